"""FITS at the byte level: render header cards, write and scan multi-extension files.

astropy's ``Card`` objects cost ~60 us each to build, verify and format; a spectral image
has ~1300 cards, so building them costs more than writing 70 MB of pixels. Here cards are
rendered straight to their 80-character images (exactly as astropy formats them, which the
tests check card by card), pixels are written big-endian with one copy, and files are
scanned block by block for their HDU layout without parsing every card. Full header
semantics stay with astropy (:meth:`Scanned.header` is ``fits.Header.fromstring``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
from astropy.io import fits

from ...errors import FitsFormatError

__all__ = ["BLOCK", "Extension", "Scanned", "card", "header_from_cards", "read_section", "render", "scan",
           "write_fits"]

BLOCK = 2880
_CARD = 80
_COMMENTARY = ("HISTORY", "COMMENT", "")
_BITPIX = {8: np.dtype("u1"), 16: np.dtype(">i2"), 32: np.dtype(">i4"), 64: np.dtype(">i8"),
           -32: np.dtype(">f4"), -64: np.dtype(">f8")}

Card = tuple[str, Any, str]


# ---------------------------------------------------------------------------------------
# Cards
# ---------------------------------------------------------------------------------------


def _float(value: float) -> str:
    s = str(value).replace("e", "E")
    if len(s) > 20:  # astropy keeps the exponent and shortens the significand
        i = s.find("E")
        s = s[:20] if i < 0 else s[: 20 - (len(s) - i)] + s[i:]
    return s


def _value(value: Any) -> str | None:
    """The value field as astropy writes it, or None where astropy's own Card is needed."""
    if isinstance(value, str):
        if not value:
            return "''"
        if not value.isascii() or not value.isprintable():
            return None
        quoted = "'{:8}'".format(value.replace("'", "''"))
        return f"{quoted:20}"
    if isinstance(value, (bool, np.bool_)):
        return f"{'T' if value else 'F':>20}"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):>20d}"
    if isinstance(value, (float, np.floating)):
        return f"{_float(value):>20}" if math.isfinite(value) else None
    return None


def card(key: str, value: Any, comment: str = "") -> list[str]:
    """The 80-character card image(s) of one keyword, as ``str(fits.Card(...))`` gives them.

    Keys longer than 8 characters or containing spaces become ``HIERARCH`` cards; HISTORY
    and COMMENT text longer than 72 characters continues on further cards; long string
    values (CONTINUE) and anything unusual are left to astropy.
    """
    key = key.upper()
    if key in _COMMENTARY:
        text = str(value)
        return [f"{key:8}{text[i:i + 72]:72}" for i in range(0, max(len(text), 1), 72)]
    hierarch = len(key) > 8 or " " in key
    val = _value(value)
    if val is None or not comment.isascii():
        return _astropy_card(key, value, comment, hierarch)
    if hierarch:
        keyword, val = f"HIERARCH {key} ", val.strip()
        if len(keyword) + 2 + len(val) == _CARD + 1:  # astropy drops the space before '='
            keyword = keyword[:-1]
    else:
        keyword = f"{key:8}"
    out = f"{keyword}= {val}" + (f" / {comment}" if comment else "")
    if len(out) <= _CARD:
        return [f"{out:80}"]
    if isinstance(value, str) and len(val) > _CARD - len(keyword) - 2:
        return _astropy_card(key, value, comment, hierarch)
    return [out[:_CARD]]  # astropy truncates an over-long comment


def _astropy_card(key: str, value: Any, comment: str, hierarch: bool) -> list[str]:
    image = str(fits.Card(f"HIERARCH {key}" if hierarch else key, value, comment))
    return [image[i:i + _CARD] for i in range(0, len(image), _CARD)]


