"""Estimate Diffuse Background (paper section 4.3, Level 3a) of one spectral image.

The global estimate starts from the image's ZODI model, adds a spectral fit of what the
model misses (the residual's median in bins of each pixel's central wavelength: the
linear variable filter puts fixed-wavelength light such as airglow lines on
iso-wavelength stripes), and a photutils ``Background2D``-style mesh of the rest
(sigma-clipped boxes with the SOURCE and bad pixels masked, median-filtered, smoothly
interpolated; :mod:`sphx.kernels.background`). A sub-region (box) is unusable when more
than 75 % of its pixels carry SOURCE; with more than 90 % usable the global estimate is
used, otherwise (crowded fields) the local one: ZODI and the spectral fit here, and the
same box statistics over the 15 x 15 region around each photometry cutout, computed by
forced photometry (``local_background``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import flags as _flags
from ..kernels.background import background_2d

__all__ = ["BackgroundEstimate", "estimate_background", "spectral_residual"]


@dataclass(frozen=True)
class BackgroundEstimate:
    """A background image and how it was made.

    Attributes
    ----------
    background
        (y, x) float32 [image unit], ZODI included; for ``"local"``, the smooth part
        (ZODI and the spectral fit) to which each cutout's own level is added.
    method
        ``"global"`` or ``"local"``.
    usable_fraction
        Fraction of sub-regions with at most ``max_source_fraction`` SOURCE pixels.
    spectral
        The spectral component alone, (y, x).
    """

    background: np.ndarray
    method: str
    usable_fraction: float
    spectral: np.ndarray


def spectral_residual(residual: np.ndarray, wavelength: np.ndarray, good: np.ndarray, *,
                      n_bins: int = 34) -> np.ndarray:
    """Smooth function of wavelength fitted to a residual image: the median of the good
    pixels in ``n_bins`` equal wavelength bins, linearly interpolated at every pixel.

    Parameters
    ----------
    residual
        (y, x) image minus its ZODI model.
    wavelength
        (y, x) central wavelength of each pixel [um].
    good
        (y, x) bool: pixels to use.
    n_bins
        Wavelength bins over the image's range (34: two per spectral channel).

    Returns
    -------
    numpy.ndarray
        (y, x) float32; zero when too few pixels are good.
    """
    use = good & np.isfinite(residual) & np.isfinite(wavelength)
    if np.count_nonzero(use) < 10 * n_bins:
        return np.zeros(residual.shape, np.float32)
    lam, r = wavelength[use], residual[use]
    edges = np.linspace(lam.min(), lam.max(), n_bins + 1)
    which = np.clip(np.searchsorted(edges, lam, side="right") - 1, 0, n_bins - 1)
    order = np.argsort(which, kind="stable")
    bounds = np.searchsorted(which[order], np.arange(n_bins + 1))
    centres, medians = [], []
    for k in range(n_bins):
        part = r[order[bounds[k]:bounds[k + 1]]]
        if part.size >= 10:
            centres.append(np.median(lam[order[bounds[k]:bounds[k + 1]]]))
            medians.append(np.median(part))
    if not centres:
        return np.zeros(residual.shape, np.float32)
    out = np.interp(np.where(np.isfinite(wavelength), wavelength, centres[0]), centres, medians)
    return out.astype(np.float32)


def estimate_background(
    image: np.ndarray,
    flags: np.ndarray,
    zodi: np.ndarray,
    wavelength: np.ndarray,
    *,
    bad: int = int(_flags.DEFAULT_BAD),
    box_size: int = 10,
    filter_size: int = 3,
    sigma: float = 3.0,
    max_source_fraction: float = 0.75,
    min_usable: float = 0.9,
) -> BackgroundEstimate:
    """The diffuse background of one image, globally or locally.

    Parameters
    ----------
    image
        (y, x) surface brightness [MJy/sr].
    flags
        (y, x) FLAGS; SOURCE marks pixels with catalogue source flux.
    zodi
        (y, x) ZODI model [MJy/sr].
    wavelength
        (y, x) central wavelength [um] (``spectral_wcs`` CWAVE).
    bad
        FLAGS bits of pixels left out of every statistic.
    box_size, filter_size, sigma
        Background2D box [pixel], mesh median filter [boxes] and clipping [sigma] of
        the global estimate.
    max_source_fraction
        A sub-region with more SOURCE pixels than this is unusable.
    min_usable
        The global estimate needs more than this fraction of usable sub-regions.

    Returns
    -------
    BackgroundEstimate
    """
    image = np.asarray(image, dtype=np.float32)
    flags = np.asarray(flags).astype(np.uint32, copy=False)
    if not (image.shape == flags.shape == np.shape(zodi) == np.shape(wavelength)):
        raise ValueError(f"image {image.shape}, flags {flags.shape}, zodi {np.shape(zodi)} and wavelength "
                         f"{np.shape(wavelength)} must have one shape")
    zodi = np.asarray(zodi, dtype=np.float32)
    source = (flags & np.uint32(_flags.Flag.SOURCE)) != 0
    unusable_pixel = (flags & np.uint32(bad)) != 0
    residual = image - zodi
    spectral = spectral_residual(residual, np.asarray(wavelength), ~source & ~unusable_pixel)
    rest = residual - spectral

    # sub-regions: the global mesh's boxes; usable when SOURCE covers at most 75 %
    ny, nx = image.shape
    my, mx = -(-ny // box_size), -(-nx // box_size)
    pad = np.zeros((my * box_size, mx * box_size), bool)
    pad[:ny, :nx] = source
    counted = np.zeros_like(pad)
    counted[:ny, :nx] = True
    share = (pad.reshape(my, box_size, mx, box_size).sum(axis=(1, 3))
             / counted.reshape(my, box_size, mx, box_size).sum(axis=(1, 3)))
    usable = float(np.mean(share <= max_source_fraction))

    if usable > min_usable:
        mesh_image, _, _ = background_2d(rest, source | unusable_pixel, box_size=box_size, filter_size=filter_size,
                                         sigma=sigma, exclude_percentile=100.0 * max_source_fraction)
        method = "global"
    else:
        # crowded: the smooth part only; forced photometry adds the statistic of each
        # cutout's own 15 x 15 region (sphx.kernels.photometry.local_backgrounds)
        mesh_image = np.zeros_like(rest)
        method = "local"
    return BackgroundEstimate((zodi + spectral + mesh_image).astype(np.float32), method, usable, spectral)
