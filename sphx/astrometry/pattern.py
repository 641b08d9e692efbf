"""Blind pattern matching of two star lists by similar triangles.

The first stage of Estimate Fine Astrometry, in the role astrometry.net plays in the
paper: find which detected stars are which catalogue stars without trusting the coarse
pointing beyond "the lists overlap". Both lists are in the same pixel frame (the
catalogue projected with the coarse WCS), so the unknown is a similarity transform
(rotation, scale, shift) that can be arbitrarily large.

Following Groth (1986) and Valdes et al. (1995): each star forms triangles with pairs of
its ``neighbours`` nearest neighbours; a triangle's shape is described by two side
ratios, invariant under similarity, and its vertices are put in a canonical order
(opposite the longest, middle and shortest side), so two triangles of the same shape
also give three star correspondences. Matching shapes (a k-d tree lookup) propose
transforms; the transforms agreeing with each other are found by binning their rotation
and shift, and each of the best-populated bins is verified by counting how many of all
the stars it maps onto a catalogue star. Mirror images never match (the orientation of
each triangle is compared), since the sky is seen with a fixed parity.

Triangles need the two lists to hold mostly the same stars around each star. In crowded
fields (the galactic plane puts hundreds of thousands of stars on a detector) a star's
nearest bright neighbours differ between the lists as soon as fluxes scatter a little,
so :func:`match_offsets` solves the bounded problem instead: with the scale known and the
rotation and shift limited to what a coarse pointing can get wrong, every (detection,
star) pair votes for the shift that would make it a match, for each rotation on a grid
fine enough that no vote misses its bin. The true shift collects one vote per star in
both lists; wrong pairs spread their votes over the whole search box. This is the
Hough-transform view of point matching (e.g. Ballard 1981; Stetson's DAOMATCH makes
the same argument for crowded fields).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["PatternMatch", "match_offsets", "match_patterns", "similarity_transform"]


@dataclass(frozen=True)
class PatternMatch:
    """A verified similarity transform from the first list's frame to the second's.

    ``pairs`` holds (index in list 1, index in list 2) of the stars it maps onto each
    other; ``scale``, ``rotation`` [deg] and ``shift`` [pixel] describe
    ``z2 = scale * exp(i rotation) * z1 + shift`` with ``z = x + i y``.
    """

    pairs: np.ndarray
    scale: float
    rotation: float
    shift: tuple[float, float]

    def apply(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = self.scale * np.exp(1j * np.deg2rad(self.rotation)) * (np.asarray(x) + 1j * np.asarray(y))
        z = z + complex(*self.shift)
        return z.real, z.imag


def similarity_transform(z1: np.ndarray, z2: np.ndarray, weights: np.ndarray | None = None) -> tuple[complex, complex]:
    """Least-squares ``a, b`` of ``z2 = a z1 + b`` for complex positions (closed form)."""
    w = np.ones(z1.shape) if weights is None else np.asarray(weights, dtype=np.float64)
    m1, m2 = np.sum(w * z1) / w.sum(), np.sum(w * z2) / w.sum()
    d1, d2 = z1 - m1, z2 - m2
    a = np.sum(w * np.conj(d1) * d2) / np.sum(w * np.abs(d1) ** 2)
    return a, m2 - a * m1


def _triangles(x: np.ndarray, y: np.ndarray, neighbours: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canonically ordered vertex triples, their shape invariants and orientations."""
    n = x.size
    k = min(neighbours, n - 1)
    if k < 2:
        return np.zeros((0, 3), np.int64), np.zeros((0, 2)), np.zeros(0)
    pts = np.column_stack([x, y])
    _, near = cKDTree(pts).query(pts, k + 1)
    pairs = np.array(list(combinations(range(1, k + 1), 2)))
    tri = np.concatenate([np.column_stack([near[:, 0], near[:, a], near[:, b]]) for a, b in pairs])
    tri = np.unique(np.sort(tri, axis=1), axis=0)
    p = pts[tri]  # (t, 3, 2)
    # side opposite vertex v joins the other two
    side = np.stack([np.hypot(*(p[:, (v + 1) % 3] - p[:, (v + 2) % 3]).T) for v in range(3)], axis=1)
    order = np.argsort(-side, axis=1, kind="stable")  # vertices opposite the longest, middle, shortest side
    tri = np.take_along_axis(tri, order, axis=1)
    side = np.take_along_axis(side, order, axis=1)
    ok = side[:, 2] > 0
    tri, side = tri[ok], side[ok]
    invariants = np.column_stack([side[:, 1] / side[:, 0], side[:, 2] / side[:, 1]])
    p = pts[tri]
    e1, e2 = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
    orientation = np.sign(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])
    return tri, invariants, orientation


