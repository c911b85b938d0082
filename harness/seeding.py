"""Named random streams: one helper for every seeded generator the harness and methods draw from.

A stream is named by a seed and a tuple of keys (strings are hashed with CRC-32, which, unlike Python's hash(),
is the same in every process and on every machine), so two streams with different names are independent while
a rerun with the same names draws the same numbers.
"""
from __future__ import annotations

import zlib

import numpy as np


def stable_key(text: str) -> int:
    """A process-independent integer for seeding from a name."""
    return zlib.crc32(text.encode("utf-8"))


def stream(seed: int, *keys: int | str) -> np.random.Generator:
    """The random stream named by `seed` and `keys` (ints as they are, strings by stable_key)."""
    return np.random.default_rng([int(seed), *(stable_key(k) if isinstance(k, str) else int(k) for k in keys)])
