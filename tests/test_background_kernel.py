"""sphx.kernels.background against photutils.background.Background2D and against truth.

Agreement metric: ``max over pixels of |sphx - photutils| / |photutils|`` for the
background and the background RMS images; it must be below 1e-3 (0.1 %). (Both are
float32 here; the two differ by a few float32 ulps, ~1e-6, because photutils accumulates
its box means and stds in float32 and sphx in float64.)
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from sphx.kernels.background import BackgroundMesh, background_2d, background_mesh, mesh_to_image

photutils_background = pytest.importorskip("photutils.background")
SigmaClip = pytest.importorskip("astropy.stats").SigmaClip

MAX_RELATIVE_DIFFERENCE = 1e-3


def _photutils(image, mask, box_size, *, filter_size=3, sigma=3.0, maxiters=10, exclude_percentile=10.0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "non-finite values were automatically masked"
        bkg = photutils_background.Background2D(
            image, box_size, mask=mask, filter_size=filter_size,
            sigma_clip=SigmaClip(sigma=sigma, maxiters=maxiters),
            bkg_estimator=photutils_background.SExtractorBackground(),
            bkg_rms_estimator=photutils_background.StdBackgroundRMS(),
            exclude_percentile=exclude_percentile)
        return bkg, bkg.background, bkg.background_rms


def _relative_difference(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.max(np.abs(ours.astype(np.float64) - theirs) / np.abs(theirs.astype(np.float64))))


def _sky(shape, rng, *, n_sources=300):
    """Smooth gradient [MJy/sr] + Gaussian noise + Gaussian point sources, float32, with
    a mask on half the sources, a masked rectangle and 0.1 % NaN pixels."""
    ny, nx = shape
    y, x = np.mgrid[0:ny, 0:nx]
    image = (0.3 + 0.05 * x / nx + 0.02 * y / ny + 0.01 * np.sin(x / 150.0) * np.cos(y / 110.0)
             + rng.normal(0.0, 0.01, shape))
    mask = np.zeros(shape, bool)
    for k, (cy, cx, flux) in enumerate(zip(rng.uniform(0, ny, n_sources), rng.uniform(0, nx, n_sources),
                                           rng.lognormal(-1.0, 1.5, n_sources), strict=True)):
        y0, y1 = max(int(cy) - 7, 0), min(int(cy) + 8, ny)
        x0, x1 = max(int(cx) - 7, 0), min(int(cx) + 8, nx)
        r2 = (y[y0:y1, x0:x1] - cy) ** 2 + (x[y0:y1, x0:x1] - cx) ** 2
        image[y0:y1, x0:x1] += flux * np.exp(-0.5 * r2 / 1.3**2)
        if k % 2 == 0:  # half the sources masked, the other half left to the clipping
            mask[y0:y1, x0:x1] |= r2 < 16.0
    # a masked region (a bright galaxy, a ghost) larger than a few boxes
    mask[ny // 3: ny // 3 + 150, nx // 4: nx // 4 + 200] = True
    image = image.astype(np.float32)
    image[rng.random(shape) < 0.001] = np.nan
    return image, mask


@pytest.fixture(scope="module")
def sky_images():
    rng = np.random.default_rng(20240611)
    # neither shape is a multiple of 10 or 64: partial boxes on the top row and right
    # column, and a corner box partial in both axes
    return {10: _sky((517, 389), rng, n_sources=200), 64: _sky((1100, 905), rng, n_sources=400)}


@pytest.mark.parametrize("box", [10, 64])
def test_matches_photutils_on_sky_image(sky_images, box):
    image, mask = sky_images[box]
    assert image.shape[0] % box and image.shape[1] % box
    bkg, ref_background, ref_rms = _photutils(image, mask, box)
    background, rms, mesh = background_2d(image, mask, box_size=box, filter_size=3)

    assert background.shape == rms.shape == image.shape
    assert background.dtype == rms.dtype == ref_background.dtype == np.float32
    assert _relative_difference(background, ref_background) < MAX_RELATIVE_DIFFERENCE
    assert _relative_difference(rms, ref_rms) < MAX_RELATIVE_DIFFERENCE
    assert _relative_difference(mesh.background, bkg.background_mesh) < MAX_RELATIVE_DIFFERENCE
    assert _relative_difference(mesh.rms, bkg.background_rms_mesh) < MAX_RELATIVE_DIFFERENCE
    # the same pixels survive masking and clipping in every box, so the same boxes are used
    np.testing.assert_array_equal(mesh.n_pixels, bkg.n_pixels_mesh)
    # the test means something only if some boxes were excluded and filled
    assert 0.3 < mesh.usable_fraction < 1.0


@pytest.mark.parametrize("box", [10, 64])
def test_usable_boxes_match_photutils(sky_images, box):
    image, mask = sky_images[box]
    bkg, _, _ = _photutils(image, mask, box)
    mesh = background_mesh(image, mask, box_size=box)
    # photutils 3.0 keeps the excluded boxes (NaN in its per-box statistics) in
    # ``_mesh_nan_mask``; it has no public attribute for them
    excluded = bkg._mesh_nan_mask
    np.testing.assert_array_equal(mesh.usable, ~excluded)
    assert mesh.usable_fraction == pytest.approx(1.0 - excluded.mean(), abs=0.0)
    # excluded boxes are NaN in the raw per-box estimates, finite in the filtered mesh
    assert np.all(np.isnan(mesh.box_background[~mesh.usable]))
    assert np.all(np.isfinite(mesh.box_background[mesh.usable]))
    assert np.all(np.isfinite(mesh.background))
    # the boxes inside the masked rectangle are excluded, the partial edge boxes too
    # (fewer pixels than 90 % of a full box)
    assert not mesh.usable[image.shape[0] // 3 // box + 1, image.shape[1] // 4 // box + 1]
    assert not mesh.usable[-1].any() and not mesh.usable[:, -1].any()


def test_matches_photutils_other_settings():
    """Non-square boxes and filter, float64, no iteration limit, a wider exclusion rule,
    and no mask."""
    rng = np.random.default_rng(3)
    image, _ = _sky((301, 233), rng, n_sources=60)
    image = image.astype(np.float64)
    kwargs = {"filter_size": (5, 3), "sigma": 2.5, "maxiters": None, "exclude_percentile": 30.0}
    bkg, ref_background, ref_rms = _photutils(image, None, (12, 17), **kwargs)
    background, rms, mesh = background_2d(image, box_size=(12, 17), **kwargs)
    assert background.dtype == np.float64
    assert _relative_difference(background, ref_background) < 1e-9
    assert _relative_difference(rms, ref_rms) < 1e-9
    np.testing.assert_array_equal(mesh.n_pixels, bkg.n_pixels_mesh)


def test_quantised_image_clips_like_astropy():
    """On integer counts a clipping bound can fall exactly on a value; whether it is kept
    then depends on the rounding of astropy's sums, taken in the order its C code leaves
    the values in. The same pixels must survive."""
    rng = np.random.default_rng(11)
    image = rng.poisson(4.0, (157, 131)).astype(np.int16)
    mask = rng.random(image.shape) < 0.05
    bkg, ref_background, ref_rms = _photutils(image, mask, (9, 7), sigma=2.0, maxiters=None,
                                             exclude_percentile=50.0)
    background, rms, mesh = background_2d(image, mask, box_size=(9, 7), sigma=2.0, maxiters=None,
                                          exclude_percentile=50.0)
    np.testing.assert_array_equal(mesh.n_pixels, bkg.n_pixels_mesh)
    assert background.dtype == np.float32  # photutils' dtype for integer images
    assert _relative_difference(background, ref_background) < MAX_RELATIVE_DIFFERENCE
    assert _relative_difference(rms, ref_rms) < MAX_RELATIVE_DIFFERENCE


def test_recovers_known_background():
    """Truth: a smooth background B(x, y) plus Gaussian noise sigma_n and bright stars,
    half of them masked out to r = 6 px, half left to the clipping.

    Noise scale. One box's SExtractor estimate 2.5 median - 1.5 mean has, for Gaussian
    noise, variance (2.5**2 pi/2 - 2 * 2.5 * 1.5 + 1.5**2) sigma_n**2 / n
    = 4.57 sigma_n**2 / n (var(median) = pi/2 sigma_n**2 / n, cov(median, mean) =
    var(mean) = sigma_n**2 / n), i.e. 2.14 sigma_n / sqrt(n) for n pixels per box. The
    3x3 median filter of the mesh takes the median of 9 independent boxes, whose std is
    sqrt(0.188) = 0.43 of one box's, and the spline only averages further. B varies on
    scales of thousands of pixels, so its own interpolation error (spline, flat
    extrapolation over the outer half box) is ~0.01, under 10 % of the noise scale.
    Hence: per-box scatter about the box mean of B within 15 % of 2.14 sigma_n / sqrt(n),
    and the residual rms of the full-resolution background below half of it. The RMS
    image must give the std of a Gaussian clipped at 3 sigma: 0.9866 sigma_n.
    """
    rng = np.random.default_rng(5)
    ny, nx = 960, 1280
    box = 32
    sigma_n = 2.0
    y, x = np.mgrid[0:ny, 0:nx]
    truth = 100.0 + 1.5 * np.sin(2 * np.pi * x / 4000.0 + 0.3) * np.cos(2 * np.pi * y / 3000.0) + 0.5 * x / nx
    image = truth + rng.normal(0.0, sigma_n, truth.shape)
    mask = np.zeros(truth.shape, bool)
    for k, (cy, cx) in enumerate(zip(rng.uniform(0, ny, 300), rng.uniform(0, nx, 300), strict=True)):
        y0, y1 = max(int(cy) - 10, 0), min(int(cy) + 11, ny)
        x0, x1 = max(int(cx) - 10, 0), min(int(cx) + 11, nx)
        r2 = (y[y0:y1, x0:x1] - cy) ** 2 + (x[y0:y1, x0:x1] - cx) ** 2
        image[y0:y1, x0:x1] += 500.0 * np.exp(-0.5 * r2 / 1.5**2)
        if k % 2 == 0:
            mask[y0:y1, x0:x1] |= r2 < 36.0
    image = image.astype(np.float32)

    background, rms, mesh = background_2d(image, mask, box_size=box, filter_size=3)
    single_box_noise = 2.14 * sigma_n / np.sqrt(box * box)
    box_truth = truth.reshape(ny // box, box, nx // box, box).mean(axis=(1, 3))
    box_error = (mesh.box_background.astype(np.float64) - box_truth)[mesh.usable]
    assert box_error.std() == pytest.approx(single_box_noise, rel=0.15)
    residual_rms = np.sqrt(np.mean((background - truth) ** 2))
    assert residual_rms < 0.5 * single_box_noise
    assert np.median(rms) == pytest.approx(0.9866 * sigma_n, rel=0.01)
    assert mesh.usable_fraction > 0.85


def test_constant_image_gives_constant_background():
    image = np.full((95, 130), 7.25, np.float32)
    background, rms, mesh = background_2d(image, box_size=20)
    assert np.all(background == np.float32(7.25))
    assert np.all(rms == 0.0)
    # the partial row (15 of 20 rows: 75 % of a box) is excluded; the partial column
    # (10 of 20) too
    assert not mesh.usable[-1].any() and not mesh.usable[:, -1].any()
    assert mesh.usable[:-1, :-1].all()


def test_mesh_to_image_matches_scipy_zoom():
    from scipy.ndimage import zoom

    rng = np.random.default_rng(8)
    for shape, box_size in [((103, 77), (10, 10)), ((64, 300), (64, 64)), ((50, 41), (7, 3))]:
        mesh = background_mesh(rng.normal(5.0, 1.0, shape).astype(np.float32), box_size=box_size,
                               exclude_percentile=100.0)
        values = rng.normal(0.0, 1.0, mesh.usable.shape).astype(np.float32)
        expected = zoom(values, box_size, order=3, mode="reflect", grid_mode=True)[:shape[0], :shape[1]]
        expected = np.clip(expected, values.min(), values.max())
        np.testing.assert_allclose(mesh_to_image(values, mesh), expected, rtol=0, atol=1e-6)


def test_same_result_on_one_thread(sky_images):
    import numba

    image, mask = sky_images[10]
    background, rms, mesh = background_2d(image, mask, box_size=10)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        background_1, rms_1, mesh_1 = background_2d(image, mask, box_size=10)
    finally:
        numba.set_num_threads(threads)
    np.testing.assert_array_equal(background_1, background)
    np.testing.assert_array_equal(rms_1, rms)
    np.testing.assert_array_equal(mesh_1.n_pixels, mesh.n_pixels)


def test_bad_input_raises():
    image = np.ones((50, 60), np.float32)
    with pytest.raises(ValueError, match="image must be a 2-D array"):
        background_2d(np.ones(100))
    with pytest.raises(ValueError, match="image must be a 2-D array"):
        background_2d(np.ones((2, 50, 60)))
    with pytest.raises(ValueError, match=r"mask shape \(50, 61\) does not match image shape \(50, 60\)"):
        background_2d(image, np.zeros((50, 61), bool))
    with pytest.raises(ValueError, match="filter_size must be odd"):
        background_2d(image, filter_size=4)
    with pytest.raises(ValueError, match="box_size must be >= 1"):
        background_2d(image, box_size=0)
    with pytest.raises(ValueError, match="exclude_percentile must be between 0 and 100"):
        background_2d(image, exclude_percentile=120.0)
    with pytest.raises(ValueError, match="maxiters"):
        background_2d(image, maxiters=0)
    with pytest.raises(ValueError, match="every pixel is masked or non-finite"):
        background_2d(np.full((50, 60), np.nan, np.float32))
    with pytest.raises(ValueError, match="every pixel is masked or non-finite"):
        background_2d(image, np.ones(image.shape, bool))
    mask = np.zeros(image.shape, bool)
    mask[::2] = True  # half of every box masked: no box keeps 90 % of its pixels
    with pytest.raises(ValueError, match="no usable box"):
        background_2d(image, mask, box_size=10)


def test_mesh_geometry():
    mesh = background_mesh(np.random.default_rng(1).normal(size=(45, 101)), box_size=(10, 25),
                           exclude_percentile=100.0)
    assert isinstance(mesh, BackgroundMesh)
    assert mesh.usable.shape == mesh.background.shape == (5, 5)
    assert mesh.box_size == (10, 25) and mesh.image_shape == (45, 101)
    # box_size beyond the image is cut to it, as photutils does
    assert background_mesh(np.ones((8, 9)), box_size=20, exclude_percentile=100.0).box_size == (8, 9)