def match_patterns(
    x1: np.ndarray,
    y1: np.ndarray,
    x2: np.ndarray,
    y2: np.ndarray,
    *,
    tolerance: float = 2.0,
    neighbours: int = 6,
    invariant_tolerance: float = 0.01,
    scale_range: tuple[float, float] = (0.98, 1.02),
    min_matches: int = 6,
    candidates: int = 8,
) -> PatternMatch | None:
    """Find the similarity transform that maps list 1 onto list 2.

    Parameters
    ----------
    x1, y1
        First star list (e.g. the brightest detections) [pixel].
    x2, y2
        Second list (e.g. the brightest catalogue stars in the coarse frame) [pixel].
    tolerance
        Largest distance of a mapped star from its counterpart [pixel].
    neighbours
        Triangles are formed with this many nearest neighbours of every star.
    invariant_tolerance
        Largest difference of the side ratios of two matching triangles.
    scale_range
        Accepted scale of the transform (the pixel scale is known).
    min_matches
        Fewest stars a transform must map onto counterparts to be accepted.
    candidates
        Best-populated transform bins that are verified.

    Returns
    -------
    PatternMatch or None
        The transform mapping the most stars, refitted to all of them, or None when no
        transform maps ``min_matches`` stars.
    """
    x1, y1, x2, y2 = (np.asarray(a, dtype=np.float64) for a in (x1, y1, x2, y2))
    t1, inv1, or1 = _triangles(x1, y1, neighbours)
    t2, inv2, or2 = _triangles(x2, y2, neighbours)
    if not len(t1) or not len(t2):
        return None
    hits = cKDTree(inv2).query_ball_point(inv1, invariant_tolerance)
    i1 = np.repeat(np.arange(len(t1)), [len(h) for h in hits])
    i2 = np.fromiter((j for h in hits for j in h), np.int64, count=i1.size)
    keep = or1[i1] == or2[i2]
    i1, i2 = i1[keep], i2[keep]
    if not i1.size:
        return None
    z1 = (x1 + 1j * y1)[t1[i1]]  # (m, 3)
    z2 = (x2 + 1j * y2)[t2[i2]]
    d1, d2 = z1 - z1.mean(axis=1, keepdims=True), z2 - z2.mean(axis=1, keepdims=True)
    a = np.sum(np.conj(d1) * d2, axis=1) / np.sum(np.abs(d1) ** 2, axis=1)
    b = z2.mean(axis=1) - a * z1.mean(axis=1)
    scale = np.abs(a)
    ok = (scale >= scale_range[0]) & (scale <= scale_range[1])
    a, b = a[ok], b[ok]
    if not a.size:
        return None
    # Transforms agreeing on rotation (1 deg bins) and shift (2 tolerance bins) pile up.
    key = np.column_stack([np.round(np.angle(a, deg=True)), np.round(b.real / (2 * tolerance)),
                           np.round(b.imag / (2 * tolerance))]).astype(np.int64)
    _, inverse, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    tree = cKDTree(np.column_stack([x2, y2]))
    z_all = x1 + 1j * y1
    best: tuple[int, np.ndarray] | None = None
    for label in np.argsort(-counts)[:candidates]:
        members = np.flatnonzero(inverse.reshape(-1) == label)
        pick = members[np.argmin(np.abs(a[members] - np.median(a[members])) + np.abs(b[members] - np.median(b[members])))]
        aa, bb = a[pick], b[pick]
        for _ in range(3):  # refit to every star the transform maps within tolerance
            z = aa * z_all + bb
            dist, j = tree.query(np.column_stack([z.real, z.imag]), distance_upper_bound=tolerance)
            hit = np.isfinite(dist)
            if hit.sum() < 3:
                break
            pairs = _unique_pairs(np.flatnonzero(hit), j[hit], dist[hit])
            aa, bb = similarity_transform(z_all[pairs[:, 0]], (x2 + 1j * y2)[pairs[:, 1]])
        else:
            if best is None or len(pairs) > len(best[1]):
                best = (int(label), pairs)
    if best is None or len(best[1]) < min_matches:
        return None
    pairs = best[1]
    aa, bb = similarity_transform(z_all[pairs[:, 0]], (x2 + 1j * y2)[pairs[:, 1]])
    if not scale_range[0] <= abs(aa) <= scale_range[1]:
        return None
    return PatternMatch(pairs, float(abs(aa)), float(np.angle(aa, deg=True)), (float(bb.real), float(bb.imag)))


