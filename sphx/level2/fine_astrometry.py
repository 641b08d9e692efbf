"""Estimate Fine Astrometry: each image's pointing and roll from its stars.

The paper's Level 2b module calculates "an astrometric solution to determine the
translation and rotation of the field per image" from astrometric calibrators, first
blind (astrometry.net) and then refined iteratively (scamp), and records the result as
header keywords with FINAST = 0 for a good solution. Here both stages are
:func:`sphx.astrometry.solve.solve_image`, one Dask task per image; the detector
distortion (SIP) and the pixel scale stay those of the fixed calibration.

What the step writes, per image (band, obs):

==========================  ===============================================================
``wcs_crval``, ``wcs_cd``   the solved WCS (the coarse one where FINAST != 0)
``finast``                  FINAST: 0 good; otherwise the bits of
                            :data:`~sphx.astrometry.solve.FINAST_BITS`
                            (:func:`~sphx.astrometry.solve.describe_finast` says them)
``astrometry_rms``          rms distance of the calibrators from their catalogue
                            positions after the fit, weighted by the inverse centroid
                            variance [arcsec] (FINAST needs < ``max_rms``)
``astrometry_error``        expected rms error of the solution over the detector, from
                            the fit's covariance [arcsec]
``astrometry_nmatch``       calibrators used (header MATCH_NSTARS)
``astrometry_nblind``       stars matched by the blind stage
``astrometry_offset``       distance of the solved image centre from the coarse one [arcsec]
``astrometry_rotation``     rotation from the coarse WCS [deg]
==========================  ===============================================================

Bad input never stops a recipe: an empty catalogue region, too few stars, or an image
with no usable pixels is a FINAST bit on that image, and Level 2 data quality fails it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pydantic
import xarray as xr

from .. import flags as _flags
from ..astrometry.catalog import catalog_inputs, image_rows
from ..astrometry.solve import DIAGNOSTICS, SolveOptions, solve_image
from ..blocks import apply_blocks
from ..errors import StepError
from ..instrument import Instrument
from ..levels import SURFACE_BRIGHTNESS
from ..pipeline.step import StepConfig, register_step
from ..wcs import SIP_ORDER, WCS_VARIABLES
from ._frame import calibration_map

__all__ = ["FineAstrometryConfig", "estimate_fine_astrometry"]

_OUTPUTS = {
    "finast": ("FINAST: 0 good fine-astrometric solution, else failure bits", ""),
    "astrometry_rms": ("weighted rms of calibrator residuals after the fit", "arcsec"),
    "astrometry_error": ("expected rms error of the solution over the detector", "arcsec"),
    "astrometry_nmatch": ("astrometric calibrators used (MATCH_NSTARS)", ""),
    "astrometry_nblind": ("stars matched by the blind pattern stage", ""),
    "astrometry_offset": ("shift of the image centre from the coarse WCS", "arcsec"),
    "astrometry_rotation": ("rotation from the coarse WCS", "deg"),
}


class FineAstrometryConfig(StepConfig):
    """Selection of astrometric calibrators and what counts as a good solution."""

    search_radius: float = pydantic.Field(
        15.0, gt=0, description="[arcmin] largest pointing error searched by the blind stage")
    max_rotation: float = pydantic.Field(
        2.0, ge=0, description="[deg] largest roll error searched by offset voting (triangles take larger ones)")
    blind_stars: int = pydantic.Field(60, ge=6, description="brightest unsaturated stars of the image matched blind")
    blind_flux_margin: float = pydantic.Field(
        1.3, ge=1, description="catalogue stars within the detections' flux range widened by this factor are matched")
    blind_threshold: float = pydantic.Field(10.0, gt=0, description="SNR of the peaks used by the blind stage")
    match_radius: float = pydantic.Field(2.0, gt=0, description="[pixel] largest calibrator offset after the blind stage")
    min_snr: float = pydantic.Field(10.0, gt=0, description="smallest measured SNR of a calibrator")
    saturation_flux: float = pydantic.Field(
        3e4, gt=0, description="[uJy] calibrators with any catalogue flux point above this may saturate")
    max_pos_error: float = pydantic.Field(10.0, gt=0, description="[mas] largest catalogue position error")
    isolation_radius: float = pydantic.Field(2.0, ge=0, description="[pixel] neighbourhood checked for brighter sources")
    isolation_ratio: float = pydantic.Field(
        0.1, gt=0, description="a neighbour brighter than this fraction of the calibrator disqualifies it")
    max_calibrators: int = pydantic.Field(1500, ge=10, description="brightest calibrators measured per image")
    min_matches: int = pydantic.Field(10, ge=3, description="fewest calibrators of a good solution")
    clip: float = pydantic.Field(4.0, gt=0, description="residuals beyond this many sigma are clipped")
    systematic: float = pydantic.Field(0.02, ge=0, description="[pixel] centroid error floor added in quadrature")
    max_rms: float = pydantic.Field(1.0, gt=0, description="[arcsec] FINAST = 0 needs a residual rms below this")
    max_error: float = pydantic.Field(
        0.1, gt=0, description="[arcsec] FINAST = 0 needs an expected solution error at most this")
    fit_scale: bool = pydantic.Field(False, description="also fit a scale change (the paper fits shift and rotation)")
    bad: _flags.FlagNames = pydantic.Field(
        tuple(f.name for f in _flags.Flag if f & _flags.DEFAULT_BAD), description="flags that exclude a pixel")
    saturated: _flags.FlagNames = pydantic.Field(
        ("OVERFLOW", "NONLINEAR", "SUR_ERROR"), description="flags near a peak that reject a calibrator")


def _solve_stack(image, variance, flags, cwave, crpix, crval, cd, a, b, ap, bp, epoch, rows, catalog, *,
                 options: SolveOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`solve_image` over the leading (band, obs) axes of a block."""
    core = (2, 2, 2, 2, 1, 1, 2, 2, 2, 2, 2, 0, 1, 2)
    inputs = (image, variance, flags, cwave, crpix, crval, cd, a, b, ap, bp, epoch, rows, catalog)
    loop = np.broadcast_shapes(*(x.shape[:x.ndim - k] for x, k in zip(inputs, core, strict=True)))
    inputs = [np.broadcast_to(x, loop + x.shape[x.ndim - k:]) for x, k in zip(inputs, core, strict=True)]
    out_crval = np.empty((*loop, 2))
    out_cd = np.empty((*loop, 2, 2))
    diag = np.empty((*loop, len(DIAGNOSTICS)))
    for idx in np.ndindex(*loop):
        args = [x[idx] for x in inputs]
        cat = image_rows(args[13], args[12])
        out_crval[idx], out_cd[idx], diag[idx] = solve_image(*args[:11], cat, float(args[11]), options)
    return out_crval, out_cd, diag


