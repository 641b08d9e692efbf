"""The simulated H2RG detectors: every per-pixel property the pipeline calibrates.

One :class:`Detector` per band holds the true values; :func:`make_detector` draws them
from a seeded generator. Arrays cover the active pixels (n, n) unless noted.

============================  ====================================================
dark current                  log-normal about ``dark`` [electron / s]; HOT pixels
                              at 20-2000 times that
flat field                    a smooth low-order surface (+-4 %) times pixel noise
                              (``flat_rms``); COLD pixels at 5-40 %; NONFUNC pixels 0;
                              DICHROIC stripe (D3, D4) attenuated to 20-45 %
read noise                    per frame, log-normal about ``read_noise`` [electron]
electronic gains              32 per detector [electron / adu]
non-linearity                 ``Q_nl, b1, b2, b3`` (:mod:`sphx.kernels.nonlinearity`)
                              and ``Qmax``, where the slope of ``g`` drops to 0.7;
                              ``g`` turns over (full well) above the overflow limit
trap density                  relative persistence trap density, log-normal about 1
full-sample pixels            a fixed set whose every read is downlinked
reference offsets             per readout channel [adu / s]
============================  ====================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import flags as _flags
from ..instrument import Instrument
from ..kernels.nonlinearity import charge_at_slope, full_well
from .config import DetectorConfig

__all__ = ["Detector", "make_detector"]


@dataclass
class Detector:
    """True properties of one detector (see the module docstring)."""

    band: int
    gain: np.ndarray           # (32,) [electron / adu]
    dark: np.ndarray           # [electron / s]
    flat: np.ndarray           # relative response (1 = nominal)
    read_noise: np.ndarray     # [electron] per frame, raw frame (n_raw, n_raw)
    q_nl: np.ndarray           # [electron]
    b1: np.ndarray
    b2: np.ndarray
    b3: np.ndarray
    q_max: np.ndarray          # [electron]
    trap_density: np.ndarray
    offset: np.ndarray         # (32,) static reference offset [adu / s]
    masks: np.ndarray          # uint32 HOT | COLD | NONFUNC | DICHROIC bits
    fullsample: np.ndarray     # (k, 2) active (y, x) of the full-sample pixels

    @property
    def dead(self) -> np.ndarray:
        return (self.masks & np.uint32(_flags.Flag.NONFUNC)) != 0


def _smooth_surface(rng: np.random.Generator, n: int, amplitude: float) -> np.ndarray:
    t = np.linspace(-1, 1, n)
    c = rng.uniform(-1, 1, 6) * amplitude
    yy, xx = t[:, None], t[None, :]
    return 1 + c[0] * xx + c[1] * yy + c[2] * xx * yy + 0.5 * c[3] * (xx**2 - 1 / 3) + 0.5 * c[4] * (yy**2 - 1 / 3)


def _pick(rng: np.random.Generator, free: np.ndarray, fraction: float) -> np.ndarray:
    """Choose about ``fraction`` of all pixels among those still ``free``."""
    k = rng.binomial(free.size, fraction)
    idx = np.flatnonzero(free.ravel())
    chosen = rng.choice(idx, size=min(k, idx.size), replace=False)
    out = np.zeros(free.size, dtype=bool)
    out[chosen] = True
    return out.reshape(free.shape)


def _below_overflow(q_nl, b1, b2, b3, limit: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-linearity whose turnover lies above ``limit`` [electron] in every pixel.

    Past the turnover a ramp bends back: its fitted slope passes for a fainter, valid one
    that no flag marks, unless the ramp trips the on-board overflow limit first. Where
    the draw puts the full well below ``limit``, the non-linearity is stretched along the
    charge axis (``b_k -> b_k s^k`` moves the full well to ``Q_nl + (g_max - Q_nl) / s``).
    """
    full = full_well(q_nl, b1, b2, b3)
    s = np.where(full < limit, (full - q_nl) / np.maximum(limit - q_nl, 1.0), 1.0)
    return b1 * s, b2 * s**2, b3 * s**3


def make_detector(instrument: Instrument, band: int, config: DetectorConfig, rng: np.random.Generator) -> Detector:
    """Draw the true properties of detector ``band``."""
    n = instrument.n_active
    b = instrument.band(band)
    f32 = np.float32
    masks = np.zeros((n, n), dtype=np.uint32)
    free = np.ones((n, n), dtype=bool)

    dead = _pick(rng, free, config.nonfunc_fraction)
    free &= ~dead
    hot = _pick(rng, free, config.hot_fraction)
    free &= ~hot
    cold = _pick(rng, free, config.cold_fraction)
    free &= ~cold

    dark_level = config.dark * (2.0 if b.array == "MWIR" else 1.0)
    dark = dark_level * rng.lognormal(0.0, 0.3, (n, n))
    dark[hot] = dark_level * 10 ** rng.uniform(np.log10(20), np.log10(2000), hot.sum())
    flat = _smooth_surface(rng, n, 0.04) * rng.normal(1.0, config.flat_rms, (n, n))
    flat[cold] *= rng.uniform(0.05, 0.4, cold.sum())
    flat[dead] = 0.0
    dark[dead] = 0.0
    dichroic = np.zeros((n, n), dtype=bool)
    if b.number in config.dichroic_bands:
        # a bowed stripe near one edge where the dichroic coating cuts the light
        yy, xx = np.mgrid[0:n, 0:n] / n
        edge = 0.06 + 0.03 * np.sin(np.pi * yy)
        dichroic = (xx > 1 - edge) if b.array == "SWIR" else (xx < edge)
        flat[dichroic] *= rng.uniform(0.2, 0.45, dichroic.sum())
    for name, sel in (("NONFUNC", dead), ("HOT", hot), ("COLD", cold), ("DICHROIC", dichroic)):
        masks[sel] |= np.uint32(_flags.Flag[name])

    q_nl = rng.normal(config.nonlinearity_onset, 0.1 * config.nonlinearity_onset, (n, n)).clip(1000)
    # about 8 % below linear at 30 000 electrons; full well 40 000 - 53 000 reported electrons
    b1, b2, b3 = _below_overflow(q_nl, rng.normal(-5e-6, 0.6e-6, (n, n)), rng.normal(1e-11, 0.25e-11, (n, n)),
                                 rng.normal(-2e-16, 0.4e-16, (n, n)),
                                 limit=1.05 * config.overflow_adu * config.gain_range[1])
    nr = instrument.n_raw
    read_noise = config.read_noise * rng.lognormal(0.0, 0.15, (nr, nr))

    k = max(4, round(config.fullsample_pixels * (n / 2040) ** 2))
    side = int(np.ceil(np.sqrt(k)))
    y0, x0 = rng.integers(n // 4, 3 * n // 4 - side, 2)
    grid = np.stack(np.mgrid[y0:y0 + side, x0:x0 + side], axis=-1).reshape(-1, 2)[:k]
    return Detector(
        band=band,
        gain=rng.uniform(*config.gain_range, instrument.n_readout_channels).astype(f32),
        dark=dark.astype(f32),
        flat=flat.astype(f32),
        read_noise=read_noise.astype(f32),
        q_nl=q_nl.astype(f32),
        b1=b1.astype(f32),
        b2=b2.astype(f32),
        b3=b3.astype(f32),
        q_max=charge_at_slope(q_nl, b1, b2, b3, 0.7).astype(f32),
        trap_density=rng.lognormal(0.0, 0.3, (n, n)).astype(f32),
        offset=rng.normal(0.0, config.reference_offset, instrument.n_readout_channels).astype(f32),
        masks=masks,
        fullsample=grid.astype(np.int64),
    )
