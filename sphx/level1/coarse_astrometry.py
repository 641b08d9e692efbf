"""Estimate Coarse Astrometry: each image's WCS from the planned pointing.

The planned boresight and position angle of the survey plan (attached by
:func:`~sphx.level1.association.associate_images`), combined with the fixed geometry of
the focal plane (the ``initial_distortion_table`` product: each detector's offset from
the boresight, its rotation and its SIP distortion), give every image a TAN-SIP WCS
(:func:`sphx.wcs.focal_plane_wcs`). Its accuracy is that of the pointing, 2'-10' in the
paper; Estimate Fine Astrometry refines it from stars.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..errors import CalibrationError, StepError
from ..instrument import Instrument
from ..pipeline.step import StepConfig, register_step
from ..wcs import WCS_VARIABLES, focal_plane_wcs, wcs_variables

__all__ = ["estimate_coarse_astrometry"]

_POINTING = ("planned_ra", "planned_dec", "planned_pa_eq")


@register_step(
    "estimate_coarse_astrometry",
    module="Estimate Coarse Astrometry",
    calibrations=("initial_distortion_table",),
    writes={v: None for v in WCS_VARIABLES},
)
def estimate_coarse_astrometry(
    ds: xr.Dataset, *, calib: dict[str, xr.Dataset], config: StepConfig, instrument: Instrument
) -> xr.Dataset:
    """Set ``wcs_*`` of every image from the planned pointing and the focal-plane geometry.

    Raises
    ------
    StepError
        If the cube has no planned pointing (run ``associate_images`` first).
    CalibrationError
        If the distortion table lacks one of the cube's bands.
    """
    missing = [c for c in _POINTING if c not in ds.coords]
    if missing:
        raise StepError(f"the cube has no planned pointing ({', '.join(missing)}); run associate_images first")
    table = calib["initial_distortion_table"]
    absent = sorted(set(ds["band"].values.tolist()) - set(table["band"].values.tolist()))
    if absent:
        raise CalibrationError(f"initial_distortion_table has no geometry for band(s) {absent}")
    ra, dec, pa = (ds[c].values for c in _POINTING)
    wcs = {}
    for b in ds["band"].values.tolist():
        t = table.sel(band=b)
        sip = {k: np.asarray(t[f"SIP_{k.upper()}"].values) for k in ("a", "b", "ap", "bp")}
        for j, o in enumerate(ds["obs"].values.tolist()):
            wcs[(b, o)] = focal_plane_wcs(
                ra=float(ra[j]), dec=float(dec[j]), pa=float(pa[j]),
                offset=tuple(float(v) for v in t["FP_OFFSET"].values), rotation=float(t["FP_ROTATION"]),
                pixel_scale=instrument.pixel_scale, n_pixels=instrument.n_active, sip=sip)
    return ds.drop_vars([v for v in WCS_VARIABLES if v in ds]).assign(
        wcs_variables(wcs, ds["band"].values, ds["obs"].values))
