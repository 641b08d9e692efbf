"""Query Reference Catalog on a 10^8-row catalogue: sphx's layout and query against a plain scan.

Generates (once, cached) a full-sky catalogue of ``--rows`` sources in the layout of
:mod:`sphx.catalog.layout` (Hive partitions ``healpix16=<pixel>``, rows sorted by the
fine HEALPix index, bounded row groups), with a galactic-plane star density boost like
the simulator's sky. Then times the query of one target group (4 exposures with ~17'
slews x the 2 detectors of a dichroic pair, the real 2040-pixel, 6.15"/pixel geometry)
at high galactic latitude and in the galactic plane:

* **sphx**: :func:`sphx.catalog.query.query_catalog` (partition and row-group pruning,
  exact polygon test, propagation to the epoch with parallax);
* **peer**: what a user without the layout would write: a ``pyarrow.dataset`` scan of
  the whole catalogue with an RA/Dec box filter around the footprints (pyarrow still
  skips row groups whose ra/dec statistics miss the box; no propagation).

Each query is timed on a freshly opened dataset (no Parquet footers cached), after
one untimed warm-up of each method (the files are then in the page cache for both),
and again on one dataset object reused by every query (footers cached in the process).

    python benchmarks/bench_refcat_query.py [--rows 1e8] [--dir PATH] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import healpy as hp
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from astropy.coordinates import SkyCoord

from sphx.catalog.layout import ROW_GROUP_SIZE, partition_column, prepare_piece
from sphx.catalog.query import query_catalog
from sphx.ephemeris import julian_year, observer_barycentric
from sphx.instrument import SPHEREX
from sphx.simulate.optics import focal_plane
from sphx.simulate.sky import _GAL_Z, _parallax, _pos_error, _power_law_mags, _proper_motions
from sphx.wcs import focal_plane_wcs

NSIDE = 16
SEED = 2016
STAR_DENSITY, GALAXY_DENSITY, PLANE_BOOST, PLANE_SCALE = 1500.0, 2500.0, 30.0, 5.0  # as the simulator's sky
FLUX_WAVELENGTHS = {"flux_1um": 1.0, "flux_2um": 2.0, "flux_3um": 3.0, "flux_4p5um": 4.5}
MARKER = "_sphx_bench_complete.json"
FORMAT = 1  # bump when the generated columns change


# --- generation ---------------------------------------------------------------------------
def pixel_rows(rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(stars, galaxies) per partition pixel, in proportion to the simulator's densities."""
    npix = hp.nside2npix(NSIDE)
    k = 4  # mean of the plane factor over 4**k children of each pixel
    child = np.arange(npix * 4**k)
    vec = np.array(hp.pix2vec(NSIDE * 2**k, child, nest=True))
    b = np.degrees(np.arcsin(np.clip(np.abs(_GAL_Z @ vec), 0, 1)))
    plane = (1 + PLANE_BOOST * np.exp(-b / PLANE_SCALE)).reshape(npix, 4**k).mean(axis=1)
    stars, galaxies = STAR_DENSITY * plane, np.full(npix, GALAXY_DENSITY)
    share = (stars + galaxies) / (stars + galaxies).sum()
    total = np.diff(np.floor(np.concatenate([[0.0], np.cumsum(share)]) * rows + 0.5).astype(np.int64))
    n_star = np.floor(total * stars / (stars + galaxies) + 0.5).astype(np.int64)
    return n_star, total - n_star


def generate_pixel(pixel: int, n_star: int, n_gal: int, row_group_size: int = ROW_GROUP_SIZE) -> pa.Table:
    """The rows of one partition pixel: vectorised, deterministic in (SEED, pixel)."""
    rng = np.random.default_rng([SEED, pixel])
    n = n_star + n_gal
    # Uniform in the pixel: centres of random order-29 descendants (0.4 mas apart).
    k = 29 - (NSIDE.bit_length() - 1)
    x, y, z = hp.pix2vec(2**29, np.int64(pixel) * 4**k + rng.integers(0, 4**k, n), nest=True)
    ra = np.degrees(np.arctan2(y, x)) % 360.0
    dec = np.degrees(np.arctan2(z, np.hypot(x, y)))
    kind = np.concatenate([np.zeros(n_star, np.int8), np.ones(n_gal, np.int8)])
    star = kind == 0
    pmra, pmdec = np.zeros(n), np.zeros(n)
    pmra[star], pmdec[star] = _proper_motions(rng, n_star)
    parallax = np.zeros(n)
    parallax[star] = _parallax(rng, pmra[star], pmdec[star])
    mag = np.concatenate([_power_law_mags(rng, n_star, 0.3, 8.0, 21.0), _power_law_mags(rng, n_gal, 0.35, 14.0, 21.0)])
    calibrator = star & (mag >= 11) & (mag <= 15) & (rng.random(n) < 0.02)
    f16 = 3631e6 * 10.0 ** (-0.4 * mag)  # [uJy] at 1.6 um
    slope = np.where(star, rng.normal(-1.5, 0.5, n), rng.normal(0.5, 0.5, n))  # F_nu ~ lambda**slope
    cols = {
        "source_id": np.int64(pixel) * 2**24 + np.arange(n, dtype=np.int64),
        "ra": ra, "dec": dec, "ref_epoch": np.full(n, 2016.0), "pmra": pmra, "pmdec": pmdec,
        "parallax": parallax, "pos_error": _pos_error(mag, kind).astype(np.float32), "kind": kind,
        "calibrator": calibrator, "mag_ab": mag.astype(np.float32),
        **{name: (f16 * (lam / 1.6) ** slope).astype(np.float32) for name, lam in FLUX_WAVELENGTHS.items()},
    }
    return prepare_piece(pa.table(cols), nside=NSIDE, pixel=pixel, row_group_size=row_group_size)


