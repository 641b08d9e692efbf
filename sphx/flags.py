"""The FLAGS bitmask: one registry with the real SPHEREx bit numbers.

Bit numbers, names and descriptions are those written in every real QR2 Level 2 FLAGS
header (``HIERARCH MP_<NAME> = bit / description``); QR3 (pipeline R7) adds CROSSTALK,
STREAK and SATELLITE_HALO, whose descriptions here are ours (the archive's text was not
available). Bits 3, 8, 13, 16 and 18 are unused.

SOURCE marks 40-70 % of the pixels of a real image (every pixel mapped to a catalogued
source) and is therefore never part of a default "bad pixel" mask.

The helpers work on numpy arrays, dask arrays and xarray objects alike and never
compute: they are plain bitwise operations.

Examples
--------
>>> from sphx import flags
>>> flags.describe(flags.Flag.HOT | flags.Flag.SOURCE)
['HOT', 'SOURCE']
>>> int(flags.mask("PERSIST", "OUTLIER"))
655360
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import pydantic

__all__ = [
    "DEFAULT_BAD",
    "FLAG_DTYPE",
    "REGISTRY",
    "Flag",
    "FlagInfo",
    "FlagNames",
    "cf_attrs",
    "clear_flag",
    "counts",
    "describe",
    "flag_info",
    "mask",
    "set_flag",
    "test_flag",
]

FLAG_DTYPE = np.dtype("uint32")
"""dtype of FLAGS in the cube (the FITS files store the same bits as int32)."""


@dataclass(frozen=True)
class FlagInfo:
    """One FLAGS bit.

    Parameters
    ----------
    name
        Name as in the ``MP_<NAME>`` header cards.
    bit
        Bit number (value ``1 << bit``).
    description
        One-line description (verbatim from the real header for QR2 bits).
    release
        First data release that uses the bit.
    """

    name: str
    bit: int
    description: str
    release: Literal["QR2", "QR3"] = "QR2"

    @property
    def value(self) -> int:
        return 1 << self.bit


REGISTRY: tuple[FlagInfo, ...] = (
    FlagInfo("TRANSIENT", 0, "Transient detected during SUR"),
    FlagInfo("OVERFLOW", 1, "Overflow detected during SUR"),
    FlagInfo("SUR_ERROR", 2, "Error in onboard processing"),
    FlagInfo("PHANTOM", 4, "Phantom pixel"),
    FlagInfo("REFERENCE", 5, "Reference pixel"),
    FlagInfo("NONFUNC", 6, "Permanently unusable"),
    FlagInfo("DICHROIC", 7, "Low efficiency due to dichroic"),
    FlagInfo("MISSING_DATA", 9, "Onboard data lost"),
    FlagInfo("HOT", 10, "Hot pixel"),
    FlagInfo("COLD", 11, "Anomalously low signal"),
    FlagInfo("FULLSAMPLE", 12, "Pixel full sample history is available"),
    FlagInfo("PHANMISS", 14, "Phantom correction was not applied"),
    FlagInfo("NONLINEAR", 15, "Nonlinearity correction cannot be applied reliably"),
    FlagInfo("PERSIST", 17, "Persistent charge above threshold"),
    FlagInfo("OUTLIER", 19, "Pixel flagged by Detect Outliers"),
    FlagInfo("CROSSTALK", 20, "Affected by electrical crosstalk from a bright source", "QR3"),
    FlagInfo("SOURCE", 21, "Pixel mapped to a known source"),
    FlagInfo("GHOST", 22, "Affected by a bright source inside the exposure"),
    FlagInfo("GHOST_FPA", 23, "Affected by a bright source on another detector"),
    FlagInfo("GHOST_EXT", 24, "Pixel affected by a bright source outside FOV"),
    FlagInfo("STREAK", 25, "Pixel on a satellite or debris streak", "QR3"),
    FlagInfo("BLOOM", 26, "Pixel part of a bloom artifact"),
    FlagInfo("SNOWBALL", 27, "Pixel part of a snowball artifact"),
    FlagInfo("HALO", 28, "Pixel part of a transient halo"),
    FlagInfo("SATELLITE_HALO", 29, "Pixel in the halo of a satellite streak", "QR3"),
)

Flag = enum.IntFlag("Flag", {f.name: f.value for f in REGISTRY})
Flag.__doc__ = "SPHEREx FLAGS bits as an :class:`enum.IntFlag` (``Flag.HOT | Flag.COLD``)."
Flag.__module__ = __name__

_BY_NAME = {f.name: f for f in REGISTRY}

DEFAULT_BAD = Flag(0)
"""Bits that make a pixel unusable for photometry by default.

