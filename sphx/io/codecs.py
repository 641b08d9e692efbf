"""Zarr compression of sphx arrays."""

from __future__ import annotations

import numpy as np
from zarr.codecs import BloscCodec

__all__ = ["compressors_for"]


def compressors_for(dtype: np.dtype) -> tuple[BloscCodec, ...]:
    """Blosc-LZ4: the fastest to decode of the codecs compared in performance-anchors.md
    (floats byte-shuffled, integer masks bit-shuffled)."""
    shuffle = "bitshuffle" if np.dtype(dtype).kind in "iub" else "shuffle"
    return (BloscCodec(cname="lz4", clevel=5, shuffle=shuffle),)
