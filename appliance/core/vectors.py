"""The numpy side of embeddings: unit vectors, their bytes, cosine similarity, nearest neighbours.

Imported on first use by embeddings.py, router.py and cache.py: numpy costs ~120 ms of start-up, which an
appliance without an embedding model never needs to pay.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DTYPE = np.float32


def unit_rows(rows: Sequence[Sequence[float]]) -> np.ndarray:
    """Rows scaled to length 1 (cosine similarity is then a dot product); a zero row stays zero."""
    matrix = np.asarray(rows, dtype=DTYPE)
    if matrix.ndim != 2 or not matrix.shape[1]:
        raise ValueError("embeddings must be equally long, non-empty lists of numbers")
    if not np.isfinite(matrix).all():
        raise ValueError("embeddings must be finite numbers")
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms == 0, 1, norms)


def stack(vectors: Sequence[np.ndarray]) -> np.ndarray:
    return np.vstack(vectors)


def to_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=DTYPE).tobytes()


def nearest(query: np.ndarray, blobs: Sequence[bytes]) -> tuple[int, float] | None:
    """The index of the stored vector (as bytes) most similar to ``query``, and its cosine similarity.

    Blobs of another length (written with another embedding model) are never a match.
    """
    width = query.shape[0] * query.itemsize
    usable = [i for i, blob in enumerate(blobs) if len(blob) == width]
    if not usable:
        return None
    matrix = np.frombuffer(b"".join(blobs[i] for i in usable), dtype=DTYPE).reshape(len(usable), -1)
    similarities = matrix @ query
    best = int(np.argmax(similarities))
    return usable[best], float(similarities[best])


def best_per_group(matrix: np.ndarray, query: np.ndarray, groups: Sequence[int]) -> list[float]:
    """Per group, the highest cosine similarity of ``query`` to the group's rows (``groups[i]``: row i's group;
    groups are numbered 0.. in order)."""
    similarities = matrix @ query
    out = np.full(max(groups) + 1, -np.inf, dtype=DTYPE)
    np.maximum.at(out, np.asarray(groups), similarities)
    return [float(v) for v in out]
