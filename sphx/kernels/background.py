"""2-D sky background on a mesh of boxes (numba), the "global mesh" of Level 3.

:func:`background_2d` gives the same background and background RMS images as
``photutils.background.Background2D`` (photutils 3.0) run with a
``SigmaClip(sigma, maxiters)``, the ``SExtractorBackground`` and ``StdBackgroundRMS``
estimators and its defaults for everything else; :func:`background_mesh` stops at the
low-resolution mesh, which is all that is needed to know which boxes were usable.

What photutils does, step by step, and so what this module does
------------------------------------------------------------------
1. **Boxes.** The image is cut into ``box_size = (by, bx)`` boxes from pixel ``(0, 0)``.
   When the shape is not a multiple of the box size, the left-over last rows and
   columns make one more row / column of *partial* boxes (no padding, no cropping): the
   mesh has ``ceil(ny / by) x ceil(nx / bx)`` boxes.
2. **Masked pixels.** ``mask`` pixels and non-finite pixels (NaN, +-inf) are left out.
3. **Sigma clipping**, per box, as ``astropy.stats.SigmaClip`` with ``cenfunc="median"``,
   ``stdfunc="std"`` (population std, ``ddof=0``): bounds ``median -+ sigma * std`` of the
   values kept so far; values outside ``[lower, upper]`` (inclusive) go; repeat until an
   iteration removes nothing, removes everything, or ``maxiters`` iterations have clipped.
   Full and edge boxes go through astropy's C fast path, which keeps in the end *every*
   unmasked value within the last bounds (a value clipped earlier can come back if the
   bounds widened); the single corner box (partial in both axes) goes through astropy's
   Python path, which keeps the values that survived *every* iteration.
4. **Box estimates** on the clipped values: background ``2.5 median - 1.5 mean`` (the
   mean when ``std == 0``; the median when ``|mean - median| / std >= 0.3``), RMS the
   population std.
5. **Excluded boxes.** A box is excluded (its estimates NaN) when the number of pixels
   left after masking *and clipping* is ``<= (1 - exclude_percentile / 100) * by * bx``:
   the threshold counts the pixels of a *full* box, so a partial box smaller than
   ``(1 - exclude_percentile / 100)`` of a full box is always excluded.
6. **Filling.** Excluded boxes get the inverse-distance-weighted mean (power 1) of the
   10 nearest usable boxes, distances in box units (``scipy.spatial.cKDTree``, as
   photutils, so that ties between equidistant boxes break the same way).
7. **Median filter** of the filled mesh, ``filter_size`` window, boxes outside the mesh
   left out (so edge windows hold fewer values; an even count gives the mean of the two
   middle values). photutils' ``filter_threshold`` default ``None`` filters every box.
8. **Full resolution.** The mesh is taken as samples at the box centres and resized by a
   cubic B-spline (``scipy.ndimage.zoom(mesh, box_size, order=3, mode="reflect",
   grid_mode=True)``) to ``mesh.shape * box_size`` pixels, cropped to the image, and
   clipped to the range of the mesh. A mesh whose values are all equal gives a constant
   image.

How it is fast
--------------
photutils spends its time in numpy reductions over 4-D views of the boxes, a Python
callback per mesh box for the median filter, and a 16-tap spline evaluation per output
pixel. Here each box is gathered once and sorted once (LSD radix sort on the bit
patterns of the floats, turned into unsigned keys that sort like the floats); on a
sorted box every clipping iteration is a median read at the middle index, one unrolled
pass for the mean and std over the kept (contiguous) range and a scan inwards from its
ends. The spline is separable and the zoom factor is a whole number of pixels, so each
full-resolution pixel costs 4 multiply-adds on contiguous weights, after 4 per mesh
column per row. The kernels are ``nogil`` numba functions run on
``numba.get_num_threads()`` threads from a pool (rows of boxes, runs of output rows):
numba compiles ``prange`` loops several seconds slower, per dtype. The spline prefilter
of the (small) mesh is ``scipy.ndimage.spline_filter`` itself, so the coefficients are
photutils' own.

Numerics
--------
The clipping is computed in float64 from the float64 value of each pixel, as astropy's C
code does. The sums go in another order (sorted, four partial sums), so the bounds can
differ from astropy's in the last bits; when a pixel lies within that margin of a bound
(which happens on quantised data such as integer counts, where a bound can fall on a
value exactly), the box is redone with a port of astropy's C loop operation for
operation (N. Wirth's selection leaving the values in astropy's order, sequential sums
in that order), so the clipped pixels are always astropy's for full and edge boxes. The
corner box's bounds are float64 here and float32 in astropy's Python path, so a pixel
within a float32 ulp of a bound there could go the other way. The box estimates are
float64 rounded to the image dtype, where photutils (numpy ``nanmean``, ``nanstd``)
accumulates float32 images in float32: estimates differ by a few float32 ulps (more
where numpy's float32 std loses digits, e.g. ~1e-5 on integer images). Backgrounds and
RMS agree with photutils to ~1e-6 relative on float32 sky images, ~1e-15 on float64.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np

__all__ = ["BackgroundMesh", "background_2d", "background_mesh", "box_background", "mesh_to_image"]

# photutils' mesh filling: its ``Background2D._interpolate_grid`` asks the Shepard IDW
# interpolator for 10 neighbours with inverse-distance (power 1) weights.
_FILL_NEIGHBOURS = 10


@dataclass(frozen=True, eq=False)
class BackgroundMesh:
    """The low-resolution background of :func:`background_mesh`, one value per box.

    Box ``(i, j)`` covers image rows ``i * by`` to ``min((i + 1) * by, ny)`` and columns
    ``j * bx`` to ``min((j + 1) * bx, nx)`` (``box_size = (by, bx)``); the last row and
    column of boxes are partial when the image shape is not a multiple of the box size.

    Attributes
    ----------
    background : (my, mx) array
        The filled and median-filtered mesh, image units: photutils' ``background_mesh``.
    rms : (my, mx) array
        The same for the background RMS: photutils' ``background_rms_mesh``.
    box_background : (my, mx) array
        The SExtractor estimate of each box before filling and filtering; NaN where the
        box is not usable.
    box_rms : (my, mx) array
        The sigma-clipped population std of each box; NaN where not usable.
    n_pixels : (my, mx) int64 array
        Pixels of each box left after masking and sigma clipping: photutils'
        ``n_pixels_mesh``.
    usable : (my, mx) bool array
        Whether the box was used (``n_pixels > (1 - exclude_percentile / 100) * by * bx``);
        the others were filled from their neighbours. photutils: ``~np.isnan`` of its
        per-box statistics.
    box_size : (int, int)
        ``(by, bx)`` [pixels], after clipping to the image shape.
    image_shape : (int, int)
        The shape of the image the mesh was computed on.
    """

    background: np.ndarray
    rms: np.ndarray
    box_background: np.ndarray
    box_rms: np.ndarray
    n_pixels: np.ndarray
    usable: np.ndarray
    box_size: tuple[int, int]
    image_shape: tuple[int, int]

    @property
    def usable_fraction(self) -> float:
        """Fraction of the boxes that were usable (0 to 1)."""
        return float(np.count_nonzero(self.usable)) / self.usable.size


def background_2d(image: np.ndarray, mask: np.ndarray | None = None, *,
                  box_size: int | tuple[int, int] = (10, 10), filter_size: int | tuple[int, int] = (3, 3),
                  sigma: float = 3.0, maxiters: int | None = 10,
                  exclude_percentile: float = 10.0) -> tuple[np.ndarray, np.ndarray, BackgroundMesh]:
    """Background and background RMS images of ``image`` from sigma-clipped boxes.

    The same numbers as ``photutils.background.Background2D(image, box_size, mask=mask,
    filter_size=filter_size, sigma_clip=SigmaClip(sigma=sigma, maxiters=maxiters),
    bkg_estimator=SExtractorBackground(), bkgrms_estimator=StdBackgroundRMS(),
    exclude_percentile=exclude_percentile)`` with the photutils 3.0 defaults for
    everything else: its ``.background``, ``.background_rms`` and meshes. The steps are
    listed in the module docstring.

    Parameters
    ----------
    image : (ny, nx) array
        The image, any unit (the outputs have the same). float32 and float64 are used as
        they are; other real dtypes are converted to float32.
    mask : (ny, nx) bool array, optional
        True for pixels to leave out of the statistics (sources, bad pixels). NaN and
        infinite pixels are left out whether masked or not. Masked pixels still get a
        background value, interpolated from the mesh.
    box_size : int or (int, int), optional
        Box height and width ``(by, bx)`` [pixels]; a larger value than the image is
        reduced to the image size.
    filter_size : int or (int, int), optional
        Size of the median filter window on the mesh [boxes], odd; 1 means no filtering.
    sigma : float, optional
        Clipping limit, in standard deviations, on both sides of the median.
    maxiters : int or None, optional
        Most clipping iterations (at least 1); None iterates until nothing is clipped.
    exclude_percentile : float, optional
        A box is left out of the mesh (and filled from its neighbours) when at least this
        percentage of a full box's pixels is masked, missing (partial boxes) or clipped,
        0 to 100.

    Returns
    -------
    background : (ny, nx) array
        The background, float32 for a float32 (or non-float) image, float64 for float64.
    background_rms : (ny, nx) array
        The background RMS, same dtype.
    mesh : BackgroundMesh
        The low-resolution mesh, with the per-box estimates, pixel counts and which
        boxes were usable (``mesh.usable_fraction``).

    Raises
    ------
    ValueError
        If ``image`` is not 2-D or empty, ``mask`` does not have its shape, a parameter
        is out of range, every pixel is masked or non-finite, or no box is usable.
    """
    mesh = background_mesh(image, mask, box_size=box_size, filter_size=filter_size, sigma=sigma,
                           maxiters=maxiters, exclude_percentile=exclude_percentile)
    return mesh_to_image(mesh.background, mesh), mesh_to_image(mesh.rms, mesh), mesh


def background_mesh(image: np.ndarray, mask: np.ndarray | None = None, *,
                    box_size: int | tuple[int, int] = (10, 10), filter_size: int | tuple[int, int] = (3, 3),
                    sigma: float = 3.0, maxiters: int | None = 10,
                    exclude_percentile: float = 10.0) -> BackgroundMesh:
    """The low-resolution mesh of :func:`background_2d` (steps 1 to 7), without the
    full-resolution images: enough to know which boxes were usable.

    Parameters and errors are those of :func:`background_2d`.

    Returns
    -------
    BackgroundMesh
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"background: image must be a 2-D array, got {image.ndim} dimension(s) "
                         f"of shape {image.shape}")
    if image.size == 0:
        raise ValueError(f"background: image is empty (shape {image.shape})")
    if image.dtype.kind not in "fiub":
        raise ValueError(f"background: image must be real-valued, got dtype {image.dtype}")
    dtype = np.dtype(np.float64 if image.dtype == np.float64 else np.float32)
    # numba compiles read-only and writeable arrays apart: always hand it a read-only view
    data = np.ascontiguousarray(image, dtype=dtype).view()
    data.flags.writeable = False
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != image.shape:
            raise ValueError(f"background: mask shape {mask.shape} does not match image shape {image.shape}")
        mask = np.ascontiguousarray(mask, dtype=bool).view()
        mask.flags.writeable = False

    by, bx = _as_pair("box_size", box_size)
    by, bx = min(by, image.shape[0]), min(bx, image.shape[1])  # photutils clips it to the image too
    fy, fx = _as_pair("filter_size", filter_size)
    if fy % 2 == 0 or fx % 2 == 0:
        raise ValueError(f"background: filter_size must be odd along both axes, got {(fy, fx)}")
    if not (isinstance(sigma, int | float | np.integer | np.floating) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"background: sigma must be a positive number, got {sigma!r}")
    if maxiters is None:
        iter_limit = -1  # astropy's C code: no limit
    elif isinstance(maxiters, int | np.integer) and not isinstance(maxiters, bool) and maxiters >= 1:
        iter_limit = int(maxiters)
    else:
        raise ValueError(f"background: maxiters must be an integer >= 1 or None, got {maxiters!r}")
    if not (isinstance(exclude_percentile, int | float | np.integer | np.floating)
            and 0.0 <= exclude_percentile <= 100.0):
        raise ValueError(f"background: exclude_percentile must be between 0 and 100, got {exclude_percentile!r}")

    # The same float expression as photutils, so that a count on the threshold is judged
    # alike (e.g. (1 - 0.1) * 100 is 90.00000000000001, not 90).
    min_pixels = (1 - (exclude_percentile / 100.0)) * (by * bx)

    mesh_shape = (-(-image.shape[0] // by), -(-image.shape[1] // bx))
    box_bkg = np.empty(mesh_shape, np.float64)
    box_rms = np.empty(mesh_shape, np.float64)
    n_pixels = np.empty(mesh_shape, np.int64)
    n_valid = np.empty(mesh_shape, np.int64)
    has_mask = mask is not None
    mask_arg = mask if has_mask else np.zeros((1, 1), bool)
    if dtype == np.float32:
        key_dtype, n_digits = np.dtype(np.uint32), 4
        sign, exponent = np.uint32(0x80000000), np.uint32(0x7F800000)
    else:
        key_dtype, n_digits = np.dtype(np.uint64), 8
        sign, exponent = np.uint64(0x8000000000000000), np.uint64(0x7FF0000000000000)
    bits = data.view(key_dtype)

    def rows(first: int, step: int) -> None:
        # scratch of one thread; the float views of the key buffers are made here
        # because numba compiles ndarray.view slowly
        keys = np.empty(by * bx, key_dtype)
        scratch = np.empty(by * bx, key_dtype)
        _box_rows(first, step, data, bits, mask_arg, has_mask, by, bx, sign, exponent, n_digits, float(sigma),
                  iter_limit, keys, keys.view(dtype), scratch, scratch.view(dtype), box_bkg, box_rms, n_pixels,
                  n_valid)

    _in_threads(rows, mesh_shape[0])
    if not n_valid.any():
        raise ValueError("background: every pixel is masked or non-finite; cannot compute a background")

    usable = n_pixels > min_pixels
    if not usable.any():
        raise ValueError(f"background: no usable box: every box has <= {min_pixels:g} unmasked, unclipped "
                         f"pixels (box_size={(by, bx)}, exclude_percentile={exclude_percentile}); "
                         "raise exclude_percentile or use larger boxes")
    # photutils keeps the box estimates in the image dtype (numpy reductions of a float32
    # array are float32) and fills and filters from those rounded values.
    box_bkg = np.where(usable, box_bkg, np.nan).astype(dtype)
    box_rms = np.where(usable, box_rms, np.nan).astype(dtype)
    filled_bkg, filled_rms = _fill_unusable(box_bkg, box_rms, usable)
    return BackgroundMesh(background=_mesh_median_filter(filled_bkg, fy, fx),
                          rms=_mesh_median_filter(filled_rms, fy, fx),
                          box_background=box_bkg, box_rms=box_rms, n_pixels=n_pixels, usable=usable,
                          box_size=(by, bx), image_shape=(int(image.shape[0]), int(image.shape[1])))


def mesh_to_image(values: np.ndarray, mesh: BackgroundMesh) -> np.ndarray:
    """Full-resolution image of a mesh of values (step 8 of the module docstring).

    Parameters
    ----------
    values : (my, mx) array
        One value per box of ``mesh`` (``mesh.background`` or ``mesh.rms``), taken as
        the value at the box centre; no NaN.
    mesh : BackgroundMesh
        Gives the box size and the image shape.

    Returns
    -------
    (ny, nx) array, float64 for float64 values, float32 otherwise
        ``scipy.ndimage.zoom(values, box_size, order=3, mode="reflect", grid_mode=True)``
        cropped to the image and clipped to the range of ``values``; a constant image
        when all values are equal.
    """
    from scipy.ndimage import spline_filter

    values = np.asarray(values)
    if values.shape != mesh.usable.shape:
        raise ValueError(f"mesh_to_image: values shape {values.shape} does not match the mesh {mesh.usable.shape}")
    if not np.isfinite(values).all():
        raise ValueError("mesh_to_image: values must be finite (fill the unusable boxes first)")
    dtype = np.dtype(np.float64 if values.dtype == np.float64 else np.float32)
    values = values.astype(dtype, copy=False)
    lo, hi = values.min(), values.max()
    if lo == hi:
        return np.full(mesh.image_shape, lo, dtype=dtype)
    by, bx = mesh.box_size
    if by == 1 and bx == 1:  # scipy's zoom returns its input unchanged for a zoom of 1
        return values.astype(dtype, copy=True)
    # The prefilter is scipy's own, not an exact solve of the spline system: on a mesh of
    # fewer than ~12 boxes along an axis, scipy's reflect-mode initialisation differs from
    # the exact solution by up to 1e-3 of the mesh's variations, and photutils has those.
    coefficients = spline_filter(values, order=3, output=np.float64, mode="reflect")
    out = np.empty(mesh.image_shape, dtype)
    my, mx = values.shape
    # scipy's zoom factor for grid_mode: input / output size, as a float64 division
    wy, ystart, yindex = _spline_taps(out.shape[0], my / (my * by), my)
    wx, xstart, xindex = _spline_taps(out.shape[1], mx / (mx * bx), mx)
    _in_threads(lambda first, step: _spline_zoom_rows(first, step, coefficients, wy, ystart, yindex, wx, xstart,
                                                      xindex, out, float(lo), float(hi)), len(ystart) - 1)
    return out


# --- validation and the mesh steps in numpy --------------------------------------------------


def _as_pair(name: str, value) -> tuple[int, int]:
    pair = np.atleast_1d(np.asarray(value))
    if pair.ndim != 1 or pair.size not in (1, 2) or pair.dtype.kind not in "iu":
        raise ValueError(f"background: {name} must be an integer or a pair of integers, got {value!r}")
    if pair.size == 1:
        pair = np.repeat(pair, 2)
    if np.any(pair < 1):
        raise ValueError(f"background: {name} must be >= 1, got {value!r}")
    return int(pair[0]), int(pair[1])


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def _in_threads(work, n_items: int) -> None:
    """Run ``work(first, step)`` on ``numba.get_num_threads()`` threads, thread ``t``
    taking items ``t, t + step, ...`` of ``range(n_items)`` (interleaved, so that the
    slower edge rows do not all land on one thread).

    The kernels are ``nogil`` numba functions run from a thread pool rather than
    ``prange`` loops: numba compiles a parallel loop several seconds slower per dtype,
    which the tests and every fresh cache would pay.
    """
    global _POOL, _POOL_SIZE
    n_threads = max(1, min(numba.get_num_threads(), n_items))
    if n_threads == 1:
        work(0, 1)
        return
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE < n_threads:
            _POOL_SIZE = max(n_threads, numba.config.NUMBA_NUM_THREADS)
            _POOL = ThreadPoolExecutor(max_workers=_POOL_SIZE, thread_name_prefix="sphx-background")
        pool = _POOL
    futures = [pool.submit(work, t, n_threads) for t in range(n_threads)]
    for future in futures:
        future.result()


def _fill_unusable(box_bkg: np.ndarray, box_rms: np.ndarray, usable: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step 6: inverse-distance (power 1) mean of the nearest usable boxes, in box units.

    Written as photutils' ``ShepardIDWInterpolator`` so that the neighbours (cKDTree
    with the same points, leaf size and query) and the float64 sums are the same.
    """
    if usable.all():
        return box_bkg, box_rms
    from scipy.spatial import cKDTree

    good = np.column_stack(np.nonzero(usable))
    holes = np.nonzero(~usable)
    tree = cKDTree(good, leafsize=10)
    distances, index = tree.query(np.column_stack(holes), k=_FILL_NEIGHBOURS, eps=0.0)
    distances = distances.reshape(len(holes[0]), -1)
    index = index.reshape(len(holes[0]), -1)
    # fewer usable boxes than neighbours asked for: scipy pads with inf distances
    valid = np.isfinite(distances)
    weights = np.where(valid, 1.0 / np.where(valid, distances, 1.0), 0.0)
    weights_total = np.sum(weights, axis=1)
    safe_index = np.where(valid, index, 0)
    filled = []
    for box_values in (box_bkg, box_rms):
        neighbours = box_values[usable][safe_index]
        out = box_values.copy()
        out[holes] = np.sum(weights * neighbours, axis=1) / weights_total
        filled.append(out)
    return filled[0], filled[1]


def _mesh_median_filter(values: np.ndarray, fy: int, fx: int) -> np.ndarray:
    """Step 7: ``generic_filter(values, nanmedian, (fy, fx), mode="constant", cval=nan)``."""
    if fy == 1 and fx == 1:
        return values
    out = np.empty_like(values)
    _median_filter_mesh(values.astype(np.float64), fy, fx, out)
    return out


# --- numba kernels -----------------------------------------------------------------------


@numba.njit(nogil=True, cache=True)
def _radix_sort_keys(keys: np.ndarray, scratch: np.ndarray, n: int, n_digits: int) -> bool:
    """Sort ``keys[:n]`` (unsigned integers of ``n_digits`` bytes, 4 or 8) ascending, LSD
    radix by bytes; returns True when the sorted keys ended in ``scratch``, False when in
    ``keys``.

    One pass over the keys counts every byte; a byte that is the same in every key (the
    sign and exponent byte of a box of sky values, mostly) costs no pass.
    """
    counts = np.zeros((n_digits, 256), np.int64)
    byte = np.uint64(0xFF)
    for i in range(n):
        k = np.uint64(keys[i])
        counts[0, int(k & byte)] += 1
        counts[1, int((k >> np.uint64(8)) & byte)] += 1
        counts[2, int((k >> np.uint64(16)) & byte)] += 1
        counts[3, int((k >> np.uint64(24)) & byte)] += 1
        if n_digits == 8:
            counts[4, int((k >> np.uint64(32)) & byte)] += 1
            counts[5, int((k >> np.uint64(40)) & byte)] += 1
            counts[6, int((k >> np.uint64(48)) & byte)] += 1
            counts[7, int((k >> np.uint64(56)) & byte)] += 1
    in_scratch = False
    for d in range(n_digits):
        shift = np.uint64(8 * d)
        src = scratch if in_scratch else keys
        dst = keys if in_scratch else scratch
        if counts[d, int((np.uint64(src[0]) >> shift) & byte)] == n:
            continue
        total = 0
        for j in range(256):
            c = counts[d, j]
            counts[d, j] = total
            total += c
        for i in range(n):
            k = src[i]
            j = int((np.uint64(k) >> shift) & byte)
            dst[counts[d, j]] = k
            counts[d, j] += 1
        in_scratch = not in_scratch
    return in_scratch


@numba.njit(nogil=True, cache=True)
def _median_sorted(v: np.ndarray, a: int, b: int) -> float:
    """Median of the sorted ``v[a:b]`` (``a < b``)."""
    n = b - a
    h = a + n // 2
    if n % 2 == 1:
        return v[h]
    # astropy's C code: 0.5 * (upper middle + lower middle)
    return 0.5 * (v[h] + v[h - 1])


@numba.njit(nogil=True, cache=True)
def _search_sorted(v: np.ndarray, n: int, x: float, right: bool) -> int:
    """``np.searchsorted(v[:n], x, side="right" if right else "left")`` (compiles faster)."""
    lo = 0
    hi = n
    while lo < hi:
        mid = (lo + hi) // 2
        if v[mid] < x or (right and v[mid] == x):
            lo = mid + 1
        else:
            hi = mid
    return lo


@numba.njit(nogil=True, cache=True)
def _mean_std(v: np.ndarray, a: int, b: int) -> tuple[float, float]:
    """Mean and population std of the sorted ``v[a:b]`` in one float64 pass.

    The values are taken relative to their median, so the one-pass variance
    ``E[d**2] - E[d]**2`` loses at most a factor 2 to cancellation
    (``|mean - median| <= std`` for any distribution); four partial sums break the
    dependency chain of a single accumulator, which made this the slowest step.
    """
    n = b - a
    shift = _median_sorted(v, a, b)
    s0 = s1 = s2 = s3 = 0.0
    q0 = q1 = q2 = q3 = 0.0
    i = a
    while i + 4 <= b:
        d0 = v[i] - shift
        d1 = v[i + 1] - shift
        d2 = v[i + 2] - shift
        d3 = v[i + 3] - shift
        s0 += d0
        s1 += d1
        s2 += d2
        s3 += d3
        q0 += d0 * d0
        q1 += d1 * d1
        q2 += d2 * d2
        q3 += d3 * d3
        i += 4
    while i < b:
        d0 = v[i] - shift
        s0 += d0
        q0 += d0 * d0
        i += 1
    offset = ((s0 + s1) + (s2 + s3)) / n
    variance = ((q0 + q1) + (q2 + q3)) / n - offset * offset
    return shift + offset, math.sqrt(max(variance, 0.0))


@numba.njit(nogil=True, cache=True)
def _clip_sorted(v: np.ndarray, n: int, sigma: float, iter_limit: int,
                 survivors_only: bool) -> tuple[int, int, bool]:
    """Sigma-clip the sorted values ``v[:n]``; returns the kept range ``v[a:b]``.

    The kept values of a sorted box are always a contiguous range, so an iteration needs
    no partitioning: the median is read at the middle, the clipped values are found by
    scanning inwards from both ends.

    Parameters
    ----------
    survivors_only : bool
        False: astropy's C fast path (full and edge boxes): stop when an iteration clips
        nothing or everything, or after ``iter_limit`` clipping iterations (-1: no limit),
        then keep every value within the last bounds. True: astropy's Python path (the
        corner box): stop when an iteration clips nothing or after ``iter_limit``
        iterations, and keep the values that survived them all.

    Returns
    -------
    a, b : int
        The kept values are ``v[a:b]``.
    ambiguous : bool
        Some value lies so close to a bound that the rounding of astropy's sums, taken
        in another order, could put it on the other side (quantised data, where a bound
        can fall on a value exactly): the caller redoes the box with
        :func:`_astropy_clip_bounds`. Only for ``survivors_only=False``.
    """
    if n == 0:
        return 0, 0, False
    eps = 2.220446049250313e-16
    a = 0
    b = n
    lower = np.nan
    upper = np.nan
    tolerance = 0.0
    ambiguous = False
    iteration = 0
    while True:
        count = b - a
        if count == 0:  # only on the survivors path: astropy's bounds of nothing are NaN
            break
        median = _median_sorted(v, a, b)
        std = _mean_std(v, a, b)[1]
        lower = median - sigma * std
        upper = median + sigma * std
        if not (lower <= upper):  # NaN bounds (overflow): nothing passes astropy's test
            return b, b, False
        a2 = a
        while a2 < b and v[a2] < lower:
            a2 += 1
        b2 = b
        while b2 > a2 and v[b2 - 1] > upper:
            b2 -= 1
        # Sequential float64 sums over n values, in any order, are within about
        # n * eps * max|v| of each other, which moves the std (and so the bounds) by at
        # most about that much; the median is the same in any order.
        largest = max(abs(v[a]), abs(v[b - 1]))
        tolerance = 4.0 * count * eps * (sigma * (std + 2.0 * largest) + abs(median))
        if ((a2 < b and v[a2] - lower <= tolerance) or (a2 > a and lower - v[a2 - 1] <= tolerance)
                or (b2 > a and upper - v[b2 - 1] <= tolerance) or (b2 < b and v[b2] - upper <= tolerance)):
            ambiguous = True
        new_count = b2 - a2
        iteration += 1
        if survivors_only:
            a, b = a2, b2
            if new_count == count or (iter_limit != -1 and iteration >= iter_limit):
                break
        else:
            if new_count == count or new_count == 0:
                break
            a, b = a2, b2
            if iter_limit != -1 and iteration >= iter_limit:
                break
    if not survivors_only:
        # every unmasked value within the last bounds: the current range, plus values
        # clipped by earlier, narrower bounds, found by binary search on the whole box
        a = _search_sorted(v, n, lower, False)
        b = _search_sorted(v, n, upper, True)
        if ((a < n and v[a] - lower <= tolerance) or (a > 0 and lower - v[a - 1] <= tolerance)
                or (b > 0 and upper - v[b - 1] <= tolerance) or (b < n and v[b] - upper <= tolerance)):
            ambiguous = True
    return a, b, ambiguous and not survivors_only


@numba.njit(nogil=True, cache=True)
def _wirth_select(buf: np.ndarray, n: int, k: int) -> float:
    """The ``k``-th smallest of ``buf[:n]``, partitioning ``buf`` in place exactly as
    astropy's ``kth_smallest`` (N. Wirth's algorithm), so that the order it leaves, and
    hence the order of the sums that follow, is astropy's."""
    lo = 0
    hi = n - 1
    while lo < hi:
        pivot = buf[k]
        i = lo
        j = hi
        while True:
            while buf[i] < pivot:
                i += 1
            while pivot < buf[j]:
                j -= 1
            if i <= j:
                t = buf[i]
                buf[i] = buf[j]
                buf[j] = t
                i += 1
                j -= 1
            if i > j:
                break
        if j < k:
            lo = i
        if k < i:
            hi = j
    return buf[k]


