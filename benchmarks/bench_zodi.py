"""Get Zodi Model on the real geometry: seconds per image and error against direct evaluation.

Budget (docs/architecture): at most 0.2 s per 2040x2040 image, interpolation error below
0.5 %. For each band this builds a realistic image (the detector's focal-plane WCS with
its SIP distortion, pointed 90 deg from the Sun on the ecliptic, where the dust bands give
the most structure; the linear-variable-filter CWAVE map), times
:func:`sphx.level2.zodi.zodi_image` (best of ``--repeat`` warm calls), and compares it
with the model evaluated directly (:func:`sphx.level2.zodi.zodi_dense`, the "peer") at
every 8th pixel. The peer's time for the whole image is extrapolated from that sub-grid
(``--full`` evaluates one whole image directly instead: about a minute of CPU).

    python benchmarks/bench_zodi.py [--bands 1 2 3 4 5 6] [--nodes 17] [--repeat 5] [--full]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from sphx import SPHEREX
from sphx.level2.zodi import DEFAULT_NODES, zodi_dense, zodi_image
from sphx.simulate.optics import focal_plane, spectral_maps
from sphx.simulate.survey import ecliptic_to_equatorial
from sphx.wcs import focal_plane_wcs
from sphx.zodi import sun_ecliptic_longitude

MJD = 61000.3
SC_POSITION_KM = np.array([1200.0, -4300.0, 5400.0])  # 650 km above the Earth, in a polar orbit
STEP = 8
BUDGET_S, BUDGET_ERROR = 0.2, 5e-3


def best_of(f, repeat: int) -> tuple[float, np.ndarray]:
    out = f()  # warm: numba compilation and caches
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bands", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--nodes", type=int, default=DEFAULT_NODES)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--full", action="store_true", help="evaluate the first band's whole image directly")
    args = parser.parse_args()

    inst = SPHEREX
    n = inst.n_active
    ra, dec = ecliptic_to_equatorial(float(sun_ecliptic_longitude(MJD)) + 90.0, 0.0)
    geometry = {"mjd": MJD, "sc_position_km": SC_POSITION_KM}
    sub = np.unique(np.r_[np.arange(0, n, STEP), n - 1])
    print(f"SPHEREx geometry, {n}x{n} active pixels, {args.nodes}x{args.nodes} nodes, "
          f"{os.cpu_count()} CPU(s); boresight 90 deg from the Sun on the ecliptic")
    print("band  sphx [s/image]  max err   rms err   (no spectral scaling: max err)  peer [s/image]  ratio")
    worst_t, worst_e = 0.0, 0.0
    for band in args.bands:
        fp = focal_plane(inst, band)
        wcs = focal_plane_wcs(ra=float(ra), dec=float(dec), pa=0.0, offset=fp.offset, rotation=fp.rotation,
                              pixel_scale=inst.pixel_scale, n_pixels=n, sip=fp.sip)
        cwave, _ = spectral_maps(inst, band)
        t_sphx, z = best_of(lambda w=wcs, c=cwave: zodi_image(w, c, nodes=args.nodes, **geometry), args.repeat)
        plain = zodi_image(wcs, cwave, nodes=args.nodes, spectral_scaling=False, **geometry)

        t0 = time.perf_counter()
        direct = zodi_dense(wcs, cwave[np.ix_(sub, sub)], x=sub, y=sub, **geometry)
        t_peer = (time.perf_counter() - t0) * (n * n) / direct.size
        if args.full and band == args.bands[0]:
            t0 = time.perf_counter()
            whole = zodi_dense(wcs, cwave, **geometry)
            t_peer = time.perf_counter() - t0
            full_err = np.abs(z / whole - 1.0)
            print(f"      (whole image evaluated directly: max err {full_err.max():.2e}, "
                  f"rms {np.sqrt(np.mean(full_err**2)):.2e})")

        err = z[np.ix_(sub, sub)] / direct - 1.0
        err_plain = np.abs(plain[np.ix_(sub, sub)] / direct - 1.0).max()
        e_max, e_rms = float(np.abs(err).max()), float(np.sqrt(np.mean(err**2)))
        worst_t, worst_e = max(worst_t, t_sphx), max(worst_e, e_max)
        print(f"  {band}   {t_sphx:12.3f}   {e_max:8.1e}  {e_rms:8.1e}   {err_plain:28.1e}   "
              f"{t_peer:12.1f}   {t_peer / t_sphx:5.0f}x")
    print(f"slowest image {worst_t:.3f} s (budget {BUDGET_S} s) -> {'OK' if worst_t <= BUDGET_S else 'OVER BUDGET'}")
    print(f"largest error {worst_e:.1e} on a grid of every {STEP}th pixel (budget {BUDGET_ERROR:.0e}) -> "
          f"{'OK' if worst_e < BUDGET_ERROR else 'OVER BUDGET'}")


if __name__ == "__main__":
    main()
