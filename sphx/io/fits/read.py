"""Read SPHEREx Level 2 spectral-image files (archive QR2/QR3 or sphx-written) lazily.

:func:`open_spectral_images` builds one xarray cube (dims band, obs, y, x) from many
files while reading only headers: every pixel plane is a dask array whose chunks open
the file (memory-mapped; ``section`` access for tile-compressed FLAGS) when computed.

Handled layouts:

- QR2: PSF image cube with ``XCTR_i``/``YCTR_i`` zone keywords; files of pipeline
  versions 6.4 to 6.5.5 without the ``+psffix1`` local tag have y-fast zone keywords
  over x-fast planes (the archive erratum) and are re-ordered here.
- QR3: RICE-compressed FLAGS (``CompImageHDU``), ``MSKNnnnn = '<NAME>'`` flag names,
  ``EPSF`` table (21 x 21 zones at 5x oversampling).
- Full frames and cutouts: the ``A`` WCS gives the detector origin; ``x``/``y`` are
  detector pixel coordinates, and images of different windows are placed on their
  union (outside a window: IMAGE NaN, FLAGS MISSING_DATA).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning
from packaging.version import InvalidVersion, Version

from ... import flags as _flags
from ...errors import DuplicateExposureError, FitsFormatError
from ...obsid import obs_key
from . import headers as H
from . import raw

__all__ = ["open_spectral_images", "psf_header_is_y_fast", "read_psf"]

_PLANES = ("IMAGE", "FLAGS", "VARIANCE", "ZODI")
_REQUIRED = (*_PLANES, H.WAVE_EXTNAME)


# ---------------------------------------------------------------------------------------
# Lazy pixel access
# ---------------------------------------------------------------------------------------


class _LazyPlane:
    """Array-like view of one image HDU; indexing reads only the rows of the slice.

    Uncompressed, unscaled planes are read straight from their byte offset; tile-
    compressed (QR3 FLAGS) or scaled ones through astropy's ``section``.
    """

    def __init__(self, path: str, hdu: raw.Scanned, dtype: np.dtype) -> None:
        self.path, self.ext, self.dtype = path, hdu.name, np.dtype(dtype)
        self.shape = hdu.shape
        self.ndim = len(self.shape)
        self.direct = None if hdu.compressed or hdu.scaled else hdu

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if self.direct is not None and all(isinstance(k, slice) and k.step in (None, 1) for k in key):
            data = raw.read_section(self.path, self.direct, key)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", AstropyWarning)
                with fits.open(self.path, memmap=True, lazy_load_hdus=True) as hdul:
                    data = np.array(hdul[self.ext].section[key])
        if self.dtype == _flags.FLAG_DTYPE:  # int32 on disk, same bits
            return data.astype(np.int32, copy=False).view(np.uint32)
        return data.astype(self.dtype, copy=False)


def _lazy(path: str, hdu: raw.Scanned, dtype: Any, chunks: Any) -> da.Array:
    stat = os.stat(path)
    token = dask.base.tokenize(path, hdu.name, stat.st_size, stat.st_mtime_ns)
    plane = _LazyPlane(path, hdu, dtype)
    return da.from_array(plane, chunks=chunks, name=f"fits-{hdu.name.lower()}-{token}",
                         meta=np.empty((0,) * plane.ndim, dtype=np.dtype(dtype)), asarray=False)


# ---------------------------------------------------------------------------------------
# PSF
# ---------------------------------------------------------------------------------------


def psf_header_is_y_fast(version: str | None) -> bool:
    """Whether a file's PSF zone keywords are y-fast (QR2 erratum).

    Pipeline versions 6.4 to 6.5.5 wrote y-fast zone keywords over x-fast planes; the
    March-2026 re-issue marks fixed files with a ``+psffix1`` local version tag, and
    6.5.6 onwards (and sphx, which writes ``6.5.6+sphx.<version>``) are correct.
    """
    if not version:
        return False
    try:
        v = Version(str(version).strip())
    except InvalidVersion:
        return False
    if v.local and "psffix1" in v.local:
        return False
    return Version("6.4") <= Version(v.base_version) <= Version("6.5.5")


_ZONE_KEYS = ("XCTR", "YCTR", "XWID", "YWID")


def _zones_from_header(text: str, n: int, *, y_fast: bool) -> dict[str, np.ndarray]:
    """Zone centres and widths per PSF plane (x-fast plane order) from the ``XCTR_i``...
    cards of a PSF header's text (read directly: there are four cards per zone)."""
    raw_zones = {k: np.full(n, np.nan) for k in _ZONE_KEYS}
    for i in range(0, len(text), 80):
        key = text[i:i + 8].rstrip()
        if key[:4] in raw_zones and key[4:5] == "_" and key[5:].isdigit() and text[i + 8:i + 10] == "= ":
            j = int(key[5:]) - 1
            if 0 <= j < n:
                raw_zones[key[:4]][j] = float(text[i + 10:i + 80].split("/", 1)[0])
    nx = len(np.unique(raw_zones["XCTR"][np.isfinite(raw_zones["XCTR"])])) or 1
    ny = n // nx
    if y_fast:
        # Card j describes zone (ix, iy) = (j // ny, j % ny); plane p is (p % nx, p // nx).
        p = np.arange(n)
        j = (p % nx) * ny + p // nx
        raw_zones = {k: v[j] for k, v in raw_zones.items()}
    return {"zone_x": raw_zones["XCTR"], "zone_y": raw_zones["YCTR"], "zone_width_x": raw_zones["XWID"],
            "zone_width_y": raw_zones["YWID"]}