def ensure_catalogue(root: Path, rows: int, row_group_size: int = ROW_GROUP_SIZE) -> None:
    """Generate the catalogue under ``root`` unless a complete one of ``rows`` rows is there.

    One pixel at a time (bounded memory), each file written to a temporary name and
    renamed, so an interrupted run resumes where it stopped.
    """
    marker = root / MARKER
    want = {"rows": rows, "seed": SEED, "nside": NSIDE, "row_group_size": row_group_size, "format": FORMAT}
    if marker.exists() and json.loads(marker.read_text()) == want:
        print(f"reusing the catalogue in {root}")
        return
    if marker.exists():
        raise SystemExit(f"{root} holds another catalogue ({marker.read_text()}); pass another --dir")
    n_star, n_gal = pixel_rows(rows)
    t0 = time.perf_counter()
    done = 0
    for p in range(hp.nside2npix(NSIDE)):
        folder = root / f"{partition_column(NSIDE)}={p}"
        path = folder / "part-0.parquet"
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            table = generate_pixel(p, int(n_star[p]), int(n_gal[p]), row_group_size)
            # Dictionary encoding only where it pays (random doubles make it slower and larger).
            pq.write_table(table, folder / "part-0.parquet.tmp", compression="zstd", row_group_size=row_group_size,
                           use_dictionary=["ref_epoch", "kind", "calibrator"])
            os.replace(folder / "part-0.parquet.tmp", path)
        done += int(n_star[p] + n_gal[p])
        if p % 256 == 255:
            rate = done / (time.perf_counter() - t0)
            print(f"  {p + 1} / {hp.nside2npix(NSIDE)} partitions, {done:,} rows ({rate:,.0f} rows/s)", flush=True)
    marker.write_text(json.dumps(want))
    print(f"generated {rows:,} rows in {time.perf_counter() - t0:.0f} s")


# --- a target group -------------------------------------------------------------------------
def group_footprints(ra: float, dec: float, *, exposures: int = 4, slew: float = 17 / 60,
                     pa_: float = 30.0) -> list[np.ndarray]:
    """Corners [deg] of every image of a target group on the dichroic pair D1/D4."""
    n = SPHEREX.n_active
    edge = np.array([[-0.5, -0.5], [n - 0.5, -0.5], [n - 0.5, n - 0.5], [-0.5, n - 0.5]])
    out = []
    for k in range(exposures):
        # Small slews along the focal plane's y axis (PA east of north).
        d = math.radians(k * slew)
        bra = ra + math.degrees(d * math.sin(math.radians(pa_))) / math.cos(math.radians(dec))
        bdec = dec + math.degrees(d * math.cos(math.radians(pa_)))
        for band in (1, 4):
            fp = focal_plane(SPHEREX, band)
            w = focal_plane_wcs(ra=bra, dec=bdec, pa=pa_, offset=fp.offset, rotation=fp.rotation,
                                pixel_scale=SPHEREX.pixel_scale, n_pixels=n, sip=fp.sip)
            out.append(w.all_pix2world(edge, 0))
    return out


def box_filter(footprints: list[np.ndarray], margin: float) -> pc.Expression:
    """An RA/Dec box around the footprints (RA not wrapping through 0 here)."""
    corners = np.concatenate(footprints)
    margin *= 1.5  # the grown footprints' mitred corners reach margin * sqrt(2) out
    dec_lo, dec_hi = corners[:, 1].min() - margin, corners[:, 1].max() + margin
    pad = margin / math.cos(math.radians(max(abs(dec_lo), abs(dec_hi))))
    ra_lo, ra_hi = corners[:, 0].min() - pad, corners[:, 0].max() + pad
    assert 0 < ra_lo < ra_hi < 360, "the box must not wrap through RA = 0"
    ra_, dec_ = pc.field("ra"), pc.field("dec")
    return (ra_ >= ra_lo) & (ra_ <= ra_hi) & (dec_ >= dec_lo) & (dec_ <= dec_hi)


def open_dataset(root: Path) -> pads.Dataset:
    return pads.dataset(root, format="parquet", partitioning="hive", exclude_invalid_files=True)


