"""SPHEREx calibration products in their IRSA archive formats (export and read back).

One FITS file per (product, detector), named and laid out as the archive's
(``spherex-data-format.md`` section 1.10); the electronic gain factors are one YAML file
for all detectors. Every PRIMARY header carries ``DETECTOR``, ``VERSION`` (the sphx
version, a PEP 440 string), ``DATE``, ``TELESCOP = INSTRUME = 'SPHEREx'`` (section 1.3).

=======================  =================================================  ==============================
product                  file name (``<v>`` version, ``<date>`` yyyy-ddd)   HDUs after PRIMARY
=======================  =================================================  ==============================
abs_gain_matrix          ``abs_gain_matrix_D<d>_spx_cal-agm-v<v>-<date>``   IMAGE 'MJy s / (electron sr)'
dark                     ``dark_D<d>_spx_cal-drk-v<v>-<date>``              IMAGE, DARK_ERR 'electron / s'
average_psf              ``average_psf_D<d>_spx_cal-psf-v<v>-<date>``       PSF-DATA-CUBE float32 (121, 101, 101)
spectral_wcs             ``spectral_wcs_D<d>_spx_cal-wcs-v<v>-<date>``      CWAVE, CBAND 'um', WCS-WAVE table
dichroic                 ``dichroic_D<d>_spx_base-<date>``                  IMAGE uint8 (1 = attenuated)
nonfunc                  ``nonfunc_D<d>_spx_base-<date>``                   IMAGE uint8 (1 = dead)
nonlinear_pars           ``nonlinear_pars_D<d>_spx_base-<date>``            Q_nl, b1, b2, b3, Qmax
readnoise_pars           ``readnoise_pars_D<d>_spx_base-<date>``            READNOISE-1, READNOISE-2 'electron'
solid_angle_pixel_map    ``solid_angle_pixel_map_D<d>_spx_cal-sapm-...``    IMAGE 'arcsec2'
gain_factors             ``gain_factors_spx_base-<date>.yaml``              32 gains per detector
=======================  =================================================  ==============================

Choices where the archive documentation is silent (all readers here accept them):

- The extension names of the single-map products (absolute gain, dark, masks) are not
  documented; they use ``IMAGE`` as the solid-angle map does. Our dark product also has
  an uncertainty, written as a second extension ``DARK_ERR``.
- ``readnoise_pars`` has two maps in the archive, sphx one (the read noise of one frame
  of the sample-up-the-ramp). ``READNOISE-1`` holds that map, ``READNOISE-2`` an
  additional independent component, written as zeros; the reader returns their sum in
  quadrature (computed in float64, so a zero ``READNOISE-2`` gives ``READNOISE-1``
  bit for bit).
- The PSF zone centres ``XCTR_i``/``YCTR_i`` are the product's ``zone_x``/``zone_y``
  (0-based detector pixel coordinates), as in the spectral-image writer.
- The spectral WCS table starts from the QR2 11 x 11 control grid and is densified only
  where bilinear interpolation would miss CWAVE/CBAND by more than 0.5 nm.
- Units are those the format fixes (the product definitions of :mod:`sphx.calibration`),
  never copied from dataset attrs. ``electron`` is not a FITS-standard unit, so the
  BUNITs parse with ``astropy.units.Unit`` (generic format), not its ``fits`` format.

Pixel data are read back exactly; the result has the variables, dims and coordinates of
``repo.open_calibration(name).sel(band=[d])`` and can be written back with
``repo.write_calibration``. Writes are atomic (temporary file in the target folder, then
rename). Files that are not such a product raise :class:`sphx.errors.FitsFormatError`.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import yaml
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning

from ... import __version__ as _sphx_version
from ...calibration import PRODUCTS as _SPECS
from ...errors import FitsFormatError
from .spectral_image import atomic_write, psf_hdu, wave_hdu, wave_table

__all__ = [
    "CALIBRATION_FILES",
    "calibration_filename",
    "read_calibration_product",
    "read_gain_factors",
    "read_wave_table",
    "write_calibration_product",
    "write_gain_factors",
]

PIXEL_DIMS = ("band", "y", "x")
PSF_EXTNAME = "PSF-DATA-CUBE"
WAVE_EXTNAME = "WCS-WAVE"
# Bilinear interpolation of the WCS-WAVE table must stay this close to CWAVE/CBAND [um];
# half the archive's 1 nm leaves room for the float32 storage of VALUES.
WAVE_TOLERANCE = 5e-4


@dataclass(frozen=True)
class _Plane:
    """One 2-D extension: EXTNAME, product variable, dtype on file."""

    extname: str
    variable: str
    dtype: str
    comment: str


@dataclass(frozen=True)
class CalibrationFile:
    """Archive layout of one calibration product.

    Parameters
    ----------
    name
        sphx product name (the archive family).
    token
        File-name token: ``cal-<token>-v<v>-<date>`` for versioned calibrations,
        ``None`` for ``base-<date>`` products.
    planes
        The 2-D pixel-map extensions in file order (empty for the PSF).
    """

    name: str
    token: str | None
    planes: tuple[_Plane, ...]

    def filename(self, band: int, *, version: int, date: _dt.date) -> str:
        day = date.strftime("%Y-%j")
        tag = f"cal-{self.token}-v{int(version)}-{day}" if self.token else f"base-{day}"
        return f"{self.name}_D{int(band)}_spx_{tag}.fits"

    def pattern(self) -> re.Pattern[str]:
        tag = rf"cal-{self.token}-v(?P<version>\d+)-(?P<date>\d{{4}}-\d{{3}})" if self.token else \
            r"base-(?P<date>\d{4}-\d{3})"
        return re.compile(rf"^{re.escape(self.name)}_D(?P<band>\d)_spx_{tag}\.fits$")


def _p(extname: str, variable: str, dtype: str, comment: str) -> _Plane:
    return _Plane(extname, variable, dtype, comment)


CALIBRATION_FILES: dict[str, CalibrationFile] = {f.name: f for f in (
    CalibrationFile("abs_gain_matrix", "agm", (_p("IMAGE", "ABS_GAIN", "float32", "absolute gain"),)),
    CalibrationFile("dark", "drk", (_p("IMAGE", "DARK", "float32", "dark current"),
                                    _p("DARK_ERR", "DARK_ERR", "float32", "dark current uncertainty"))),
    CalibrationFile("average_psf", "psf", ()),
    CalibrationFile("spectral_wcs", "wcs", (_p("CWAVE", "CWAVE", "float32", "central wavelength"),
                                            _p("CBAND", "CBAND", "float32", "bandwidth"))),
    CalibrationFile("dichroic", None, (_p("IMAGE", "DICHROIC", "uint8", "1 = attenuated >= 50% by the dichroic"),)),
    CalibrationFile("nonfunc", None, (_p("IMAGE", "NONFUNC", "uint8", "1 = permanently unusable"),)),
    CalibrationFile("nonlinear_pars", None, tuple(
        _p(v, v, "float32", c) for v, c in (
            ("Q_nl", "onset of non-linearity"), ("b1", "linear coefficient"), ("b2", "quadratic coefficient"),
            ("b3", "cubic coefficient"), ("Qmax", "largest charge the correction is valid for")))),
    CalibrationFile("readnoise_pars", None, (
        _p("READNOISE-1", "READNOISE", "float32", "read noise of one frame"),
        _p("READNOISE-2", "READNOISE", "float32", "additional read noise (added in quadrature)"))),
    CalibrationFile("solid_angle_pixel_map", "sapm", (_p("IMAGE", "SAPM", "float32", "pixel solid angle"),)),
)}

GAIN_FACTORS_UNITS = "electron / adu"


def _units(name: str, variable: str) -> str:
    """The archive unit of a variable: fixed by the product definition (masks: '')."""
    units = _SPECS[name].variables.get(variable, _SPECS[name].optional.get(variable, ((), None)))[1]
    return "" if units is None else units


def _date(date: _dt.date | _dt.datetime | str | None) -> _dt.datetime:
    if date is None:
        return _dt.datetime.now(_dt.UTC)
    if isinstance(date, str):
        return _dt.datetime.fromisoformat(date)
    if not isinstance(date, _dt.datetime):
        return _dt.datetime(date.year, date.month, date.day, tzinfo=_dt.UTC)
    return date


def calibration_filename(name: str, band: int, *, version: int = 1,
                         date: _dt.date | _dt.datetime | str | None = None) -> str:
    """Archive file name of product ``name`` for detector ``band`` (see module docstring)."""
    if name == "gain_factors":
        return f"gain_factors_spx_base-{_date(date).strftime('%Y-%j')}.yaml"
    if name not in CALIBRATION_FILES:
        raise KeyError(f"no archive format for calibration product {name!r}; "
                       f"known: {', '.join(sorted([*CALIBRATION_FILES, 'gain_factors']))}")
    return CALIBRATION_FILES[name].filename(band, version=version, date=_date(date))


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


def _primary(band: int, date: _dt.datetime, name: str) -> fits.PrimaryHDU:
    hdu = fits.PrimaryHDU()
    h = hdu.header
    h["DETECTOR"] = (int(band), "1-3: SWIR, 4-6: MWIR")
    h["VERSION"] = (str(_sphx_version), "SSDC Pipelines software version")
    h["DATE"] = (date.strftime("%Y-%m-%dT%H:%M:%S"), "file creation date (UTC)")
    h["TELESCOP"] = ("SPHEREx", "Telescope")
    h["INSTRUME"] = ("SPHEREx", "Instrument")
    h["ORIGIN"] = ("sphx", "Open re-implementation of the SPHEREx pipeline")
    # Not an archive keyword: lets the reader tell a renamed file's product.
    h["HIERARCH SPHX PRODUCT"] = (name, "sphx calibration product name")
    return hdu


def _band_values(ds: xr.Dataset, var: str, band: int, name: str) -> np.ndarray:
    if var not in ds:
        raise KeyError(f"calibration product {name!r} has no variable {var!r}")
    if "band" not in ds[var].dims or int(band) not in ds["band"].values.tolist():
        raise KeyError(f"calibration product {name!r} has no band {band}")
    return np.asarray(ds[var].sel(band=int(band)).values)


def _image(values: np.ndarray, plane: _Plane, units: str) -> fits.ImageHDU:
    dtype = np.dtype(plane.dtype)
    if values.ndim != 2:
        raise ValueError(f"{plane.variable} must be a 2-D (y, x) map per band, got shape {values.shape}")
    if dtype.kind == "u" and values.size and (values.min() < 0 or values.max() > np.iinfo(dtype).max):
        raise ValueError(f"{plane.variable} has values outside the {dtype} range")
    hdu = fits.ImageHDU(np.ascontiguousarray(values.astype(dtype, copy=False)), name=plane.extname)
    hdu.header.comments["EXTNAME"] = plane.comment
    hdu.header["BUNIT"] = (units, "Unit of pixel value")
    return hdu


def _spectral_wcs_hdus(ds: xr.Dataset, band: int) -> list[fits.BinTableHDU]:
    cwave = _band_values(ds, "CWAVE", band, "spectral_wcs")
    cband = _band_values(ds, "CBAND", band, "spectral_wcs")
    x, y, values = wave_table(cwave, cband, tolerance=WAVE_TOLERANCE)
    return [wave_hdu(x, y, values)]


def _psf_hdus(ds: xr.Dataset, band: int, *, n_active: int | None) -> list[fits.ImageHDU]:
    cube = np.asarray(_band_values(ds, "PSF", band, "average_psf"), np.float32)
    zx, zy = np.asarray(ds["zone_x"].values, float), np.asarray(ds["zone_y"].values, float)
    psf_x = np.asarray(ds["psf_x"].values, float)
    oversampling = int(ds.attrs.get("oversampling", 10))
    # The PSF pixel is pixel_scale / oversampling [arcsec]; the offsets give it.
    pixel_scale = float(np.round((psf_x[1] - psf_x[0]) * oversampling, 10))
    if n_active is None:
        # Centres are symmetric in the frame: first + last = n_active - 1 (0-based pixels).
        n_active = round(zx.min() + zx.max() + 1)
    hdu = psf_hdu(cube, zx, zy, n_active=n_active, pixel_scale=pixel_scale, oversampling=oversampling)
    hdu.name = PSF_EXTNAME
    return [hdu]


def write_calibration_product(
    ds: xr.Dataset,
    name: str,
    folder: str | os.PathLike[str],
    *,
    band: int,
    version: int = 1,
    date: _dt.date | _dt.datetime | str | None = None,
    overwrite: bool = False,
    n_active: int | None = None,
) -> Path:
    """Write one detector of a calibration product as the archive's FITS file.

    Parameters
    ----------
    ds
        The product as ``repo.open_calibration(name)`` gives it (dims band, y, x; the
        PSF band, zone, psf_y, psf_x).
    name
        Product name, a key of :data:`CALIBRATION_FILES` (``gain_factors``: use
        :func:`write_gain_factors`).
    folder
        Output folder; the file name follows the archive pattern.
    band
        Detector number.
    version
        Product version (``v<version>`` in the file name of ``cal-`` products).
    date
        Processing date (file name, yyyy-ddd) and ``DATE`` keyword; now by default.
    overwrite
        Replace an existing file.
    n_active
        Active pixels per detector side (PSF zone widths); derived from the zone
        centres by default.

    Returns
    -------
    Path of the written file.
    """
    if name == "gain_factors":
        raise KeyError("gain_factors is a YAML product: use write_gain_factors")
    spec = CALIBRATION_FILES.get(name)
    if spec is None:
        raise KeyError(f"no archive format for calibration product {name!r}; known: {', '.join(sorted(CALIBRATION_FILES))}")
    when = _date(date)
    hdus: list[Any] = [_primary(band, when, name)]
    for plane in spec.planes:
        if name == "readnoise_pars" and plane.extname == "READNOISE-2":
            values = np.zeros_like(hdus[-1].data)  # no second component in sphx (see module docstring)
        else:
            values = _band_values(ds, plane.variable, band, name)
        hdus.append(_image(values, plane, _units(name, plane.variable)))
    if name == "average_psf":
        hdus[0].header.add_comment("PSF zone data defined by x and y centers and x and y zones")
        hdus += _psf_hdus(ds, band, n_active=n_active)
    elif name == "spectral_wcs":
        hdus += _spectral_wcs_hdus(ds, band)
    hdul = fits.HDUList(hdus)

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyWarning)
            hdul.writeto(tmp, overwrite=True)

    path = Path(folder) / spec.filename(band, version=version, date=when)
    return atomic_write(path, write, overwrite=overwrite)


def write_gain_factors(
    ds: xr.Dataset,
    folder: str | os.PathLike[str],
    *,
    date: _dt.date | _dt.datetime | str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the electronic gain factors of all detectors as ``gain_factors_spx_base-<date>.yaml``.

    The YAML holds ``TELESCOP``, ``VERSION``, ``DATE``, ``UNITS`` ('electron / adu') and
    ``DETECTORS``: detector number -> list of the 32 readout-channel gains (channel 0
    first). Values are written with the shortest decimal that reads back as the same
    float32.
    """
    if "GAIN" not in ds or ds["GAIN"].dims != ("band", "readout_channel"):
        raise KeyError("gain_factors needs GAIN (band, readout_channel)")
    gains = np.asarray(ds["GAIN"].values, np.float32)
    when = _date(date)
    doc = {
        "TELESCOP": "SPHEREx",
        "INSTRUME": "SPHEREx",
        "VERSION": str(_sphx_version),
        "DATE": when.strftime("%Y-%m-%dT%H:%M:%S"),
        "UNITS": GAIN_FACTORS_UNITS,
        # str(np.float32) is the shortest decimal that reads back as the same float32.
        "DETECTORS": {int(b): [float(str(g)) for g in row]
                      for b, row in zip(ds["band"].values.tolist(), gains, strict=True)},
    }

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("# SPHEREx electronic gain factors per detector and readout channel [electron / adu]\n")
            yaml.safe_dump(doc, f, sort_keys=False, default_flow_style=None, width=120)

    return atomic_write(Path(folder) / calibration_filename("gain_factors", 0, date=when), write, overwrite=overwrite)


