"""Calibration products: what each one holds, and a check that a Dataset is one.

Names follow the archive's calibration families (``gain_factors``, ``dark``,
``abs_gain_matrix``, ``spectral_wcs``, ...). A product is an ``xarray.Dataset`` with a
``band`` dimension (detector numbers) and, for pixel maps, the labelled ``y``/``x``
coordinates of the active frame (or of the raw frame, for products applied before the
reference border is removed). Products are stored as immutable numbered versions in the
repository; :func:`register_product` adds products that later modules define.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import xarray as xr

from .errors import CalibrationError
from .instrument import Instrument
from .levels import ELECTRON_RATE, WAVELENGTH, same_unit

__all__ = ["PRODUCTS", "ProductSpec", "register_product", "validate_product"]

PIXEL_DIMS = ("band", "y", "x")


@dataclass(frozen=True)
class ProductSpec:
    """The content of one calibration product.

    Parameters
    ----------
    name
        Product name (the archive's family name).
    description
        One line.
    variables
        Required variables: name -> (dims, units); units None accepts any.
    frame
        Pixel frame of ``(band, y, x)`` variables: ``"active"`` or ``"raw"``.
    """

    name: str
    description: str
    variables: Mapping[str, tuple[tuple[str, ...], str | None]]
    frame: Literal["active", "raw"] = "active"
    optional: Mapping[str, tuple[tuple[str, ...], str | None]] = field(default_factory=dict)


PRODUCTS: dict[str, ProductSpec] = {}


def register_product(spec: ProductSpec) -> ProductSpec:
    """Add (or replace) a product definition."""
    PRODUCTS[spec.name] = spec
    return spec


for _spec in (
    ProductSpec(
        "gain_factors",
        "electronic gain of each readout channel (32 per detector)",
        {"GAIN": (("band", "readout_channel"), "electron / adu")},
    ),
    ProductSpec("dark", "dark current", {"DARK": (PIXEL_DIMS, ELECTRON_RATE)}, optional={"DARK_ERR": (PIXEL_DIMS, ELECTRON_RATE)}),
    ProductSpec(
        "flat_field",
        "response of each pixel relative to its spectral channel (an input of the absolute gain matrix)",
        {"FLAT": (PIXEL_DIMS, "")},
        optional={"FLAT_ERR": (PIXEL_DIMS, ""), "N_SAMPLES": (PIXEL_DIMS, ""), "CHI2": (PIXEL_DIMS, "")},
    ),
    ProductSpec(
        "abs_gain_matrix",
        "absolute gain: surface brightness per photocurrent",
        {"ABS_GAIN": (PIXEL_DIMS, "MJy s / (electron sr)")},
    ),
    ProductSpec("spectral_wcs", "central wavelength and bandwidth of every pixel",
                {"CWAVE": (PIXEL_DIMS, WAVELENGTH), "CBAND": (PIXEL_DIMS, WAVELENGTH)}),
    ProductSpec("solid_angle_pixel_map", "solid angle of every pixel", {"SAPM": (PIXEL_DIMS, "arcsec2")}),
    ProductSpec("nonfunc", "mask of permanently unusable pixels", {"NONFUNC": (PIXEL_DIMS, None)}),
    ProductSpec("dichroic", "mask of pixels attenuated >= 50 % by the dichroic", {"DICHROIC": (PIXEL_DIMS, None)}),
    ProductSpec("readnoise_pars", "read noise of one frame of the sample-up-the-ramp",
                {"READNOISE": (PIXEL_DIMS, "electron")}),
    ProductSpec(
        "nonlinear_pars",
        "non-linearity parameters (form in sphx.kernels.nonlinearity)",
        {"Q_nl": (PIXEL_DIMS, "electron"), "b1": (PIXEL_DIMS, "1 / electron"), "b2": (PIXEL_DIMS, "1 / electron2"),
         "b3": (PIXEL_DIMS, "1 / electron3"), "Qmax": (PIXEL_DIMS, "electron")},
    ),
    ProductSpec(
        "average_psf",
        "oversampled optical PSF per zone (planes x-fast: plane = iy * zones + ix)",
        {"PSF": (("band", "zone", "psf_y", "psf_x"), "")},
    ),
    ProductSpec(
        "initial_distortion_table",
        "fixed focal-plane geometry: detector offsets, rotations and SIP distortion",
        {"FP_OFFSET": (("band", "fp_axis"), "deg"), "FP_ROTATION": (("band",), "deg"),
         **{f"SIP_{k}": (("band", "sip_p", "sip_q"), None) for k in ("A", "B", "AP", "BP")}},
    ),
    ProductSpec(
        "persistence_pars",
        "charge-trap persistence model (form in sphx.kernels.persistence)",
        {"TRAP_DENSITY": (PIXEL_DIMS, ""), "TRAP_FRACTION": (("band", "trap"), ""),
         "TRAP_TAU": (("band", "trap"), "s")},
        optional={"TRAP_SATURATION": (PIXEL_DIMS, "electron")},
    ),
):
    register_product(_spec)


def validate_product(name: str, ds: xr.Dataset, *, instrument: Instrument) -> None:
    """Raise :class:`~sphx.errors.CalibrationError` unless ``ds`` is a valid ``name`` product."""
    spec = PRODUCTS.get(name)
    if spec is None:
        raise CalibrationError(f"unknown calibration product {name!r}; known: {', '.join(sorted(PRODUCTS))}")
    if not isinstance(ds, xr.Dataset):
        raise CalibrationError(f"calibration product {name!r} must be an xarray.Dataset, got {type(ds).__name__}")
    problems = []
    for var, (dims, units) in {**spec.variables, **{k: v for k, v in spec.optional.items() if k in ds}}.items():
        if var not in ds:
            problems.append(f"missing variable {var}")
            continue
        if ds[var].dims != dims:
            problems.append(f"{var} has dims {ds[var].dims}, expected {dims}")
        if units is not None and not same_unit(ds[var].attrs.get("units"), units):
            problems.append(f"{var} has units {ds[var].attrs.get('units')!r}, expected {units!r}")
    if "band" not in ds.coords:
        problems.append("missing band coordinate (detector numbers)")
    else:
        unknown = sorted(set(ds["band"].values.tolist()) - set(instrument.band_numbers))
        if unknown:
            problems.append(f"band(s) {unknown} not in instrument {instrument.name!r}")
    frame = instrument.pixel_coords(reference_pixels=spec.frame == "raw")
    for axis in ("y", "x"):
        if axis in ds.dims and not (axis in ds.coords and np.array_equal(ds[axis].values, frame)):
            problems.append(f"{axis} must be the {spec.frame} frame {frame[0]}..{frame[-1]} of {instrument.name!r}")
    if "readout_channel" in ds.dims and ds.sizes["readout_channel"] != instrument.n_readout_channels:
        problems.append(
            f"readout_channel has {ds.sizes['readout_channel']} entries, expected {instrument.n_readout_channels}"
        )
    if problems:
        raise CalibrationError(f"calibration product {name!r} is not valid: " + "; ".join(problems))


def product_for(name: str, product: xr.Dataset, ds: xr.Dataset, *, instrument: Instrument) -> xr.Dataset:
    """A validated calibration product restricted to the bands of cube ``ds``, in its order.

    Raises
    ------
    CalibrationError
        If the product is invalid (wrong variables, units or pixel frame for
        ``instrument``) or lacks one of the cube's bands.
    """
    validate_product(name, product, instrument=instrument)
    bands = ds["band"].values.tolist()
    missing = sorted(set(bands) - set(product["band"].values.tolist()))
    if missing:
        raise CalibrationError(f"calibration product {name!r} has no data for band(s) {missing} of the cube")
    return product.sel(band=bands)
