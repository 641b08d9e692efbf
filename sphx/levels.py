"""Processing levels and the units each stores.

The pipeline paper's levels map onto repository groups:

======  ==========================================================  ====================
level   content                                                     IMAGE units
======  ==========================================================  ====================
raw     on-board slopes with reference border and phantom reads     adu / s
l1      engineering units, preamplifier corrected (border kept)     electron / s
l2a     non-linearity corrected, variance, persistence; trimmed     electron / s
l2      calibrated spectral images with zodi model                  MJy / sr
======  ==========================================================  ====================

Any other name is a *custom level* (a user's own intermediate): its variables and units
are fixed by its first write and enforced afterwards.

Units strings are astropy's canonical forms, so ``astropy.units.Unit(attrs["units"])``
parses every one of them; comparisons parse both sides, so ``"MJy/sr"`` equals
``"MJy / sr"``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import astropy.units as u

__all__ = [
    "ADU_RATE",
    "ELECTRON_RATE",
    "LEVELS",
    "SURFACE_BRIGHTNESS",
    "WAVELENGTH",
    "Level",
    "get_level",
    "same_unit",
    "squared",
]

ADU_RATE = "adu / s"
ELECTRON_RATE = "electron / s"
SURFACE_BRIGHTNESS = "MJy / sr"
WAVELENGTH = "um"
DIMENSIONLESS = ""


@functools.cache
def _parse(unit: str) -> u.UnitBase:
    return u.Unit(unit, parse_strict="raise")


def squared(unit: str) -> str:
    """Canonical string of the square of ``unit`` (the units of its variance)."""
    return (_parse(unit) ** 2).to_string()


def same_unit(a: str | None, b: str | None) -> bool:
    """Whether two unit strings denote the same unit; unparsable strings never match."""
    if a is None or b is None:
        return a is b
    try:
        return _parse(str(a)) == _parse(str(b))
    except (ValueError, TypeError):
        return False


@dataclass(frozen=True)
class Level:
    """What one processing level stores.

    Parameters
    ----------
    name
        Group name in the repository.
    description
        One line for listings and attributes.
    variables
        Required pixel variables and their units.
    optional
        Pixel variables the level may hold, and their units.
    reference_pixels
        Whether images carry the reference border (raw-frame coordinates).
    custom
        True for a user-defined level whose schema comes from its first write.
    """

    name: str
    description: str
    variables: Mapping[str, str]
    optional: Mapping[str, str] = field(default_factory=dict)
    reference_pixels: bool = False
    custom: bool = False

    def units(self, variable: str) -> str | None:
        """Units a variable must have at this level (None if the level does not define it)."""
        return self.variables.get(variable, self.optional.get(variable))


LEVELS: dict[str, Level] = {
    "raw": Level(
        "raw",
        "on-board sample-up-the-ramp slopes with reference border and phantom reads",
        {"IMAGE": ADU_RATE, "FLAGS": DIMENSIONLESS},
        {"PHANTOM": ADU_RATE},
        reference_pixels=True,
    ),
    "l1": Level(
        "l1",
        "Level 1: engineering units, preamplifier corrected, reference border kept",
        {"IMAGE": ELECTRON_RATE, "FLAGS": DIMENSIONLESS},
        {"PHANTOM": ELECTRON_RATE},
        reference_pixels=True,
    ),
    "l2a": Level(
        "l2a",
        "Level 2a: non-linearity corrected, variance and persistence, reference pixels removed",
        {"IMAGE": ELECTRON_RATE, "FLAGS": DIMENSIONLESS, "VARIANCE": squared(ELECTRON_RATE)},
    ),
    "l2": Level(
        "l2",
        "Level 2: calibrated spectral images (zodiacal light modelled, not subtracted)",
        {
            "IMAGE": SURFACE_BRIGHTNESS,
            "FLAGS": DIMENSIONLESS,
            "VARIANCE": squared(SURFACE_BRIGHTNESS),
            "ZODI": SURFACE_BRIGHTNESS,
        },
    ),
}

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def get_level(name: str, *, allow_custom: bool = True) -> Level:
    """The level called ``name``; an unknown valid name gives an empty custom level.

    Raises
    ------
    KeyError
        If ``name`` is not a valid level name (lower-case letters, digits, ``_``), or is
        unknown and ``allow_custom`` is false.
    """
    if name in LEVELS:
        return LEVELS[name]
    if not allow_custom or not isinstance(name, str) or not _NAME.match(name):
        raise KeyError(
            f"unknown level {name!r}: known levels are {', '.join(LEVELS)}; custom level names "
            "are lower-case letters, digits and '_'"
        )
    return Level(name, f"custom level {name!r}", {}, custom=True)