def read_gain_factors(path: str | os.PathLike[str]) -> xr.Dataset:
    """Read a gain-factors YAML back as the ``gain_factors`` product (GAIN (band, readout_channel))."""
    file = str(path)
    try:
        with open(file, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise FitsFormatError(f"not a readable gain-factors YAML: {exc}", file=file) from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("DETECTORS"), dict):
        raise FitsFormatError("no DETECTORS mapping: not a SPHEREx gain-factors file", file=file)
    if doc.get("TELESCOP") != "SPHEREx":
        raise FitsFormatError(f"TELESCOP is {doc.get('TELESCOP')!r}, not 'SPHEREx'", file=file)
    bands = sorted(int(b) for b in doc["DETECTORS"])
    rows = []
    for b in bands:
        row = doc["DETECTORS"].get(b, doc["DETECTORS"].get(str(b)))
        if not isinstance(row, list) or len(row) != 32:
            raise FitsFormatError(f"detector {b}: expected 32 gain factors, got "
                                  f"{len(row) if isinstance(row, list) else type(row).__name__}", file=file)
        rows.append(np.asarray(row, np.float64).astype(np.float32))
    units = str(doc.get("UNITS", GAIN_FACTORS_UNITS))
    return xr.Dataset(
        {"GAIN": (("band", "readout_channel"), np.stack(rows),
                  {"units": units, "long_name": "electronic gain per readout channel"})},
        coords={"band": np.asarray(bands, np.int64), "readout_channel": np.arange(32, dtype=np.int64)},
        attrs={"sphx_product": "gain_factors"},
    )


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------


