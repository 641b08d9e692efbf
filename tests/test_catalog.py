"""The reference catalogue: motion with parallax, the partitioned layout, and footprint queries."""

from __future__ import annotations

import math
import warnings

import astropy.units as u
import healpy as hp
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from astropy.coordinates import CartesianRepresentation, Distance, SkyCoord
from astropy.time import Time
from astropy.wcs import WCS
from matplotlib.path import Path

from sphx.catalog.layout import FINE_COLUMN, FINE_ORDER, fine_index, prepare_piece
from sphx.catalog.motion import propagate
from sphx.catalog.query import QueryStats, query_catalog
from sphx.ephemeris import observer_barycentric
from sphx.errors import StepError
from sphx.io import open_repository
from sphx.simulate.sky import CATALOG_NSIDE, CATALOG_SCHEMA, catalog_for_pixels, pixels_in_footprint

SEED = 21
DENSITY = {"star_density": 150.0, "galaxy_density": 150.0}
ROW_GROUP = 400  # small groups, so that a few thousand rows per partition still prune


# --- propagate with parallax ------------------------------------------------------------
def _astropy_apparent(ra, dec, pmra, pmdec, parallax, observer_au, *, t0, t1):
    """Direction of the source at t1 seen from the observer, by astropy (independent)."""
    c = SkyCoord(ra=ra * u.deg, dec=dec * u.deg, distance=Distance(parallax=parallax * u.mas),
                 pm_ra_cosdec=pmra * u.mas / u.yr, pm_dec=pmdec * u.mas / u.yr, radial_velocity=0 * u.km / u.s,
                 obstime=Time(t0, format="jyear"), frame="icrs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moved = c.apply_space_motion(new_obstime=Time(t1, format="jyear"))
    xyz = moved.cartesian.xyz.to(u.au).value - np.asarray(observer_au)[:, None]
    seen = SkyCoord(CartesianRepresentation(xyz * u.au), frame="icrs")
    return seen.ra.deg, seen.dec.deg


def test_parallax_matches_astropy():
    rng = np.random.default_rng(3)
    n = 200
    ra = rng.uniform(0, 360, n)
    dec = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    dec[:2] = [89.95, -89.95]
    parallax = 10.0 ** rng.uniform(-1, math.log10(800.0), n)  # 0.1-800 mas
    # Stellar velocities (10-300 km/s): astropy's space motion includes light-time
    # terms of order v / c, which would matter for impossible 1e4 km/s stars.
    mu = parallax * rng.uniform(10, 300, n) / 4.740470463533348  # [mas/yr]
    angle = rng.uniform(0, 2 * np.pi, n)
    pmra, pmdec = mu * np.sin(angle), mu * np.cos(angle)
    observer = observer_barycentric(61000.25, np.array([3000.0, -6500.0, 1200.0]))  # Earth + spacecraft
    r, d = propagate(ra, dec, pmra, pmdec, parallax, ref_epoch=2016.0, epoch=2026.3, observer=observer)
    seen = SkyCoord(r * u.deg, d * u.deg)
    # The parallax alone: the proper-motion position at distance 1 / parallax, minus the observer.
    r0, d0 = propagate(ra, dec, pmra, pmdec, ref_epoch=2016.0, epoch=2026.3)
    xyz = SkyCoord(r0 * u.deg, d0 * u.deg, distance=Distance(parallax=parallax * u.mas)).cartesian.xyz
    alone = SkyCoord(CartesianRepresentation(xyz - observer[:, None] * u.au), frame="icrs")
    # The whole chain: astropy's space motion, minus the observer.
    ar, ad = _astropy_apparent(ra, dec, pmra, pmdec, parallax, observer, t0=2016.0, t1=2026.3)
    shift = seen.separation(SkyCoord(r0 * u.deg, d0 * u.deg)).to(u.mas).value
    sep_alone = seen.separation(alone).to(u.mas).value
    sep_chain = seen.separation(SkyCoord(ar * u.deg, ad * u.deg)).to(u.mas).value
    print(f"parallax shifts up to {shift.max():.0f} mas; largest difference to astropy {sep_alone.max():.1e} mas "
          f"(parallax alone), {sep_chain.max():.1e} mas (space motion)")
    assert shift.max() > 300  # the parallax was applied ...
    assert sep_alone.max() < 1e-5  # ... exactly as the vector difference ...
    # ... and as astropy's straight-line space motion, but for the angle it travels,
    # atan(theta) rather than theta (a uniform rotation), and the distance growing by
    # 1 / cos(theta): third- and second-order terms of theta = mu dt.
    theta = np.radians(mu * 10.3 / 3.6e6)
    expected = np.degrees(theta**3 / 3) * 3.6e6 + parallax * theta**2
    assert (sep_chain < 1.1 * expected + 1e-4).all()


def test_sources_in_image_seen_from_the_observer_match_astropy():
    # the catalogue array's rows moved to the epoch and seen from the observer, then
    # projected: against astropy's space motion and its WCS, for nearby fast stars
    from sphx.astrometry.catalog import catalog_array, sources_in_image

    rng = np.random.default_rng(3)
    n = 400
    ra, dec = rng.uniform(149.8, 150.2, n), rng.uniform(1.8, 2.2, n)
    pmra, pmdec, parallax = rng.normal(0, 500, n), rng.normal(0, 500, n), rng.uniform(50.0, 800.0, n)
    table = pa.table({"ra": ra, "dec": dec, "ref_epoch": np.full(n, 2016.0), "pmra": pmra, "pmdec": pmdec,
                      **{c: np.ones(n) for c in ("flux_1um", "flux_2um", "flux_3um", "flux_4p5um")}})
    wcs = WCS(naxis=2)
    wcs.wcs.ctype, wcs.wcs.crval, wcs.wcs.crpix = ["RA---TAN", "DEC--TAN"], [150.0, 2.0], [100.5, 100.5]
    wcs.wcs.cd = np.array([[-6.2, 0.0], [0.0, 6.2]]) / 3600.0
    mjd, epoch = 61000.0, Time(61000.0, format="mjd").jyear
    observer = observer_barycentric(mjd)
    rows, x, y = sources_in_image(catalog_array(table), wcs, (0, 199), (0, 199), epoch, 5.0, parallax=parallax,
                                  observer=observer)
    assert 100 < rows.size < n
    ra1, dec1 = _astropy_apparent(ra[rows], dec[rows], pmra[rows], pmdec[rows], parallax[rows],
                                  observer, t0=2016.0, t1=epoch)
    ax, ay = wcs.all_world2pix(ra1, dec1, 0)
    assert np.max(np.hypot(x - ax, y - ay)) < 1e-3  # [pixel] (6.2"/pixel; parallax up to 0.8")
    # without the observer the shift is the parallax, up to 0.13 pixel here
    rows0, x0, y0 = sources_in_image(catalog_array(table), wcs, (0, 199), (0, 199), epoch, 5.0)
    _, a, b = np.intersect1d(rows, rows0, return_indices=True)
    assert np.max(np.hypot(x0[b] - x[a], y0[b] - y[a])) > 0.05


def test_no_parallax_is_bit_identical_and_observer_broadcasts():
    rng = np.random.default_rng(4)
    ra, dec = rng.uniform(0, 360, 50), rng.uniform(-80, 80, 50)
    pmra, pmdec = rng.normal(0, 50, (2, 50))
    pmra[:5] = pmdec[:5] = 0.0
    base = propagate(ra, dec, pmra, pmdec, ref_epoch=2016.0, epoch=2027.0)
    observer = np.array([0.3, -0.9, -0.4])
    plx = rng.uniform(0.1, 5, 50)
    plx[:10] = [0.0, np.nan, -1.0, 0.0, np.nan, 0.0, np.nan, -0.5, 0.0, 0.0]  # unknown or none
    for args in ((None, None), (plx, None), (np.zeros(50), observer), (np.full(50, np.nan), observer)):
        r, d = propagate(ra, dec, pmra, pmdec, args[0], ref_epoch=2016.0, epoch=2027.0, observer=args[1])
        assert r.tobytes() == base[0].tobytes() and d.tobytes() == base[1].tobytes()
    r, d = propagate(ra, dec, pmra, pmdec, plx, ref_epoch=2016.0, epoch=2027.0, observer=observer)
    assert r[:10].tobytes() == base[0][:10].tobytes() and d[:10].tobytes() == base[1][:10].tobytes()
    assert (r[10:] != base[0][10:]).all()
    np.testing.assert_array_equal(r[:5], ra[:5])  # no motion, no parallax: the input itself
    # One observer per row (..., 3) equals the rows one by one.
    observers = rng.normal(0, 1, (50, 3))
    rr, dd = propagate(ra, dec, pmra, pmdec, plx, ref_epoch=2016.0, epoch=2027.0, observer=observers)
    one = [propagate(ra[i], dec[i], pmra[i], pmdec[i], plx[i], ref_epoch=2016.0, epoch=2027.0,
                     observer=observers[i]) for i in range(50)]
    np.testing.assert_array_equal(rr, [o[0] for o in one])
    np.testing.assert_array_equal(dd, [o[1] for o in one])
    with pytest.raises(StepError, match="observer"):
        propagate(ra, dec, pmra, pmdec, plx, ref_epoch=2016.0, epoch=2027.0, observer=[1.0, 2.0])


def test_annual_parallax_ellipse_at_the_ecliptic_pole():
    # A star at the ecliptic pole with parallax p traces a circle of radius p over a year.
    pole = SkyCoord(lon=0 * u.deg, lat=90 * u.deg, frame="barycentrictrueecliptic").icrs
    mjd = 60000.0 + np.linspace(0, 365.25, 13)
    obs = observer_barycentric(mjd)
    r, d = propagate(pole.ra.deg, pole.dec.deg, 0.0, 0.0, 500.0, ref_epoch=2016.0, epoch=2016.0, observer=obs)
    sep = SkyCoord(r * u.deg, d * u.deg).separation(pole).to(u.mas).value
    np.testing.assert_allclose(sep, 500.0 * np.linalg.norm(obs, axis=1), rtol=2e-3)


# --- layout -------------------------------------------------------------------------------
def test_prepare_piece_sorts_and_checks_the_pixel(tmp_path):
    t = catalog_for_pixels([1000], seed=SEED, **DENSITY)
    piece = prepare_piece(t, nside=CATALOG_NSIDE, pixel=1000, row_group_size=ROW_GROUP)
    fine = piece.column(FINE_COLUMN).to_numpy()
    assert (np.diff(fine) >= 0).all() and piece.num_rows == t.num_rows
    np.testing.assert_array_equal(fine >> (2 * (FINE_ORDER - 4)), 1000)
    np.testing.assert_array_equal(fine, fine_index(piece.column("ra").to_numpy(), piece.column("dec").to_numpy()))
    assert sorted(piece.column("source_id").to_pylist()) == sorted(t.column("source_id").to_pylist())
    assert piece.schema.field(FINE_COLUMN).metadata[b"order"] == str(FINE_ORDER).encode()
    # The repository's writer honours the piece's row-group size.
    repo = open_repository(tmp_path / "repo", create=True)
    path = repo.write_table("refcat", piece, key="hpx1000", partition={"healpix16": 1000})
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups == math.ceil(t.num_rows / ROW_GROUP) > 1
    with pytest.raises(StepError, match="outside partition pixel 1001"):
        prepare_piece(t, nside=CATALOG_NSIDE, pixel=1001)


# --- queries --------------------------------------------------------------------------------
def _square(ra, dec, side, angle=0.0):
    """Corners [deg] of a square of ``side`` [deg] centred at (ra, dec), rotated by ``angle`` [deg]."""
    w = WCS(naxis=2)
    w.wcs.ctype, w.wcs.crval = ["RA---TAN", "DEC--TAN"], [ra, dec]
    w.wcs.crpix, w.wcs.cdelt = [1, 1], [1.0, 1.0]
    h = math.tan(math.radians(side / 2)) * 180 / math.pi  # intermediate coordinates [deg]
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    xy = np.array([[-h, -h], [h, -h], [h, h], [-h, h]]) @ np.array([[c, s], [-s, c]])
    return w.wcs_pix2world(xy, 0)


def _inside(ra, dec, corners) -> np.ndarray:
    """Brute force: points inside a great-circle polygon, in its own gnomonic projection."""
    x, y, z = SkyCoord(corners[:, 0] * u.deg, corners[:, 1] * u.deg).cartesian.xyz.value.mean(axis=1)
    lon, lat = math.degrees(math.atan2(y, x)), math.degrees(math.atan2(z, math.hypot(x, y)))
    w = WCS(naxis=2)
    w.wcs.ctype, w.wcs.crval = ["RA---TAN", "DEC--TAN"], [lon, lat]
    w.wcs.crpix, w.wcs.cdelt = [1, 1], [1.0, 1.0]
    near = SkyCoord(ra * u.deg, dec * u.deg).separation(SkyCoord(lon * u.deg, lat * u.deg)).deg < 45
    inside = np.zeros(ra.size, bool)
    xy = w.wcs_world2pix(np.column_stack([ra[near], dec[near]]), 0)
    inside[near] = Path(w.wcs_world2pix(corners, 0)).contains_points(xy)
    return inside


# Regions: a target group (4 exposures x 2 detectors, small slews), a footprint across
# RA = 0 and two at the north pole (one containing it).
GROUP = [_square(150.0 + 0.28 * k, 30.0 + 0.05 * k, 3.5, 20.0 + d) for k in range(4) for d in (0.0, 0.3)]
ACROSS_ZERO = [_square(0.4, -12.0, 3.5, 35.0)]
POLE = [_square(45.0, 89.0, 3.5, 10.0), _square(200.0, 87.5, 2.0, 0.0)]
REGIONS = {"group": GROUP, "ra0": ACROSS_ZERO, "pole": POLE}


@pytest.fixture(scope="module")
def refcat(tmp_path_factory):
    """The default-layout catalogue of every partition pixel near the regions, in a repository."""
    pixels = np.unique(np.concatenate([
        pixels_in_footprint(150.5, 30.0, 5.0), pixels_in_footprint(0.4, -12.0, 5.0), pixels_in_footprint(0, 90, 6.0),
    ]))
    repo = open_repository(tmp_path_factory.mktemp("refcat") / "repo", create=True)
    tables = []
    for p in pixels:
        t = catalog_for_pixels([p], seed=SEED, **DENSITY)
        tables.append(t)
        repo.write_table("refcat", prepare_piece(t, nside=CATALOG_NSIDE, pixel=int(p), row_group_size=ROW_GROUP),
                         key=f"hpx{p}", partition={"healpix16": int(p)})
    dataset = pads.dataset(repo.table_path("refcat"), format="parquet", partitioning="hive")
    return dataset, pa.concat_tables(tables), pixels


@pytest.mark.parametrize("region", list(REGIONS))
def test_query_matches_brute_force(refcat, region):
    dataset, full, pixels = refcat
    footprints = REGIONS[region]
    ra, dec = full.column("ra").to_numpy(), full.column("dec").to_numpy()
    ids = full.column("source_id").to_numpy()
    expected = ids[np.any([_inside(ra, dec, f) for f in footprints], axis=0)]
    table, stats = query_catalog(dataset, footprints=footprints, epoch=2016.0, margin=0.0)
    got = table.column("source_id").to_numpy()
    print(f"{region}: {got.size} sources, {stats}")
    assert got.size > 500 and np.array_equal(np.sort(got), np.sort(expected))
    assert np.array_equal(got, np.sort(got))  # ordered by source_id
    # Only some partitions and row groups are read.
    touched = np.unique(got >> 24)
    assert touched.size <= stats.partitions < stats.partitions_total == pixels.size
    assert stats.rows_returned == got.size < stats.rows_read < full.num_rows
    assert stats.row_groups < sum(f.metadata.num_row_groups for f in dataset.get_fragments())
    # The same from the in-memory table (with and without its partition column).
    with_part = full.append_column("healpix16", pa.array(ids >> 24))
    for t in (full, with_part):
        mem, _ = query_catalog(t, footprints=footprints, epoch=2016.0, margin=0.0)
        assert np.array_equal(mem.column("source_id").to_numpy(), got)


def test_only_the_partitions_near_the_footprint_are_read(refcat):
    dataset, full, _ = refcat
    pixel = hp.ang2pix(16, 150.3, 29.0, nest=True, lonlat=True)
    # Around the centre of one of its order-6 grandchildren: a 16th of the partition.
    corners = _square(*hp.pix2ang(64, pixel * 16 + 9, nest=True, lonlat=True), 0.4)
    ra, dec = corners.T
    assert (hp.ang2pix(16, ra, dec, nest=True, lonlat=True) == pixel).all()
    table, stats = query_catalog(dataset, footprints=[corners], epoch=2016.0, margin=0.0)
    in_pixel = int(((full.column("source_id").to_numpy() >> 24) == pixel).sum())
    assert stats.partitions == 1 and (table.column("healpix16").to_numpy() == pixel).all()
    assert stats.rows_read < in_pixel / 3  # row groups pruned inside the partition
    assert isinstance(stats, QueryStats) and stats.seconds > 0


def test_margin_grows_the_footprint(refcat):
    dataset, full, _ = refcat
    corners = _square(0.4, -12.0, 2.0, 35.0)
    margin = 0.1
    table, _ = query_catalog(dataset, footprints=[corners], epoch=2016.0, margin=margin)
    got = set(table.column("source_id").to_pylist())
    ra, dec = full.column("ra").to_numpy(), full.column("dec").to_numpy()
    ids = full.column("source_id").to_numpy()
    # Distance to the footprint from its edges sampled every ~3.6" (great circles are
    # straight in the gnomonic plane of _inside's WCS, so sample there).
    inside = _inside(ra, dec, corners)
    w = WCS(naxis=2)
    w.wcs.ctype, w.wcs.crval = ["RA---TAN", "DEC--TAN"], [0.4, -12.0]
    w.wcs.crpix, w.wcs.cdelt = [1, 1], [1.0, 1.0]
    xy = w.wcs_world2pix(corners, 0)
    t = np.linspace(0, 1, 2000)[:, None]
    edge = np.concatenate([xy[i] + t * (xy[(i + 1) % 4] - xy[i]) for i in range(4)])
    border = SkyCoord(*(w.wcs_pix2world(edge, 0).T * u.deg))
    near = SkyCoord(ra * u.deg, dec * u.deg).separation(SkyCoord(0.4 * u.deg, -12.0 * u.deg)).deg < 3
    dist = np.full(ra.size, np.inf)
    _, sep, _ = SkyCoord(ra[near] * u.deg, dec[near] * u.deg).match_to_catalog_sky(border)
    dist[near] = sep.deg
    must = set(ids[inside | (dist < margin - 0.001)].tolist())
    may = set(ids[inside | (dist < margin * 1.5)].tolist())  # mitred corners reach margin * sqrt(2)
    assert must <= got <= may and len(got - set(ids[inside].tolist())) > 20


def test_positions_are_moved_to_the_epoch(refcat):
    dataset, full, _ = refcat
    observer = observer_barycentric(61200.0)
    table, _ = query_catalog(dataset, footprints=GROUP, epoch=2026.75, observer=observer)
    stored, _ = query_catalog(dataset, footprints=GROUP, epoch=2026.75, observer=observer, margin=1 / 60)
    for name in ("source_id", "ra", "dec"):  # the default margin is 1'
        assert table.column(name).equals(stored.column(name))
    ids = table.column("source_id").to_numpy()
    src = full.take(pa.array(np.searchsorted(full.column("source_id").to_numpy(), ids)))
    assert np.array_equal(src.column("source_id").to_numpy(), ids)
    c = {n: src.column(n).to_numpy() for n in ("ra", "dec", "pmra", "pmdec", "parallax")}
    r, d = propagate(c["ra"], c["dec"], c["pmra"], c["pmdec"], c["parallax"], ref_epoch=2016.0, epoch=2026.75,
                     observer=observer)
    np.testing.assert_array_equal(table.column("ra").to_numpy(), r)
    np.testing.assert_array_equal(table.column("dec").to_numpy(), d)
    assert (table.column("ref_epoch").to_numpy() == 2026.75).all()
    star = src.column("kind").to_numpy() == 0
    assert (table.column("ra").to_numpy()[star] != c["ra"][star]).mean() > 0.99  # stars moved
    assert (table.column("ra").to_numpy()[~star] == c["ra"][~star]).all()  # galaxies did not
    for name in ("pmra", "pmdec", "parallax", "mag_ab", "flux_2um", "pos_error"):
        assert table.column(name).equals(src.column(name)), name
    assert table.schema.field("ra").metadata == CATALOG_SCHEMA.field("ra").metadata
    sub, _ = query_catalog(dataset, footprints=GROUP, epoch=2026.75, observer=observer, columns=["source_id", "ra"])
    assert sub.column_names == ["source_id", "ra"] and sub.column("ra").equals(table.column("ra"))


def test_corners_along_an_edge_and_either_direction(refcat):
    dataset, _, _ = refcat
    corners = ACROSS_ZERO[0]
    mid = SkyCoord(corners[:2, 0] * u.deg, corners[:2, 1] * u.deg).cartesian.xyz.value.sum(axis=1)
    mid = SkyCoord(CartesianRepresentation(mid), frame="icrs")
    five = np.insert(corners, 1, [mid.ra.deg, mid.dec.deg], axis=0)  # a corner on the first edge
    base, _ = query_catalog(dataset, footprints=[corners], epoch=2016.0, margin=0.05)
    for other in (five, corners[::-1]):
        table, _ = query_catalog(dataset, footprints=[other], epoch=2016.0, margin=0.05)
        assert table.column("source_id").equals(base.column("source_id"))


def test_empty_region_gives_an_empty_table(refcat):
    dataset, _, _ = refcat
    for footprints in ([], [_square(250.0, -40.0, 3.0)]):  # nothing asked; no partition there
        table, stats = query_catalog(dataset, footprints=footprints, epoch=2020.0)
        assert table.num_rows == 0 and table.schema.equals(dataset.schema, check_metadata=False)
        assert stats.partitions == stats.rows_read == stats.rows_returned == 0


def test_bad_catalogues_and_footprints(refcat, tmp_path):
    dataset, full, _ = refcat
    pq.write_table(full.slice(0, 100), tmp_path / "flat.parquet")
    flat = pads.dataset(tmp_path / "flat.parquet")
    with pytest.raises(StepError, match="partition column"):
        query_catalog(flat, footprints=GROUP, epoch=2020.0)
    with pytest.raises(StepError, match="pmdec"):
        query_catalog(full.drop_columns(["pmdec"]), footprints=GROUP, epoch=2020.0)
    with pytest.raises(StepError, match="nonesuch"):
        query_catalog(dataset, footprints=GROUP, epoch=2020.0, columns=["ra", "nonesuch"])
    bowtie = np.array([[10.0, 10.0], [12.0, 12.0], [12.0, 10.0], [10.0, 12.0]])
    with pytest.raises(StepError, match=r"footprints\[1\]: is not a convex"):
        query_catalog(dataset, footprints=[GROUP[0], bowtie], epoch=2020.0)
    for bad, match in (([np.zeros((2, 2))], "footprints"), ([[[0, 95], [1, 0], [2, 0]]], "Dec"),
                       (GROUP[0], "sequence")):
        with pytest.raises(StepError, match=match):
            query_catalog(dataset, footprints=bad, epoch=2020.0)
    with pytest.raises(StepError, match="margin"):
        query_catalog(dataset, footprints=GROUP, epoch=2020.0, margin=-1.0)
    with pytest.raises(StepError, match="observer"):
        query_catalog(dataset, footprints=GROUP, epoch=2020.0, observer=[1.0, 0.0])
