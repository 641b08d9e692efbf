"""What a simulation hands the pipeline (calibration products) and keeps as truth.

Calibration products are the detector's true properties *as measured in the lab*: each
carries a measurement error scaled by ``lab_error`` (0 gives the exact truth). The exact
values are kept in the ``simulation_truth`` state of the repository.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from .. import flags as _flags
from ..cube import STRING_DTYPE
from .optics import psf_cube, psf_zone_centers
from .simulator import SR_PER_ARCSEC2, UJY_PER_MJY, Simulator

__all__ = ["calibration_products", "detector_truth"]

# 1-sigma lab accuracy at lab_error = 1
GAIN_ERROR = 0.002      # relative
DARK_ERROR = 0.002      # [electron / s]
AGM_ERROR = 0.003       # relative
READNOISE_ERROR = 0.02  # relative


def _pixel_coords(sim: Simulator) -> dict[str, np.ndarray]:
    px = sim.instrument.pixel_coords(reference_pixels=False)
    return {"band": np.asarray(sim.bands, np.int64), "y": px, "x": px}


def _maps(sim: Simulator, values: dict[str, tuple[list[np.ndarray], str, str]]) -> xr.Dataset:
    dims = ("band", "y", "x")
    return xr.Dataset({name: (dims, np.stack(arrs), {"units": units, "long_name": long})
                       for name, (arrs, units, long) in values.items()}, coords=_pixel_coords(sim))


def absolute_gain(sim: Simulator, band: int) -> np.ndarray:
    """True absolute gain [MJy/sr per electron/s] of every pixel (NaN on dead pixels)."""
    opt = sim.optics[band]
    with np.errstate(divide="ignore"):
        agm = 1.0 / (opt.sapm.astype(np.float64) * SR_PER_ARCSEC2 * UJY_PER_MJY * opt.response)
    return np.where(np.isfinite(agm), agm, np.nan).astype(np.float32)


def calibration_products(sim: Simulator) -> dict[str, xr.Dataset]:
    """The calibration products of a simulation, by archive family name."""
    cfg, inst = sim.config, sim.instrument
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(2,)))
    e = cfg.lab_error
    dets = [sim.detectors[b] for b in sim.bands]
    opts = [sim.optics[b] for b in sim.bands]
    ref, n = inst.n_reference, inst.n_active
    shape = (n, n)
    out: dict[str, xr.Dataset] = {}
    out["gain_factors"] = xr.Dataset(
        {"GAIN": (("band", "readout_channel"),
                  np.stack([d.gain * (1 + GAIN_ERROR * e * rng.standard_normal(d.gain.size)) for d in dets]).astype(np.float32),
                  {"units": "electron / adu", "long_name": "electronic gain per readout channel"})},
        coords={"band": np.asarray(sim.bands, np.int64), "readout_channel": np.arange(inst.n_readout_channels)})
    out["dark"] = _maps(sim, {
        "DARK": ([d.dark + np.float32(DARK_ERROR * e) * rng.standard_normal(shape, np.float32) for d in dets],
                 "electron / s", "dark current"),
        "DARK_ERR": ([np.full(shape, DARK_ERROR * e, np.float32) for _ in dets], "electron / s", "dark uncertainty"),
    })
    out["abs_gain_matrix"] = _maps(sim, {"ABS_GAIN": (
        [absolute_gain(sim, b) * (1 + np.float32(AGM_ERROR * e) * rng.standard_normal(shape, np.float32))
         for b in sim.bands], "MJy s / (electron sr)", "absolute gain (flat field included)")})
    out["spectral_wcs"] = _maps(sim, {"CWAVE": ([o.cwave for o in opts], "um", "central wavelength"),
                                      "CBAND": ([o.cband for o in opts], "um", "bandwidth")})
    out["solid_angle_pixel_map"] = _maps(sim, {"SAPM": ([o.sapm for o in opts], "arcsec2", "pixel solid angle")})
    for name, bit in (("nonfunc", "NONFUNC"), ("dichroic", "DICHROIC")):
        out[name] = _maps(sim, {bit: ([((d.masks & np.uint32(_flags.Flag[bit])) != 0).astype(np.uint8) for d in dets],
                                      "", f"1 = {bit.lower()} pixel")})
    out["readnoise_pars"] = _maps(sim, {"READNOISE": (
        [d.read_noise[ref:ref + n, ref:ref + n] * (1 + np.float32(READNOISE_ERROR * e) * rng.standard_normal(shape, np.float32))
         for d in dets], "electron", "read noise of one frame")})
    out["nonlinear_pars"] = _maps(sim, {
        "Q_nl": ([d.q_nl for d in dets], "electron", "onset of non-linearity"),
        "b1": ([d.b1 for d in dets], "1 / electron", "linear coefficient"),
        "b2": ([d.b2 for d in dets], "1 / electron2", "quadratic coefficient"),
        "b3": ([d.b3 for d in dets], "1 / electron3", "cubic coefficient"),
        "Qmax": ([d.q_max for d in dets], "electron", "largest charge the correction is valid for"),
    })
    centers = psf_zone_centers(inst)
    zy, zx = np.meshgrid(centers, centers, indexing="ij")
    offsets = (np.arange(inst.psf_size) - inst.psf_size // 2) * inst.pixel_scale / inst.psf_oversampling
    out["average_psf"] = xr.Dataset(
        {"PSF": (("band", "zone", "psf_y", "psf_x"), np.stack([psf_cube(inst, o.cwave) for o in opts]),
                 {"units": "", "long_name": "fraction of the flux per oversampled pixel"})},
        coords={"band": np.asarray(sim.bands, np.int64), "zone": np.arange(centers.size**2),
                "zone_x": ("zone", zx.ravel(), {"units": "pixel", "long_name": "zone centre x (XCTR - 1)"}),
                "zone_y": ("zone", zy.ravel(), {"units": "pixel", "long_name": "zone centre y (YCTR - 1)"}),
                "psf_y": ("psf_y", offsets, {"units": "arcsec"}), "psf_x": ("psf_x", offsets, {"units": "arcsec"})},
        attrs={"oversampling": inst.psf_oversampling})
    fps = [o.focal for o in opts]
    out["initial_distortion_table"] = xr.Dataset(
        {"FP_OFFSET": (("band", "fp_axis"), np.array([f.offset for f in fps]), {"units": "deg"}),
         "FP_ROTATION": (("band",), np.array([f.rotation for f in fps]), {"units": "deg"}),
         **{f"SIP_{k.upper()}": (("band", "sip_p", "sip_q"), np.stack([f.sip[k] for f in fps]), {})
            for k in ("a", "b", "ap", "bp")}},
        coords={"band": np.asarray(sim.bands, np.int64), "fp_axis": np.array(["u", "v"], dtype=STRING_DTYPE)})
    k = len(cfg.detector.trap_taus)
    # the traps fill no further once the on-board overflow level is passed (Simulator._image)
    saturation = [np.broadcast_to(1.2 * cfg.detector.overflow_adu * d.gain[inst.readout_channel(b, np.arange(n))],
                                  shape).astype(np.float32) for b, d in zip(sim.bands, dets, strict=True)]
    out["persistence_pars"] = xr.Dataset(
        {"TRAP_DENSITY": (("band", "y", "x"), np.stack([d.trap_density for d in dets]), {"units": ""}),
         "TRAP_SATURATION": (("band", "y", "x"), np.stack(saturation),
                             {"units": "electron", "long_name": "collected charge above which traps fill no further"}),
         "TRAP_FRACTION": (("band", "trap"), np.tile(cfg.detector.trap_fractions, (len(dets), 1)), {"units": ""}),
         "TRAP_TAU": (("band", "trap"), np.tile(cfg.detector.trap_taus, (len(dets), 1)), {"units": "s"})},
        coords={**_pixel_coords(sim), "trap": np.arange(k)})
    return out


def detector_truth(sim: Simulator) -> xr.Dataset:
    """The exact detector properties behind the products (for tests against truth)."""
    dets = [sim.detectors[b] for b in sim.bands]
    ref, n = sim.instrument.n_reference, sim.instrument.n_active
    ds = _maps(sim, {
        "DARK": ([d.dark for d in dets], "electron / s", "true dark current"),
        "FLAT": ([d.flat for d in dets], "", "true relative response"),
        "ABS_GAIN": ([absolute_gain(sim, b) for b in sim.bands], "MJy s / (electron sr)", "true absolute gain"),
        "READNOISE": ([d.read_noise[ref:ref + n, ref:ref + n] for d in dets], "electron", "true read noise"),
        "MASKS": ([d.masks for d in dets], "", "injected HOT, COLD, NONFUNC, DICHROIC bits"),
    })
    ds["GAIN"] = (("band", "readout_channel"), np.stack([d.gain for d in dets]), {"units": "electron / adu"})
    ds["REFERENCE_OFFSET"] = (("band", "readout_channel"), np.stack([d.offset for d in dets]), {"units": "adu / s"})
    ds["SENSITIVITY"] = (("band",), np.array([sim.config.detector.sensitivity[sim.instrument.band_numbers.index(b)]
                                              for b in sim.bands]), {"units": "electron / (s uJy)"})
    ds.attrs["config"] = sim.config.model_dump_json()
    return ds
