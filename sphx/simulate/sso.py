"""Orbital elements of simulated solar-system objects that cross the simulated survey.

:func:`sso_elements` builds a deterministic table of heliocentric elements
(:data:`sphx.io.mpcorb.ELEMENTS_SCHEMA`) for a survey: a few tens of main-belt-like
asteroids, a near-Earth asteroid and a high-eccentricity comet, each made to appear on
a chosen image. For object ``k``:

1. pick an exposure ``j`` (spread evenly over the plan), a detector and a pixel away
   from the edges, and take that pixel's sky direction ``u`` through the image's
   *true* WCS;
2. pick a heliocentric distance ``r`` (main belt 2.1-3.4 AU, NEO 1.05-1.4 AU, comet
   1.5-3 AU) and solve for the distance ``delta`` along ``u`` from the spacecraft at
   mid-exposure where the body is ``r`` from the Sun: the body's position at the
   emission time ``t - delta / c`` is the spacecraft's plus ``delta * u``;
3. give it a velocity (near-circular prograde with a random tilt for asteroids, a
   faster one for the NEO, near-escape speed 30 deg from radial for the comet), convert
   the state to elements (:func:`sphx.kernels.kepler.state_to_elements`) and move the
   epoch 10-40 days earlier, to a whole TT day as the MPC's are.

Two-body propagation of the elements (:mod:`sphx.sso`) therefore returns the object at
the chosen pixel of the true WCS at mid-exposure, to numerical precision; the table's
``truth_*`` columns record where. The objects are **not rendered** into the simulated
images: they test the bookkeeping of the Compute Known Solar System Object Positions
module, not photometry.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..ephemeris import C_AU_PER_DAY, earth_sun_barycentric, observer_barycentric, tt_from_utc
from ..io.mpcorb import ELEMENTS_SCHEMA
from ..kernels.kepler import GAUSS_K, state_to_elements
from .simulator import Simulator

__all__ = ["sso_elements"]

_KINDS = {  # heliocentric distance range [AU], absolute magnitude range
    "main_belt": ((2.1, 3.4), (12.0, 17.0)),
    "neo": ((1.05, 1.4), (19.0, 22.0)),
    "comet": ((1.5, 3.0), (9.0, 12.0)),
}
_ECLIPTIC_POLE = np.array([0.0, -0.39777715593191376, 0.9174820620691818])  # ICRS axes


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _velocity(kind: str, r_vec: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A heliocentric velocity [AU / d] for a body at ``r_vec`` (ICRS axes)."""
    r = float(np.linalg.norm(r_vec))
    radial = r_vec / r
    along = _unit(np.cross(_ECLIPTIC_POLE, radial))  # prograde, in the ecliptic
    normal = np.cross(radial, along)
    v_circ = GAUSS_K / np.sqrt(r)
    if kind == "comet":
        a = rng.uniform(10.0, 30.0)
        speed = GAUSS_K * np.sqrt(2.0 / r - 1.0 / a)
        tilt = np.deg2rad(rng.uniform(20.0, 160.0))  # a comet's orbit may be steep or retrograde
        t = np.cos(tilt) * along + np.sin(tilt) * normal
        inward = -1.0 if rng.random() < 0.5 else 1.0
        return speed * (np.cos(np.deg2rad(30.0)) * inward * radial + np.sin(np.deg2rad(30.0)) * t)
    tilt = np.deg2rad(rng.normal(0.0, 8.0 if kind == "main_belt" else 15.0))
    t = np.cos(tilt) * along + np.sin(tilt) * normal
    factor = rng.uniform(0.92, 1.08) if kind == "main_belt" else rng.uniform(1.15, 1.25)
    radial_part = rng.normal(0.0, 0.05 if kind == "main_belt" else 0.15)
    return v_circ * (factor * t + radial_part * radial)


