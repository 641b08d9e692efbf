"""SPHEREx observation ids and the integer keys derived from them.

An observation id names one pointing of the whole focal plane, e.g.
``2025W51_1A_0684_2``: year 2025, week 51, planning period ``1A`` (one per ~3.5 days),
large-slew (target) counter 0684, small-slew step 2. The archive's integer exposure id
``EXPIDN`` appends the detector: ``2025W51_1A_0684_2`` on D3 is ``202551101068423``
(the letter becomes two digits, A = 01).

sphx labels the ``obs`` dimension with :func:`obs_key`, the ``EXPIDN`` without its
detector digit: an int64 that is unique per exposure, deterministic (re-ingesting the
same exposure gives the same key) and cheap to store, while the string id is kept as the
``obsid`` coordinate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .errors import ObservationIdError

__all__ = ["ObservationId", "expidn", "obs_key", "obsid_from_key", "parse_obsid"]

_PATTERN = re.compile(r"^(\d{4})W(\d{2})_(\d)([A-Z])_(\d{4})_(\d)$")


@dataclass(frozen=True, order=True)
class ObservationId:
    """The parts of an observation id.

    Parameters
    ----------
    year, week
        ISO year and week of the planning period.
    period
        Planning-period digit within the week.
    letter
        Planning-period letter (``A``, ``B``, ...).
    target
        Large-slew counter within the planning period.
    step
        Small-slew step within the target group (1-9).
    """

    year: int
    week: int
    period: int
    letter: str
    target: int
    step: int

    def __str__(self) -> str:
        return f"{self.year:04d}W{self.week:02d}_{self.period}{self.letter}_{self.target:04d}_{self.step}"

    @property
    def key(self) -> int:
        return obs_key(str(self))

    @property
    def planning_period(self) -> str:
        """The planning-period label, e.g. ``2025W51_1A``."""
        return f"{self.year:04d}W{self.week:02d}_{self.period}{self.letter}"


def parse_obsid(obsid: str) -> ObservationId:
    """Split an observation id into its parts.

    Raises
    ------
    ObservationIdError
        If ``obsid`` is not of the form ``YYYYWww_PL_NNNN_S``.
    """
    m = _PATTERN.match(str(obsid)) if isinstance(obsid, (str, np.str_)) else None
    if m is None:
        raise ObservationIdError(obsid)
    year, week, period, letter, target, step = m.groups()
    return ObservationId(int(year), int(week), int(period), letter, int(target), int(step))


def obs_key(obsid: str) -> int:
    """The int64 key of an observation id (``EXPIDN`` without the detector digit)."""
    o = parse_obsid(obsid)
    letter = ord(o.letter) - ord("A") + 1
    return int(f"{o.year:04d}{o.week:02d}{o.period}{letter:02d}{o.target:04d}{o.step}")


def obsid_from_key(key: int) -> str:
    """Invert :func:`obs_key`."""
    s = f"{int(key):014d}"
    if len(s) != 14 or not 1 <= int(s[7:9]) <= 26:
        raise ObservationIdError(key)
    letter = chr(ord("A") + int(s[7:9]) - 1)
    return str(ObservationId(int(s[:4]), int(s[4:6]), int(s[6]), letter, int(s[9:13]), int(s[13])))


def expidn(obsid: str, detector: int) -> int:
    """The archive's integer exposure id ``EXPIDN`` of one detector image."""
    if not 1 <= int(detector) <= 9:
        raise ValueError(f"detector must be 1-9, got {detector!r}")
    return obs_key(obsid) * 10 + int(detector)