@numba.njit(nogil=True, cache=True)
def _astropy_clip_bounds(buf: np.ndarray, count: int, sigma: float, iter_limit: int) -> tuple[float, float]:
    """Last clipping bounds of astropy's C ``compute_sigma_clipped_bounds`` on
    ``buf[:count]`` (the box's unmasked values in photutils' order; overwritten),
    operation for operation: the same selections, the same sequential sums."""
    iteration = 0
    while True:
        if count % 2 == 0:
            # C leaves the order of the two calls to the compiler; astropy's build
            # evaluates the upper middle first (checked bit for bit on random boxes)
            upper_middle = _wirth_select(buf, count, count // 2)
            lower_middle = _wirth_select(buf, count, count // 2 - 1)
            median = 0.5 * (upper_middle + lower_middle)
        else:
            median = _wirth_select(buf, count, (count - 1) // 2)
        mean = 0.0
        for i in range(count):
            mean += buf[i]
        mean /= count
        std = 0.0
        for i in range(count):
            std += (buf[i] - mean) * (buf[i] - mean)
        std = math.sqrt(std / count)
        lower = median - sigma * std
        upper = median + sigma * std
        new_count = 0
        for i in range(count):
            if buf[i] >= lower and buf[i] <= upper:
                buf[new_count] = buf[i]
                new_count += 1
        if new_count == count or new_count == 0:
            return lower, upper
        count = new_count
        iteration += 1
        if iter_limit != -1 and iteration >= iter_limit:
            return lower, upper


@numba.njit(nogil=True, cache=True)
def _sextractor(v: np.ndarray, a: int, b: int) -> tuple[float, float]:
    """SExtractor background and population std of the sorted ``v[a:b]``."""
    if b <= a:
        return np.nan, np.nan
    median = _median_sorted(v, a, b)
    mean, std = _mean_std(v, a, b)
    if std == 0.0:
        return mean, std
    if abs(mean - median) / std >= 0.3:  # photutils: >= (SExtractor's manual says >)
        return median, std
    return 2.5 * median - 1.5 * mean, std


@numba.njit(nogil=True, cache=True)
def _box_rows(first: int, step: int, data: np.ndarray, bits: np.ndarray, mask: np.ndarray, has_mask: bool,
              by: int, bx: int, sign, exponent, n_digits: int, sigma: float, iter_limit: int, keys: np.ndarray,
              keys_as_float: np.ndarray, scratch: np.ndarray, scratch_as_float: np.ndarray, box_bkg: np.ndarray,
              box_rms: np.ndarray, n_pixels: np.ndarray, n_valid: np.ndarray) -> None:
    """Steps 2 to 4 for the rows of boxes ``first, first + step, ...``.

    ``bits`` is ``data`` seen as unsigned integers of its size, ``sign`` and
    ``exponent`` the masks of its sign bit and exponent bits; ``keys_as_float`` and
    ``scratch_as_float`` are the buffers ``keys`` and ``scratch`` seen as floats.
    """
    ny, nx = data.shape
    my, mx = box_bkg.shape
    values = np.empty(by * bx, np.float64)
    buf = np.empty(by * bx, np.float64)
    for iy in range(first, my, step):
        y0 = iy * by
        y1 = min(y0 + by, ny)
        last_row = ny % by != 0 and iy == my - 1
        for ix in range(mx):
            x0 = ix * bx
            x1 = min(x0 + bx, nx)
            n = 0
            for y in range(y0, y1):
                for x in range(x0, x1):
                    u = bits[y, x]
                    if (u & exponent) == exponent:  # NaN or inf
                        continue
                    if has_mask and mask[y, x]:
                        continue
                    # flip so that unsigned order is float order: negative floats get all
                    # their bits inverted, positive ones their sign bit set
                    keys[n] = ~u if (u & sign) != 0 else u | sign
                    n += 1
            n_valid[iy, ix] = n
            if n > 0:
                in_scratch = _radix_sort_keys(keys, scratch, n, n_digits)
                ordered = scratch if in_scratch else keys
                for i in range(n):
                    k = ordered[i]
                    ordered[i] = k ^ sign if (k & sign) != 0 else ~k
                floats = scratch_as_float if in_scratch else keys_as_float
                for i in range(n):
                    values[i] = floats[i]
            last_col = nx % bx != 0 and ix == mx - 1
            corner = last_row and last_col
            a, b, ambiguous = _clip_sorted(values, n, sigma, iter_limit, corner)
            if ambiguous:
                m = _gather_in_photutils_order(data, mask, has_mask, y0, y1, x0, x1, last_row or last_col, buf)
                lower, upper = _astropy_clip_bounds(buf, m, sigma, iter_limit)
                a = _search_sorted(values, n, lower, False)
                b = _search_sorted(values, n, upper, True)
            background, rms = _sextractor(values, a, b)
            box_bkg[iy, ix] = background
            box_rms[iy, ix] = rms
            n_pixels[iy, ix] = max(b - a, 0)


@numba.njit(nogil=True, cache=True)
def _gather_in_photutils_order(data: np.ndarray, mask: np.ndarray, has_mask: bool, y0: int, y1: int, x0: int,
                               x1: int, column_major: bool, buf: np.ndarray) -> int:
    """The unmasked finite pixels of a box, in the order photutils hands them to astropy:
    row by row for full boxes; column by column for the boxes of the partial top row and
    right column (its ``reshape_as_blocks`` + ``moveaxis``). Returns their number."""
    m = 0
    if column_major:
        for x in range(x0, x1):
            for y in range(y0, y1):
                f = data[y, x]
                if math.isfinite(f) and not (has_mask and mask[y, x]):
                    buf[m] = f
                    m += 1
    else:
        for y in range(y0, y1):
            for x in range(x0, x1):
                f = data[y, x]
                if math.isfinite(f) and not (has_mask and mask[y, x]):
                    buf[m] = f
                    m += 1
    return m


@numba.njit(nogil=True, cache=True)
def _median_filter_mesh(values: np.ndarray, fy: int, fx: int, out: np.ndarray) -> None:
    """NaN-ignoring median over a ``fy x fx`` window, nothing beyond the edges."""
    my, mx = values.shape
    hy = fy // 2
    hx = fx // 2
    window = np.empty(fy * fx, np.float64)
    for i in range(my):
        for j in range(mx):
            n = 0
            for y in range(max(i - hy, 0), min(i + hy + 1, my)):
                for x in range(max(j - hx, 0), min(j + hx + 1, mx)):
                    f = values[y, x]
                    if not math.isnan(f):
                        # insertion into the sorted window
                        k = n
                        while k > 0 and window[k - 1] > f:
                            window[k] = window[k - 1]
                            k -= 1
                        window[k] = f
                        n += 1
            if n == 0:
                out[i, j] = np.nan
            elif n % 2 == 1:
                out[i, j] = window[n // 2]
            else:
                out[i, j] = 0.5 * (window[n // 2 - 1] + window[n // 2])


@numba.njit(nogil=True, cache=True)
def _spline_taps(n_out: int, zoom: float, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cubic B-spline taps along one axis of scipy's zoom with ``grid_mode=True``.

    Output pixel ``o`` is at input coordinate ``(o + 0.5) * zoom - 0.5``; its weights are
    those of scipy's ``get_spline_interpolation_weights``, the last one being 1 minus the
    others. Coefficients beyond the ends are mirrored about the half-sample point
    (``c[-1] = c[0]``, ``c[n] = c[n-1]``), which is what scipy's reflect mode amounts to.
    The first tap is non-decreasing in ``o``, so the output splits into runs of pixels
    that share their 4 coefficients.

    Returns
    -------
    weight : (4, n_out) float64
    run_start : (n_runs + 1,) int64
        Run ``r`` is the output pixels ``run_start[r]`` to ``run_start[r + 1]``.
    run_index : (n_runs, 4) int64
        The coefficient indices of the 4 taps of each run.
    """
    weight = np.empty((4, n_out), np.float64)
    first = np.empty(n_out, np.int64)
    for o in range(n_out):
        x = (o + 0.5) * zoom - 0.5
        fl = math.floor(x)
        t = x - fl
        z = 1.0 - t
        weight[0, o] = z * z * z / 6.0
        weight[1, o] = (t * t * (t - 2.0) * 3.0 + 4.0) / 6.0
        weight[2, o] = (z * z * (z - 2.0) * 3.0 + 4.0) / 6.0
        weight[3, o] = 1.0 - weight[0, o] - weight[1, o] - weight[2, o]
        first[o] = int(fl) - 1
    n_runs = 1
    for o in range(1, n_out):
        if first[o] != first[o - 1]:
            n_runs += 1
    run_start = np.empty(n_runs + 1, np.int64)
    run_index = np.empty((n_runs, 4), np.int64)
    r = 0
    for o in range(n_out):
        if o == 0 or first[o] != first[o - 1]:
            run_start[r] = o
            for m in range(4):
                k = first[o] + m
                if n_in == 1:
                    k = 0
                else:
                    k %= 2 * n_in
                    if k >= n_in:
                        k = 2 * n_in - 1 - k
                run_index[r, m] = k
            r += 1
    run_start[n_runs] = n_out
    return weight, run_start, run_index


@numba.njit(nogil=True, cache=True)
def _spline_zoom_rows(first: int, step: int, coefficients: np.ndarray, wy: np.ndarray, ystart: np.ndarray,
                      yindex: np.ndarray, wx: np.ndarray, xstart: np.ndarray, xindex: np.ndarray, out: np.ndarray,
                      lo: float, hi: float) -> None:
    """Evaluate the cubic spline of ``coefficients`` on the output rows of the y runs
    ``first, first + step, ...`` (taps of :func:`_spline_taps`), clipped to ``[lo, hi]``.

    Separable: the 4 y taps of a run make one row of mesh values, then each run of
    output columns sharing its 4 x taps is a vectorisable loop over contiguous weights.
    """
    mx = coefficients.shape[1]
    row = np.empty(mx, np.float64)
    for ry in range(first, len(ystart) - 1, step):
        c0 = coefficients[yindex[ry, 0]]
        c1 = coefficients[yindex[ry, 1]]
        c2 = coefficients[yindex[ry, 2]]
        c3 = coefficients[yindex[ry, 3]]
        for i in range(ystart[ry], ystart[ry + 1]):
            w0, w1, w2, w3 = wy[0, i], wy[1, i], wy[2, i], wy[3, i]
            for j in range(mx):
                row[j] = w0 * c0[j] + w1 * c1[j] + w2 * c2[j] + w3 * c3[j]
            line = out[i]
            for rx in range(len(xstart) - 1):
                r0 = row[xindex[rx, 0]]
                r1 = row[xindex[rx, 1]]
                r2 = row[xindex[rx, 2]]
                r3 = row[xindex[rx, 3]]
                for j in range(xstart[rx], xstart[rx + 1]):
                    f = wx[0, j] * r0 + wx[1, j] * r1 + wx[2, j] * r2 + wx[3, j] * r3
                    # photutils clips after the cast to the output dtype; lo and hi are
                    # values of that dtype and rounding is monotonic, so clipping before
                    # the cast gives the same
                    line[j] = min(max(f, lo), hi)


@numba.njit(nogil=True, cache=True)
def box_background(values: np.ndarray, sigma: float, maxiters: int) -> tuple[float, float]:
    """The SExtractor background of one box's unmasked values, sigma-clipped as
    photutils' ``Background2D`` clips a full box, and its variance for Gaussian noise
    (NaN when empty). Callable from numba.

    The variance is ``k std**2 / n`` over the ``n`` kept values: ``k = pi / 2`` for the
    median, ``k = 6.25 pi / 2 + 2.25 - 7.5 = 4.57`` for ``2.5 median - 1.5 mean`` (the
    median and the mean of normal samples have covariance ``std**2 / n``).
    """
    v = np.sort(values)
    a, b, _ = _clip_sorted(v, v.size, sigma, maxiters, False)
    level, std = _sextractor(v, a, b)
    if b <= a:
        return level, np.nan
    median = _median_sorted(v, a, b)
    k = math.pi / 2 if level == median else 6.25 * math.pi / 2 + 2.25 - 7.5
    return level, k * std * std / (b - a)