def render(cards: Iterable[Card]) -> list[str]:
    """Card images of ``(key, value, comment)`` triples; None and non-finite float values
    are left out (FITS cannot hold NaN: a missing card reads back as NaN)."""
    out: list[str] = []
    for key, value, comment in cards:
        if value is None or (isinstance(value, (float, np.floating)) and not math.isfinite(value)):
            continue
        out += card(key, value, comment)
    return out


def header_from_cards(images: Sequence[str]) -> fits.Header:
    """An astropy Header holding the rendered cards (parsed lazily by astropy)."""
    return fits.Header.fromstring("".join(images))


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Extension:
    """One extension to write: rendered non-structural cards and its data.

    ``data`` is an image array (written big-endian in its own dtype); ``columns`` instead
    makes a one-row binary table of ``(name, vector, tdim)`` fixed-length array columns.
    """

    cards: Sequence[str]
    data: np.ndarray | None = None
    columns: Sequence[tuple[str, np.ndarray, str]] = field(default_factory=tuple)


_TFORM = {np.dtype(">i2"): "I", np.dtype(">i4"): "J", np.dtype(">i8"): "K", np.dtype(">f4"): "E",
          np.dtype(">f8"): "D", np.dtype("u1"): "B"}


def _checked(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    if a.dtype.kind == "b":
        raise TypeError("boolean arrays have no FITS image type")
    if a.dtype.kind == "u" and a.dtype.itemsize > 1:
        raise TypeError(f"unsigned {a.dtype} needs BZERO: view it as signed before writing")
    return a


def _padded_header(images: Sequence[str]) -> bytes:
    text = "".join(images) + f"{'END':80}"
    text += " " * (-len(text) % BLOCK)
    return text.encode("ascii")


def _structure(ext: Extension) -> tuple[list[str], list[np.ndarray]]:
    if ext.columns:
        arrays = [_checked(np.asarray(a).ravel()) for _, a, _ in ext.columns]
        cards = render([("XTENSION", "BINTABLE", "binary table extension"),
                        ("BITPIX", 8, "array data type"),
                        ("NAXIS", 2, "number of array dimensions"),
                        ("NAXIS1", sum(a.nbytes for a in arrays), "length of dimension 1"),
                        ("NAXIS2", 1, "length of dimension 2"),
                        ("PCOUNT", 0, "number of group parameters"),
                        ("GCOUNT", 1, "number of groups"),
                        ("TFIELDS", len(arrays), "number of table fields")])
        for i, ((name, _, tdim), a) in enumerate(zip(ext.columns, arrays, strict=True), start=1):
            cards += render([(f"TTYPE{i}", name, ""), (f"TFORM{i}", f"{a.size}{_TFORM[a.dtype.newbyteorder('>')]}", ""),
                             (f"TDIM{i}", tdim, "")])
        return cards, arrays
    data = _checked(ext.data) if ext.data is not None else None
    shape = () if data is None else data.shape
    cards = render([("XTENSION", "IMAGE", "Image extension"),
                    ("BITPIX", _bitpix(data.dtype) if data is not None else 8, "array data type"),
                    ("NAXIS", len(shape), "number of array dimensions"),
                    *((f"NAXIS{i}", n, "") for i, n in enumerate(reversed(shape), start=1)),
                    ("PCOUNT", 0, "number of parameters"),
                    ("GCOUNT", 1, "number of groups")])
    return cards, [] if data is None else [data]


def _bitpix(dtype: np.dtype) -> int:
    return next(b for b, d in _BITPIX.items() if d == dtype.newbyteorder(">") or d == dtype)


_CHUNK = 1 << 22  # elements converted to big-endian at a time, while the previous chunk is written


def _big_chunks(arrays: Sequence[np.ndarray], pool: ThreadPoolExecutor) -> Iterator[np.ndarray]:
    """The arrays as big-endian chunks, each converted in ``pool`` while the caller writes
    the one before (numpy and file writes release the GIL)."""
    pieces = [(a.ravel(), i) for a in arrays for i in range(0, max(a.size, 1), _CHUNK) if a.size]
    if not pieces:
        return

    def convert(piece: tuple[np.ndarray, int]) -> np.ndarray:
        flat, i = piece
        return flat[i:i + _CHUNK].astype(flat.dtype.newbyteorder(">"), copy=False)

    pending = pool.submit(convert, pieces[0])
    for k in range(len(pieces)):
        chunk = pending.result()
        if k + 1 < len(pieces):
            pending = pool.submit(convert, pieces[k + 1])
        yield chunk


def write_fits(fileobj: IO[bytes], primary: Sequence[str], extensions: Sequence[Extension]) -> None:
    """Write a data-less PRIMARY HDU (with ``primary`` cards) and the extensions."""
    fileobj.write(_padded_header([*render([("SIMPLE", True, "conforms to FITS standard"),
                                           ("BITPIX", 8, "array data type"),
                                           ("NAXIS", 0, "number of array dimensions"),
                                           ("EXTEND", True, "")]), *primary]))
    with ThreadPoolExecutor(max_workers=1) as pool:
        for ext in extensions:
            cards, arrays = _structure(ext)
            fileobj.write(_padded_header([*cards, *ext.cards]))
            n = 0
            for chunk in _big_chunks(arrays, pool):
                fileobj.write(memoryview(chunk).cast("B"))
                n += chunk.nbytes
            fileobj.write(b"\0" * (-n % BLOCK))


# ---------------------------------------------------------------------------------------
# Scanning
# ---------------------------------------------------------------------------------------


@dataclass
class Scanned:
    """One HDU of a scanned file: header text, structural values and data location."""

    text: str
    index: int
    offset: int  # byte offset of the data
    nbytes: int  # data bytes, without padding
    values: dict[str, str] = field(default_factory=dict)  # raw value fields, first occurrence
    _header: fits.Header | None = None

    @property
    def name(self) -> str:
        return "PRIMARY" if self.index == 0 else self.string("EXTNAME").upper()

    @property
    def compressed(self) -> bool:
        return self.values.get("ZIMAGE", "F") == "T"

    @property
    def shape(self) -> tuple[int, ...]:
        """Numpy shape of the image (the compressed image's for tile-compressed HDUs)."""
        prefix = "Z" if self.compressed else ""
        n = self.integer(f"{prefix}NAXIS")
        return tuple(self.integer(f"{prefix}NAXIS{i}") for i in range(n, 0, -1))

    @property
    def dtype(self) -> np.dtype:
        """On-disk dtype of an uncompressed image (big-endian)."""
        return _BITPIX[self.integer("BITPIX")]

    @property
    def scaled(self) -> bool:
        """Whether BSCALE/BZERO/BLANK change the stored values (astropy must read them)."""
        return (float(self.values.get("BSCALE", "1")) != 1.0 or float(self.values.get("BZERO", "0")) != 0.0
                or "BLANK" in self.values)

    def integer(self, key: str) -> int:
        return int(self.values[key])

    def string(self, key: str, default: str = "") -> str:
        raw = self.values.get(key)
        if raw is None or not raw.startswith("'"):
            return default
        return raw[1:raw.rfind("'")].replace("''", "'").rstrip()

    def header(self) -> fits.Header:
        """The full astropy Header (parsed once, lazily per card)."""
        if self._header is None:
            self._header = fits.Header.fromstring(self.text)
        return self._header


_STRUCTURAL = ("SIMPLE", "XTENSION", "BITPIX", "NAXIS", "PCOUNT", "GCOUNT", "EXTNAME", "ZIMAGE", "ZNAXIS",
               "BSCALE", "BZERO", "BLANK")


def _value_field(image: str) -> str:
    """The raw value of a fixed-format card (string with its quotes), without comment."""
    rest = image[10:]
    if rest.lstrip().startswith("'"):
        start = rest.index("'")
        i = start + 1
        while True:
            j = rest.find("'", i)
            if j < 0:
                return rest[start:].rstrip()
            if rest[j + 1:j + 2] == "'":
                i = j + 2
                continue
            return rest[start:j + 1]
    return rest.split("/", 1)[0].strip()


def scan(path: str | os.PathLike[str]) -> list[Scanned]:
    """The HDUs of a FITS file: header text and data location, reading headers only.

    Raises
    ------
    FitsFormatError
        For a file that does not start like FITS, a header without END, or data running
        past the end of the file (names the file and what is wrong).
    """
    path = str(path)
    size = os.path.getsize(path)
    hdus: list[Scanned] = []
    with open(path, "rb") as f:
        pos = 0
        while pos < size:
            blocks: list[str] = []
            while True:
                block = f.read(BLOCK)
                if len(block) < BLOCK:
                    where = "the primary header" if not hdus else f"header of HDU {len(hdus)}"
                    raise FitsFormatError(f"truncated file: {size} bytes, {where} has no END card", file=path)
                try:
                    text = block.decode("ascii")
                except UnicodeDecodeError:
                    text = None
                if text is None or (not hdus and not blocks and not text.startswith("SIMPLE  =")):
                    if not hdus:
                        raise FitsFormatError("not a FITS file (no SIMPLE card at the start)", file=path)
                    raise FitsFormatError(f"damaged header of HDU {len(hdus)} (not ASCII text)", file=path)
                blocks.append(text)
                pos += BLOCK
                end = next((i for i in range(0, BLOCK, _CARD) if text[i:i + 8] == "END     "), None)
                if end is not None:
                    break
            header = "".join(blocks)
            header = header[: (len(blocks) - 1) * BLOCK + end]
            values: dict[str, str] = {}
            for i in range(0, len(header), _CARD):
                key = header[i:i + 8].rstrip()
                if header[i + 8:i + 10] == "= " and (key in _STRUCTURAL or key.startswith(("NAXIS", "ZNAXIS"))):
                    values.setdefault(key, _value_field(header[i:i + _CARD]))
            try:
                naxes = [int(values[f"NAXIS{i}"]) for i in range(1, int(values["NAXIS"]) + 1)]
                nbytes = abs(int(values["BITPIX"])) // 8 * int(values.get("GCOUNT", "1")) * (
                    int(values.get("PCOUNT", "0")) + (math.prod(naxes) if naxes else 0))
            except (KeyError, ValueError) as exc:
                raise FitsFormatError(f"HDU {len(hdus)} header lacks a valid {exc} card", file=path) from None
            if not naxes:
                nbytes = 0
            hdus.append(Scanned(text=header, index=len(hdus), offset=pos, nbytes=nbytes, values=values))
            pos += nbytes + (-nbytes % BLOCK)
            if pos > size:
                raise FitsFormatError(f"truncated file: {size} bytes, the headers describe {pos}", file=path)
            f.seek(pos)
    if not hdus:
        raise FitsFormatError("empty file", file=path)
    return hdus


def read_section(path: str, hdu: Scanned, key: tuple[slice, ...]) -> np.ndarray:
    """Native-endian ``data[key]`` of an uncompressed, unscaled image HDU.

    ``key`` holds unit-step slices; only the span of the first axis is read.
    """
    shape = hdu.shape
    key = key + (slice(None),) * (len(shape) - len(key))
    lo, hi, _ = key[0].indices(shape[0])
    n = max(hi - lo, 0)
    inner = math.prod(shape[1:])
    data = np.fromfile(path, dtype=hdu.dtype, count=n * inner, offset=hdu.offset + lo * inner * hdu.dtype.itemsize)
    data = data.reshape(n, *shape[1:])[(slice(None), *key[1:])]
    if not data.flags.c_contiguous:
        data = np.ascontiguousarray(data)
    return data.byteswap(inplace=True).view(hdu.dtype.newbyteorder("="))