def _identify(path: Path, header: fits.Header) -> tuple[CalibrationFile, int]:
    """Product and detector of a file: from the archive file name, else from the
    ``SPHX PRODUCT`` card (a renamed file)."""
    for spec in CALIBRATION_FILES.values():
        m = spec.pattern().match(path.name)
        if m:
            break
    else:
        name = str(header.get("SPHX PRODUCT", "")).strip()
        if name not in CALIBRATION_FILES:
            raise FitsFormatError(
                f"file name does not match any calibration product pattern and no known product is named in the "
                f"header (SPHX PRODUCT = {name!r}); known: {', '.join(sorted(CALIBRATION_FILES))}", file=str(path))
        spec, m = CALIBRATION_FILES[name], None
    if "DETECTOR" not in header:
        raise FitsFormatError("PRIMARY has no DETECTOR keyword", file=str(path), hdu="PRIMARY")
    band = int(header["DETECTOR"])
    if m is not None and int(m.group("band")) != band:
        raise FitsFormatError(f"file name says detector {m.group('band')} but DETECTOR = {band}",
                              file=str(path), hdu="PRIMARY")
    named = str(header.get("SPHX PRODUCT", spec.name)).strip()
    if named != spec.name:
        raise FitsFormatError(f"file is named as {spec.name!r} but holds product {named!r}",
                              file=str(path), hdu="PRIMARY")
    return spec, band


