"""Level 1 image files: one (band, observation) of a Level 1 cube in engineering units.

The layout follows the Level 2 spectral image (:mod:`sphx.io.fits.spectral_image`) as
closely as the content allows::

    0 PRIMARY    no data; TELESCOP, INSTRUME, VERSION, DETECTOR, OBSID, DATE
    1 IMAGE      float32 (y, x), the whole raw frame (reference border included),
                 'electron / s'; header: OBSID, EXPIDN, DETECTOR, DATE-*/MJD-*, XPOSURE,
                 TELAPSE, on-board readout parameters, coarse TAN-SIP WCS, alternate WCS
                 'A' (0-based active pixels), spacecraft state, L1DQAFLG,
                 'L1 N_<NAME>' flag counts, HISTORY (pipeline steps)
    2 FLAGS      int32 bitmask (y, x), EXTTYPE='MASK', HIERARCH MP_<NAME> = bit
    3 VARIANCE   float32 (y, x), 'electron2 / s2' (only when the cube has VARIANCE)
    4 PHANTOM    float32 (y, readout_channel, phantom_read) phantom reads (when present)
    5 SPHX-META  1-row table, column JSON: every non-pixel variable of this image (dims,
                 dtype, attrs, values) and the cube attrs, so a round trip is exact

Any other per-image pixel variable (dims containing ``y``) is written like PHANTOM, as
an extension named after it with ``SPHXVAR``/``SPHXDIMS`` keywords. Units are fixed by
the format (the cube's ``units`` attrs of FLAGS etc. are not copied). The celestial WCS
``CRPIX`` is relative to the written array, whose first pixel is the first reference
pixel: ``astropy.wcs.WCS(header)`` maps array pixels to the sky.

:func:`read_level1_images` reads headers and the small SPHX-META table up front and
returns a dask-backed cube whose pixel data are read only when computed.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
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

from ... import __version__ as _sphx_version
from ... import flags as _flags
from ...cube import STRING_DTYPE
from ...errors import FitsFormatError
from ...obsid import expidn, obs_key
from . import headers as H
from .spectral_image import atomic_write

__all__ = ["L1_HDU_ORDER", "read_level1_images", "write_level1_image"]

L1_HDU_ORDER = ("PRIMARY", "IMAGE", "FLAGS", "VARIANCE", "PHANTOM", "SPHX-META")
IMAGE_BUNIT = "electron / s"
VARIANCE_BUNIT = "electron2 / s2"
META_EXTNAME = "SPHX-META"
_KNOWN = {"IMAGE": ("float32", IMAGE_BUNIT), "FLAGS": ("int32", ""), "VARIANCE": ("float32", VARIANCE_BUNIT)}


def _obs_label(obs: int | str) -> int:
    return obs_key(obs) if isinstance(obs, str) else int(obs)


def _jsonable(value: np.ndarray) -> Any:
    return np.asarray(value).tolist()


def _attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """Attrs as JSON values (numpy scalars/arrays to python)."""
    out = {}
    for k, v in attrs.items():
        if isinstance(v, np.ndarray | np.generic):
            v = v.tolist()
        out[str(k)] = v
    return out


def _dtype(text: str) -> Any:
    return STRING_DTYPE if text.startswith("StringDType") else np.dtype(text)


def _pixel_vars(ds: xr.Dataset) -> list[str]:
    return [n for n, v in ds.data_vars.items() if "y" in v.dims and "band" in v.dims and "obs" in v.dims]


def _meta_json(ds: xr.Dataset, cell: xr.Dataset, pixel: Sequence[str]) -> str:
    """Every non-pixel variable of one image (values for this band/obs), plus the
    coordinates of its extra dims and the cube attrs."""
    variables: dict[str, Any] = {}
    for name, var in cell.variables.items():
        if name in pixel or name in ds.dims:
            continue
        variables[name] = {
            "dims": list(ds[name].dims), "coord": name in ds.coords, "dtype": str(var.dtype),
            "attrs": _attrs(dict(var.attrs)), "data": _jsonable(var.values),
        }
    dims = {d: {"dtype": str(ds[d].dtype), "data": _jsonable(ds[d].values), "attrs": _attrs(dict(ds[d].attrs))}
            for d in ds.dims if d in ds.coords and d not in ("band", "obs")}
    # Pixel attrs without units: the format fixes those (the cube's FLAGS units are wrong).
    pixel_attrs = {n: _attrs({k: v for k, v in ds[n].attrs.items() if k != "units"}) for n in pixel}
    return json.dumps({"variables": variables, "dims": dims, "attrs": _attrs(dict(ds.attrs)),
                       "pixel_attrs": pixel_attrs,
                       "band_attrs": _attrs(dict(ds["band"].attrs)), "obs_attrs": _attrs(dict(ds["obs"].attrs))},
                      allow_nan=True)


def _image_header(ds: xr.Dataset, cell: xr.Dataset, *, band: int, origin: tuple[int, int], date: str) -> fits.Header:
    meta: dict[str, Any] = {k: np.asarray(cell[k].values) for k in cell.variables if k not in ds.dims}
    obsid = str(meta["obsid"])
    cards: list[H.Card] = [
        ("EXTNAME", "IMAGE", "extension name"),
        ("EXTTYPE", "IMAGE", "Extension supports mask overlay"),
        ("BUNIT", IMAGE_BUNIT, "Unit of pixel value (engineering units)"),
        ("DETECTOR", int(band), "1-3: SWIR, 4-6: MWIR"),
        ("OBSID", obsid, "Observation ID"),
        ("EXPIDN", expidn(obsid, int(band)), "Integer Exposure ID"),
        ("DATE", date, "HDU creation time (UTC)"),
        *H._readout_cards(ds.attrs.get("instrument", {})),
    ]
    for key, var, comment in (("SPS_TARGET", "target", "Target ID assigned by Survey Planning"),
                              ("SPS_FLAGS", "sps_flags", "Flags defined by Survey Planning"),
                              ("SGT_LAT_MIDPT", "sgt_lat", "[deg] Ground track latitude at midpoint"),
                              ("SGT_LON_MIDPT", "sgt_lon", "[deg] Ground track longitude at midpoint"),
                              ("SGT_MIN_GCD2SAA", "saa_distance", "[deg] Closest ground track dist to SAA"),
                              ("SPS_ELON", "planned_elon", "[deg] Ecliptic longitude of planned boresight"),
                              ("SPS_ELAT", "planned_elat", "[deg] Ecliptic latitude of planned boresight"),
                              ("SPS_EPA", "planned_pa", "[deg] PA of FP y axis at planned boresight")):
        if var in meta:
            cards.append((key, H._py(meta[var]), comment))
    if "l1dqa_pass" in meta:
        cards.append(("L1DQAFLG", "Pass" if bool(meta["l1dqa_pass"]) else "Fail", "L1 DQA outcome"))
    cards.append(("RADESYS", "ICRS", "Equatorial coordinate system"))
    if "sc_position" in meta and "sc_velocity" in meta:
        pos = np.asarray(cell["sc_position"].transpose("sc_epoch", "xyz").values, float)
        vel = np.asarray(cell["sc_velocity"].transpose("sc_epoch", "xyz").values, float)
        for i, (tail, word) in enumerate((("_START", "START"), ("", "MID"), ("_END", "END"))):
            cards += [(f"{a}_SC{tail}", float(pos[i, j]), f"[km] Exposure {word} {a.lower()} position")
                      for j, a in enumerate("XYZ")]
            cards += [(f"V{a}_SC{tail}", float(vel[i, j]), f"[km/s] Exposure {word} v_{a.lower()} velocity")
                      for j, a in enumerate("XYZ")]
        cards += [("XYZ_SC_SYSTEM", "GEOCENTER", "Reference frame for spacecraft position"),
                  ("VXYZ_SC_SYSTEM", "GEOCENTER", "Reference frame for spacecraft velocity")]
    if "flag_count" in meta:
        cards += [(f"L1 N_{n}", int(c), f"number of pixels flagged {n.lower()}")
                  for n, c in zip(ds["flag"].values.tolist(), meta["flag_count"].tolist(), strict=True)]
    if "wcs_crval" in meta:
        cards += [*H.sky_wcs_cards(meta, origin=origin), *H.sip_cards(meta)]
    cards += [*H.alt_a_cards(origin=origin), ("MJDREF", 0.0, "[d] MJD of fiducial time")]
    if all(k in meta for k in ("mjd_beg", "mjd_avg", "mjd_end", "xposure", "telapse")):
        cards += H.time_cards(meta)
    header = H.to_header(cards)
    for line in ds.attrs.get("history", []):
        header.add_history(str(line))
    return header


def write_level1_image(
    ds: xr.Dataset,
    path: str | os.PathLike[str],
    *,
    band: int,
    obs: int | str,
    overwrite: bool = False,
    date: str | None = None,
) -> Path:
    """Write one (band, observation) of a Level 1 cube as a Level 1 image file.

    Parameters
    ----------
    ds
        Level 1 cube (``repo.open_level("l1")``); this image's pixels are computed once.
    path
        Output file, written atomically (temporary file in the same folder, then rename).
    band
        Detector number.
    obs
        Observation key (``obs`` coordinate) or OBSID string.
    overwrite
        Replace an existing file.
    date
        ``DATE`` (UTC ISO-8601); now by default.

    Returns
    -------
    Path of the written file.
    """
    key = _obs_label(obs)
    cell = ds.sel(band=int(band), obs=key).compute()
    pixel = _pixel_vars(ds)
    origin = (int(ds["x"].values[0]), int(ds["y"].values[0]))
    date = date or _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    primary = fits.PrimaryHDU()
    ph = primary.header
    ph["TELESCOP"] = ("SPHEREx", "Telescope")
    ph["INSTRUME"] = ("SPHEREx", "Instrument")
    ph["VERSION"] = (str(_sphx_version), "SSDC Pipelines software version")
    ph["DETECTOR"] = (int(band), "1-3: SWIR, 4-6: MWIR")
    ph["OBSID"] = (str(cell["obsid"].values), "Observation ID")
    ph["DATE"] = (date, "file creation date (UTC)")
    ph["ORIGIN"] = ("sphx", "Open re-implementation of the SPHEREx pipeline")
    ph["LEVEL"] = ("L1", "data level: engineering units")
    hdus: list[Any] = [primary]
    if "IMAGE" not in pixel or "FLAGS" not in pixel:
        raise KeyError("a Level 1 cube needs IMAGE and FLAGS (band, obs, y, x)")
    hdus.append(fits.ImageHDU(np.asarray(cell["IMAGE"].values, np.float32),
                              header=_image_header(ds, cell, band=band, origin=origin, date=date)))
    flags = np.asarray(cell["FLAGS"].values)
    if flags.size and (flags.min() < 0 or int(flags.max()) >= 2**31):
        raise ValueError("FLAGS values do not fit the archive's int32 bitmask")
    fh = H.to_header([
        ("EXTNAME", "FLAGS", "extension name"),
        ("BUNIT", "", "Unit of flag pixel value (dimensionless)"),
        ("EXTTYPE", "MASK", "Extension can be used as a mask overlay"),
        *((f"MP_{f.name}", f.bit, f.description) for f in _flags.REGISTRY),
        *H.alt_a_cards(origin=origin),
    ])
    hdus.append(fits.ImageHDU(flags.astype(np.int32), header=fh))
    for name in pixel:
        if name in ("IMAGE", "FLAGS"):
            continue
        values = cell[name]
        hdu = fits.ImageHDU(np.asarray(values.values, np.float32 if values.dtype.kind == "f" else values.dtype),
                            name=name.upper())
        hdu.header["SPHXVAR"] = (name, "cube variable")
        hdu.header["SPHXDIMS"] = (" ".join(values.dims), "cube dims (numpy order)")
        hdu.header["BUNIT"] = (VARIANCE_BUNIT if name == "VARIANCE" else IMAGE_BUNIT, "Unit of pixel value")
        hdus.append(hdu)
    text = _meta_json(ds, cell, pixel)
    table = fits.BinTableHDU.from_columns(
        [fits.Column(name="JSON", format=f"{len(text.encode())}A", array=np.array([text]))], name=META_EXTNAME)
    table.header["SPHXDTYP"] = (" ".join(f"{n}:{cell[n].dtype}" for n in pixel), "pixel variable dtypes")
    hdus.append(table)
    hdul = fits.HDUList(hdus)

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyWarning)
            hdul.writeto(tmp, overwrite=True)

    return atomic_write(Path(path), write, overwrite=overwrite)


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------


def _read_hdu(path: str, extname: str, dtype: Any) -> np.ndarray:
    """Pixel data of one HDU (runs inside the dask graph)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        with fits.open(path, memmap=False) as hdul:
            return np.asarray(hdul[extname].data).astype(dtype)


