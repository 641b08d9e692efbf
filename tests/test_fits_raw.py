"""Byte-level FITS (sphx.io.fits.raw) against astropy: card images, written files, scans."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.io.fits.verify import VerifyWarning

from sphx.errors import FitsFormatError
from sphx.io.fits import raw

_RNG = np.random.default_rng(1)
_VALUES = [
    True, False, np.bool_(True), 0, -5, 2**40, np.int64(7), np.int32(-3), 1.0, -0.0, 1e-5, 1e20, 3.14159,
    1.23456789012345e-300, 123456789.123456789, np.float32(1.1), np.float64(2.5), "", "a", "abc'def",
    "MJy / sr", "x" * 60, "x" * 68, "x" * 69, "x" * 100, "caf\u00e9",
    *(_RNG.normal(size=20) * 10.0 ** _RNG.integers(-30, 30, 20)),
]
_KEYS = ["A", "CRPIX1A", "L2 N_TRAN_NB", "MP_OVERFLOW", "OMEGA_MEDIAN", "SPHX_IMG_ASTROMETRY_RMS", "X" * 30]
_COMMENTS = ["", "short", "a much longer comment " * 4]


def _astropy(key: str, value, comment: str) -> str:
    name = key if len(key) <= 8 and " " not in key else f"HIERARCH {key}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", VerifyWarning)
            return str(fits.Card(name, value, comment))
    except ValueError as exc:
        return f"ValueError: {exc}"


def _ours(key: str, value, comment: str) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", VerifyWarning)
            return "".join(raw.card(key, value, comment))
    except ValueError as exc:
        return f"ValueError: {exc}"


@pytest.mark.parametrize("key", _KEYS)
def test_cards_are_what_astropy_writes(key):
    # every value kind (bool, int, float incl. float32 and exponents, short, quoted, long
    # and non-ASCII strings) with empty, short and over-long comments, plain and HIERARCH
    for value in _VALUES:
        for comment in _COMMENTS:
            assert _ours(key, value, comment) == _astropy(key, value, comment), (key, value, comment)


def test_commentary_cards_wrap_at_72_characters():
    for text in ("", "short history", "y" * 72, "z" * 150):
        header = fits.Header()
        header.add_history(text)
        assert "".join(raw.card("HISTORY", text)) == "".join(str(c) for c in header.cards)


def test_render_skips_missing_values():
    images = raw.render([("A", 1, ""), ("B", None, ""), ("C", float("nan"), ""), ("D", np.float32("inf"), "")])
    assert [c[:8].strip() for c in images] == ["A"]


def _write(path, *, cards=(), extensions=()):
    with open(path, "wb") as f:
        raw.write_fits(f, list(cards), list(extensions))


def test_written_files_verify_and_read_back_with_astropy(tmp_path):
    rng = np.random.default_rng(2)
    images = {
        "F32": rng.normal(size=(37, 53)).astype(np.float32),
        "F64": rng.normal(size=(5, 7, 3)),
        "I32": rng.integers(-(2**31), 2**31 - 1, size=(2100,), dtype=np.int32),  # spans a write chunk
        "I16": rng.integers(-999, 999, size=(3, 4), dtype=np.int16),
        "U8": rng.integers(0, 255, size=(9, 9), dtype=np.uint8),
    }
    extensions = [raw.Extension(raw.render([("EXTNAME", name, ""), ("BUNIT", "MJy / sr", "unit"),
                                            ("HISTORY", "h" * 100, "")]), data)
                  for name, data in images.items()]
    x, values = np.arange(1, 12, dtype=np.int32), rng.normal(size=(11, 11, 2)).astype(np.float32)
    extensions.append(raw.Extension(raw.render([("EXTNAME", "TABLE", "")]),
                                    columns=[("X", x, "(11)"), ("VALUES", values, "(2,11,11)")]))
    path = tmp_path / "a.fits"
    _write(path, cards=raw.render([("TELESCOP", "SPHEREx", "")]), extensions=extensions)
    assert path.stat().st_size % raw.BLOCK == 0
    with fits.open(path) as hdul:
        hdul.verify("exception")  # standard-conforming structure and cards
        assert hdul[0].header["TELESCOP"] == "SPHEREx"
        for name, data in images.items():
            np.testing.assert_array_equal(hdul[name].data, data)
            assert hdul[name].header["BUNIT"] == "MJy / sr"
            assert "".join(hdul[name].header["HISTORY"]) == "h" * 100
        row = hdul["TABLE"].data[0]
        np.testing.assert_array_equal(row["X"], x)
        np.testing.assert_array_equal(row["VALUES"], values)
        info = [hdul.fileinfo(i) for i in range(len(hdul))]
    # the scan finds the same HDUs, data offsets and sizes as astropy
    scanned = raw.scan(path)
    assert [h.name for h in scanned] == ["PRIMARY", *images, "TABLE"]
    assert [h.offset for h in scanned] == [i["datLoc"] for i in info]
    assert [h.nbytes for h in scanned[1:-1]] == [d.nbytes for d in images.values()]
    assert scanned[1].shape == (37, 53) and scanned[2].shape == (5, 7, 3)


def test_unsigned_and_boolean_images_are_refused(tmp_path):
    for data in (np.zeros((2, 2), np.uint32), np.zeros((2, 2), bool)):
        with pytest.raises(TypeError):
            _write(tmp_path / "b.fits", extensions=[raw.Extension([], data)])


def test_scan_and_read_section_of_astropy_files(tmp_path):
    rng = np.random.default_rng(3)
    image = rng.normal(size=(64, 48)).astype(">f4")
    cube = rng.normal(size=(6, 11, 11)).astype(np.float32)
    flags = rng.integers(0, 2**20, size=(64, 48), dtype=np.int32)
    hdul = fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(image, name="IMAGE"),
                         fits.CompImageHDU(flags, name="FLAGS", compression_type="RICE_1"),
                         fits.ImageHDU(cube, name="PSF"),
                         fits.ImageHDU(np.arange(6, dtype=np.int16), name="SCALED")])
    hdul["SCALED"].header["BZERO"] = 32768
    hdul["IMAGE"].header["OBSID"] = ("2025W51_1A_0684_2", "it's quoted")
    path = tmp_path / "c.fits"
    hdul.writeto(path)
    scanned = {h.name: h for h in raw.scan(path)}
    assert scanned["FLAGS"].compressed and scanned["FLAGS"].shape == (64, 48)
    assert not scanned["IMAGE"].compressed and not scanned["IMAGE"].scaled
    assert scanned["SCALED"].scaled
    assert scanned["IMAGE"].header()["OBSID"] == "2025W51_1A_0684_2"
    for key in [(slice(None), slice(None)), (slice(10, 30), slice(None)), (slice(5, 6), slice(7, 40))]:
        got = raw.read_section(str(path), scanned["IMAGE"], key)
        assert got.dtype.isnative
        np.testing.assert_array_equal(got, image[key])
    np.testing.assert_array_equal(raw.read_section(str(path), scanned["PSF"], (slice(2, 4), slice(1, 5))),
                                  cube[2:4, 1:5])


def test_scan_names_what_is_wrong(tmp_path):
    good = tmp_path / "good.fits"
    _write(good, extensions=[raw.Extension(raw.render([("EXTNAME", "IMAGE", "")]), np.ones((40, 40), np.float32))])
    data = good.read_bytes()
    cases = {
        "nofits.fits": (b"hello" * 1000, "not a FITS file"),
        "noend.fits": (data[:raw.BLOCK] + b" " * raw.BLOCK, "has no END card"),
        "short.fits": (data[:-raw.BLOCK], "truncated file"),
        "binary.fits": (data[:raw.BLOCK] + bytes(range(256)) * 12 + bytes(48), "not ASCII"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(FitsFormatError, match=message) as err:
            raw.scan(tmp_path / name)
        assert name in str(err.value)
