"""SPHEREx Level 2 spectral-image FITS: export, import, cutouts, archive compatibility."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits
from astropy.wcs import WCS

from sphx.errors import FitsFormatError
from sphx.io.fits import headers as H
from sphx.io.fits import raw
from sphx.io.fits.read import open_spectral_images, read_psf
from sphx.io.fits.spectral_image import (
    FITS_VERSION,
    HDU_ORDER,
    cutout,
    export_level,
    spectral_image_filename,
    write_spectral_image,
)
from sphx.testing import raise_if_dask_computes
from sphx.wcs import cube_wcs

REF = Path("/work/shared/reference/spherex-headers")
pytestmark = pytest.mark.filterwarnings("ignore::astropy.utils.exceptions.AstropyWarning")


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    import sphx
    from sphx.pipeline.runner import run_recipe
    from sphx.simulate import simulate_survey

    tmp = tmp_path_factory.mktemp("fits")
    repo = simulate_survey(
        {"instrument": "SPHEREx-small", "seed": 6, "bands": [1, 4], "survey": {"n_exposures": 2}}, tmp / "repo"
    ).repository
    run_recipe(Path(sphx.__file__).parent / "recipes" / "l1-l2.yaml", repo, profile="synchronous", progress=False, log=lambda s: None)
    l2 = repo.open_level("l2")
    cal = {k: repo.open_calibration(k) for k in ("average_psf", "spectral_wcs", "solid_angle_pixel_map")}
    paths = export_level(l2, tmp / "out", psf=cal["average_psf"], spectral_wcs=cal["spectral_wcs"],
                         sapm=cal["solid_angle_pixel_map"])
    return {"l2": l2, "cal": cal, "paths": paths, "tmp": tmp}


def _wcs(header, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return WCS(header, **kw)


def test_layout_and_units(sim):
    assert len(sim["paths"]) == 4
    for p in sim["paths"]:
        assert p.name.startswith("level2_2025W") and "_spx_l2b-v1-" in p.name
        with fits.open(p) as h:
            assert [x.name for x in h] == list(HDU_ORDER)
            assert h[0].data is None and h[0].header["VERSION"] == FITS_VERSION
            assert h["IMAGE"].data.dtype == np.dtype(">f4") and h["FLAGS"].data.dtype == np.dtype(">i4")
            assert h["FLAGS"].header["EXTTYPE"] == "MASK"
            assert h["PSF"].data.shape == (121, 101, 101) and h["PSF"].header["OVERSAMP"] == 10
            assert [k for k in h["PSF"].header if k.startswith("XCT")] == [f"XCTR_{i}" for i in range(1, 122)]
            assert "(1, 0)" in h["PSF"].header.comments["XCTR_2"]
            assert h["WCS-WAVE"].header["TDIM3"].startswith("(2,")
            for name in ("IMAGE", "FLAGS", "VARIANCE", "ZODI"):
                u.Unit(h[name].header["BUNIT"])  # parses
            assert u.Unit(h["IMAGE"].header["BUNIT"]) == u.MJy / u.sr
            assert u.Unit(h["VARIANCE"].header["BUNIT"]) == (u.MJy / u.sr) ** 2
    from packaging.version import Version

    assert Version(FITS_VERSION) > Version("6.5.5")
    assert spectral_image_filename("2025W51_1A_0684_2", 3, version=12).startswith("level2_2025W51_1A_0684_2D3_spx_l2b-v12-")


def test_real_keyword_sets_present(sim):
    real_image = fits.Header.fromtextfile(REF / "qr2_l2_image_header.txt")
    real_flags = fits.Header.fromtextfile(REF / "qr2_l2_flags_header.txt")
    with fits.open(sim["paths"][0]) as h:
        assert set(real_image.keys()) - set(h["IMAGE"].header.keys()) == set()
        assert set(real_flags.keys()) - set(h["FLAGS"].header.keys()) == set()


def test_round_trip(sim):
    l2 = sim["l2"]
    ds = open_spectral_images(sim["paths"])
    assert list(ds.band.values) == list(l2.band.values) and list(ds.obs.values) == list(l2.obs.values)
    for name in ("IMAGE", "VARIANCE", "ZODI", "FLAGS"):
        assert ds[name].dtype == l2[name].dtype
        np.testing.assert_array_equal(ds[name].values, l2[name].values)
    for name in ("wcs_crpix", "wcs_crval", "wcs_cd", "wcs_sip_a", "wcs_sip_b", "wcs_sip_ap", "wcs_sip_bp",
                 "source_fraction", "mjd_beg", "mjd_avg", "mjd_end", "xposure", "telapse", "sc_position",
                 "sc_velocity", "sgt_lat", "planned_elon", "astrometry_rms", "stat_median"):
        np.testing.assert_allclose(ds[name].values, l2[name].values, rtol=1e-13, atol=0, err_msg=name)
    for name in ("finast", "l1dqa_pass", "l2dqa_pass", "n_tran_nb", "n_pers_nb", "n_transient", "target",
                 "astrometry_nmatch"):
        np.testing.assert_array_equal(ds[name].values, l2[name].values, err_msg=name)
    assert list(ds.obsid.values) == list(l2.obsid.values)
    assert list(ds.sps_flags.values) == list(l2.sps_flags.values)
    np.testing.assert_array_equal(ds.flag_count.sel(flag=l2.flag.values).values, l2.flag_count.values)
    # HISTORY cards hold 72 characters; astropy wraps longer lines onto further cards.
    # (wrapping drops the space at the break, so compare without blanks).
    strip = lambda lines: "".join(lines).replace(" ", "")
    assert strip(ds.attrs["history"]) == strip(l2.attrs["history"])


def test_astropy_wcs(sim):
    l2, swcs = sim["l2"], sim["cal"]["spectral_wcs"]
    yy, xx = np.mgrid[0:248:9, 0:248:9]
    for p in sim["paths"]:
        with fits.open(p) as h:
            hdr = h["IMAGE"].header
            band, obs = hdr["DETECTOR"], int(str(hdr["EXPIDN"])[:-1])
            w = _wcs(hdr, fobj=h, key="W")
            w.sip = None
            wl, bw = w.pixel_to_world(xx, yy)
            cw = swcs.CWAVE.sel(band=band).values[yy, xx]
            cb = swcs.CBAND.sel(band=band).values[yy, xx]
            assert np.abs(wl.to_value(u.um) - cw).max() < 1e-3
            assert np.abs(bw.to_value(u.um) - cb).max() < 1e-3
            a = _wcs(hdr, key="A")
            a.sip = None
            dx, dy = a.pixel_to_world_values(xx, yy)
            np.testing.assert_allclose(dx, xx) and np.testing.assert_allclose(dy, yy)
            sky = _wcs(hdr).pixel_to_world(xx, yy)
            ref = cube_wcs(l2, band=band, obs=obs).pixel_to_world(xx, yy)
            assert sky.separation(ref).to_value(u.arcsec).max() < 0.01


def test_real_headers_parse():
    real = fits.Header.fromtextfile(REF / "qr2_l2_image_header.txt")
    meta = H.header_to_meta(real)
    assert meta["obsid"] == "2025W51_1A_0684_2" and meta["detector"] == 3
    assert meta["mjd_beg"] == pytest.approx(61027.214984375) and meta["xposure"] == pytest.approx(113.5826)
    # Cutout origin (1292, 863) from the A WCS -> reference pixel in the detector frame.
    assert H.origin_from_header(real) == (1292, 863)
    np.testing.assert_allclose(meta["wcs_crpix"], [-271.5 + 1292, 157.5 + 863])
    assert meta["wcs_sip_a"][0, 0] == pytest.approx(-0.358887901781)
    assert meta["flag_count"]["SOURCE"] == 2939926 and meta["l2dqa_pass"] and meta["finast"] == 0
    # The sky WCS rebuilt from our metadata matches astropy's reading of the real header.
    from sphx.wcs import arrays_to_wcs

    ours = arrays_to_wcs(meta["wcs_crpix"], meta["wcs_crval"], meta["wcs_cd"], meta["wcs_sip_a"],
                         meta["wcs_sip_b"], meta["wcs_sip_ap"], meta["wcs_sip_bp"])
    theirs = _wcs(real)
    a = ours.pixel_to_world(np.array([1300.0 + 1, 1350.0]), np.array([870.0 + 1, 900.0]))
    b = theirs.pixel_to_world(np.array([1300.0 + 1 - 1292, 1350.0 - 1292]), np.array([870.0 + 1 - 863, 900.0 - 863]))
    assert a.separation(b).to_value(u.arcsec).max() < 1e-6
    flags = fits.Header.fromtextfile(REF / "qr2_l2_flags_header.txt")
    bits = H.flag_bits_from_header(flags)
    assert bits["SOURCE"] == 21 and bits["HALO"] == 28 and len(bits) == 22


def test_cutout(sim, tmp_path):
    parent = sim["paths"][1]
    box = (30, 50, 40, 25)
    cut = cutout(parent, box=box)
    out = tmp_path / "cut.fits"
    cut.writeto(out)
    x0, y0, nx, ny = box
    with fits.open(parent) as hp, fits.open(out) as hc:
        assert [x.name for x in hc] == list(HDU_ORDER)
        for name in ("IMAGE", "FLAGS", "VARIANCE", "ZODI"):
            np.testing.assert_array_equal(hc[name].data, hp[name].data[y0:y0 + ny, x0:x0 + nx])
        np.testing.assert_array_equal(hc["PSF"].data, hp["PSF"].data)
        yy, xx = np.mgrid[0:ny:4, 0:nx:5]
        hpi, hci = hp["IMAGE"].header, hc["IMAGE"].header
        s1 = _wcs(hci).pixel_to_world(xx, yy)
        s0 = _wcs(hpi).pixel_to_world(xx + x0, yy + y0)
        assert s1.separation(s0).to_value(u.arcsec).max() < 1e-6
        a = _wcs(hci, key="A")
        a.sip = None
        np.testing.assert_allclose(a.pixel_to_world_values(xx, yy), [xx + x0, yy + y0])
        w1, w0 = _wcs(hci, fobj=hc, key="W"), _wcs(hpi, fobj=hp, key="W")
        w1.sip = w0.sip = None
        l1, b1 = w1.pixel_to_world_values(xx, yy)
        l0, b0 = w0.pixel_to_world_values(xx + x0, yy + y0)
        np.testing.assert_allclose(l1, l0, atol=1e-6) and np.testing.assert_allclose(b1, b0, atol=1e-6)
    # Reading a cutout puts it at its detector pixels.
    ds = open_spectral_images([out])
    assert int(ds.x[0]) == x0 and int(ds.y[0]) == y0 and ds.sizes["x"] == nx
    full = open_spectral_images([parent])
    np.testing.assert_allclose(ds.wcs_crpix.values, full.wcs_crpix.values, rtol=1e-14)
    # A sky-centred cutout follows IRSA's window rule.
    with fits.open(parent) as hp:
        ra, dec = _wcs(hp["IMAGE"].header).pixel_to_world_values(100.0, 120.0)
    c = cutout(parent, center=(ra, dec), size=10 * 6.15 * u.arcsec)
    assert c["IMAGE"].data.shape == (10, 10) and H.origin_from_header(c["IMAGE"].header) == (96, 116)


def test_lazy_open(sim):
    with raise_if_dask_computes():
        ds = open_spectral_images(sim["paths"])
    import dask.array as da

    for name in ("IMAGE", "VARIANCE", "ZODI", "FLAGS", "psf"):
        assert isinstance(ds[name].data, da.Array)


def _yfast_copy(src: Path, dst: Path, version: str) -> None:
    """A copy whose PSF zone keywords are y-fast (the QR2 erratum) with the given VERSION."""
    with fits.open(src) as h:
        h[0].header["VERSION"] = version
        ph = h["PSF"].header
        n, nx = ph["NAXIS3"], 11
        ny = n // nx
        vals = {k: [ph[f"{k}_{i + 1}"] for i in range(n)] for k in ("XCTR", "YCTR", "XWID", "YWID")}
        for j in range(n):  # card j describes zone (j // ny, j % ny)
            ix, iy = j // ny, j % ny
            p = iy * nx + ix
            for k in vals:
                ph[f"{k}_{j + 1}"] = (vals[k][p], f"Center of {k[0].lower()} zone ({ix}, {iy})")
        h.writeto(dst)


def test_psf_erratum(sim, tmp_path):
    src = sim["paths"][0]
    truth = read_psf(src)
    _yfast_copy(src, tmp_path / "old.fits", "6.5.5")
    _yfast_copy(src, tmp_path / "fixed.fits", "6.5.5+psffix1")
    old, fixed = read_psf(tmp_path / "old.fits"), read_psf(tmp_path / "fixed.fits")
    np.testing.assert_array_equal(old.zone_x.values, truth.zone_x.values)
    np.testing.assert_array_equal(old.zone_y.values, truth.zone_y.values)
    # psffix1 files are taken as they are (here: deliberately y-fast, so they differ).
    assert not np.array_equal(fixed.zone_x.values, truth.zone_x.values)
    ds = open_spectral_images([tmp_path / "old.fits"])
    np.testing.assert_array_equal(ds.psf_zone_x.values[0, 0], truth.zone_x.values)


def _qr3_copy(src: Path, dst: Path) -> None:
    """A QR3-style file: RICE FLAGS, MSKN flag names, EPSF table (21x21 zones, 5x)."""
    with fits.open(src) as h:
        fh = h["FLAGS"].header.copy()
        for k in [k for k in fh if k.startswith("MP_")]:
            bit = fh[k]
            del fh[k]
            fh[f"MSKN{bit:04d}"] = k[3:]
        flags = fits.CompImageHDU(h["FLAGS"].data, header=fh, name="FLAGS", compression_type="RICE_1")
        nz, n = 21, 33
        c = (np.arange(nz) + 0.5) * 248 / nz - 0.5
        zx, zy = np.meshgrid(c, c)
        cols = [
            fits.Column("BINX", "J", array=np.tile(np.arange(nz), nz)),
            fits.Column("BINY", "J", array=np.repeat(np.arange(nz), nz)),
            fits.Column("XCENTER", "E", unit="pixel", array=zx.ravel()),
            fits.Column("YCENTER", "E", unit="pixel", array=zy.ravel()),
            fits.Column("XWIDTH", "E", array=np.full(nz * nz, 248 / nz)),
            fits.Column("YWIDTH", "E", array=np.full(nz * nz, 248 / nz)),
            fits.Column("EPSF", f"{n * n}D", dim=f"({n},{n})", array=np.random.default_rng(1).random((nz * nz, n, n))),
        ]
        epsf = fits.BinTableHDU.from_columns(cols, name="EPSF")
        epsf.header["OVSMPX"] = epsf.header["OVSMPY"] = 5
        h[0].header["VERSION"] = "7.0.5"
        fits.HDUList([h[0], h["IMAGE"], flags, h["VARIANCE"], h["ZODI"], epsf, h["WCS-WAVE"]]).writeto(dst)


def test_qr3_file(sim, tmp_path):
    src = sim["paths"][0]
    _qr3_copy(src, tmp_path / "qr3.fits")
    with raise_if_dask_computes():
        ds = open_spectral_images([tmp_path / "qr3.fits"])
    ref = open_spectral_images([src])
    np.testing.assert_array_equal(ds.FLAGS.values, ref.FLAGS.values)
    assert ds.psf.shape[-3:] == (441, 33, 33) and ds.psf.attrs["oversampling"] == 5
    assert np.isfinite(ds.psf_zone_x.values).all()
    psf = read_psf(tmp_path / "qr3.fits")
    assert psf.PSF.shape == (441, 33, 33) and psf.attrs["layout"] == "QR3"


def test_bad_files(sim, tmp_path):
    src = sim["paths"][0]
    raw = src.read_bytes()
    # truncated
    (tmp_path / "trunc.fits").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(FitsFormatError, match=r"trunc.fits.*truncated"):
        open_spectral_images([tmp_path / "trunc.fits"])
    # missing HDU
    with fits.open(src) as h:
        del h["ZODI"]
        h.writeto(tmp_path / "nozodi.fits")
    with pytest.raises(FitsFormatError, match=r"nozodi.fits.*missing HDU 'ZODI'"):
        open_spectral_images([tmp_path / "nozodi.fits"])
    # wrong shape
    with fits.open(src) as h:
        h["VARIANCE"].data = h["VARIANCE"].data[:10]
        h.writeto(tmp_path / "shape.fits")
    with pytest.raises(FitsFormatError, match=r"shape.fits.*VARIANCE has shape"):
        open_spectral_images([tmp_path / "shape.fits"])
    # unknown flag name
    with fits.open(src) as h:
        h["FLAGS"].header["HIERARCH MP_WOBBLE"] = 3
        h.writeto(tmp_path / "flag.fits")
    with pytest.raises(FitsFormatError, match=r"flag.fits.*unknown flag name 'WOBBLE'"):
        open_spectral_images([tmp_path / "flag.fits"])
    # not SPHEREx
    fits.HDUList([fits.PrimaryHDU(np.zeros((4, 4)))]).writeto(tmp_path / "other.fits")
    with pytest.raises(FitsFormatError, match=r"other.fits.*not a SPHEREx"):
        open_spectral_images([tmp_path / "other.fits"])
    # not FITS at all
    (tmp_path / "junk.fits").write_bytes(b"hello" * 100)
    with pytest.raises(FitsFormatError, match=r"junk.fits"):
        open_spectral_images([tmp_path / "junk.fits"])


def test_atomic_write(sim, tmp_path, monkeypatch):
    l2 = sim["l2"]
    target = tmp_path / "a.fits"

    def boom(fileobj, *args, **kwargs):
        fileobj.write(b"SIMPLE  =" + b" " * 2871)  # half-written
        raise RuntimeError("disk full")

    monkeypatch.setattr(raw, "write_fits", boom)
    with pytest.raises(RuntimeError):
        write_spectral_image(l2, target, band=1, obs=int(l2.obs[0]))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    write_spectral_image(l2, target, band=1, obs=str(l2.obsid.values[0]))
    with pytest.raises(FileExistsError):
        write_spectral_image(l2, target, band=1, obs=int(l2.obs[0]))