def read_psf(path: str | os.PathLike[str]) -> xr.Dataset:
    """The PSF of a spectral-image file with its zones, as xarray.

    Returns a Dataset with ``PSF`` (zone, psf_y, psf_x) and ``zone_x``, ``zone_y``
    (0-based detector pixel centres), ``zone_width_x``, ``zone_width_y`` [pixel] per zone
    in plane order (x fast), attrs ``oversampling``, ``version``, ``layout``
    ('QR2' PSF cube or 'QR3' EPSF table). QR2 erratum headers are re-ordered.
    """
    path = str(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        with fits.open(path, memmap=False) as hdul:
            version = str(hdul[0].header.get("VERSION", "")).strip()
            names = [h.name.upper() for h in hdul]
            if "PSF" in names:
                hdu = hdul["PSF"]
                cube = np.asarray(hdu.data, dtype=np.float32)
                zones = _zones_from_header(hdu.header.tostring(), cube.shape[0],
                                           y_fast=psf_header_is_y_fast(version))
                over, layout = int(hdu.header.get("OVERSAMP", 10)), "QR2"
            elif "EPSF" in names:
                hdu = hdul["EPSF"]
                t = hdu.data
                n = len(t)
                npsf = int(round(np.sqrt(np.asarray(t["EPSF"][0]).size)))  # noqa: RUF046
                cube = np.asarray(t["EPSF"], dtype=np.float32).reshape(n, npsf, npsf)
                zones = {"zone_x": np.asarray(t["XCENTER"], float), "zone_y": np.asarray(t["YCENTER"], float),
                         "zone_width_x": np.asarray(t["XWIDTH"], float),
                         "zone_width_y": np.asarray(t["YWIDTH"], float)}
                over, layout = int(hdu.header.get("OVSMPX", 5)), "QR3"
            else:
                raise FitsFormatError("no PSF or EPSF HDU", file=path, hdu="PSF")
    n = cube.shape[-1]
    offs = (np.arange(n) - (n - 1) / 2) / over  # native pixels
    return xr.Dataset(
        {"PSF": (("zone", "psf_y", "psf_x"), cube)},
        coords={"zone": np.arange(cube.shape[0]), **{k: ("zone", v) for k, v in zones.items()},
                "psf_y": offs, "psf_x": offs},
        attrs={"oversampling": over, "version": version, "layout": layout},
    )


# ---------------------------------------------------------------------------------------
# Scanning one file (headers only)
# ---------------------------------------------------------------------------------------


def _scan(path: str) -> dict[str, Any]:
    """Headers, shapes and PSF layout of one file; raises FitsFormatError for bad files."""
    try:
        hdus = raw.scan(path)
    except OSError as exc:
        raise FitsFormatError(f"cannot read the file ({exc})", file=path) from None
    by_name: dict[str, raw.Scanned] = {}
    for hdu in hdus:
        by_name.setdefault(hdu.name, hdu)
    names = [h.name for h in hdus]
    try:
        primary = hdus[0].header()
        image = by_name["IMAGE"].header() if "IMAGE" in by_name else None
    except (ValueError, TypeError) as exc:  # astropy on unparseable cards
        raise FitsFormatError(f"damaged header ({exc})", file=path) from None
    is_spherex = str(primary.get("TELESCOP", "")).strip().upper() == "SPHEREX" or (
        image is not None and "OBSID" in image
    )
    if not is_spherex:
        raise FitsFormatError(
            "not a SPHEREx spectral image (no TELESCOP='SPHEREx' and no IMAGE HDU with OBSID)", file=path
        )
    for name in _REQUIRED:
        if name not in by_name:
            raise FitsFormatError(f"missing HDU {name!r} (HDUs present: {', '.join(names)})", file=path, hdu=name)
    if "PSF" not in by_name and "EPSF" not in by_name:
        raise FitsFormatError(f"missing HDU 'PSF' or 'EPSF' (HDUs present: {', '.join(names)})",
                              file=path, hdu="PSF")
    shape = by_name["IMAGE"].shape
    if len(shape) != 2:
        raise FitsFormatError(f"IMAGE has shape {shape}, expected 2-d", file=path, hdu="IMAGE")
    for name in _PLANES[1:]:
        if by_name[name].shape != shape:
            raise FitsFormatError(f"{name} has shape {by_name[name].shape}, IMAGE has {shape}", file=path, hdu=name)
    for key in ("DETECTOR", "OBSID"):
        if key not in image:
            raise FitsFormatError(f"IMAGE header has no {key}", file=path, hdu="IMAGE")
    bits = H.flag_bits_from_header(by_name["FLAGS"].header(), file=path)
    version = str(primary.get("VERSION", "")).strip()
    info: dict[str, Any] = {
        "path": path, "meta": H.header_to_meta(image), "shape": shape, "origin": H.origin_from_header(image),
        "bits": bits, "version": version, "compressed_flags": by_name["FLAGS"].compressed,
        "hdus": {name: by_name[name] for name in _PLANES},
    }
    if "PSF" in by_name:
        psf = by_name["PSF"]
        pshape = psf.shape
        if len(pshape) != 3:
            raise FitsFormatError(f"PSF has shape {pshape}, expected (zone, psf_y, psf_x)", file=path, hdu="PSF")
        info["psf"] = {"layout": "QR2", "shape": pshape, "oversampling": int(psf.header().get("OVERSAMP", 10)),
                       "hdu": psf, **_zones_from_header(psf.text, pshape[0], y_fast=psf_header_is_y_fast(version))}
    else:
        eh = by_name["EPSF"].header()
        nrow = int(eh["NAXIS2"])
        tdim = None
        for i in range(1, int(eh.get("TFIELDS", 0)) + 1):
            if str(eh.get(f"TTYPE{i}", "")).strip().upper() == "EPSF":
                tdim = eh.get(f"TDIM{i}")
        m = re.match(r"\((\d+),\s*(\d+)\)", str(tdim or ""))
        if m is None:
            raise FitsFormatError("EPSF column has no TDIM '(n,n)'", file=path, hdu="EPSF")
        info["psf"] = {"layout": "QR3", "shape": (nrow, int(m.group(2)), int(m.group(1))),
                       "oversampling": int(eh.get("OVSMPX", 5))}
    return info


@dask.delayed(pure=True)
def _epsf_table(path: str) -> dict[str, np.ndarray]:
    with fits.open(path, memmap=True) as hdul:
        t = hdul["EPSF"].data
        n = len(t)
        cube = np.asarray(t["EPSF"], dtype=np.float32)
        npsf = int(round(np.sqrt(cube[0].size)))  # noqa: RUF046
        return {"PSF": cube.reshape(n, npsf, npsf),
                **{k: np.asarray(t[c], dtype=np.float64) for k, c in
                   (("zone_x", "XCENTER"), ("zone_y", "YCENTER"),
                    ("zone_width_x", "XWIDTH"), ("zone_width_y", "YWIDTH"))}}


# ---------------------------------------------------------------------------------------
# The cube
# ---------------------------------------------------------------------------------------

_FILL = {"IMAGE": np.nan, "VARIANCE": np.nan, "ZODI": np.nan, "FLAGS": int(_flags.Flag.MISSING_DATA)}
_DTYPE = {"IMAGE": np.float32, "VARIANCE": np.float32, "ZODI": np.float32, "FLAGS": _flags.FLAG_DTYPE}
_UNITS = {"IMAGE": H.IMAGE_BUNIT, "VARIANCE": H.VARIANCE_BUNIT, "ZODI": H.ZODI_BUNIT}


def _fill_value(values: list[Any]) -> Any:
    sample = next((v for v in values if v is not None), None)
    if isinstance(sample, bool):
        return False
    if isinstance(sample, int):
        return -1
    if isinstance(sample, float):
        return np.nan
    return ""


def open_spectral_images(
    paths: Iterable[str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    chunks: Any = None,
    psf: bool = True,
) -> xr.Dataset:
    """One lazy Level 2 cube from many spectral-image files (headers only are read).

    Parameters
    ----------
    paths
        Files (any mix of exposures and detectors), or a single path.
    chunks
        Dask chunks of one (y, x) plane; one chunk per plane by default.
    psf
        Add the per-image PSF as a lazy ``psf`` variable (band, obs, psf_zone, psf_y,
        psf_x) with ``psf_zone_x``/``psf_zone_y`` centres, when all files share one PSF
        layout.

    Returns
    -------
    xarray.Dataset
        IMAGE, VARIANCE, ZODI (float32), FLAGS (uint32) with dims (band, obs, y, x), ``x``
        and ``y`` in 0-based detector pixels; the wcs_* variables (``wcs_crpix`` in the
        detector frame); per-image and per-observation metadata as in a sphx Level 2 cube.

    Raises
    ------
    FitsFormatError
        For a file that is not a readable SPHEREx spectral image (names file and problem).
    DuplicateExposureError
        For two files of the same (detector, observation).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    infos = [_scan(str(Path(p))) for p in paths]
    if not infos:
        raise ValueError("no files given")
    cells: dict[tuple[int, int], dict[str, Any]] = {}
    for info in infos:
        cell = (info["meta"]["detector"], obs_key(info["meta"]["obsid"]))
        if cell in cells:
            raise DuplicateExposureError(
                f"detector {cell[0]} of {info['meta']['obsid']} is in both {cells[cell]['path']} and {info['path']}"
            )
        cells[cell] = info
    bands = sorted({b for b, _ in cells})
    obs = sorted({o for _, o in cells})
    x0 = min(i["origin"][0] for i in infos)
    y0 = min(i["origin"][1] for i in infos)
    x1 = max(i["origin"][0] + i["shape"][1] for i in infos)
    y1 = max(i["origin"][1] + i["shape"][0] for i in infos)
    ny, nx = y1 - y0, x1 - x0
    plane_chunks = chunks if chunks is not None else (ny, nx)

    data_vars: dict[str, Any] = {}
    for name in _PLANES:
        rows = []
        for b in bands:
            row = []
            for o in obs:
                info = cells.get((b, o))
                dtype = _DTYPE[name]
                if info is None:
                    arr = da.full((ny, nx), _FILL[name], dtype=dtype, chunks=plane_chunks)
                else:
                    arr = _lazy(info["path"], info["hdus"][name], dtype,
                                plane_chunks if info["shape"] == (ny, nx) else info["shape"])
                    ox, oy = info["origin"][0] - x0, info["origin"][1] - y0
                    pad = ((oy, ny - oy - info["shape"][0]), (ox, nx - ox - info["shape"][1]))
                    if any(any(p) for p in pad):
                        arr = da.pad(arr, pad, mode="constant", constant_values=_FILL[name]).rechunk(plane_chunks)
                row.append(arr)
            rows.append(da.stack(row))
        attrs = {"units": _UNITS[name]} if name in _UNITS else {}
        if name == "FLAGS":
            attrs = _flags.cf_attrs()
        data_vars[name] = (("band", "obs", "y", "x"), da.stack(rows), attrs)

    metas = {c: i["meta"] for c, i in cells.items()}

    def grid(key: str, shape: tuple[int, ...] = (), fill: Any = np.nan, dtype: Any = None) -> np.ndarray:
        out = np.full((len(bands), len(obs), *shape), fill, dtype=dtype)
        for (b, o), m in metas.items():
            if key in m:
                out[bands.index(b), obs.index(o)] = m[key]
        return out

    data_vars["wcs_crpix"] = (("band", "obs", "wcs_axis"), grid("wcs_crpix", (2,)), {"units": "pixel"})
    data_vars["wcs_crval"] = (("band", "obs", "wcs_axis"), grid("wcs_crval", (2,)), {"units": "deg"})
    data_vars["wcs_cd"] = (("band", "obs", "wcs_axis", "wcs_pix"), grid("wcs_cd", (2, 2)), {"units": "deg / pixel"})
    for k in ("a", "b", "ap", "bp"):
        data_vars[f"wcs_sip_{k}"] = (("band", "obs", "sip_p", "sip_q"), grid(f"wcs_sip_{k}", (4, 4), 0.0))
    for key, dtype, fill in (("finast", np.int32, -1), ("l1dqa_pass", bool, False), ("l2dqa_pass", bool, False),
                             ("source_fraction", np.float64, np.nan), ("astrometry_nmatch", np.int32, -1),
                             ("n_tran_nb", np.int64, -1), ("n_pers_nb", np.int64, -1),
                             ("psf_fwhm", np.float64, np.nan), ("omega_median", np.float64, np.nan),
                             ("omega_stddev", np.float64, np.nan)):
        data_vars[key] = (("band", "obs"), grid(key, (), fill, dtype))
    names = [f.name for f in _flags.REGISTRY]
    counts = np.zeros((len(bands), len(obs), len(names)), dtype=np.int64)
    for (b, o), m in metas.items():
        counts[bands.index(b), obs.index(o)] = [m["flag_count"].get(n, 0) for n in names]
    data_vars["flag_count"] = (("band", "obs", "flag"), counts,
                               {"long_name": "number of active pixels carrying each FLAGS bit"})
    extra_names = sorted({k for m in metas.values() for k in m["_extra_image"]})
    for key in extra_names:
        values = [m["_extra_image"].get(key) for m in metas.values()]
        fill = _fill_value(values)
        out = np.full((len(bands), len(obs)), fill, dtype=object)
        for (b, o), m in metas.items():
            out[bands.index(b), obs.index(o)] = m["_extra_image"].get(key, fill)
        data_vars[key] = (("band", "obs"), np.array(out.tolist()))
    files = np.full((len(bands), len(obs)), "", dtype=object)
    for (b, o), info in cells.items():
        files[bands.index(b), obs.index(o)] = info["path"]
    data_vars["source_file"] = (("band", "obs"), files.astype(str))

    # Per-observation coordinates from the first file of each observation.
    first = {o: next(cells[(b, o)]["meta"] for b in bands if (b, o) in cells) for o in obs}
    coords: dict[str, Any] = {
        "band": ("band", np.array(bands, dtype=np.int64), {"long_name": "detector number (DETECTOR)"}),
        "obs": ("obs", np.array(obs, dtype=np.int64),
                {"long_name": "observation key: EXPIDN without the detector digit"}),
        "y": ("y", np.arange(y0, y1, dtype=np.int64), {"long_name": "pixel row, 0 = first active row"}),
        "x": ("x", np.arange(x0, x1, dtype=np.int64),
              {"long_name": "pixel column, 0 = first active column (sky orientation)"}),
        "flag": ("flag", np.array(names)),
        "sc_epoch": ("sc_epoch", np.array(["beg", "avg", "end"])),
        "xyz": ("xyz", np.array(["x", "y", "z"])),
    }
    obs_vars = ["obsid", "mjd_beg", "mjd_avg", "mjd_end", "xposure", "telapse", "target", "sps_flags",
                "sgt_lat", "sgt_lon", "saa_distance", "planned_elon", "planned_elat", "planned_pa"]
    for key in obs_vars:
        values = [first[o].get(key) for o in obs]
        if all(v is None for v in values):
            continue
        fill = _fill_value(values)
        coords[key] = ("obs", np.array([fill if v is None else v for v in values]))
    coords["sc_position"] = (("obs", "sc_epoch", "xyz"), np.stack([first[o]["sc_position"] for o in obs]),
                             {"units": "km"})
    coords["sc_velocity"] = (("obs", "sc_epoch", "xyz"), np.stack([first[o]["sc_velocity"] for o in obs]),
                             {"units": "km / s"})
    for key in sorted({k for m in first.values() for k in m["_extra_obs"]}):
        values = [first[o]["_extra_obs"].get(key) for o in obs]
        fill = _fill_value(values)
        coords[key] = ("obs", np.array([fill if v is None else v for v in values]))

    if psf:
        _add_psf(data_vars, coords, cells, bands, obs)

    first_info = infos[0]
    attrs = {
        "source": "sphx.io.fits",
        "history": first_info["meta"]["history"],
        "fits_versions": sorted({i["version"] for i in infos}),
    }
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def _add_psf(data_vars: dict[str, Any], coords: dict[str, Any], cells: dict[tuple[int, int], dict[str, Any]],
             bands: Sequence[int], obs: Sequence[int]) -> None:
    """Lazy per-image PSF variables when every file has the same PSF layout and shape."""
    layouts = {(i["psf"]["layout"], i["psf"]["shape"], i["psf"]["oversampling"]) for i in cells.values()}
    if len(layouts) != 1:
        return
    layout, shape, over = layouts.pop()
    nz = shape[0]
    zx, zy = np.full((len(bands), len(obs), nz), np.nan), np.full((len(bands), len(obs), nz), np.nan)
    for bi, b in enumerate(bands):
        row = []
        for oi, o in enumerate(obs):
            info = cells.get((b, o))
            if info is None:
                row.append(da.full(shape, np.nan, dtype=np.float32, chunks=shape))
                continue
            if layout == "QR2":
                row.append(_lazy(info["path"], info["psf"]["hdu"], np.float32, shape))
                zx[bi, oi], zy[bi, oi] = info["psf"]["zone_x"], info["psf"]["zone_y"]
            else:
                table = _epsf_table(info["path"])
                row.append(da.from_delayed(table["PSF"], shape, dtype=np.float32))
                zx_row = da.from_delayed(table["zone_x"], (nz,), dtype=np.float64)
                zy_row = da.from_delayed(table["zone_y"], (nz,), dtype=np.float64)
                info["_lazy_zones"] = (zx_row, zy_row)
        cubes_row = da.stack(row)
        data_vars.setdefault("_psf_rows", []).append(cubes_row)
    psf_cube = da.stack(data_vars.pop("_psf_rows"))
    data_vars["psf"] = (("band", "obs", "psf_zone", "psf_y", "psf_x"), psf_cube,
                        {"oversampling": over, "layout": layout})
    if layout == "QR2":
        data_vars["psf_zone_x"] = (("band", "obs", "psf_zone"), zx, {"units": "pixel"})
        data_vars["psf_zone_y"] = (("band", "obs", "psf_zone"), zy, {"units": "pixel"})
    else:
        lz = []
        for b in bands:
            row_x, row_y = [], []
            for o in obs:
                info = cells.get((b, o))
                if info is None:
                    row_x.append(da.full((nz,), np.nan))
                    row_y.append(da.full((nz,), np.nan))
                else:
                    row_x.append(info["_lazy_zones"][0])
                    row_y.append(info["_lazy_zones"][1])
            lz.append((da.stack(row_x), da.stack(row_y)))
        data_vars["psf_zone_x"] = (("band", "obs", "psf_zone"), da.stack([r[0] for r in lz]), {"units": "pixel"})
        data_vars["psf_zone_y"] = (("band", "obs", "psf_zone"), da.stack([r[1] for r in lz]), {"units": "pixel"})
    n = shape[-1]
    offs = (np.arange(n) - (n - 1) / 2) / over
    coords["psf_y"] = ("psf_y", offs, {"units": "pixel", "long_name": "offset from PSF centre [native pixels]"})
    coords["psf_x"] = ("psf_x", offs, {"units": "pixel", "long_name": "offset from PSF centre [native pixels]"})
