"""Write Level 2 spectral images as the IRSA archive has them, and cut them out.

One multi-extension FITS file per (band, observation), seven HDUs in the archive's order::

    0 PRIMARY   no data; VERSION, TELESCOP, INSTRUME, DETECTOR
    1 IMAGE     float32, 'MJy / sr', zodiacal light not subtracted
    2 FLAGS     int32 bitmask, EXTTYPE='MASK', HIERARCH MP_<NAME> = bit
    3 VARIANCE  float32, (MJy / sr)^2
    4 ZODI      float32, 'MJy / sr'
    5 PSF       float32 cube (zone, psf_y, psf_x), x-fast zone keywords
    6 WCS-WAVE  1-row table of the spectral lookup WCS 'W'

IRSA tutorials index these HDUs by position as well as by name, so the order is part of
the format. Headers come from :mod:`sphx.io.fits.headers`.
"""

from __future__ import annotations

import datetime as _dt
import functools
import os
import tempfile
import warnings
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning

from ... import __version__ as _sphx_version
from ... import flags as _flags
from ...instrument import Instrument
from ...kernels.statistics import count_bits_without, finite_median_std
from ...obsid import obs_key
from ...wcs import WCS_VARIABLES
from . import headers as H
from . import raw

__all__ = [
    "FITS_VERSION",
    "HDU_ORDER",
    "cutout",
    "export_level",
    "image_meta",
    "spectral_image_filename",
    "wave_table",
    "write_spectral_image",
]

HDU_ORDER = ("PRIMARY", "IMAGE", "FLAGS", "VARIANCE", "ZODI", "PSF", "WCS-WAVE")

# PRIMARY VERSION. The IRSA PSF notebook parses it with packaging.version.Version and
# rewrites the PSF zone keywords of files whose version is <= 6.5.5 without a
# '+psffix1' local tag (the QR2 y-fast header erratum). sphx writes x-fast zone keywords,
# so its version must read as a fixed pipeline: the release part is the first fixed QR2
# pipeline (6.5.6, and still the QR2 PSF-cube layout, unlike 7.x which means an EPSF
# table to some readers), and the local tag names the writer and its version.
FITS_VERSION = f"6.5.6+sphx.{_sphx_version}"

_IMAGE_VARS = ("IMAGE", "VARIANCE", "ZODI", "FLAGS")


# ---------------------------------------------------------------------------------------
# Metadata of one image
# ---------------------------------------------------------------------------------------


def _obs_label(ds: xr.Dataset, obs: int | str) -> int:
    """The ``obs`` coordinate value (int key) of an observation given as key or OBSID."""
    return obs_key(obs) if isinstance(obs, str) else int(obs)


def _scalar_kind(var: xr.Variable | xr.DataArray) -> bool:
    return var.dtype.kind in "biuf" or var.dtype.kind in "UT" or str(var.dtype).startswith("String")


def image_meta(ds: xr.Dataset, *, band: int, obs: int | str) -> dict[str, Any]:
    """Per-image metadata of one (band, observation) of a Level 2 cube (small values only).

    Keys are cube variable names; values without an archive keyword are collected under
    ``_extra_image`` (per-image) and ``_extra_obs`` (per-observation) for SPHX cards.
    """
    key = _obs_label(ds, obs)
    cell = ds.drop_vars([v for v in _IMAGE_VARS if v in ds]).sel(band=band, obs=key)
    meta: dict[str, Any] = {}
    for name in WCS_VARIABLES:
        meta[name] = np.asarray(cell[name].values, dtype=np.float64)
    if "flag_count" in cell:
        meta["flag_count"] = {str(n): int(c) for n, c in zip(cell["flag"].values, cell["flag_count"].values, strict=True)}
    extra_image: dict[str, Any] = {}
    extra_obs: dict[str, Any] = {}
    for name, var in cell.variables.items():
        if name in ds.dims or name in WCS_VARIABLES or name == "flag_count":
            continue
        dims = ds.variables[name].dims
        if dims == ("band", "obs") or dims == ("obs", "band"):
            if name in H.MAPPED_IMAGE_VARS:
                meta[name] = H._py(var.values)
            elif _scalar_kind(var):
                extra_image[name] = H._py(var.values)
        elif dims == ("obs",):
            if name in H.MAPPED_OBS_VARS:
                meta[name] = H._py(var.values)
            elif _scalar_kind(var):
                extra_obs[name] = H._py(var.values)
        elif name in ("sc_position", "sc_velocity"):
            meta[name] = np.asarray(var.transpose("sc_epoch", "xyz").values, dtype=np.float64)
    if "astrometry_nblind" in extra_image:
        meta["_astronetsolved"] = extra_image["astrometry_nblind"] > 0
    meta["_extra_image"], meta["_extra_obs"] = extra_image, extra_obs
    return meta


