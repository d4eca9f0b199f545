"""The photo search feature: the index of a photo folder, exact top-k ranking, text queries, the web page and server
(search.py is its command line)."""