def _scan(path: str) -> dict[str, Any]:
    """Headers, HDU shapes and the SPHX-META table of one file (no pixel data)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyWarning)
            with fits.open(path, memmap=False, lazy_load_hdus=False) as hdul:
                ph = hdul[0].header
                if str(ph.get("TELESCOP", "")).strip() != "SPHEREx":
                    raise FitsFormatError(f"TELESCOP is {ph.get('TELESCOP')!r}, not 'SPHEREx'", file=path, hdu="PRIMARY")
                names = [h.name for h in hdul]
                for need in ("IMAGE", "FLAGS", META_EXTNAME):
                    if need not in names:
                        raise FitsFormatError(f"missing HDU {need!r} (file has {names})", file=path, hdu=need)
                ih = hdul["IMAGE"].header
                for key in ("DETECTOR", "OBSID"):
                    if key not in ih:
                        raise FitsFormatError(f"missing keyword {key}", file=path, hdu="IMAGE")
                shapes = {h.name: tuple(int(h.header[f"NAXIS{i}"]) for i in range(h.header["NAXIS"], 0, -1))
                          for h in hdul[1:] if h.name != META_EXTNAME}
                vardims = {h.name: (str(h.header.get("SPHXVAR", h.name)), str(h.header.get("SPHXDIMS", "y x")).split())
                           for h in hdul[1:] if h.name != META_EXTNAME}
                for name in ("IMAGE", "FLAGS"):
                    if len(shapes[name]) != 2:
                        raise FitsFormatError(f"expected a 2-D image, got shape {shapes[name]}", file=path, hdu=name)
                if shapes["FLAGS"] != shapes["IMAGE"]:
                    raise FitsFormatError(f"shape {shapes['FLAGS']} differs from IMAGE {shapes['IMAGE']}",
                                          file=path, hdu="FLAGS")
                meta_hdu = hdul[META_EXTNAME]
                meta = json.loads(str(meta_hdu.data["JSON"][0]))
                dtypes = dict(item.split(":", 1) for item in str(meta_hdu.header.get("SPHXDTYP", "")).split())
                # A truncated file: astropy pads missing data silently on lazy reads, so
                # compare the file size with what the headers promise.
                end = hdul.fileinfo(len(hdul) - 1)
                size = os.path.getsize(path)
                needed = end["datLoc"] + end["datSpan"] if end is not None else 0
                if size < needed:
                    raise FitsFormatError(f"truncated: {size} bytes, headers need {needed}", file=path)
                band, obsid = int(ih["DETECTOR"]), str(ih["OBSID"]).strip()
                x0, y0 = H.origin_from_header(ih)
    except FitsFormatError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise FitsFormatError(f"not a readable Level 1 image file: {exc}", file=path) from exc
    return {"band": band, "obsid": obsid, "obs": obs_key(obsid), "shapes": shapes, "vardims": vardims,
            "meta": meta, "dtypes": dtypes, "origin": (x0, y0), "path": path}


def read_level1_images(paths: Iterable[str | os.PathLike[str]]) -> xr.Dataset:
    """Read Level 1 image files as one lazy Level 1 cube (band, obs, y, x).

    Only headers and the small SPHX-META table are read here; pixel data are read when
    the returned dask arrays are computed. Images missing from the (band, obs) grid are
    NaN (IMAGE, VARIANCE, PHANTOM) and 0 (FLAGS).

    Raises
    ------
    FitsFormatError
        For a file that is not a Level 1 image (not SPHEREx, missing HDU, wrong shape,
        truncated) or files whose frames differ.
    """
    infos = [_scan(str(p)) for p in paths]
    if not infos:
        raise ValueError("no Level 1 files given")
    bands = sorted({i["band"] for i in infos})
    obs = sorted({i["obs"] for i in infos})
    first = infos[0]
    for info in infos[1:]:
        if info["shapes"] != first["shapes"] or info["origin"] != first["origin"]:
            raise FitsFormatError(f"frame {info['shapes']} at {info['origin']} differs from "
                                  f"{first['path']}'s {first['shapes']} at {first['origin']}", file=info["path"])
    grid = {(i["band"], i["obs"]): i for i in infos}
    meta0 = first["meta"]
    ny, nx = first["shapes"]["IMAGE"]
    x0, y0 = first["origin"]
    coords: dict[str, Any] = {
        "band": ("band", np.asarray(bands, np.int64), meta0.get("band_attrs", {})),
        "obs": ("obs", np.asarray(obs, np.int64), meta0.get("obs_attrs", {})),
    }
    for d, spec in meta0["dims"].items():
        coords[d] = (d, np.asarray(spec["data"], dtype=_dtype(spec["dtype"])), spec["attrs"])
    data_vars: dict[str, Any] = {}
    # Pixel variables: lazy reads, one dask chunk per image.
    for ext, (var, dims) in first["vardims"].items():
        dims = ["y", "x"] if ext in ("IMAGE", "FLAGS", "VARIANCE") else dims
        dtype = _dtype(first["dtypes"].get(var, _KNOWN.get(ext, ("float32",))[0]))
        shape = first["shapes"][ext]
        fill = 0 if np.dtype(dtype).kind in "iub" else np.nan
        rows = []
        for b in bands:
            row = []
            for o in obs:
                info = grid.get((b, o))
                if info is None:
                    row.append(da.full(shape, fill, dtype=dtype))
                else:
                    row.append(da.from_delayed(dask.delayed(_read_hdu, pure=True)(info["path"], ext, dtype),
                                               shape, dtype=dtype))
            rows.append(da.stack(row))
        attrs = dict(meta0.get("pixel_attrs", {}).get(var, {}))
        if var != "FLAGS":
            attrs["units"] = VARIANCE_BUNIT if var == "VARIANCE" else IMAGE_BUNIT
        data_vars[var] = (("band", "obs", *dims), da.stack(rows), attrs)
    # Non-pixel variables from the SPHX-META tables.
    for name, spec in meta0["variables"].items():
        dims, dtype = spec["dims"], _dtype(spec["dtype"])
        per_band, per_obs = "band" in dims, "obs" in dims
        cells = {}
        for (b, o), info in grid.items():
            cells[(b, o)] = np.asarray(info["meta"]["variables"][name]["data"], dtype=dtype)
        sample = np.asarray(spec["data"], dtype=dtype)
        lead = [len(bands)] if per_band else []
        lead += [len(obs)] if per_obs else []
        out = np.empty((*lead, *sample.shape), dtype=dtype) if dtype is not STRING_DTYPE else \
            np.full((*lead, *sample.shape), "", dtype=dtype)
        if np.dtype(dtype).kind == "f":
            out[...] = np.nan
        for (b, o), value in cells.items():
            idx = ((bands.index(b),) if per_band else ()) + ((obs.index(o),) if per_obs else ())
            out[idx] = value
        # The stored values follow the cube's dim order with band/obs removed in front.
        rest = [d for d in dims if d not in ("band", "obs")]
        arr = xr.Variable([*(["band"] if per_band else []), *(["obs"] if per_obs else []), *rest], out,
                          spec["attrs"]).transpose(*dims)
        if spec["coord"]:
            coords[name] = arr
        else:
            data_vars[name] = arr
    pix_x = np.arange(nx, dtype=np.int64) + x0
    pix_y = np.arange(ny, dtype=np.int64) + y0
    coords.setdefault("x", ("x", pix_x))
    coords.setdefault("y", ("y", pix_y))
    return xr.Dataset(data_vars, coords=coords, attrs=meta0["attrs"])
