"""A set of row ids at 16 bytes an id: what a run keeps in memory per row, whatever its size.

A Python set of the pipeline's 16-character ids costs ~130 bytes an id; at the paper's 65,000 prompts the
stores' done ids alone grew a run by ~17 MB. Here an id is its 128-bit BLAKE2b digest, kept in a sorted
numpy array, with the latest additions in a small set merged in batches. Two ids share a digest with a
chance of about n^2 / 2^129 (1e-21 at a billion ids): never, for any run.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np

MERGE_AT = 4096   # recent additions held as bytes (~90 B each) before they join the sorted array


def _digest(row_id: str) -> bytes:
    return hashlib.blake2b(row_id.encode("utf-8"), digest_size=16).digest()


class IdSet:
    """Membership, add and len; no iteration (the ids themselves are not kept: read them from the file)."""

    def __init__(self, ids: Iterable[str] = ()):
        self._sorted = np.empty(0, dtype="S16")
        self._recent: set[bytes] = set()
        for row_id in ids:
            self.add(row_id)

    def _in_sorted(self, key: bytes) -> bool:
        found = self._sorted
        if not len(found):
            return False
        i = int(found.searchsorted(key))
        # numpy hands out an S16 element without its trailing NUL bytes: compare the key likewise
        return i < len(found) and found[i] == key.rstrip(b"\0")

    def __contains__(self, row_id: object) -> bool:
        if not isinstance(row_id, str):
            return False
        key = _digest(row_id)
        return key in self._recent or self._in_sorted(key)

    def add(self, row_id: str) -> None:
        key = _digest(row_id)
        if key in self._recent or self._in_sorted(key):
            return
        self._recent.add(key)
        if len(self._recent) >= MERGE_AT:
            merged = np.concatenate([self._sorted, np.array(list(self._recent), dtype="S16")])
            merged.sort()
            self._sorted, self._recent = merged, set()

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)