def _hdu(hdul: fits.HDUList, extname: str, file: str) -> Any:
    try:
        return hdul[extname]
    except KeyError:
        names = [h.name for h in hdul]
        raise FitsFormatError(f"missing HDU {extname!r} (file has {names})", file=file, hdu=extname) from None


def _pixel_map(hdul: fits.HDUList, plane: _Plane, file: str) -> np.ndarray:
    hdu = _hdu(hdul, plane.extname, file)
    try:
        data = hdu.data
    except (OSError, ValueError, TypeError) as exc:  # truncated data
        raise FitsFormatError(f"cannot read data: {exc}", file=file, hdu=plane.extname) from exc
    if data is None or data.ndim != 2 or data.shape[0] != data.shape[1]:
        shape = None if data is None else data.shape
        raise FitsFormatError(f"expected a square 2-D pixel map, got shape {shape}", file=file, hdu=plane.extname)
    return np.asarray(data).astype(plane.dtype)


def _map_dataset(spec: CalibrationFile, hdul: fits.HDUList, band: int, file: str) -> xr.Dataset:
    arrays: dict[str, np.ndarray] = {}
    for plane in spec.planes:
        data = _pixel_map(hdul, plane, file)
        if arrays and data.shape != next(iter(arrays.values())).shape:
            raise FitsFormatError(f"shape {data.shape} differs from the other maps' "
                                  f"{next(iter(arrays.values())).shape}", file=file, hdu=plane.extname)
        if plane.variable in arrays:  # READNOISE-2: independent component, add in quadrature
            first = arrays[plane.variable].astype(np.float64)
            data = np.sqrt(first**2 + data.astype(np.float64) ** 2).astype(np.float32)
        arrays[plane.variable] = data
    n = next(iter(arrays.values())).shape[0]
    data_vars = {}
    for plane in spec.planes:
        if plane.variable in data_vars:
            continue
        attrs = {"units": _units(spec.name, plane.variable), "long_name": plane.comment}
        data_vars[plane.variable] = (PIXEL_DIMS, arrays[plane.variable][None], attrs)
    pix = np.arange(n, dtype=np.int64)
    return xr.Dataset(data_vars, coords={"band": np.asarray([band], np.int64), "y": pix, "x": pix})


