"""test.py --save_features: what a split was ranked with, as one .npz file (docs/training.md lists its keys).

Only plain arrays go in (float32, int64 and NumPy unicode strings), so `np.load(path)` reads it without pickle.
"""
from __future__ import annotations

import os

import numpy as np

from evaluation.encode import EncodedSplit
from models.cfine import retrieval_features
from utils.files import atomic_write

FEATURE_KEYS = ("gallery", "query", "gallery_pids", "query_pids", "gallery_paths", "query_captions")


def feature_arrays(encoded: EncodedSplit, gallery_paths: list[str], query_captions: list[str]) -> dict[str, np.ndarray]:
    """The ranked features (retrieval_features' 'concat' mode, as score_split's metrics: L2-normalised, float32;
    N x D gallery, M x D queries), their pids, the gallery's image paths and the query captions, in dataset order."""
    return {
        "gallery": retrieval_features(encoded.gallery, "concat").float().cpu().numpy(),
        "query": retrieval_features(encoded.queries, "concat").float().cpu().numpy(),
        "gallery_pids": encoded.gallery_pids.cpu().numpy().astype(np.int64),
        "query_pids": encoded.query_pids.cpu().numpy().astype(np.int64),
        "gallery_paths": np.array(gallery_paths, dtype=np.str_),
        "query_captions": np.array(query_captions, dtype=np.str_),
    }


def save_features(path: str | os.PathLike, encoded: EncodedSplit, gallery_paths: list[str],
                  query_captions: list[str]) -> None:
    """Write feature_arrays to path as an uncompressed .npz, atomically (never through a link planted at path)."""
    arrays = feature_arrays(encoded, gallery_paths, query_captions)
    atomic_write(path, lambda f: np.savez(f, **arrays))
