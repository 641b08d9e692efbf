"""Forced PSF photometry: sphx against photutils ``PSFPhotometry`` with fixed positions.

Two measurements, in one run:

1. **Full image**: a 2040x2040 image with 160,000 catalogue sources (the issue's case),
   a 121-zone PSF cube (10x oversampled, 101x101), photometered by
   :func:`sphx.kernels.photometry.forced_photometry` (templates built from the cube
   included in the time). The target is at most 10 s on 2 cores; peak Python memory of
   the call (tracemalloc) is printed next to the image's size. Then the whole of what
   :func:`sphx.level3.photometry.photometer_image` does with the image's pixels under
   ``run_level3``: the PSF blended between the four zones around each source, the
   global background, a first fit, the fitted sources rendered, the background again
   without them and the second fit with their photon noise in the weights.
2. **Against the peer**: a smaller image (512x512, 3000 sources: sparser, so that some
   sources are isolated), one PSF, the same sources and noise for both. photutils gets the effective PSF of the same cube (10x10 box sums,
   :class:`photutils.psf.ImagePSF`) with ``x_0`` and ``y_0`` fixed and a 15x15 fit shape;
   sphx fits the 15x15 cutouts jointly. Prints both times, the speed ratio per source
   (the issue asks for at least 100) and the flux agreement for isolated sources (no
   other source within 8 pixels; the issue asks for 0.5 %).

    python benchmarks/bench_forced_photometry.py [--sources 160000] [--peer-size 512] [--peer-sources 3000]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
from bench_repository import best
from scipy.spatial import cKDTree

from sphx.kernels.photometry import forced_photometry, render_sources, template_bank
from sphx.level3.background import estimate_background
from sphx.level3.photometry import psf_zone_weights
from sphx.simulate.optics import psf_plane, render_point_sources

SIZE = 2040
OVER, PSF_SIZE, ZONES = 10, 101, 11


def plane(sigma: float) -> np.ndarray:
    """The simulator's core + wing PSF integrated over 10x oversampled pixels."""
    return psf_plane(sigma, sigma, size=PSF_SIZE, oversampling=OVER)


def scene(rng: np.random.Generator, n: int, count: int, sigma: float) -> tuple[np.ndarray, ...]:
    x, y = rng.uniform(-2, n + 1, count), rng.uniform(-2, n + 1, count)
    flux = 10 ** rng.uniform(0.5, 4.0, count)  # S/N from ~1 to ~5000 at unit noise
    image = np.zeros((n, n))
    render_point_sources(image, x, y, flux, np.full(count, sigma), np.full(count, sigma))
    image += rng.normal(0, 1, image.shape)
    return image.astype(np.float32), x, y, flux