def sso_elements(sim: Simulator, *, n_asteroids: int = 24, n_neos: int = 1, n_comets: int = 1) -> pa.Table:
    """Elements of simulated SSOs placed on the survey's images (deterministic per seed).

    Parameters
    ----------
    sim
        The survey's simulator (its plan, bands, true WCSs and seed are used; it is not
        advanced).
    n_asteroids, n_neos, n_comets
        Numbers of main-belt asteroids, near-Earth asteroids and comets.

    Returns
    -------
    pyarrow.Table
        :data:`~sphx.io.mpcorb.ELEMENTS_SCHEMA` (asteroids in mean-anomaly form, comets
        in perihelion form), followed by the truth: ``truth_obsid``, ``truth_band``,
        ``truth_x``, ``truth_y`` (the image and 0-based pixel where the object is at
        mid-exposure) and ``truth_mjd`` (UTC MJD of that mid-exposure).
    """
    kinds = ["main_belt"] * n_asteroids + ["neo"] * n_neos + ["comet"] * n_comets
    plan, n_img = sim.plan, sim.instrument.n_active
    rng = np.random.default_rng(np.random.SeedSequence(sim.config.seed, spawn_key=(9,)))
    exposures = np.round(np.linspace(0, len(plan) - 1, len(kinds))).astype(int) if kinds else np.zeros(0, int)
    rows: dict[str, list] = {f.name: [] for f in ELEMENTS_SCHEMA}
    truth: dict[str, list] = {"truth_obsid": [], "truth_band": [], "truth_x": [], "truth_y": [], "truth_mjd": []}
    for k, (kind, j) in enumerate(zip(kinds, exposures, strict=True)):
        band = sim.bands[k % len(sim.bands)]
        x, y = rng.uniform(0.1 * n_img, 0.9 * (n_img - 1), 2)
        ra, dec = (float(v) for v in sim.true_wcs(int(j), band).all_pix2world(x, y, 0))
        u = np.array([np.cos(np.radians(dec)) * np.cos(np.radians(ra)),
                      np.cos(np.radians(dec)) * np.sin(np.radians(ra)), np.sin(np.radians(dec))])
        t_utc = float(plan.mjd_avg[j])
        observer = observer_barycentric(t_utc, plan.sc_position[j, 1])
        _, sun = earth_sun_barycentric(t_utc)
        _, sun_before = earth_sun_barycentric(t_utc - 0.5)
        _, sun_after = earth_sun_barycentric(t_utc + 0.5)
        sun_velocity = sun_after - sun_before
        (r_lo, r_hi), (h_lo, h_hi) = _KINDS[kind]
        r = rng.uniform(r_lo, r_hi)
        d = observer - sun
        b = float(u @ d)
        delta = -b + np.sqrt(b * b - float(d @ d) + r * r)
        tau = delta / C_AU_PER_DAY
        # the Sun at emission as sphx.kernels.kepler.astrometric takes it: linear motion
        helio = observer + delta * u - (sun - tau * sun_velocity)
        velocity = _velocity(kind, helio, rng)
        t_emit = float(tt_from_utc(t_utc)) - tau
        el = {key: float(v[0]) for key, v in state_to_elements(helio, velocity, t_emit).items()}
        epoch = float(np.floor(t_emit - rng.uniform(10.0, 40.0)))
        comet = kind == "comet"
        n_motion = GAUSS_K / abs(el["a"]) ** 1.5  # [rad / d]
        mean_anomaly = el["mean_anomaly"] - np.degrees(n_motion * (t_emit - epoch))
        designation = f"SIM{k + 1:04d}"
        rows["designation"].append(designation)
        rows["packed"].append(designation)
        rows["name"].append(f"simulated {kind.replace('_', '-')}")
        rows["epoch_mjd_tt"].append(epoch)
        rows["a_au"].append(el["a"])
        rows["q_au"].append(el["q"] if comet else np.nan)
        rows["e"].append(el["e"])
        rows["incl_deg"].append(el["incl"])
        rows["node_deg"].append(el["node"])
        rows["peri_deg"].append(el["peri"])
        rows["mean_anomaly_deg"].append(np.nan if comet else float(mean_anomaly % 360.0))
        rows["tp_mjd_tt"].append(el["tp"] if comet else np.nan)
        rows["H"].append(round(float(rng.uniform(h_lo, h_hi)), 2))
        rows["G"].append(4.0 if comet else 0.15)
        rows["comet"].append(comet)
        truth["truth_obsid"].append(str(plan.obsid[j]))
        truth["truth_band"].append(band)
        truth["truth_x"].append(float(x))
        truth["truth_y"].append(float(y))
        truth["truth_mjd"].append(t_utc)
    table = pa.Table.from_pydict(rows, schema=ELEMENTS_SCHEMA)
    extra = [
        (pa.field("truth_obsid", pa.string(), metadata={"doc": "image the object was placed on"}), pa.string()),
        (pa.field("truth_band", pa.int8(), metadata={"doc": "detector of that image"}), pa.int8()),
        (pa.field("truth_x", pa.float64(), metadata={"unit": "pixel", "doc": "0-based column at mid-exposure"}),
         pa.float64()),
        (pa.field("truth_y", pa.float64(), metadata={"unit": "pixel", "doc": "0-based row at mid-exposure"}),
         pa.float64()),
        (pa.field("truth_mjd", pa.float64(), metadata={"unit": "d", "doc": "UTC MJD of that mid-exposure"}),
         pa.float64()),
    ]
    for f, type_ in extra:
        table = table.append_column(f, pa.array(truth[f.name], type_))
    meta = dict(ELEMENTS_SCHEMA.metadata or {})
    meta[b"note"] = b"simulated objects placed on the true WCS; not rendered into the images"
    return table.replace_schema_metadata(meta)