@register_step(
    "estimate_fine_astrometry",
    module="Estimate Fine Astrometry",
    config=FineAstrometryConfig,
    reads={"IMAGE": SURFACE_BRIGHTNESS, "VARIANCE": None, "FLAGS": None},
    writes={"wcs_crval": "deg", "wcs_cd": "deg / pixel", **{k: units for k, (_, units) in _OUTPUTS.items()}},
    calibrations=("spectral_wcs",),
    tables={"srccat": False, "refcat": False},
    frame="active",
)
def estimate_fine_astrometry(
    ds: xr.Dataset,
    *,
    calib: dict[str, xr.Dataset],
    config: FineAstrometryConfig,
    instrument: Instrument,
    tables: Mapping[str, Any],
) -> xr.Dataset:
    """Solve every image's WCS from its stars (lazy, one task per image).

    Parameters
    ----------
    ds
        Calibrated cube at the active frame: IMAGE [MJy / sr], VARIANCE, FLAGS, the coarse
        ``wcs_*`` variables, ``mjd_avg``, and the target groups' source lists from
        ``query_reference_catalog`` (else ``tables``).
    calib
        ``spectral_wcs`` (CWAVE [um]: where catalogue spectra are evaluated).
    tables
        ``srccat`` or ``refcat`` when the cube holds no source lists.

    Returns
    -------
    xarray.Dataset
        The cube with the solved ``wcs_crval``/``wcs_cd`` and the variables listed in the
        module docstring.

    Raises
    ------
    StepError
        No WCS variables, no catalogue, or a cube not at the active frame.
    """
    missing = [v for v in WCS_VARIABLES[:3] if v not in ds]
    if missing:
        raise StepError(f"estimate_fine_astrometry needs the coarse WCS, but the cube lacks {missing}; "
                        "run estimate_coarse_astrometry first")
    x, y = ds["x"].values, ds["y"].values
    if x.size != instrument.n_active or y.size != instrument.n_active or x[0] != 0 or y[0] != 0:
        raise StepError("estimate_fine_astrometry works on whole images at the active frame "
                        f"({instrument.n_active}x{instrument.n_active} pixels from 0)")
    if "mjd_avg" not in ds.variables:
        raise StepError("estimate_fine_astrometry needs the mjd_avg coordinate (epoch of the catalogue motions)")
    catalog, rows = catalog_inputs(ds, tables, step="estimate_fine_astrometry")
    options = SolveOptions(
        pixel_scale=instrument.pixel_scale, bad=int(_flags.mask(*config.bad)),
        saturated=int(_flags.mask(*config.saturated)),
        **{k: getattr(config, k) for k in SolveOptions.__dataclass_fields__
           if k in FineAstrometryConfig.model_fields and k not in ("bad", "saturated")})

    per_image = {"band": 1, "obs": 1}
    pixels = [ds[v].chunk({**per_image, "y": -1, "x": -1}) for v in ("IMAGE", "VARIANCE", "FLAGS")]
    no_sip = xr.DataArray(np.zeros((SIP_ORDER + 1, SIP_ORDER + 1)), dims=("sip_p", "sip_q"))
    wcs_in = [ds["wcs_crpix"], ds["wcs_crval"], ds["wcs_cd"],
              *(ds.get(f"wcs_sip_{k}", no_sip) for k in ("a", "b", "ap", "bp"))]
    wcs_in = [w.chunk({d: 1 for d in per_image if d in w.dims}) for w in wcs_in]
    epoch = (2000.0 + (ds["mjd_avg"].variable - 51544.5) / 365.25).chunk({"obs": 1})  # Julian year
    crval, cd, diag = apply_blocks(
        _solve_stack, *pixels, calibration_map(calib, "spectral_wcs", "CWAVE", ds), *wcs_in, epoch, rows, catalog,
        input_core_dims=[["y", "x"]] * 4 + [["wcs_axis"], ["wcs_axis"], ["wcs_axis", "wcs_pix"]]
        + [["sip_p", "sip_q"]] * 4 + [[], ["srccat_bound"], ["catalog_source", "catalog_field"]],
        output_core_dims=[["wcs_axis"], ["wcs_axis", "wcs_pix"], ["astrometry_field"]],
        kwargs={"options": options},
        output_dtypes=[np.float64, np.float64, np.float64],
        output_sizes={"astrometry_field": len(DIAGNOSTICS)},
    )
    out = ds.copy()
    out["wcs_crval"] = crval.transpose(*ds["wcs_crval"].dims).assign_attrs(ds["wcs_crval"].attrs)
    out["wcs_cd"] = cd.transpose(*ds["wcs_cd"].dims).assign_attrs(ds["wcs_cd"].attrs)
    for k, name in enumerate(("finast", "rms", "error", "nmatch", "nblind", "offset", "rotation")):
        var = "finast" if name == "finast" else f"astrometry_{name}"
        value = diag.isel(astrometry_field=k, drop=True).transpose("band", "obs")
        if var in ("finast", "astrometry_nmatch", "astrometry_nblind"):
            value = value.astype(np.int32)
        long_name, units = _OUTPUTS[var]
        out[var] = value.assign_attrs(long_name=long_name, units=units)
    return out
