"""Orbital elements: the table schema, and readers of the MPC's ``MPCORB.DAT`` and ``CometEls.txt``.

Solar-system objects enter the pipeline as one Arrow table of heliocentric osculating
elements, :data:`ELEMENTS_SCHEMA`, one row per object. Two forms of the same orbit are
accepted per row:

* **mean-anomaly form** (minor planets, as in ``MPCORB.DAT``): ``a_au``, ``e``,
  ``mean_anomaly_deg`` at ``epoch_mjd_tt``;
* **perihelion form** (comets, as in ``CometEls.txt``): ``q_au``, ``e``,
  ``tp_mjd_tt``. Where ``q_au`` and ``tp_mjd_tt`` are both finite they are used.

Angles (``incl_deg``, ``node_deg``, ``peri_deg``) refer to the J2000 ecliptic and
equinox (in practice the ICRF rotated by the obliquity 84381.448", see
:mod:`sphx.kernels.kepler`); times are TT Modified Julian Dates.

Magnitudes: for minor planets ``H`` and ``G`` are the IAU H-G absolute magnitude and
slope (``G`` defaults to 0.15 where the file leaves it blank, as the MPC does); for
comets (``comet`` true) they are the total absolute magnitude and the activity index
of the MPC's law ``m = H + 5 log10(delta) + 2.5 G log10(r)``.

Formats: https://minorplanetcenter.net/iau/info/MPOrbitFormat.html and
https://minorplanetcenter.net/iau/info/CometOrbitFormat.html (the "Ephemerides and
Orbital Elements" layout of ``CometEls.txt``); packed designations and dates as in
https://minorplanetcenter.net/iau/info/PackedDes.html, including the ``~`` numbers
above 619999 and the ``_`` extended provisional designations.
"""

from __future__ import annotations

import gzip
import io
import itertools
import os
from collections.abc import Iterable, Iterator
from typing import Any

import erfa
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import OrbitElementsError

__all__ = [
    "ELEMENTS_SCHEMA",
    "empty_elements",
    "read_comet_els",
    "read_mpcorb",
    "unpack_designation",
    "unpack_epoch",
]


def _field(name: str, type_: pa.DataType, unit: str | None, doc: str) -> pa.Field:
    meta = {"doc": doc, **({"unit": unit} if unit else {})}
    return pa.field(name, type_, metadata=meta)


ELEMENTS_SCHEMA = pa.schema(
    [
        _field("designation", pa.string(), None, "unpacked designation: '1', '2005 FG23', '88P', 'C/2020 F3'"),
        _field("packed", pa.string(), None, "MPC packed designation"),
        _field("name", pa.string(), None, "readable designation or name from the file"),
        _field("epoch_mjd_tt", pa.float64(), "d", "osculation epoch, TT MJD"),
        _field("a_au", pa.float64(), "AU", "semi-major axis (negative for hyperbolas; NaN where not given)"),
        _field("q_au", pa.float64(), "AU", "perihelion distance (NaN where not given)"),
        _field("e", pa.float64(), None, "eccentricity"),
        _field("incl_deg", pa.float64(), "deg", "inclination to the J2000 ecliptic"),
        _field("node_deg", pa.float64(), "deg", "longitude of the ascending node, J2000"),
        _field("peri_deg", pa.float64(), "deg", "argument of perihelion, J2000"),
        _field("mean_anomaly_deg", pa.float64(), "deg", "mean anomaly at the epoch (NaN where not given)"),
        _field("tp_mjd_tt", pa.float64(), "d", "time of perihelion, TT MJD (NaN where not given)"),
        _field("H", pa.float64(), "mag", "absolute magnitude (comets: total, M1)"),
        _field("G", pa.float64(), None, "H-G slope parameter (comets: activity index n, K1 = 2.5 n)"),
        _field("comet", pa.bool_(), None, "true: comet magnitude law"),
    ],
    metadata={"frame": "heliocentric, J2000 ecliptic and equinox", "time_scale": "TT"},
)
"""Schema of the orbital-elements table (units in each field's metadata)."""