def peer_reads(dataset: pads.Dataset, expr: pc.Expression) -> tuple[int, int, int]:
    """(files with row groups read, row groups read, rows read) of the peer's scan (untimed)."""
    files = groups = rows = 0
    for f in dataset.get_fragments():
        sub = f.subset(filter=expr)
        if sub.row_groups:
            files += 1
            groups += len(sub.row_groups)
            rows += sum(rg.num_rows for rg in sub.row_groups)
    return files, groups, rows


def timed(fn, repeat: int) -> tuple[float, object]:
    """Median wall time of ``fn()`` over ``repeat`` calls, and its last result."""
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=float, default=1e8)
    p.add_argument("--dir", type=Path, default=None)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--row-group-size", type=int, default=ROW_GROUP_SIZE, help="to compare layouts")
    args = p.parse_args()
    rows = int(args.rows)
    suffix = "" if args.row_group_size == ROW_GROUP_SIZE else f"-rg{args.row_group_size}"
    root = args.dir or Path("/tmp") / f"sphx-refcat-bench-{rows}{suffix}"
    ensure_catalogue(root, rows, args.row_group_size)

    t0 = time.perf_counter()
    dataset = open_dataset(root)
    total = sum(f.metadata.num_rows for f in dataset.get_fragments())
    files = len(dataset.files)
    disk = sum(os.path.getsize(f) for f in dataset.files) / 1e9
    print(f"catalogue: {total:,} rows in {files} partition files, {disk:.1f} GB "
          f"(discovery and footers {time.perf_counter() - t0:.2f} s)")
    if total != rows:
        raise SystemExit(f"the catalogue in {root} holds {total:,} rows, not {rows:,}")

    mjd = 61100.3  # a mid-group time
    epoch = float(julian_year(mjd))
    observer = observer_barycentric(mjd, np.array([4000.0, -5500.0, 2500.0]))
    margin = 1 / 60
    regions = {
        "high latitude (b = +60)": SkyCoord(l=100.0, b=60.0, unit="deg", frame="galactic").icrs,
        "galactic plane (l = 30, b = 0)": SkyCoord(l=30.0, b=0.0, unit="deg", frame="galactic").icrs,
    }
    print(f"target group: 4 exposures (17' slews) x D1/D4, {SPHEREX.n_active} px of {SPHEREX.pixel_scale}\", "
          f"margin {margin * 60:.0f}', epoch {epoch:.3f}; median of {args.repeat} after a warm-up")
    t_open, _ = timed(lambda: open_dataset(root), args.repeat)
    print(f"opening the dataset (listing {files} files): {t_open:.3f} s, not in the times below")
    for name, c in regions.items():
        footprints = group_footprints(float(c.ra.deg), float(c.dec.deg))
        expr = box_filter(footprints, margin)

        def ours(dataset, footprints=footprints):
            return query_catalog(dataset, footprints=footprints, epoch=epoch, observer=observer, margin=margin)

        def peer(dataset, expr=expr):
            return dataset.to_table(filter=expr)

        results = {}
        for label, fn in (("sphx", ours), ("peer", peer)):
            fn(open_dataset(root))  # warm-up: page cache, numba compilation
            # A fresh dataset per query (no footers cached), then one dataset reused by
            # every query (a pipeline querying group after group keeps its footers).
            opened = [open_dataset(root) for _ in range(args.repeat)]
            t_cold, out = timed(lambda opened=opened, fn=fn: fn(opened.pop()), args.repeat)
            reused = open_dataset(root)
            fn(reused)
            t_warm, _ = timed(lambda reused=reused, fn=fn: fn(reused), args.repeat)
            results[label] = (t_cold, t_warm, out)
        (c_ours, w_ours, (table, stats)), (c_peer, w_peer, box) = results["sphx"], results["peer"]
        p_files, p_groups, p_rows = peer_reads(open_dataset(root), expr)
        print(f"\n{name}: RA {c.ra.deg:.2f}, Dec {c.dec.deg:.2f}")
        print(f"  sphx query_catalog: {stats.rows_returned:>10,} rows returned; read {stats.partitions} of "
              f"{stats.partitions_total} partitions, {stats.row_groups} row groups, {stats.rows_read:,} rows "
              f"({stats.rows_read / total:.4%} of the catalogue); {c_ours:.3f} s fresh dataset, "
              f"{w_ours:.3f} s reused")
        print(f"  peer box scan:      {box.num_rows:>10,} rows returned; footers of all {files} files, read "
              f"{p_files} files, {p_groups} row groups, {p_rows:,} rows ({p_rows / total:.4%}); "
              f"{c_peer:.3f} s fresh dataset, {w_peer:.3f} s reused")
        print(f"  peer / sphx time: {c_peer / c_ours:.1f}x fresh, {w_peer / w_ours:.1f}x reused")
        ids = set(table.column("source_id").to_pylist())
        missing = ids - set(box.column("source_id").to_pylist())
        # The box contains the grown footprints, so every returned source is in the box.
        print(f"  check: {len(missing)} sphx sources outside the peer's box (expected 0)")


if __name__ == "__main__":
    main()