The IRSA source-discovery tool's mask without FULLSAMPLE (which only says that the
full ramp was downlinked) and without SOURCE.
"""
for _name in ["TRANSIENT", "OVERFLOW", "SUR_ERROR", "PHANTOM", "REFERENCE", "NONFUNC", "DICHROIC", "MISSING_DATA", "HOT", "COLD", "PHANMISS", "NONLINEAR", "PERSIST", "OUTLIER"]:
    DEFAULT_BAD |= Flag[_name]


def flag_info(flag: str | int | Flag) -> FlagInfo:
    """The registry entry of one bit, given by name, by bit value or as a :class:`Flag`.

    Raises
    ------
    KeyError
        For a name or value that is not a single known bit; the message lists the names.
    """
    if isinstance(flag, str):
        info = _BY_NAME.get(flag.upper())
    else:
        value = int(flag)
        info = next((f for f in REGISTRY if f.value == value), None)
    if info is None:
        raise KeyError(f"unknown FLAGS bit {flag!r}; known: {', '.join(_BY_NAME)}")
    return info


def mask(*flags: str | int | Flag) -> Flag:
    """The combined bit mask of several flags, given by name, value or :class:`Flag`."""
    out = Flag(0)
    for f in flags:
        out |= Flag(int(f)) if not isinstance(f, str) else Flag(flag_info(f).value)
    return out


def _as_mask(flag: Any) -> np.uint32:
    if isinstance(flag, (list, tuple, set, frozenset)):
        flag = mask(*flag)
    elif isinstance(flag, str):
        flag = mask(flag)
    return FLAG_DTYPE.type(int(flag))


def set_flag(flags: Any, where: Any, flag: Any) -> Any:
    """Return ``flags`` with ``flag`` set where ``where`` is true (lazy for dask/xarray)."""
    if not hasattr(where, "astype"):
        where = np.asarray(where)
    return flags | (where.astype(FLAG_DTYPE) * _as_mask(flag))


def clear_flag(flags: Any, flag: Any) -> Any:
    """Return ``flags`` with the bits of ``flag`` cleared everywhere."""
    return flags & ~_as_mask(flag)


def test_flag(flags: Any, flag: Any = DEFAULT_BAD, *, require: Literal["any", "all"] = "any") -> Any:
    """Boolean array: which pixels carry any (or all) of the bits of ``flag``."""
    m = _as_mask(flag)
    if require == "all":
        return (flags & m) == m
    return (flags & m) != 0


test_flag.__test__ = False  # keep pytest from collecting the helper as a test


def describe(value: int | Flag) -> list[str]:
    """Names of the bits set in one FLAGS value, in bit order."""
    v = int(value)
    return [f.name for f in REGISTRY if v & f.value]


def counts(flags: np.ndarray) -> dict[str, int]:
    """Number of pixels carrying each bit (eager; use the image statistics step on cubes)."""
    a = np.asarray(flags).astype(FLAG_DTYPE, copy=False)
    return {f.name: int(np.count_nonzero(a & f.value)) for f in REGISTRY}


def cf_attrs() -> dict[str, Any]:
    """CF-convention attributes describing FLAGS, for plain xarray/netCDF readers.

    ``flag_masks``/``flag_meanings`` are CF; ``flag_bits`` and ``flag_descriptions``
    carry the SPHEREx bit numbers and header descriptions alongside.
    """
    return {
        "long_name": "SPHEREx pixel flags",
        "flag_masks": [f.value for f in REGISTRY],
        "flag_meanings": " ".join(f.name for f in REGISTRY),
        "flag_bits": [f.bit for f in REGISTRY],
        "flag_descriptions": [f.description for f in REGISTRY],
    }


def _known_names(names: tuple[str, ...]) -> tuple[str, ...]:
    for n in names:
        try:
            flag_info(n)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
    return tuple(n.upper() for n in names)


FlagNames = Annotated[tuple[str, ...], pydantic.AfterValidator(_known_names)]
"""Flag names in a step configuration, checked against the registry and upper-cased."""