def full_image(args, rng) -> None:
    # zone sigmas grow towards the corners, as the simulated field dependence does
    centres = (np.arange(ZONES) + 0.5) * SIZE / ZONES - 0.5
    u = (centres - SIZE / 2) / (SIZE / 2)
    zone_sigma = 0.4 * (1 + 0.1 * (u[None, :] ** 2 + u[:, None] ** 2)).ravel()
    cube = np.stack([plane(s) for s in zone_sigma]).astype(np.float32)
    x_all = rng.uniform(-2, SIZE + 1, args.sources)
    y_all = rng.uniform(-2, SIZE + 1, args.sources)
    zx = np.clip(np.floor((x_all + 0.5) * ZONES / SIZE), 0, ZONES - 1).astype(np.int64)
    zy = np.clip(np.floor((y_all + 0.5) * ZONES / SIZE), 0, ZONES - 1).astype(np.int64)
    zone = zy * ZONES + zx
    flux = 10 ** rng.uniform(0.5, 4.0, args.sources)
    image = np.zeros((SIZE, SIZE))
    render_point_sources(image, x_all, y_all, flux, zone_sigma[zone], zone_sigma[zone])
    noiseless = image
    image = (image + rng.normal(0, 1, image.shape)).astype(np.float32)
    weight = np.ones_like(image)
    flags = np.zeros(image.shape, np.uint32)

    def run():
        bank = template_bank(cube, oversampling=OVER)
        return forced_photometry(image, weight, flags, x_all, y_all, zone, bank)

    run()  # compile
    t = best(run, args.repeat)
    tracemalloc.start()
    res = run()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    ok = np.isfinite(res["flux"])
    pull = (res["flux"][ok] - flux[ok]) / res["flux_error"][ok]
    print(f"full image: {args.sources} sources on {SIZE}x{SIZE}, 121 PSF zones: {t:.2f} s "
          f"({args.sources / t:,.0f} sources/s; the issue asks for at most 10 s); "
          f"median sources per fit {np.median(res['n_blend']) + 1:.0f}; peak traced memory "
          f"{peak / 1e6:.0f} MB (image {image.nbytes / 1e6:.0f} MB); pull std {np.std(pull):.3f}", flush=True)

    sky = 100.0  # a flat zodiacal light; unit read noise plus the photon noise of sky and sources
    image = (noiseless + sky + rng.normal(0, 1, image.shape) * np.sqrt(1 + sky + noiseless)).astype(np.float32)
    wavelength = np.broadcast_to(np.linspace(0.75, 1.1, SIZE, dtype=np.float32)[:, None], image.shape)
    zodi = np.full(image.shape, sky, np.float32)
    blend, blend_weight = psf_zone_weights(x_all, y_all, centres[np.arange(ZONES**2) % ZONES],
                                           centres[np.arange(ZONES**2) // ZONES])

    def chain():
        bank = template_bank(cube, oversampling=OVER)
        background = estimate_background(image, flags, zodi, wavelength).background
        kw = {"zone_weight": blend_weight}
        first = forced_photometry(image - background, 1 / (1 + background), flags, x_all, y_all, blend, bank, **kw)
        sources = render_sources(image.shape, x_all, y_all, blend, np.fmax(first["flux"], 0), bank, **kw)
        background = estimate_background(image - sources, flags, zodi, wavelength).background
        return forced_photometry(image - background, 1 / (1 + background + sources), flags, x_all, y_all, blend,
                                 bank, **kw)

    chain()
    t = best(chain, args.repeat)
    res = chain()
    ok = np.isfinite(res["flux"])
    pull = (res["flux"][ok] - flux[ok]) / res["flux_error"][ok]
    print(f"full image, Level 3a as run_level3 does it (zones blended, background, two fits): {t:.2f} s "
          f"(the issue asks for at most 10 s); pull median {np.median(pull):+.3f}, std {np.std(pull):.3f}",
          flush=True)


def against_photutils(args, rng) -> None:
    from astropy.table import Table
    from photutils.psf import ImagePSF, PSFPhotometry

    n, count = args.peer_size, args.peer_sources
    sigma = 0.42
    image, x, y, flux = scene(rng, n, count, sigma)
    inside = (x > 0) & (x < n - 1) & (y > 0) & (y < n - 1)  # photutils needs the centre on the image
    x, y, flux = x[inside], y[inside], flux[inside]
    one = plane(sigma)
    weight, flags = np.ones_like(image), np.zeros(image.shape, np.uint32)
    zone = np.zeros(x.size, np.int64)

    def ours():
        return forced_photometry(image, weight, flags, x, y, zone, template_bank(one[None], oversampling=OVER))

    ours()
    t_ours = best(ours, args.repeat)
    res = ours()
    # the effective PSF: native-pixel integrals centred on each oversampled sample
    c = np.cumsum(np.cumsum(np.pad(one, ((1, 0), (1, 0))), 0), 1)
    epsf = c[OVER:, OVER:] - c[:-OVER, OVER:] - c[OVER:, :-OVER] + c[:-OVER, :-OVER]
    model = ImagePSF(epsf, oversampling=OVER, origin=((PSF_SIZE - 1) / 2 - (OVER - 1) / 2,) * 2)
    model.x_0.fixed = True
    model.y_0.fixed = True
    phot = PSFPhotometry(model, fit_shape=(15, 15), aperture_radius=3)
    t0 = time.perf_counter()
    table = phot(image, error=np.ones_like(image), init_params=Table({"x_0": x, "y_0": y, "flux": flux}))
    t_peer = time.perf_counter() - t0
    theirs = np.asarray(table["flux_fit"], dtype=float)
    dist, _ = cKDTree(np.c_[x, y]).query(np.c_[x, y], k=2)
    isolated = (dist[:, 1] > 8) & (x > 8) & (x < n - 9) & (y > 8) & (y < n - 9)
    bright = isolated & (flux > 1000)
    rel = np.abs(res["flux"] / theirs - 1)
    print(f"against photutils: {x.size} sources on {n}x{n}: photutils PSFPhotometry {t_peer:.1f} s, "
          f"sphx {t_ours:.3f} s: speed ratio {t_peer / t_ours:.0f} (the issue asks for at least 100); "
          f"isolated sources ({isolated.sum()}): flux agreement median {np.median(rel[isolated]):.2e}, "
          f"max {rel[isolated].max():.2e} (S/N > 1000: max {rel[bright].max():.2e}; the issue asks for 0.5 %)",
          flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sources", type=int, default=160_000, help="sources on a full 2040x2040 image")
    p.add_argument("--peer-size", type=int, default=512, help="image side for the photutils comparison")
    p.add_argument("--peer-sources", type=int, default=3000,
                   help="sources on it (sparser than the full image, so that some are isolated)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--skip-peer", action="store_true")
    args = p.parse_args()
    rng = np.random.default_rng(7)
    full_image(args, rng)
    if not args.skip_peer:
        against_photutils(args, rng)


if __name__ == "__main__":
    main()
