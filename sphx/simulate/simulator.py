"""Simulated surveys: raw exposures, calibration products and the truth, exposure by exposure.

:class:`Simulator` advances through the survey plan in time order (persistence and the
reference-offset drifts are carried from one exposure to the next) and returns numpy
images; :func:`simulate_survey` writes them into a repository as it goes, so memory stays
that of a few exposures for a survey of any length.

What one image goes through (band ``b``, exposure ``j``):

1. the true WCS from the true boresight and the detector's fixed focal-plane geometry;
2. zodiacal light on a node grid at each node's sky position and wavelength, spline
   interpolated to every pixel [MJy/sr];
3. catalogue sources moved to the exposure epoch, projected, their spectra averaged over
   each source pixel's bandpass and rendered with the local PSF [uJy];
4. photocurrent = (zodi x pixel solid angle + source flux) x sensitivity x flat;
   plus dark current and the persistent current released by earlier exposures' charge;
5. the on-board slope: non-linearity and overflow, sample-up-the-ramp noise with the
   exact variance of a 74-frame OLS fit, particle hits (flagged TRANSIENT when the
   on-board detector would see them), full ramps for the full-sample pixels;
6. electronic gain per readout channel, reference offsets drifting per channel, the
   reference border and phantom reads [adu/s].
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import xarray as xr
from astropy.wcs import WCS
from scipy.interpolate import CubicSpline

from .. import flags as _flags
from ..catalog.motion import propagate
from ..cube import make_cube
from ..ephemeris import julian_year, observer_barycentric
from ..errors import SimulationError
from ..instrument import Instrument
from ..kernels import persistence
from ..kernels.nonlinearity import measured_rate, nonlinear_charge
from ..kernels.ramp import ols_weights, slope_variance
from ..levels import ADU_RATE, SURFACE_BRIGHTNESS
from ..obsid import obs_key
from ..wcs import focal_plane_wcs
from ..zodi import earth_position, zodi_brightness
from .config import SimulationConfig, load_config
from .detector import Detector, make_detector
from .optics import FocalPlane, focal_plane, psf_sigmas, render_point_sources, solid_angle_map, spectral_maps
from .readout import add_ramp_noise, expose, read_out
from .sky import catalog_for_pixels, pixels_in_footprint, sed_flux
from .survey import OBLIQUITY, SurveyPlan, equatorial_to_ecliptic, plan_survey

__all__ = ["TRUTH_LEVEL", "ImageResult", "Simulator"]

TRUTH_LEVEL = "truth"
SR_PER_ARCSEC2 = (math.pi / 180.0 / 3600.0) ** 2
UJY_PER_MJY = 1e12
AU_KM = 149_597_870.7
_CACHE_PIXELS = 32


def _ecliptic_vector(v: np.ndarray) -> np.ndarray:
    """Equatorial (ICRS-like) cartesian vectors to ecliptic (the frame of :mod:`.survey`)."""
    c, s = math.cos(math.radians(OBLIQUITY)), math.sin(math.radians(OBLIQUITY))
    x, y, z = np.moveaxis(np.asarray(v, dtype=np.float64), -1, 0)
    return np.stack([x, c * y + s * z, -s * y + c * z], axis=-1)


def _unit(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    r, d = np.deg2rad(ra), np.deg2rad(dec)
    return np.stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)], axis=-1)


@dataclass
class ImageResult:
    """One simulated image and its truth (active frame unless noted)."""

    raw: np.ndarray            # (n_raw, n_raw) [adu / s]
    raw_flags: np.ndarray      # (n_raw, n_raw) on-board flags
    phantom: np.ndarray        # (n_raw, channels, reads) [adu / s]
    sky: np.ndarray            # true sky [MJy / sr], zodi included
    zodi: np.ndarray           # [MJy / sr]
    persistence: np.ndarray    # injected persistent current [electron / s]
    current: np.ndarray        # true current into each pixel, before the readout [electron / s]
    offset: np.ndarray         # (n_raw, channels) reference offset of every row and channel [adu / s]
    truth_flags: np.ndarray    # what is truly wrong with each pixel
    wcs: WCS                   # true WCS
    sources: dict[str, np.ndarray]
    transients: dict[str, np.ndarray]
    fullsample: dict[str, np.ndarray]


@dataclass
class _BandOptics:
    cwave: np.ndarray
    cband: np.ndarray
    sapm: np.ndarray
    focal: FocalPlane
    response: np.ndarray      # electron/s per (uJy per pixel), flat included
    omega: np.ndarray         # uJy per pixel per MJy/sr (the solid angle)


@dataclass
class _Catalog:
    """Catalogue pixels in memory (least recently used dropped first)."""

    seed: int
    sky: Any
    pixels: collections.OrderedDict = field(default_factory=collections.OrderedDict)
    new: list[tuple[int, pa.Table]] = field(default_factory=list)
    _merged: tuple[tuple[int, ...], dict[str, np.ndarray]] = ((), {})

    def around(self, ra: float, dec: float, radius: float) -> dict[str, np.ndarray]:
        wanted = [int(p) for p in pixels_in_footprint(np.atleast_1d(ra), np.atleast_1d(dec), radius)]
        if tuple(wanted) == self._merged[0]:  # dichroic partners and small slews see the same pixels
            return self._merged[1]
        pieces = []
        for p in wanted:
            if p not in self.pixels:
                table = catalog_for_pixels([p], seed=self.seed, **self.sky.model_dump())
                self.new.append((p, table))
                cols = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
                cols["_xyz"] = _unit(cols["ra"], cols["dec"])  # once per pixel, not per image
                self.pixels[p] = cols
            self.pixels.move_to_end(p)
            pieces.append(self.pixels[p])
        while len(self.pixels) > max(_CACHE_PIXELS, len(wanted)):
            self.pixels.popitem(last=False)
        merged = {k: np.concatenate([c[k] for c in pieces]) for k in pieces[0]} if pieces else {}
        self._merged = (tuple(wanted), merged)
        return merged


class Simulator:
    """A survey simulation advanced one exposure at a time, in time order.

    Parameters
    ----------
    config
        A :class:`~sphx.simulate.config.SimulationConfig`, a dict or a YAML path.
    """

    def __init__(self, config: SimulationConfig | Mapping[str, Any] | str | None = None) -> None:
        self.config = cfg = load_config(config)
        self.instrument: Instrument = cfg.instrument_model
        self.bands = cfg.band_numbers
        inst = self.instrument
        field_deg = inst.n_active * inst.pixel_scale / 3600.0
        self.plan: SurveyPlan = plan_survey(
            instrument=inst, n_exposures=cfg.survey.n_exposures, start_mjd=cfg.survey.start_mjd,
            exposures_per_group=cfg.survey.exposures_per_group, mode=cfg.survey.mode,
            small_slew=cfg.survey.small_slew, group_step=field_deg,
            pointing_error=cfg.survey.pointing_error, roll_error=cfg.survey.roll_error,
            deep_field=cfg.survey.deep_field, seed=cfg.seed)
        self.detectors: dict[int, Detector] = {
            b: make_detector(inst, b, cfg.detector, self._rng(0, b)) for b in self.bands}
        self.optics = {b: self._optics(b) for b in self.bands}
        k = len(cfg.detector.trap_taus)
        self.traps = {b: np.zeros((k, inst.n_active, inst.n_active), np.float32) for b in self.bands}
        self.drift = {b: np.zeros(inst.n_readout_channels) for b in self.bands}
        self.catalog = _Catalog(cfg.seed, cfg.sky)
        self.next_exposure = 0
        self._last_end: float | None = None
        self._radius = field_deg / math.sqrt(2) + 0.05  # detector half-diagonal plus PSF margin [deg]
        nodes = np.linspace(0, inst.n_active - 1, cfg.zodi.nodes)
        # row i: weights of the nodes' values in the natural cubic spline at pixel i
        basis = CubicSpline(nodes, np.eye(nodes.size), bc_type="natural")(np.arange(inst.n_active, dtype=float))
        self._zodi_nodes = (nodes, basis)

    # -- set-up -------------------------------------------------------------------------
    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(self.config.seed, spawn_key=key))

    def _optics(self, band: int) -> _BandOptics:
        inst = self.instrument
        cwave, cband = spectral_maps(inst, band)
        fp = focal_plane(inst, band)
        nominal = focal_plane_wcs(ra=0.0, dec=0.0, pa=0.0, offset=fp.offset, rotation=fp.rotation,
                                  pixel_scale=inst.pixel_scale, n_pixels=inst.n_active, sip=fp.sip)
        sapm = solid_angle_map(nominal, inst.n_active)
        sensitivity = self.config.detector.sensitivity[inst.band_numbers.index(band)]
        response = (sensitivity * self.detectors[band].flat).astype(np.float32)
        omega = sapm.astype(np.float64) * SR_PER_ARCSEC2 * UJY_PER_MJY
        return _BandOptics(cwave, cband, sapm, fp, response, omega)

    def true_wcs(self, j: int, band: int) -> WCS:
        """The true WCS of image (exposure ``j``, ``band``)."""
        return self._wcs(band, self.plan.true_ra[j], self.plan.true_dec[j], self.plan.true_pa[j])

    def planned_wcs(self, j: int, band: int) -> WCS:
        """The WCS the planned pointing and the fixed focal plane predict (coarse astrometry)."""
        return self._wcs(band, self.plan.planned_ra[j], self.plan.planned_dec[j], self.plan.planned_pa[j])

    def _wcs(self, band: int, ra: float, dec: float, pa_: float) -> WCS:
        fp = self.optics[band].focal
        return focal_plane_wcs(ra=float(ra), dec=float(dec), pa=float(pa_), offset=fp.offset, rotation=fp.rotation,
                               pixel_scale=self.instrument.pixel_scale, n_pixels=self.instrument.n_active, sip=fp.sip)

    # -- one exposure ---------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[int, ImageResult]]:
        while self.next_exposure < len(self.plan):
            yield self.step()

    def step(self) -> dict[int, ImageResult]:
        """Simulate the next exposure of the plan on every band."""
        j = self.next_exposure
        if j >= len(self.plan):
            raise SimulationError(f"the plan has {len(self.plan)} exposures; all are simulated")
        plan = self.plan
        gap = 0.0 if self._last_end is None else (plan.mjd_beg[j] - self._last_end) * 86400.0
        sc = plan.sc_position[j, 1]
        observer = earth_position(plan.mjd_avg[j]) + _ecliptic_vector(sc) / AU_KM
        out = {b: self._image(j, b, gap=gap, observer=observer) for b in self.bands}
        self._last_end = float(plan.mjd_end[j])
        self.next_exposure += 1
        return out

    def _image(self, j: int, band: int, *, gap: float, observer: np.ndarray) -> ImageResult:
        cfg, inst = self.config, self.instrument
        det, opt = self.detectors[band], self.optics[band]
        rng = self._rng(1, j, band)
        n, nr, ref = inst.n_active, inst.n_raw, inst.n_reference
        wcs = self.true_wcs(j, band)

        zodi = self._zodi(wcs, opt, observer) if cfg.zodi.enabled else np.zeros((n, n), np.float32)
        src, sources = self._sources(j, band, wcs, opt)
        sky = (zodi + src / opt.omega).astype(np.float32)
        texp = inst.exposure_time
        persist = persistence.release(self.traps[band], gap=gap, exposure=texp, taus=np.array(cfg.detector.trap_taus))
        current = np.empty((n, n))
        expose(zodi, src, opt.omega, opt.response, det.dark, persist, det.dead, current)

        first, last = inst.n_discarded_frames, inst.n_frames - 1
        col_gain = det.gain[inst.readout_channel(band, np.arange(n))][None, :].astype(np.float64)
        limit = cfg.detector.overflow_adu * col_gain
        measured, n_used = measured_rate(current, det.q_nl, det.b1, det.b2, det.b3, limit=limit,
                                         first=first, last=last, frame_time=inst.frame_time)
        # one normal deviate per raw pixel: slope noise inside, reference noise on the border
        z = rng.standard_normal((nr, nr), dtype=np.float32)
        value = np.empty((n, n))
        add_ramp_noise(measured, n_used, det.read_noise, z, ref, inst.frame_time, value)

        on_board = np.zeros((n, n), np.uint32)
        on_board[n_used < last - first + 1] |= np.uint32(_flags.Flag.OVERFLOW)
        on_board[n_used < 5] |= np.uint32(_flags.Flag.SUR_ERROR)
        transients = self._transients(rng, value, on_board, first, last)
        fullsample = self._fullsample(rng, det, current, value, col_gain, limit, transients)
        if fullsample["y"].size:
            on_board[fullsample["y"][::inst.n_frames], fullsample["x"][::inst.n_frames]] |= np.uint32(
                _flags.Flag.FULLSAMPLE)

        # traps fill with this exposure's charge, up to a little above the overflow level
        persistence.capture(self.traps[band], np.minimum(current * texp, limit * 1.2),
                            fractions=np.array(cfg.detector.trap_fractions), density=det.trap_density)

        raw, raw_flags, phantom, offset = self._readout(rng, band, det, value, on_board, z)
        truth_flags = det.masks | (on_board & np.uint32(_flags.Flag.OVERFLOW))
        truth_flags[transients["y"], transients["x"]] |= np.uint32(_flags.Flag.TRANSIENT)
        truth_flags[persist > cfg.detector.persistence_threshold] |= np.uint32(_flags.Flag.PERSIST)
        truth_flags[current * last * inst.frame_time > det.q_max] |= np.uint32(_flags.Flag.NONLINEAR)
        return ImageResult(raw, raw_flags, phantom, sky, zodi, persist, current.astype(np.float32),
                           offset.astype(np.float32), truth_flags, wcs, sources, transients, fullsample)

    def _zodi(self, wcs: WCS, opt: _BandOptics, observer: np.ndarray) -> np.ndarray:
        """Kelsall model at the node grid, cubic-spline interpolated (a separable matrix product)."""
        nodes, basis = self._zodi_nodes
        gx, gy = np.meshgrid(nodes, nodes)
        ra, dec = wcs.all_pix2world(gx, gy, 0)
        lon, lat = equatorial_to_ecliptic(ra, dec)
        lam = opt.cwave[np.rint(gy).astype(int), np.rint(gx).astype(int)]
        z = zodi_brightness(lon, lat, lam, observer=observer)
        return (basis @ z @ basis.T).astype(np.float32)

    def _sources(self, j: int, band: int, wcs: WCS, opt: _BandOptics) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        inst = self.instrument
        n = inst.n_active
        image = np.zeros((n, n), np.float64)
        ra_c, dec_c = (float(v) for v in wcs.wcs.crval)
        cat = self.catalog.around(ra_c, dec_c, self._radius)
        empty = {k: np.zeros(0) for k in ("source_id", "x", "y", "ra", "dec", "wavelength", "bandwidth", "flux")}
        if not cat:
            return image, empty
        near = cat["_xyz"] @ _unit(np.array(ra_c), np.array(dec_c)) > math.cos(math.radians(self._radius))
        cat = {k: v[near] for k, v in cat.items()}
        # Stars are seen from the spacecraft at mid-exposure: proper motion to the epoch
        # and the annual (plus spacecraft) parallax of the catalogue's barycentric positions.
        mjd = float(self.plan.mjd_avg[j])
        observer = observer_barycentric(mjd, self.plan.sc_position[j, 1])
        ra, dec = propagate(cat["ra"], cat["dec"], cat["pmra"], cat["pmdec"], cat["parallax"],
                            ref_epoch=cat["ref_epoch"], epoch=julian_year(mjd), observer=observer)
        x, y = wcs.all_world2pix(ra, dec, 0)
        margin = 8
        keep = (x > -margin) & (x < n - 1 + margin) & (y > -margin) & (y < n - 1 + margin)
        cat = {k: v[keep] for k, v in cat.items()}
        x, y, ra, dec = x[keep], y[keep], ra[keep], dec[keep]
        xi, yi = np.clip(np.rint(x), 0, n - 1).astype(int), np.clip(np.rint(y), 0, n - 1).astype(int)
        lam, bw = opt.cwave[yi, xi].astype(np.float64), opt.cband[yi, xi].astype(np.float64)
        flux = sed_flux(cat, lam, bw)
        sx, sy = psf_sigmas(lam, x, y, instrument=inst)
        render_point_sources(image, x, y, flux, sx, sy)
        return image, {"source_id": cat["source_id"], "x": x, "y": y, "ra": ra, "dec": dec,
                       "wavelength": lam, "bandwidth": bw, "flux": flux}

    def _transients(self, rng: np.random.Generator, value: np.ndarray, on_board: np.ndarray,
                    first: int, last: int) -> dict[str, np.ndarray]:
        """Particle hits: each adds its charge to the ramp from its frame on."""
        d, inst = self.config.detector, self.instrument
        n = inst.n_active
        area = (d.pixel_pitch * 1e-4) ** 2 * n * n  # [cm^2]
        k = rng.poisson(d.transient_rate * area * inst.elapsed_time)
        y = rng.integers(0, n, k)
        x = rng.integers(0, n, k)
        frame = rng.integers(0, inst.n_frames, k)
        charge = d.transient_charge * rng.lognormal(0.0, 0.8, k)
        w = ols_weights(first, last, frame_time=inst.frame_time)
        tail = np.concatenate([np.cumsum(w[::-1])[::-1], [0.0]])  # sum of weights from frame k on
        bias = charge * tail[np.clip(frame - first, 0, last - first + 1)]
        flagged = (charge >= d.transient_threshold) & (frame >= d.transient_first_frame) & (frame <= last)
        np.add.at(value, (y, x), bias)
        for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):  # charge shared with the four neighbours
            yy, xx = y + dy, x + dx
            ok = (yy >= 0) & (yy < n) & (xx >= 0) & (xx < n)
            np.add.at(value, (yy[ok], xx[ok]), 0.03 * bias[ok])
        on_board[y[flagged], x[flagged]] |= np.uint32(_flags.Flag.TRANSIENT)
        return {"y": y, "x": x, "frame": frame, "charge": charge, "slope_bias": bias, "flagged": flagged}

    def _fullsample(self, rng: np.random.Generator, det: Detector, current: np.ndarray,
                    value: np.ndarray, col_gain: np.ndarray, limit: np.ndarray,
                    transients: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every read of the full-sample pixels; their slopes are fitted from these ramps."""
        inst = self.instrument
        py, px = det.fullsample[:, 0], det.fullsample[:, 1]
        k = py.size
        t = np.arange(inst.n_frames) * inst.frame_time
        rate = np.maximum(current[py, px], 0.0)
        q = np.cumsum(rng.poisson(rate[:, None] * inst.frame_time, (k, inst.n_frames)), axis=1).astype(float)
        q -= q[:, :1]  # the reset read collects nothing
        hit = {(int(a), int(b)): i for i, (a, b) in enumerate(zip(transients["y"], transients["x"], strict=True))}
        for s in range(k):
            i = hit.get((int(py[s]), int(px[s])))
            if i is not None:
                q[s, transients["frame"][i]:] += transients["charge"][i]
        reported = nonlinear_charge(q, det.q_nl[py, px, None], det.b1[py, px, None], det.b2[py, px, None],
                                    det.b3[py, px, None])
        ref = inst.n_reference
        reads = reported + rng.normal(0.0, 1.0, (k, inst.n_frames)) * det.read_noise[py + ref, px + ref, None]
        first, last = inst.n_discarded_frames, inst.n_frames - 1
        for s in range(k):
            # on board, the fit stops before the first read at or above the overflow limit
            over = np.flatnonzero(reads[s, first:last + 1] >= limit[0, px[s]])
            stop = first + (over[0] if over.size else last - first + 1)
            frames = slice(first, max(stop, first + 2))
            value[py[s], px[s]] = np.polyfit(t[frames], reads[s, frames], 1)[0]
        gain = col_gain[0, px]
        adu = reads / gain[:, None]
        return {"y": np.repeat(py, inst.n_frames), "x": np.repeat(px, inst.n_frames),
                "frame": np.tile(np.arange(inst.n_frames), k), "time": np.tile(t, k),
                "adu": adu.ravel().astype(np.float32)}

    def _readout(self, rng: np.random.Generator, band: int, det: Detector, value: np.ndarray,
                 on_board: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Electronic gains, drifting reference offsets, reference border and phantom reads."""
        inst, d = self.instrument, self.config.detector
        nr, ref, n = inst.n_raw, inst.n_reference, inst.n_active
        nch = inst.n_readout_channels
        self.drift[band] += rng.normal(0.0, d.reference_drift, nch)
        gradient = rng.normal(0.0, d.reference_gradient, nch)
        rows = (np.arange(nr) / (nr - 1) - 0.5)[:, None]
        channel_offset = det.offset + self.drift[band] + gradient * rows  # (nr, nch) [adu/s]
        col_channel = inst.readout_channel(band, inst.pixel_coords(reference_pixels=True))
        n_fit = inst.n_frames - inst.n_discarded_frames
        raw = np.empty((nr, nr), np.float32)
        read_out(value, channel_offset, col_channel, det.gain, det.read_noise, z, ref, n_fit, inst.frame_time, raw)
        flags = np.full((nr, nr), np.uint32(_flags.Flag.REFERENCE))
        flags[ref:ref + n, ref:ref + n] = on_board
        # phantom reads: the channel offset plus the read noise of an empty pixel
        sigma = np.sqrt(slope_variance(0.0, d.read_noise, n_frames=n_fit, frame_time=inst.frame_time))
        phantom = channel_offset[:, :, None] + (sigma / det.gain)[None, :, None] * rng.standard_normal(
            (nr, nch, inst.n_phantom))
        return raw, flags, phantom.astype(np.float32), channel_offset


def _cube_meta(sim: Simulator, idx: list[int]) -> dict[str, Any]:
    p = sim.plan
    return {
        "obsid": [str(p.obsid[j]) for j in idx],
        "mjd_avg": p.mjd_avg[idx],
        "observations": {
            "mjd_beg": p.mjd_beg[idx], "mjd_end": p.mjd_end[idx],
            "target": p.target[idx].astype(np.int64),
            "survey": np.full(len(idx), 0 if p.mode == "deep" else 1, np.int64),
            "planned_elon": p.planned_elon[idx], "planned_elat": p.planned_elat[idx],
            "planned_pa": p.planned_epa[idx],
            "sc_position": p.sc_position[idx], "sc_velocity": p.sc_velocity[idx],
        },
    }


def _stacker(bands: list[int], images: list[dict[int, ImageResult]]):
    def stack(attr: str) -> np.ndarray:
        return np.stack([[getattr(im[b], attr) for im in images] for b in bands])
    return stack


def raw_cube(sim: Simulator, idx: list[int], images: list[dict[int, ImageResult]]) -> xr.Dataset:
    """The ``raw`` level cube of simulated exposures ``idx``."""
    bands = list(sim.bands)
    stack = _stacker(bands, images)
    return make_cube(stack("raw"), level="raw", instrument=sim.instrument, bands=bands, flags=stack("raw_flags"),
                     phantom=stack("phantom"), units={"IMAGE": ADU_RATE, "PHANTOM": ADU_RATE},
                     attrs={"source": "sphx.simulate"}, **_cube_meta(sim, idx))


def truth_cube(sim: Simulator, idx: list[int], images: list[dict[int, ImageResult]]) -> xr.Dataset:
    """The ``truth`` level cube: true sky, zodi, persistence, flags and WCS of exposures ``idx``."""
    bands = list(sim.bands)
    stack = _stacker(bands, images)
    wcs = {(b, obs_key(str(sim.plan.obsid[j]))): im[b].wcs for b in bands for j, im in zip(idx, images, strict=True)}
    cwave = np.stack([sim.optics[b].cwave for b in bands])
    cband = np.stack([sim.optics[b].cband for b in bands])
    ds = make_cube(stack("sky"), level=TRUTH_LEVEL, instrument=sim.instrument, bands=bands, flags=stack("truth_flags"),
                   zodi=stack("zodi"), wcs=wcs, cwave=cwave, cband=cband,
                   units={"IMAGE": SURFACE_BRIGHTNESS, "ZODI": SURFACE_BRIGHTNESS},
                   attrs={"source": "sphx.simulate", "description": "simulation truth"}, **_cube_meta(sim, idx))
    ds["PERSIST"] = (("band", "obs", "y", "x"), stack("persistence"),
                     {"units": "electron / s", "long_name": "injected persistent current"})
    return ds