def _psf_dataset(hdul: fits.HDUList, band: int, file: str) -> xr.Dataset:
    hdu = _hdu(hdul, PSF_EXTNAME, file)
    h = hdu.header
    try:
        cube = hdu.data
    except (OSError, ValueError, TypeError) as exc:
        raise FitsFormatError(f"cannot read data: {exc}", file=file, hdu=PSF_EXTNAME) from exc
    if cube is None or cube.ndim != 3 or cube.shape[1] != cube.shape[2]:
        raise FitsFormatError(f"expected a (zone, psf_y, psf_x) cube, got shape {None if cube is None else cube.shape}",
                              file=file, hdu=PSF_EXTNAME)
    nz, n = cube.shape[0], cube.shape[1]
    missing = [k for k in ("OVERSAMP", "CDELT1", "CRPIX1") if k not in h]
    missing += [f"{k}_{i}" for i in range(1, nz + 1) for k in ("XCTR", "YCTR") if f"{k}_{i}" not in h][:4]
    if missing:
        raise FitsFormatError(f"missing keywords {missing}", file=file, hdu=PSF_EXTNAME)
    oversampling = int(h["OVERSAMP"])
    zx = np.array([float(h[f"XCTR_{i}"]) for i in range(1, nz + 1)])
    zy = np.array([float(h[f"YCTR_{i}"]) for i in range(1, nz + 1)])
    # Offsets as k * pixel_scale / oversampling, the product's own formula: bit-identical
    # to the product's coordinates (CDELT alone would differ in the last bit).
    pixel_scale = float(np.round(float(h["CDELT1"]) * oversampling, 10))
    k = np.arange(n) + 1 - float(h["CRPIX1"])
    offsets = k * pixel_scale / oversampling
    return xr.Dataset(
        {"PSF": (("band", "zone", "psf_y", "psf_x"), np.asarray(cube, np.float32)[None],
                 {"units": "", "long_name": "fraction of the flux per oversampled pixel"})},
        coords={"band": np.asarray([band], np.int64), "zone": np.arange(nz, dtype=np.int64),
                "zone_x": ("zone", zx, {"units": "pixel", "long_name": "zone centre x (XCTR - 1)"}),
                "zone_y": ("zone", zy, {"units": "pixel", "long_name": "zone centre y (YCTR - 1)"}),
                "psf_y": ("psf_y", offsets, {"units": "arcsec"}), "psf_x": ("psf_x", offsets, {"units": "arcsec"})},
        attrs={"oversampling": oversampling},
    )