_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_B62_VALUE = {c: i for i, c in enumerate(_B62)}
_ORDER_LETTERS = "ABCDEFGHJKLMNOPQRSTUVWXYZ"  # second letter of provisional designations (no I)
_SURVEYS = {"PLS": "P-L", "T1S": "T-1", "T2S": "T-2", "T3S": "T-3"}
_CENTURY = {"I": 18, "J": 19, "K": 20}
_MPCORB_WIDTH = 202
_MPCORB_MIN = 103  # a line must reach the semi-major axis
_COMET_WIDTH = 168
_COMET_MIN = 79  # a line must reach the inclination
_CHUNK = 100_000
_HEADER_LINES = 200  # the header's closing dashes are looked for this far


def empty_elements() -> pa.Table:
    """An elements table with no rows."""
    return ELEMENTS_SCHEMA.empty_table()


def _base62(text: str) -> int:
    value = 0
    for ch in text:
        value = value * 62 + _B62_VALUE[ch]
    return value


def unpack_designation(packed: str) -> str:
    """The readable form of an MPC packed minor-planet designation.

    ``'00001'`` -> ``'1'``, ``'A0345'`` -> ``'100345'``, ``'~0000'`` -> ``'620000'``,
    ``'K05F23G'`` -> ``'2005 FG23'``, ``'PLS2040'`` -> ``'2040 P-L'``, ``'_QC0000'`` ->
    ``'2026 CA620'``. Anything else is returned stripped, unchanged.
    """
    p = packed.strip()
    try:
        if len(p) == 5:
            if p.isdigit():
                return str(int(p))
            if p[0] == "~":
                return str(620_000 + _base62(p[1:]))
            if p[0].isalpha() and p[1:].isdigit():
                return str(_B62_VALUE[p[0]] * 10_000 + int(p[1:]))
        elif len(p) == 7:
            if p[:3] in _SURVEYS and p[3:].isdigit():
                return f"{int(p[3:])} {_SURVEYS[p[:3]]}"
            if p[0] in _CENTURY and p[1:3].isdigit() and p[5].isdigit():
                year = _CENTURY[p[0]] * 100 + int(p[1:3])
                cycle = _B62_VALUE[p[4]] * 10 + int(p[5])
                return f"{year} {p[3]}{p[6]}{cycle if cycle else ''}"
            if p[0] == "_":
                order = _base62(p[3:]) + 15_501  # extended scheme: order after 15500
                letter, cycle = _ORDER_LETTERS[(order - 1) % 25], (order - 1) // 25
                return f"{2000 + _B62_VALUE[p[1]]} {p[2]}{letter}{cycle}"
    except (KeyError, ValueError, IndexError):
        pass
    return p


def _unpack_comet(number: str, kind: str, provisional: str) -> str:
    """Readable comet designation: ``'88P'``, ``'C/2020 F3'``, ``'P/1994 P1-B'``."""
    number, provisional = number.strip(), provisional.strip()
    fragment = ""
    if provisional and provisional[-1].islower():
        fragment = "-" + provisional[-1].upper()
    if number.isdigit() and int(number) > 0:
        return f"{int(number)}{kind}{fragment}"
    p = provisional
    if len(p) == 7 and p[0] in _CENTURY and p[1:3].isdigit():
        try:
            order = _B62_VALUE[p[4]] * 10 + int(p[5])
            return f"{kind}/{_CENTURY[p[0]] * 100 + int(p[1:3])} {p[3]}{order}{fragment}"
        except (KeyError, ValueError):
            pass
    if p:
        return f"{kind}/{unpack_designation(p)}"
    return kind


def _mjd(year: np.ndarray, month: np.ndarray, day: np.ndarray) -> np.ndarray:
    """MJD of (year, month, day with fraction); NaN where the date does not exist."""
    year = np.asarray(year, dtype=np.int64)
    month = np.asarray(month, dtype=np.int64)
    day = np.asarray(day, dtype=np.float64)
    out = np.full(year.shape, np.nan)
    ok = (month >= 1) & (month <= 12) & (day >= 0.0) & (day < 32.0)
    if np.any(ok):
        whole = np.floor(day[ok]).astype(np.int64)
        _, mjd0 = erfa.cal2jd(year[ok].astype(np.int32), month[ok].astype(np.int32), np.ones(ok.sum(), np.int32))
        out[ok] = mjd0 + whole - 1 + (day[ok] - whole)
    return out


