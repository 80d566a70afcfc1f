"""Embedding vectors: unit float32 rows, their bytes, cosine similarity and nearest neighbours.

Vectors are ``array('f')`` rows scaled to length 1, so cosine similarity is a dot product; the products are
taken by SimSIMD over the rows' bytes (a 0.6 MB library where numpy and its OpenBLAS would add 16 MB to the
one-file binary and ~0.4 s to every start). Imported on first use by embeddings.py, router.py and cache.py.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence

import simsimd

FLOAT = "f"  # float32: what the rows are stored and compared as
WIDTH = array(FLOAT).itemsize


class Matrix:
    """Rows of equal length, side by side in one buffer (what a dot product over many rows wants)."""

    __slots__ = ("rows", "view")

    def __init__(self, data: bytes, dims: int) -> None:
        self.rows = len(data) // (dims * WIDTH)
        self.view = memoryview(data).cast(FLOAT, shape=[self.rows, dims])

    def dots(self, query: array) -> list[float]:
        """Each row's dot product with ``query`` (its cosine similarity, the rows being unit vectors)."""
        one = memoryview(query.tobytes()).cast(FLOAT, shape=[1, len(query)])
        return memoryview(simsimd.cdist(one, self.view, metric="dot")).tolist()[0]


def unit_rows(rows: Sequence[Sequence[float]]) -> list[array]:
    """Rows scaled to length 1 (cosine similarity is then a dot product); a zero row stays zero."""
    if not rows or not all(isinstance(row, Sequence) and row and len(row) == len(rows[0]) for row in rows):
        raise ValueError("embeddings must be equally long, non-empty lists of numbers")
    out = []
    for row in rows:
        try:
            norm = math.hypot(*row)
        except TypeError:
            raise ValueError("embeddings must be lists of numbers") from None
        if not math.isfinite(norm):
            raise ValueError("embeddings must be finite numbers")
        out.append(array(FLOAT, [x / norm for x in row] if norm else row))
    return out


def stack(vectors: Sequence[array]) -> Matrix:
    return Matrix(b"".join(vector.tobytes() for vector in vectors), len(vectors[0]))


def to_bytes(vector: array) -> bytes:
    return vector.tobytes()


def nearest(query: array, blobs: Sequence[bytes]) -> tuple[int, float] | None:
    """The index of the stored vector (as bytes) most similar to ``query``, and its cosine similarity.

    Blobs of another length (written with another embedding model) are never a match.
    """
    width = len(query) * WIDTH
    usable = [i for i, blob in enumerate(blobs) if len(blob) == width]
    if not usable:
        return None
    similarities = Matrix(b"".join(blobs[i] for i in usable), len(query)).dots(query)
    best = max(range(len(usable)), key=similarities.__getitem__)
    return usable[best], similarities[best]


def best_per_group(matrix: Matrix, query: array, groups: Sequence[int]) -> list[float]:
    """Per group, the highest cosine similarity of ``query`` to the group's rows (``groups[i]``: row i's group;
    groups are numbered 0.. in order)."""
    out = [-math.inf] * (max(groups) + 1)
    for group, similarity in zip(groups, matrix.dots(query), strict=True):
        out[group] = max(out[group], similarity)
    return out
