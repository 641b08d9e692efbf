"""The simulation configuration: everything a simulated survey depends on, with defaults.

A configuration is plain data (YAML or a dict); the same configuration and seed give
the same bytes. Unknown keys and impossible values raise
:class:`~sphx.errors.SimulationError` naming the key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import SimulationError
from ..instrument import SPHEREX, SPHEREX_SMALL, Instrument

__all__ = [
    "DetectorConfig",
    "SimulationConfig",
    "SkyConfig",
    "SurveyConfig",
    "ZodiConfig",
    "load_config",
]

INSTRUMENTS = {"SPHEREx": SPHEREX, "SPHEREx-small": SPHEREX_SMALL}


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{key}: {msg}")
    return "invalid simulation configuration: " + "; ".join(lines)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SurveyConfig(_Model):
    """Survey plan (see :func:`sphx.simulate.survey.plan_survey`)."""

    n_exposures: int = Field(8, ge=1, description="exposures to simulate (each covers all detectors)")
    exposures_per_group: int = Field(4, ge=1, le=9, description="small-slew steps per target group")
    mode: Literal["all_sky", "deep"] = "all_sky"
    start_mjd: float = Field(61024.0, description="UTC MJD of the first exposure [d]")
    small_slew: float | None = Field(None, gt=0, description="[arcmin]; default 17' scaled to the detector size")
    pointing_error: float = Field(2.0, ge=0, description="rms boresight error [arcmin]")
    roll_error: float = Field(0.1, ge=0, description="rms roll error [deg]")
    deep_field: tuple[float, float] = (270.0, 66.56)


class SkyConfig(_Model):
    """Reference catalog (see :func:`sphx.simulate.sky.catalog_for_pixels`)."""

    star_density: float = Field(1500.0, ge=0, description="stars per deg^2 at the galactic poles")
    galaxy_density: float = Field(2500.0, ge=0, description="galaxies per deg^2")
    plane_boost: float = Field(30.0, ge=0, description="star density factor in the galactic plane, minus 1")
    mag_bright: float = 8.0
    mag_limit: float = 21.0
    calibrator_density: float = Field(0.5, ge=0, description="calibrator stars per deg^2")
    ice_fraction: float = Field(0.01, ge=0, le=1)


class ZodiConfig(_Model):
    """Zodiacal light (see :mod:`sphx.zodi`)."""

    enabled: bool = True
    nodes: int = Field(16, ge=4, le=128, description="model nodes per detector side, interpolated between")


class DetectorConfig(_Model):
    """Detector properties and effects (see :mod:`sphx.simulate.detector`)."""

    sensitivity: tuple[float, ...] = Field(
        (0.012, 0.012, 0.011, 0.009, 0.006, 0.006),
        description="photocurrent per unit point-source flux, per band [electron / s / uJy]")
    dark: float = Field(0.01, ge=0, description="median dark current of SWIR detectors (MWIR twice) [electron / s]")
    read_noise: float = Field(10.0, gt=0, description="median read noise per frame [electron]")
    gain_range: tuple[float, float] = (1.0, 1.4)
    flat_rms: float = Field(0.02, ge=0)
    hot_fraction: float = Field(5e-4, ge=0, le=0.1)
    cold_fraction: float = Field(5e-4, ge=0, le=0.1)
    nonfunc_fraction: float = Field(1e-3, ge=0, le=0.1)
    dichroic_bands: tuple[int, ...] = (3, 4)
    nonlinearity_onset: float = Field(8000.0, gt=0, description="median Q_nl [electron]")
    overflow_adu: float = Field(25000.0, gt=0, description="on-board overflow limit KOVR_A [adu]")
    reference_offset: float = Field(0.5, ge=0, description="rms static offset per readout channel [adu / s]")
    reference_drift: float = Field(0.05, ge=0, description="random-walk step per exposure [adu / s]")
    reference_gradient: float = Field(0.1, ge=0, description="rms offset change across the frame [adu / s]")
    transient_rate: float = Field(5.0, ge=0, description="particle hits [1 / cm^2 / s]")
    pixel_pitch: float = Field(18.0, gt=0, description="[um]")
    transient_charge: float = Field(1000.0, gt=0, description="median charge of a hit [electron]")
    transient_threshold: float = Field(150.0, gt=0, description="on-board detection threshold of a jump [electron]")
    transient_first_frame: int = Field(7, ge=0, description="frame where on-board detection starts (TRANDLY)")
    trap_fractions: tuple[float, ...] = (5e-4, 3e-4, 2e-4)
    trap_taus: tuple[float, ...] = Field((60.0, 600.0, 6000.0), description="[s]")
    persistence_threshold: float = Field(0.1, gt=0, description="PERSIST truth flag above this [electron / s]")
    fullsample_pixels: int = Field(240, ge=0, description="per full-size detector; scaled by area")

    @model_validator(mode="after")
    def _consistent(self) -> DetectorConfig:
        if len(self.trap_fractions) != len(self.trap_taus):
            raise ValueError("trap_fractions and trap_taus must have the same length")
        if any(t <= 0 for t in self.trap_taus):
            raise ValueError("trap_taus must be positive")
        if not 0 < self.gain_range[0] <= self.gain_range[1]:
            raise ValueError(f"gain_range {self.gain_range} must be increasing and positive")
        return self


class SimulationConfig(_Model):
    """A whole simulated survey.

    Attributes
    ----------
    seed
        Seed of every random draw.
    instrument
        ``"SPHEREx"`` (real geometry, default) or ``"SPHEREx-small"`` (248x248 pixels).
    bands
        Detectors to simulate (default all six).
    lab_error
        Scale of the measurement errors of the calibration products written for the
        pipeline (1 = nominal lab accuracy, 0 = exact truth).
    """

    seed: int = 0
    instrument: Literal["SPHEREx", "SPHEREx-small"] = "SPHEREx"
    bands: tuple[int, ...] | None = None
    lab_error: float = Field(1.0, ge=0)
    survey: SurveyConfig = SurveyConfig()
    sky: SkyConfig = SkyConfig()
    zodi: ZodiConfig = ZodiConfig()
    detector: DetectorConfig = DetectorConfig()

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise SimulationError(_describe(exc)) from None

    @model_validator(mode="after")
    def _bands(self) -> SimulationConfig:
        inst = INSTRUMENTS[self.instrument]
        if self.bands is not None:
            unknown = sorted(set(self.bands) - set(inst.band_numbers))
            if unknown or not self.bands or len(set(self.bands)) != len(self.bands):
                raise ValueError(f"bands {list(self.bands)}: must be distinct detectors of {list(inst.band_numbers)}")
        if len(self.detector.sensitivity) != len(inst.bands):
            raise ValueError(f"detector.sensitivity needs one value per band ({len(inst.bands)})")
        if self.sky.mag_limit <= self.sky.mag_bright:
            raise ValueError("sky.mag_limit must be fainter (larger) than sky.mag_bright")
        return self

    @property
    def instrument_model(self) -> Instrument:
        return INSTRUMENTS[self.instrument]

    @property
    def band_numbers(self) -> tuple[int, ...]:
        return tuple(sorted(self.bands)) if self.bands else self.instrument_model.band_numbers


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def load_config(source: SimulationConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
                **overrides: Any) -> SimulationConfig:
    """A validated configuration from a config, a dict or a YAML file, plus overrides.

    Overrides are nested dicts or dotted keys, e.g. ``load_config(path,
    **{"survey.n_exposures": 4})``.
    """
    if isinstance(source, SimulationConfig):
        data = source.model_dump()
    elif source is None:
        data = {}
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise SimulationError(f"simulation configuration {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise SimulationError(f"simulation configuration {path} is not valid YAML: {exc}") from None
        if not isinstance(data, Mapping):
            raise SimulationError(f"simulation configuration {path} must be a mapping of keys")
    for key, value in overrides.items():
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        data = _merge(data, nested)
    return SimulationConfig(**data)