def match_offsets(
    x1: np.ndarray,
    y1: np.ndarray,
    x2: np.ndarray,
    y2: np.ndarray,
    *,
    centre: tuple[float, float],
    radius: float,
    max_rotation: float,
    tolerance: float = 2.0,
    min_matches: int = 6,
    significance: float = 6.0,
) -> PatternMatch | None:
    """Find the rotation about ``centre`` and the shift mapping list 1 onto list 2 by voting.

    Parameters
    ----------
    x1, y1
        First star list (the detections) [pixel].
    x2, y2
        Second list (catalogue stars in the coarse frame) [pixel].
    centre
        Point the rotation turns about (the image centre) [pixel].
    radius
        Largest shift searched along each axis [pixel].
    max_rotation
        Largest rotation searched [deg].
    tolerance
        Largest distance of a mapped star from its counterpart [pixel]; also the size of
        the vote bins.
    min_matches
        Fewest stars a transform must map onto counterparts to be accepted.
    significance
        The winning bin must hold this many Poisson sigmas more votes than wrong pairs
        put in a bin on average.

    Returns
    -------
    PatternMatch or None
        The transform refitted to the stars it maps (its scale is fitted too, and should
        come out as 1), or None when no shift stands out.
    """
    x1, y1, x2, y2 = (np.asarray(a, dtype=np.float64) for a in (x1, y1, x2, y2))
    if x1.size < 3 or x2.size < 3:
        return None
    c = complex(*centre)
    z1, z2 = x1 + 1j * y1 - c, x2 + 1j * y2 - c
    reach = np.abs(z1).max()
    # rotation steps small enough that the farthest star moves less than half a bin
    step = tolerance / max(reach, tolerance)
    n = int(np.ceil(np.radians(max_rotation) / step))
    # candidate pairs once: any rotation in range keeps them within the search box
    slack = radius * np.sqrt(2.0) + reach * np.radians(max_rotation) + tolerance
    near = cKDTree(np.column_stack([z2.real, z2.imag])).query_ball_point(np.column_stack([z1.real, z1.imag]), slack)
    i1 = np.repeat(np.arange(x1.size), [len(h) for h in near])
    i2 = np.fromiter((j for h in near for j in h), np.int64, count=i1.size)
    if not i1.size:
        return None
    bins = int(np.ceil(2 * radius / tolerance)) + 1
    best = (-1.0, 0.0, 0j, 0.0)  # (excess, rotation, shift, count)
    for theta in np.linspace(-1.0, 1.0, 2 * n + 1) * n * step:
        shift = z2[i2] - z1[i1] * np.exp(1j * theta)
        ix = np.floor((shift.real + radius) / tolerance).astype(np.int64)
        iy = np.floor((shift.imag + radius) / tolerance).astype(np.int64)
        inside = (ix >= 0) & (ix < bins) & (iy >= 0) & (iy < bins)
        votes = np.bincount(iy[inside] * bins + ix[inside], minlength=bins * bins).reshape(bins, bins)
        # 2 x 2 box sums, so that a shift on a bin corner is not split four ways
        box = votes[:-1, :-1] + votes[1:, :-1] + votes[:-1, 1:] + votes[1:, 1:]
        peak = np.unravel_index(np.argmax(box), box.shape)
        expected = 4.0 * inside.sum() / votes.size
        excess = (box[peak] - expected) / np.sqrt(expected + 1.0)
        if excess > best[0]:
            centre_bin = complex((peak[1] + 1) * tolerance - radius, (peak[0] + 1) * tolerance - radius)
            best = (excess, theta, centre_bin, float(box[peak]))
    excess, theta, shift, count = best
    if excess < significance or count < min_matches:
        return None
    a, b = np.exp(1j * theta), shift
    tree = cKDTree(np.column_stack([z2.real, z2.imag]))
    for _ in range(3):  # refit to every star the transform maps within tolerance
        z = a * z1 + b
        dist, j = tree.query(np.column_stack([z.real, z.imag]), distance_upper_bound=tolerance)
        hit = np.isfinite(dist)
        if hit.sum() < max(min_matches, 3):
            return None
        pairs = _unique_pairs(np.flatnonzero(hit), j[hit], dist[hit])
        a, b = similarity_transform(z1[pairs[:, 0]], z2[pairs[:, 1]])
    # back to the frame of the inputs: z2 + c = a (z1 + c) + (b + c - a c)
    b = b + c - a * c
    return PatternMatch(pairs, float(abs(a)), float(np.angle(a, deg=True)), (float(b.real), float(b.imag)))


def _unique_pairs(i1: np.ndarray, i2: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """One-to-one pairs: where several stars claim one counterpart, the nearest keeps it."""
    order = np.argsort(dist, kind="stable")
    _, first = np.unique(i2[order], return_index=True)
    keep = order[first]
    return np.column_stack([i1[keep], i2[keep]])
