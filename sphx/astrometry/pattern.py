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
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["PatternMatch", "match_patterns", "similarity_transform"]


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


def _unique_pairs(i1: np.ndarray, i2: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """One-to-one pairs: where several stars claim one counterpart, the nearest keeps it."""
    order = np.argsort(dist, kind="stable")
    _, first = np.unique(i2[order], return_index=True)
    keep = order[first]
    return np.column_stack([i1[keep], i2[keep]])