# ---------------------------------------------------------------------------------------
# WCS-WAVE table
# ---------------------------------------------------------------------------------------


def _interp_weights(nodes: np.ndarray, n: int) -> np.ndarray:
    """(n, len(nodes)) matrix of linear-interpolation weights at 0-based pixels 0..n-1."""
    p = np.arange(n, dtype=np.float64)
    i = np.clip(np.searchsorted(nodes, p, side="right") - 1, 0, len(nodes) - 2)
    t = (p - nodes[i]) / (nodes[i + 1] - nodes[i])
    w = np.zeros((n, len(nodes)))
    w[np.arange(n), i] = 1.0 - t
    w[np.arange(n), i + 1] = t
    return w


def wave_table(
    cwave: np.ndarray, cband: np.ndarray, *, tolerance: float = 2e-4, max_nodes: int = 257
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Control points of the ``W`` lookup WCS for one full detector frame.

    Starts from the archive's 11 x 11 grid and densifies until bilinear interpolation
    between the nodes reproduces every pixel's central wavelength and bandwidth within
    ``tolerance`` [um] (2e-4 um = 0.2 nm, well inside the 1 nm the archive promises and
    robust to the float32 storage of VALUES).

    Parameters
    ----------
    cwave, cband
        Central wavelength and bandwidth [um], shape (y, x), full detector frame.

    Returns
    -------
    x, y
        1-based detector pixel coordinates of the control points (int32).
    values
        float32 (ny, nx, 2): [..., 0] wavelength, [..., 1] bandwidth [um].
    """
    cwave, cband = np.asarray(cwave), np.asarray(cband)
    ny, nx = cwave.shape
    # the interpolation error varies smoothly between nodes: every 4th pixel (and the
    # last) measures it at a sixteenth of the cost
    sy, sx = np.r_[0:ny:4, ny - 1], np.r_[0:nx:4, nx - 1]
    sampled = [np.asarray(full[np.ix_(sy, sx)], dtype=np.float64) for full in (cwave, cband)]
    for k in (11, 17, 25, 33, 49, 65, 97, 129, 193, max_nodes):
        xs = np.unique(np.round(np.linspace(0, nx - 1, min(k, nx))).astype(np.int64))
        ys = np.unique(np.round(np.linspace(0, ny - 1, min(k, ny))).astype(np.int64))
        values = np.stack([cwave[np.ix_(ys, xs)], cband[np.ix_(ys, xs)]], axis=-1).astype(np.float32)
        wx, wy = _interp_weights(xs.astype(float), nx)[sx], _interp_weights(ys.astype(float), ny)[sy]
        err = max(
            np.nanmax(np.abs(wy @ values[..., c].astype(np.float64) @ wx.T - full))
            for c, full in enumerate(sampled)
        )
        if err <= tolerance or k >= max_nodes:
            break
    return (xs + 1).astype(np.int32), (ys + 1).astype(np.int32), values


_WAVE_EXTNAME_COMMENT = "Lookup table for the spectral WCS 'W'"


def _wave_columns(x: np.ndarray, y: np.ndarray, values: np.ndarray) -> list[tuple[str, np.ndarray, str]]:
    """``X``/``Y`` int32 vectors and ``VALUES`` float32 with ``TDIM='(2,nX,nY)'``
    (numpy shape (nY, nX, 2)): the columns of the 1-row ``WCS-WAVE`` table."""
    nx, ny = len(x), len(y)
    return [("X", np.asarray(x, np.int32), f"({nx})"), ("Y", np.asarray(y, np.int32), f"({ny})"),
            ("VALUES", np.asarray(values, np.float32), f"(2,{nx},{ny})")]


def wave_hdu(x: np.ndarray, y: np.ndarray, values: np.ndarray) -> fits.BinTableHDU:
    """The 1-row ``WCS-WAVE`` table HDU (columns as the archive's, see :func:`wave_table`)."""
    cols = [fits.Column(name=name, format=f"{a.size}{'J' if a.dtype.kind == 'i' else 'E'}", dim=tdim,
                        array=a[None, ...]) for name, a, tdim in _wave_columns(x, y, values)]
    hdu = fits.BinTableHDU.from_columns(cols, name=H.WAVE_EXTNAME)
    hdu.header.comments["EXTNAME"] = _WAVE_EXTNAME_COMMENT
    return hdu


def _nominal_spectral(inst: Instrument, band: int) -> tuple[np.ndarray, np.ndarray]:
    """Nominal CWAVE/CBAND [um] when no spectral_wcs calibration is given."""
    n = inst.n_active
    lam = inst.nominal_wavelength(band, np.arange(n))[:, None] * np.ones((1, n))
    return lam, lam / inst.band(band).resolving_power


# ---------------------------------------------------------------------------------------
# PSF
# ---------------------------------------------------------------------------------------


def _zone_widths(centres: np.ndarray, n: int) -> np.ndarray:
    """Zone widths [pixel] from sorted zone centres: boundaries half way between centres,
    outer boundaries at the frame edges (-0.5 and n - 0.5 in 0-based pixel coordinates)."""
    edges = np.concatenate([[-0.5], (centres[1:] + centres[:-1]) / 2.0, [n - 0.5]])
    return np.diff(edges)


def psf_hdu(cube: np.ndarray, zone_x: np.ndarray, zone_y: np.ndarray, **options: Any) -> fits.ImageHDU:
    """The QR2-style PSF HDU (see :func:`_psf_parts`)."""
    cube, cards = _psf_parts(cube, zone_x, zone_y, **options)
    return fits.ImageHDU(cube, header=raw.header_from_cards(cards))


def _psf_parts(
    cube: np.ndarray,
    zone_x: np.ndarray,
    zone_y: np.ndarray,
    *,
    n_active: int,
    pixel_scale: float,
    oversampling: int,
) -> tuple[np.ndarray, list[str]]:
    """Data and cards of the QR2-style PSF HDU: float32 (zone, psf_y, psf_x), x-fast zone
    keywords.

    Zone centres are 0-based detector pixel coordinates; plane ``k`` (1-based) is zone
    ``(ix, iy)`` with ``k = iy * nx + ix + 1``. Each zone card's comment carries
    "(ix, iy)" because the IRSA erratum fix parses it; no other key starts with ``XCT``
    (the IRSA notebook's regex would take it for a zone centre).
    """
    zone_x, zone_y = np.asarray(zone_x, float), np.asarray(zone_y, float)
    order = np.lexsort((zone_x, zone_y))  # y slow, x fast
    cube = np.asarray(cube, dtype=np.float32)[order]
    zone_x, zone_y = zone_x[order], zone_y[order]
    ux, uy = np.unique(zone_x), np.unique(zone_y)
    wx, wy = _zone_widths(ux, n_active), _zone_widths(uy, n_active)
    npsf = cube.shape[-1]
    cards: list[H.Card] = [
        ("EXTNAME", "PSF", "extension name"),
        ("WCSAXES", 2, "Number of coordinate axes"),
        ("CRPIX1", (npsf + 1) / 2.0, "Pixel coordinate of reference point"),
        ("CRPIX2", (cube.shape[-2] + 1) / 2.0, "Pixel coordinate of reference point"),
        ("CDELT1", pixel_scale / oversampling, "[arcsec] Coordinate increment at reference point"),
        ("CDELT2", pixel_scale / oversampling, "[arcsec] Coordinate increment at reference point"),
        ("CUNIT1", "arcsec", "Units of coordinate increment and value"),
        ("CUNIT2", "arcsec", "Units of coordinate increment and value"),
        ("CTYPE1", "XANG", "Coordinate type code"),
        ("CTYPE2", "YANG", "Coordinate type code"),
        ("CRVAL1", 0.0, "[arcsec] Coordinate value at reference point"),
        ("CRVAL2", 0.0, "[arcsec] Coordinate value at reference point"),
        ("CNAME1", "Relative offset in detector X from center of PSF, in arcseconds", ""),
        ("CNAME2", "Relative offset in detector Y from center of PSF, in arcseconds", ""),
        ("MJDREF", 0.0, "[d] MJD of fiducial time"),
        ("OVERSAMP", int(oversampling), "PSF oversampling factor per detector pixel"),
        ("BUNIT", "", "PSF is normalised"),
    ]
    for k in range(cube.shape[0]):
        ix, iy = int(np.searchsorted(ux, zone_x[k])), int(np.searchsorted(uy, zone_y[k]))
        cards += [
            (f"XCTR_{k + 1}", float(zone_x[k]), f"X pixel at center of zone ({ix}, {iy})"),
            (f"YCTR_{k + 1}", float(zone_y[k]), f"Y pixel at center of zone ({ix}, {iy})"),
            (f"XWID_{k + 1}", float(wx[ix]), f"[pixel] Zone ({ix}, {iy}) width along X axis"),
            (f"YWID_{k + 1}", float(wy[iy]), f"[pixel] Zone ({ix}, {iy}) width along Y axis"),
        ]
    return cube, raw.render(cards)


def _gaussian_psf(inst: Instrument) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A placeholder PSF (Gaussian, FWHM 1.5 native pixels) on the instrument's zone grid,
    used only when no average_psf calibration is given (the format needs the HDU)."""
    nz, n, ov = inst.psf_zones, inst.psf_size, inst.psf_oversampling
    c = (np.arange(nz) + 0.5) * inst.n_active / nz - 0.5
    zx, zy = np.meshgrid(c, c)
    r = (np.arange(n) - (n - 1) / 2) / ov
    sigma = 1.5 / 2.3548
    g = np.exp(-0.5 * (r[:, None] ** 2 + r[None, :] ** 2) / sigma**2)
    g /= g.sum()
    return np.broadcast_to(g, (nz * nz, n, n)).astype(np.float32), zx.ravel(), zy.ravel()


def _psf_fwhm(cube: np.ndarray, *, pixel_scale: float, oversampling: int) -> float:
    """Median over zones of the FWHM [arcsec] of the circle with the area above half maximum."""
    cube = np.asarray(cube)
    peak = cube.max(axis=(1, 2), keepdims=True)
    area = (cube >= 0.5 * peak).sum(axis=(1, 2)) / oversampling**2  # native pixels
    return float(np.median(2.0 * np.sqrt(area / np.pi)) * pixel_scale)


# ---------------------------------------------------------------------------------------
# File names
# ---------------------------------------------------------------------------------------


def spectral_image_filename(
    obsid: str, band: int, *, version: int = 1, date: _dt.date | _dt.datetime | None = None
) -> str:
    """Archive file name ``level2_<OBSID>D<det>_spx_l2b-v<ver>-<yyyy-ddd>.fits``.

    Parameters
    ----------
    obsid
        Observation id, e.g. ``2025W51_1A_0684_2``.
    band
        Detector number.
    version
        Product version number (``v12`` in ``l2b-v12``).
    date
        Processing date (UTC today by default); written as year and day of year.
    """
    date = date or _dt.datetime.now(_dt.UTC)
    return f"level2_{obsid}D{int(band)}_spx_l2b-v{int(version)}-{date.strftime('%Y-%j')}.fits"


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


def atomic_write(path: Path, write: Callable[[str], None], *, overwrite: bool) -> Path:
    """Run ``write(tmp)`` on a temporary file in the target folder, then rename it onto
    ``path``: a crash never leaves a half-written file under the final name."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


_PER_BAND: dict[int, dict[tuple[int, str], Any]] = {}


def _per_band(calib: xr.Dataset, band: int, what: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` once per calibration Dataset object, band and quantity.

    Every exposure of a band is written with the same PSF HDU, WCS-WAVE table and
    solid-angle statistics; a level export computes them once per band. The entry goes
    when the calibration Dataset is garbage collected.
    """
    key = id(calib)
    if key not in _PER_BAND:
        _PER_BAND[key] = {}
        weakref.finalize(calib, _PER_BAND.pop, key, None)
    store = _PER_BAND[key]
    if (band, what) not in store:
        store[band, what] = compute()
    return store[band, what]


def _spectral_image_parts(
    ds: xr.Dataset,
    *,
    band: int,
    obs: int | str,
    psf: xr.Dataset | None = None,
    spectral_wcs: xr.Dataset | None = None,
    sapm: xr.Dataset | None = None,
    date: str | None = None,
) -> tuple[list[str], list[raw.Extension]]:
    """PRIMARY cards and the six extensions of one (band, observation) image (see
    :func:`write_spectral_image`)."""
    inst = Instrument.from_dict(ds.attrs["instrument"])
    key = _obs_label(ds, obs)
    meta = image_meta(ds, band=band, obs=key)
    planes = ds[list(_IMAGE_VARS)].sel(band=band, obs=key).compute()
    flags = np.asarray(planes["FLAGS"].values)
    meta["_bloom_ns"], meta["_snow_ns"] = (int(n) for n in count_bits_without(
        flags, np.array([_flags.flag_info(n).bit for n in ("BLOOM", "SNOWBALL")]), np.uint32(_flags.Flag.SOURCE)))
    origin = (int(ds["x"].values[0]), int(ds["y"].values[0]))

    if psf is not None:
        oversampling = int(psf.attrs.get("oversampling", inst.psf_oversampling))
        psf_cube, psf_cards = _per_band(psf, band, "hdu", lambda: _psf_parts(
            psf["PSF"].sel(band=band).values, psf["zone_x"].values, psf["zone_y"].values, n_active=inst.n_active,
            pixel_scale=inst.pixel_scale, oversampling=oversampling))
    else:
        cube, zx, zy = _gaussian_psf(inst)
        oversampling = inst.psf_oversampling
        psf_cube, psf_cards = _psf_parts(cube, zx, zy, n_active=inst.n_active, pixel_scale=inst.pixel_scale,
                                         oversampling=oversampling)
    if "psf_fwhm" not in meta:
        meta["psf_fwhm"] = _psf_fwhm(psf_cube, pixel_scale=inst.pixel_scale, oversampling=oversampling)
    if sapm is not None and "omega_median" not in meta:
        meta["omega_median"], meta["omega_stddev"] = _per_band(sapm, band, "omega", lambda: tuple(
            float(v) for v in finite_median_std(np.ascontiguousarray(sapm["SAPM"].sel(band=band).values))))
    elif "omega_median" not in meta:
        # No solid-angle map: the nominal square pixel, spread not known.
        meta["omega_median"], meta["omega_stddev"] = inst.pixel_scale**2, 0.0

    if spectral_wcs is not None:
        wx, wy, values = _per_band(spectral_wcs, band, "wave", lambda: wave_table(
            spectral_wcs["CWAVE"].sel(band=band).values, spectral_wcs["CBAND"].sel(band=band).values))
    else:
        wx, wy, values = wave_table(*_nominal_spectral(inst, band))
    # Spectral grid of the whole detector, re-gridded onto the written window.
    wx, wy, values = _regrid_wave(wx, wy, values, origin=origin, shape=flags.shape)

    image_cards = H.image_header_cards(
        meta, band=band, instrument=ds.attrs["instrument"], history=list(ds.attrs.get("history", [])),
        origin=origin, date=date, persistence_threshold=float(ds.attrs.get("persistence_threshold", 0.1)),
    )
    primary = raw.render([
        ("VERSION", FITS_VERSION, "SSDC Pipelines software version (sphx writer)"),
        ("TELESCOP", "SPHEREx", "Telescope"),
        ("INSTRUME", "SPHEREx", "Instrument"),
        ("DETECTOR", int(band), "1-3: SWIR, 4-6: MWIR"),
        ("OBSID", str(meta["obsid"]), "Observation ID"),
        ("ORIGIN", "sphx", "Open re-implementation of the SPHEREx pipeline"),
    ])
    plane = functools.partial(H.plane_header_cards, meta, origin=origin)
    return primary, [
        raw.Extension(image_cards, np.asarray(planes["IMAGE"].values, np.float32)),
        raw.Extension(H.flags_header_cards(meta, origin=origin), flags.view(np.int32)),
        raw.Extension(plane(extname="VARIANCE", bunit=H.VARIANCE_BUNIT),
                      np.asarray(planes["VARIANCE"].values, np.float32)),
        raw.Extension(plane(extname="ZODI", bunit=H.ZODI_BUNIT), np.asarray(planes["ZODI"].values, np.float32)),
        raw.Extension(psf_cards, psf_cube),
        raw.Extension(raw.render([("EXTNAME", H.WAVE_EXTNAME, _WAVE_EXTNAME_COMMENT)]),
                      columns=_wave_columns(wx, wy, values)),
    ]


def write_spectral_image(
    ds: xr.Dataset,
    path: str | os.PathLike[str],
    *,
    band: int,
    obs: int | str,
    psf: xr.Dataset | None = None,
    spectral_wcs: xr.Dataset | None = None,
    sapm: xr.Dataset | None = None,
    overwrite: bool = False,
    date: str | None = None,
) -> Path:
    """Write one (band, observation) of a Level 2 cube as an archive spectral-image MEF.

    Parameters
    ----------
    ds
        Level 2 cube (dims band, obs, y, x); pixel data of this image are computed once.
    path
        Output file (written atomically: temporary file in the same folder, then rename).
    band
        Detector number.
    obs
        Observation key (the ``obs`` coordinate) or OBSID string.
    psf
        ``average_psf`` calibration (PSF (band, zone, psf_y, psf_x), ``zone_x``/``zone_y``
        0-based pixel centres); a Gaussian placeholder is written without it.
    spectral_wcs
        ``spectral_wcs`` calibration (CWAVE, CBAND [um]) for the ``W`` WCS; the
        instrument's nominal wavelengths are used without it.
    sapm
        ``solid_angle_pixel_map`` calibration (SAPM [arcsec2]) for ``OMEGA_MEDIAN/STDDEV``.
    overwrite
        Replace an existing file.
    date
        HDU creation time written as ``DATE`` (now by default).

    Returns
    -------
    Path
        The written file.
    """
    primary, extensions = _spectral_image_parts(ds, band=band, obs=obs, psf=psf, spectral_wcs=spectral_wcs,
                                                sapm=sapm, date=date)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            raw.write_fits(f, primary, extensions)

    return atomic_write(Path(path), write, overwrite=overwrite)


def export_level(
    ds: xr.Dataset,
    folder: str | os.PathLike[str],
    *,
    psf: xr.Dataset | None = None,
    spectral_wcs: xr.Dataset | None = None,
    sapm: xr.Dataset | None = None,
    version: int = 1,
    date: _dt.date | _dt.datetime | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write every (band, observation) of a level into ``folder`` with archive file names.

    Returns the written paths in (band, obs) order. Options as :func:`write_spectral_image`;
    ``version`` and ``date`` go into the file names.
    """
    folder = Path(folder)
    obsids = [str(o) for o in ds["obsid"].values]
    paths = []
    for band in ds["band"].values:
        for key, obsid in zip(ds["obs"].values, obsids, strict=True):
            path = folder / spectral_image_filename(obsid, int(band), version=version, date=date)
            paths.append(write_spectral_image(
                ds, path, band=int(band), obs=int(key), psf=psf, spectral_wcs=spectral_wcs, sapm=sapm,
                overwrite=overwrite,
            ))
    return paths


# ---------------------------------------------------------------------------------------
# Cutouts
# ---------------------------------------------------------------------------------------


def _regrid_wave(
    x: np.ndarray, y: np.ndarray, values: np.ndarray, *, origin: tuple[int, int], shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The control points enclosing a window (0-based detector origin, (ny, nx) shape).

    Keeping the enclosing nodes (values unchanged) reproduces the parent's bilinear
    lookup exactly inside the window.
    """
    def span(nodes: np.ndarray, lo: int, hi: int) -> slice:
        i0 = max(int(np.searchsorted(nodes, lo, side="right")) - 1, 0)
        i1 = min(int(np.searchsorted(nodes, hi, side="left")), len(nodes) - 1)
        if i1 <= i0:
            i1 = min(i0 + 1, len(nodes) - 1)
            i0 = max(i1 - 1, 0)
        return slice(i0, i1 + 1)

    (x0, y0), (ny, nx) = origin, shape
    sx, sy = span(np.asarray(x), x0 + 1, x0 + nx), span(np.asarray(y), y0 + 1, y0 + ny)
    return np.asarray(x)[sx], np.asarray(y)[sy], np.asarray(values)[sy, sx]


def _window(
    hdul: fits.HDUList, *, center: Any, size: Any, box: Sequence[int] | None
) -> tuple[int, int, int, int]:
    ny, nx = hdul["IMAGE"].shape
    if box is not None:
        x0, y0, wx, wy = (int(v) for v in box)
    else:
        if center is None or size is None:
            raise ValueError("give either box=(x0, y0, nx, ny) or center and size")
        from astropy import units as u
        from astropy.coordinates import SkyCoord
        from astropy.wcs import WCS

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyWarning)
            wcs = WCS(hdul["IMAGE"].header)
        if not isinstance(center, SkyCoord):
            center = SkyCoord(float(center[0]) * u.deg, float(center[1]) * u.deg, frame="icrs")
        cx, cy = (float(v) for v in wcs.world_to_pixel(center))
        scale = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix)))) * 3600.0  # arcsec / pixel
        if isinstance(size, u.Quantity):
            npix = size.to_value(u.pix) if size.unit == u.pix else size.to_value(u.arcsec) / scale
        else:
            npix = float(size)  # pixels
        n = int(round(npix))  # noqa: RUF046
        # IRSA's window rule: n = round(size / pixel scale), first pixel floor(c + 1 - n/2).
        # (a 1e-6 pixel guard keeps round-off of world_to_pixel from moving the window)
        x0, y0 = int(np.floor(cx + 1 - n / 2 + 1e-6)), int(np.floor(cy + 1 - n / 2 + 1e-6))
        wx = wy = n
    xa, ya = max(x0, 0), max(y0, 0)
    xb, yb = min(x0 + wx, nx), min(y0 + wy, ny)
    if xb <= xa or yb <= ya:
        raise ValueError(f"cutout window x {x0}..{x0 + wx - 1}, y {y0}..{y0 + wy - 1} is outside the {nx}x{ny} image")
    return xa, ya, xb - xa, yb - ya


def _shift_header(header: fits.Header, dx: int, dy: int) -> fits.Header:
    header = header.copy()
    for suffix in ("", "A", "W"):
        for axis, d in (("1", dx), ("2", dy)):
            k = f"CRPIX{axis}{suffix}"
            if k in header:
                header[k] = float(header[k]) - d
    return header


def cutout(
    source: str | os.PathLike[str] | fits.HDUList,
    *,
    center: Any = None,
    size: Any = None,
    box: Sequence[int] | None = None,
) -> fits.HDUList:
    """A sub-image of a spectral-image MEF that keeps every HDU (as IRSA's cutout service).

    IMAGE/FLAGS/VARIANCE/ZODI are cropped; ``CRPIX`` of the sky, ``A`` and ``W`` WCSs shift
    by the window origin (so all three still describe the same detector pixels); the
    ``WCS-WAVE`` table is re-gridded to the control points enclosing the window; the PSF
    (or EPSF) HDU passes through unmodified.

    Parameters
    ----------
    source
        File path or open HDU list (a full frame or itself a cutout).
    center, size
        Sky position ((ra, dec) [deg] or SkyCoord) and size (pixels, or an angle Quantity);
        the window follows IRSA's rule and is trimmed to the image.
    box
        ``(x0, y0, nx, ny)``: 0-based pixel origin within ``source`` and size [pixel].

    Returns
    -------
    astropy.io.fits.HDUList
        In memory; write it with ``writeto``.
    """
    if isinstance(source, fits.HDUList):
        return _cutout(source, center=center, size=size, box=box)
    with fits.open(source, memmap=True) as hdul:
        return _cutout(hdul, center=center, size=size, box=box)


def _cutout(hdul: fits.HDUList, *, center: Any, size: Any, box: Sequence[int] | None) -> fits.HDUList:
    x0, y0, nx, ny = _window(hdul, center=center, size=size, box=box)
    out = fits.HDUList()
    for hdu in hdul:
        name = hdu.name.upper()
        if isinstance(hdu, fits.PrimaryHDU):
            out.append(fits.PrimaryHDU(header=hdu.header.copy()))
        elif name in _IMAGE_VARS:
            data = np.array(hdu.section[y0:y0 + ny, x0:x0 + nx])
            header = _shift_header(hdu.header, x0, y0)
            if isinstance(hdu, fits.CompImageHDU):
                out.append(fits.CompImageHDU(data, header=header, name=name,
                                             compression_type=hdu.compression_type))
            else:
                out.append(fits.ImageHDU(data, header=header, name=name))
        elif name == H.WAVE_EXTNAME:
            # Parent-detector origin of the new window, from the source's A WCS.
            px0, py0 = H.origin_from_header(hdul["IMAGE"].header)
            row = hdu.data[0]
            vx, vy = np.asarray(row["X"]).ravel(), np.asarray(row["Y"]).ravel()
            values = np.asarray(row["VALUES"]).reshape(len(vy), len(vx), 2)
            gx, gy, gv = _regrid_wave(vx, vy, values, origin=(px0 + x0, py0 + y0), shape=(ny, nx))
            table = wave_hdu(gx, gy, gv)
            table.header = table.header  # fresh table header, EXTNAME WCS-WAVE
            out.append(table)
        else:  # PSF / EPSF and anything else: unmodified
            out.append(hdu.copy())
    return out