def unpack_epoch(packed: str) -> float:
    """TT MJD of an MPC packed date such as ``'K2555'`` (2025 May 5.0).

    Raises
    ------
    OrbitElementsError
        If ``packed`` is not a packed date.
    """
    p = packed.strip()
    if len(p) != 5 or p[0] not in _CENTURY or not p[1:3].isdigit():
        raise OrbitElementsError(f"packed epoch {packed!r} is not of the form CYYMD (e.g. 'K2555')")
    try:
        month, day = _B62_VALUE[p[3]], _B62_VALUE[p[4]]
    except KeyError:
        raise OrbitElementsError(f"packed epoch {packed!r} has an invalid month or day character") from None
    if not (1 <= month <= 12 and 1 <= day <= 31):
        raise OrbitElementsError(f"packed epoch {packed!r} has month {month} or day {day} out of range")
    return float(_mjd(np.array([_CENTURY[p[0]] * 100 + int(p[1:3])]), np.array([month]), np.array([day]))[0])


# --- fixed-width parsing -------------------------------------------------------------

def _lines(source: Any) -> tuple[Iterator[str], str, Any]:
    """(lines, name for messages, what to close)."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        opener = gzip.open if path.endswith(".gz") else open
        f = opener(path, "rt", encoding="ascii", errors="replace")
        return iter(f), path, f
    if isinstance(source, io.IOBase) or hasattr(source, "read"):
        name = getattr(source, "name", "<stream>")
        return (ln.decode("ascii", "replace") if isinstance(ln, bytes) else ln for ln in source), str(name), None
    if isinstance(source, Iterable):
        return iter(source), "<lines>", None
    raise TypeError(f"cannot read orbital elements from {type(source).__name__}; give a path, a file or lines")


class _Block:
    """A chunk of fixed-width lines as a (rows, width) byte array, 1-based columns."""

    def __init__(self, lines: list[str], numbers: list[int], width: int, where: str) -> None:
        text = "".join(ln.ljust(width)[:width] for ln in lines)
        self.bytes = np.frombuffer(text.encode("ascii", "replace"), np.uint8).reshape(len(lines), width)
        self.lines, self.numbers, self.where = lines, numbers, where

    def text(self, first: int, last: int) -> np.ndarray:
        w = last - first + 1
        return np.ascontiguousarray(self.bytes[:, first - 1:last]).view(f"S{w}").ravel()

    def blank(self, first: int, last: int) -> np.ndarray:
        return np.all(self.bytes[:, first - 1:last] == 0x20, axis=1)

    def strings(self, first: int, last: int) -> list[str]:
        return self.arrow_strings(first, last).to_pylist()

    def arrow_strings(self, first: int, last: int) -> pa.Array:
        """Column as stripped Arrow strings (the bytes are ASCII: '?' replaced the rest)."""
        w = last - first + 1
        col = np.ascontiguousarray(self.bytes[:, first - 1:last])
        raw = pa.FixedSizeBinaryArray.from_buffers(pa.binary(w), col.shape[0], [None, pa.py_buffer(col)])
        return pc.utf8_trim_whitespace(raw.cast(pa.binary()).cast(pa.string()))

    def fail(self, row: int, what: str, first: int, last: int) -> OrbitElementsError:
        ln = self.lines[row]
        return OrbitElementsError(
            f"{self.where}: line {self.numbers[row]}: cannot read {what} from columns {first}-{last} "
            f"({ln[first - 1:last]!r}) of {ln.rstrip()[:60]!r}...")

    def floats(self, what: str, first: int, last: int, *, blank: float | None = None) -> np.ndarray:
        """Column as float64; blank fields become ``blank`` (an error if ``None``)."""
        col = self.text(first, last)
        empty = self.blank(first, last)
        out = np.full(col.shape, np.nan if blank is None else blank)
        if blank is None and np.any(empty):
            raise self.fail(int(np.flatnonzero(empty)[0]), what, first, last)
        fill = ~empty
        try:
            out[fill] = col[fill].astype(np.float64)
        except ValueError:
            for row in np.flatnonzero(fill):
                try:
                    float(col[row])
                except ValueError:
                    raise self.fail(int(row), what, first, last) from None
            raise
        return out

    def ints(self, what: str, first: int, last: int) -> np.ndarray:
        return self.floats(what, first, last).astype(np.int64)


def _chunks(lines: Iterator[str], where: str, width: int, minimum: int, *, header: bool) -> Iterator[_Block]:
    """Blocks of data lines (blank lines dropped, short ones refused), 1-based line numbers."""
    numbered: Iterator[tuple[int, str]] = enumerate(lines, start=1)
    if header:
        # MPCORB.DAT opens with free text closed by a line of dashes; extracts (NEA.txt...)
        # have none, and then every line is data
        head = list(itertools.islice(numbered, _HEADER_LINES))
        dash = next((i for i, (_, ln) in enumerate(head) if ln.startswith("-----")), -1)
        numbered = itertools.chain(head[dash + 1:], numbered)
    pending: list[str] = []
    numbers: list[int] = []
    for number, raw in numbered:
        line = raw.rstrip()
        if not line:
            continue
        if len(line) < minimum:
            raise OrbitElementsError(f"{where}: line {number}: {len(line)} characters, a record needs at least "
                                     f"{minimum} ({line.strip()[:60]!r})")
        pending.append(line)
        numbers.append(number)
        if len(pending) >= _CHUNK:
            yield _Block(pending, numbers, width, where)
            pending, numbers = [], []
    if pending:
        yield _Block(pending, numbers, width, where)


def _check_rows(block: _Block, cols: dict[str, np.ndarray]) -> None:
    e = cols["e"]
    for what, bad, span in (
        ("eccentricity (must be >= 0)", ~(e >= 0.0), (71, 79)),
        ("inclination (must be 0..180 deg)", ~((cols["incl_deg"] >= 0.0) & (cols["incl_deg"] <= 180.0)), (60, 68)),
    ):
        if np.any(bad):
            raise block.fail(int(np.flatnonzero(bad)[0]), what, *span)


def _table(columns: dict[str, Any]) -> pa.Table:
    return pa.Table.from_pydict({f.name: columns[f.name] for f in ELEMENTS_SCHEMA}, schema=ELEMENTS_SCHEMA)


def read_mpcorb(source: str | os.PathLike[str] | Iterable[str]) -> pa.Table:
    """Read minor-planet orbits in the MPC's export format (``MPCORB.DAT``).

    Parameters
    ----------
    source
        A path (``.gz`` read compressed), an open text file or an iterable of lines.
        The free-text header of ``MPCORB.DAT`` (up to its line of dashes) and blank
        lines are skipped.

    Returns
    -------
    pyarrow.Table
        :data:`ELEMENTS_SCHEMA`, mean-anomaly form (``q_au``, ``tp_mjd_tt`` NaN).

    Raises
    ------
    OrbitElementsError
        Naming the file, line number and columns of the first record that cannot be read.
    """
    lines, where, closing = _lines(source)
    pieces = []
    try:
        for block in _chunks(lines, where, _MPCORB_WIDTH, _MPCORB_MIN, header=True):
            cols: dict[str, Any] = {
                "mean_anomaly_deg": block.floats("mean anomaly", 27, 35),
                "peri_deg": block.floats("argument of perihelion", 38, 46),
                "node_deg": block.floats("longitude of the node", 49, 57),
                "incl_deg": block.floats("inclination", 60, 68),
                "e": block.floats("eccentricity", 71, 79),
                "a_au": block.floats("semi-major axis", 93, 103),
                "H": block.floats("absolute magnitude H", 9, 13, blank=np.nan),
                "G": block.floats("slope parameter G", 15, 19, blank=0.15),
            }
            epochs = block.arrow_strings(21, 25).dictionary_encode()  # a handful of distinct epochs
            values = []
            for p in epochs.dictionary.to_pylist():
                try:
                    values.append(unpack_epoch(p))
                except OrbitElementsError:
                    row = epochs.indices.to_pylist().index(len(values))
                    raise block.fail(row, "packed epoch", 21, 25) from None
            cols["epoch_mjd_tt"] = np.asarray(values, dtype=np.float64)[epochs.indices.to_numpy()]
            _check_rows(block, cols)
            bad = ~(cols["a_au"] > 0.0) & (cols["e"] < 1.0)
            if np.any(bad):
                raise block.fail(int(np.flatnonzero(bad)[0]), "semi-major axis (must be > 0 for e < 1)", 93, 103)
            packed = block.strings(1, 7)
            if any(not p for p in packed):
                raise block.fail(packed.index(""), "designation", 1, 7)
            n = len(packed)
            cols.update({
                "packed": packed,
                "designation": [unpack_designation(p) for p in packed],
                "name": block.arrow_strings(167, 194),
                "q_au": np.full(n, np.nan),
                "tp_mjd_tt": np.full(n, np.nan),
                "comet": np.zeros(n, bool),
            })
            pieces.append(_table(cols))
    finally:
        if closing is not None:
            closing.close()
    return pa.concat_tables(pieces) if pieces else empty_elements()


def read_comet_els(source: str | os.PathLike[str] | Iterable[str]) -> pa.Table:
    """Read comet orbits in the MPC's ``CometEls.txt`` layout.

    Parameters
    ----------
    source
        A path (``.gz`` read compressed), an open text file or an iterable of lines.

    Returns
    -------
    pyarrow.Table
        :data:`ELEMENTS_SCHEMA`, perihelion form (``q_au``, ``tp_mjd_tt``); ``a_au``
        is ``q / (1 - e)`` (NaN for ``e = 1``) and ``mean_anomaly_deg`` NaN; the epoch
        is the perihelion time where the file gives none; ``comet`` is true.

    Raises
    ------
    OrbitElementsError
        Naming the file, line number and columns of the first record that cannot be read.
    """
    lines, where, closing = _lines(source)
    pieces = []
    try:
        for block in _chunks(lines, where, _COMET_WIDTH, _COMET_MIN, header=False):
            year = block.ints("perihelion year", 15, 18)
            month = block.ints("perihelion month", 20, 21)
            day = block.floats("perihelion day", 23, 29)
            tp = _mjd(year, month, day)
            if np.any(~np.isfinite(tp)):
                raise block.fail(int(np.flatnonzero(~np.isfinite(tp))[0]), "perihelion date", 15, 29)
            cols: dict[str, Any] = {
                "q_au": block.floats("perihelion distance", 31, 39),
                "e": block.floats("eccentricity", 42, 49),
                "peri_deg": block.floats("argument of perihelion", 52, 59),
                "node_deg": block.floats("longitude of the node", 62, 69),
                "incl_deg": block.floats("inclination", 72, 79),
                "H": block.floats("absolute magnitude", 92, 95, blank=np.nan),
                "G": block.floats("slope parameter", 97, 100, blank=np.nan),
                "tp_mjd_tt": tp,
            }
            _check_rows(block, cols)
            bad = ~(cols["q_au"] > 0.0)
            if np.any(bad):
                raise block.fail(int(np.flatnonzero(bad)[0]), "perihelion distance (must be > 0)", 31, 39)
            epoch = np.array(tp)
            has_epoch = ~block.blank(82, 89)
            if np.any(has_epoch):
                ey, em, ed = (block.floats("epoch", a, b, blank=0.0)[has_epoch] for a, b in ((82, 85), (86, 87),
                                                                                            (88, 89)))
                epoch[has_epoch] = _mjd(ey, em, ed)
                if np.any(~np.isfinite(epoch)):
                    raise block.fail(int(np.flatnonzero(~np.isfinite(epoch))[0]), "epoch", 82, 89)
            e = cols["e"]
            with np.errstate(divide="ignore", invalid="ignore"):
                a = np.where(e == 1.0, np.nan, cols["q_au"] / (1.0 - e))
            number, kind, prov = block.strings(1, 4), block.strings(5, 5), block.strings(6, 12)
            n = len(number)
            cols.update({
                "epoch_mjd_tt": epoch,
                "a_au": a,
                "mean_anomaly_deg": np.full(n, np.nan),
                "packed": [(f"{nu}{k}{p}" if nu else f"{k}{p}") for nu, k, p in zip(number, kind, prov, strict=True)],
                "designation": [_unpack_comet(nu, k, p) for nu, k, p in zip(number, kind, prov, strict=True)],
                "name": block.arrow_strings(103, 158),
                "comet": np.ones(n, bool),
            })
            pieces.append(_table(cols))
    finally:
        if closing is not None:
            closing.close()
    return pa.concat_tables(pieces) if pieces else empty_elements()