def _check_wave_table(hdul: fits.HDUList, file: str) -> None:
    hdu = _hdu(hdul, WAVE_EXTNAME, file)
    try:
        cols = {c.name.upper() for c in hdu.columns}
        row = hdu.data
    except (AttributeError, OSError, ValueError, TypeError) as exc:
        raise FitsFormatError(f"not a readable table: {exc}", file=file, hdu=WAVE_EXTNAME) from exc
    if not {"X", "Y", "VALUES"} <= cols or row is None or len(row) != 1:
        raise FitsFormatError(f"expected a 1-row table with X, Y, VALUES columns, got columns {sorted(cols)}",
                              file=file, hdu=WAVE_EXTNAME)


def read_calibration_product(path: str | os.PathLike[str]) -> xr.Dataset:
    """Read one archive calibration FITS file back as its sphx product.

    Parameters
    ----------
    path
        A file written by :func:`write_calibration_product` (or the archive's own); the
        product is known from the file name (or the ``SPHX PRODUCT`` card).

    Returns
    -------
    xr.Dataset
        The product for one detector (``band`` of length 1), as
        ``repo.open_calibration(name).sel(band=[d])``; attrs ``sphx_product`` and
        ``version`` (the file's VERSION).

    Raises
    ------
    FitsFormatError
        Not FITS, truncated, not SPHEREx, unknown product, missing HDU or wrong shape.
    """
    p = Path(path)
    if p.name.endswith(".yaml"):
        return read_gain_factors(p)
    file = str(p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyWarning)
            with fits.open(file, memmap=False) as hdul:
                hdul.verify("silentfix+ignore")
                header = hdul[0].header
                if str(header.get("TELESCOP", "")).strip() != "SPHEREx":
                    raise FitsFormatError(f"TELESCOP is {header.get('TELESCOP')!r}, not 'SPHEREx'",
                                          file=file, hdu="PRIMARY")
                spec, band = _identify(p, header)
                if spec.name == "average_psf":
                    ds = _psf_dataset(hdul, band, file)
                else:
                    ds = _map_dataset(spec, hdul, band, file)
                    if spec.name == "spectral_wcs":
                        _check_wave_table(hdul, file)
                version = str(header.get("VERSION", "")).strip()
    except FitsFormatError:
        raise
    except (OSError, ValueError, TypeError, IndexError) as exc:
        raise FitsFormatError(f"not a readable FITS file: {exc}", file=file) from exc
    ds.attrs.update({"sphx_product": spec.name, "version": version})
    return ds


def read_wave_table(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``WCS-WAVE`` table of a spectral-WCS product: 1-based control points ``x``
    (nX,), ``y`` (nY,) and ``values`` float32 (nY, nX, 2) [um] (wavelength, bandwidth)."""
    with fits.open(str(path), memmap=False) as hdul:
        _check_wave_table(hdul, str(path))
        row = hdul[WAVE_EXTNAME].data[0]
        return np.asarray(row["X"]), np.asarray(row["Y"]), np.asarray(row["VALUES"])

