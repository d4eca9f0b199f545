"""Evaluation: encode a split (sharded over processes), retrieval metrics (R@K, mAP, mINP), ranking pages and training
curves; used by train.py, test.py and the search feature."""
