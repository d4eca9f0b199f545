"""The synthetic pedestrian dataset: attributes -> captions (attributes.py), drawings (drawing.py), and the
generator that writes them in a benchmark's raw layout (generate.py; `python -m datasets.synthetic`)."""
