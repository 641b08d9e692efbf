"""Median filter of outlier detection: sphx against scipy.ndimage on one detector image.

Budget (architecture): the 5x5 median of Level 2b "Detect Outlier Pixels" at least 20x
faster than ``scipy.ndimage.median_filter`` on a 2040x2040 float32 image on 2 cores.
The image is sky-like: a smooth background with Gaussian noise and a few hundred stars.
scipy's result is undefined where a window holds NaN, so scipy is timed on the finite
image and sphx on both the finite image and a copy with 0.1 % NaN pixels (the windows
holding a NaN take sphx's slower path; ``--nan-fraction`` changes their number). Each time is the best of ``--repeats``
runs, after one untimed run that compiles or loads the numba kernels.

    python benchmarks/bench_median.py [--size 5] [--repeats 10] [--nan-fraction 0.001] [--check]

``--check`` exits with status 1 when the results differ from scipy (finite image;
NaN-free windows of the image with NaN) or from ``np.nanmedian`` (a sample of the
windows holding NaN), or, for the 5x5 window, when sphx is less than 20x faster than
scipy on either image.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numba
import numpy as np
import scipy.ndimage as ndi

from sphx.kernels.median import median_filter

REQUIRED_SPEEDUP = 20.0


def sky_image(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Background gradient [MJy/sr] plus Gaussian noise and Gaussian stars, float32."""
    ny, nx = shape
    y, x = np.mgrid[0:ny, 0:nx]
    image = 0.3 + 0.05 * (x / nx) + 0.02 * (y / ny) + rng.normal(0.0, 0.01, shape)
    for cy, cx, flux in zip(rng.uniform(0, ny, 300), rng.uniform(0, nx, 300), rng.lognormal(-1.0, 1.5, 300),
                            strict=True):
        y0, y1 = max(int(cy) - 6, 0), min(int(cy) + 7, ny)
        x0, x1 = max(int(cx) - 6, 0), min(int(cx) + 7, nx)
        r2 = (y[y0:y1, x0:x1] - cy) ** 2 + (x[y0:y1, x0:x1] - cx) ** 2
        image[y0:y1, x0:x1] += flux * np.exp(-0.5 * r2 / 1.2**2)
    return image.astype(np.float32)


def best_time(func, repeats: int) -> float:
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=5, help="window size [pixels] (default 5)")
    parser.add_argument("--shape", type=int, default=2040, help="image side [pixels] (default 2040)")
    parser.add_argument("--repeats", type=int, default=10, help="sphx runs per timing (default 10)")
    parser.add_argument("--scipy-repeats", type=int, default=3, help="scipy runs (default 3)")
    parser.add_argument("--nan-fraction", type=float, default=0.001,
                        help="fraction of NaN pixels in the second image (default 0.001)")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 if sphx is under {REQUIRED_SPEEDUP:.0f}x scipy or disagrees")
    args = parser.parse_args()
    size = args.size
    rng = np.random.default_rng(7)
    image = sky_image((args.shape, args.shape), rng)
    with_nan = image.copy()
    with_nan[rng.random(image.shape) < args.nan_fraction] = np.nan
    n_nan = int(np.isnan(with_nan).sum())

    median_filter(image[:64, :64], size=size)  # compile, or load the numba cache
    print(f"{size}x{size} median filter of a {args.shape}x{args.shape} float32 sky image, "
          f"{numba.get_num_threads()} numba threads")

    expected = ndi.median_filter(image, size=size, mode="reflect")
    t_scipy = best_time(lambda: ndi.median_filter(image, size=size, mode="reflect"), args.scipy_repeats)
    out = np.empty_like(image)
    t_finite = best_time(lambda: median_filter(image, size=size, out=out), args.repeats)
    finite_result = median_filter(image, size=size)
    t_nan = best_time(lambda: median_filter(with_nan, size=size, out=out), args.repeats)
    nan_result = median_filter(with_nan, size=size)

    # agreement: exact on the finite image; on the NaN image, exact wherever the window
    # holds no NaN, and np.nanmedian on a sample of the windows that do
    diff_finite = float(np.abs(finite_result.astype(np.float64) - expected).max())
    r = size // 2
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(with_nan, r, mode="symmetric"), (size, size))
    touched = ndi.maximum_filter(np.isnan(with_nan).astype(np.uint8), size=size, mode="reflect").astype(bool)
    diff_clean = float(np.abs(nan_result[~touched].astype(np.float64) - expected[~touched]).max())
    sample = np.flatnonzero(touched)[:: max(1, int(touched.sum()) // 5000)]
    iy, ix = np.unravel_index(sample, image.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        brute = np.nanmedian(windows[iy, ix].reshape(len(sample), -1), axis=1).astype(np.float32)
    diff_nan = float(np.nanmax(np.abs(nan_result[iy, ix].astype(np.float64) - brute)))
    nan_mismatch = int((np.isnan(nan_result[iy, ix]) != np.isnan(brute)).sum())

    ratio_finite = t_scipy / t_finite
    ratio_nan = t_scipy / t_nan
    print(f"  scipy.ndimage.median_filter, finite image : {t_scipy * 1e3:9.1f} ms  (best of {args.scipy_repeats})")
    print(f"  sphx median_filter, finite image          : {t_finite * 1e3:9.2f} ms  (best of {args.repeats})"
          f"  -> {ratio_finite:6.1f}x")
    print(f"  sphx median_filter, {n_nan} NaN ({n_nan / image.size:.2%})    : {t_nan * 1e3:9.2f} ms  "
          f"(best of {args.repeats})  -> {ratio_nan:6.1f}x  ({int(touched.sum())} windows hold NaN)")
    print(f"  max |sphx - scipy|, finite image          : {diff_finite:g}")
    print(f"  max |sphx - scipy|, NaN image, NaN-free windows : {diff_clean:g}")
    print(f"  max |sphx - np.nanmedian|, {len(sample)} windows with NaN : {diff_nan:g} "
          f"({nan_mismatch} NaN mismatches)")
    agree = diff_finite == 0 and diff_clean == 0 and diff_nan == 0 and nan_mismatch == 0
    if size == 5:
        ok = agree and min(ratio_finite, ratio_nan) >= REQUIRED_SPEEDUP
        print(f"required: >= {REQUIRED_SPEEDUP:.0f}x faster and identical results -> {'OK' if ok else 'FAILED'}")
    else:
        ok = agree
        print(f"required: identical results (the speed budget is for 5x5) -> {'OK' if ok else 'FAILED'}")
    if args.check and not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
