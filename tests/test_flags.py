import dask.array as da
import numpy as np
import pytest
import xarray as xr
from astropy.io.fits import Header

from sphx import flags
from sphx.flags import Flag
from sphx.testing import raise_if_dask_computes

from .conftest import DATA


def test_registry_matches_the_real_flags_header():
    header = Header.fromtextfile(DATA / "qr2_l2_flags_header.txt")
    real = {k[3:]: (header[k], header.comments[k]) for k in header if k.startswith("MP_")}
    ours = {f.name: (f.bit, f.description) for f in flags.REGISTRY if f.release == "QR2"}
    assert ours == real
    qr3 = {f.name: f.bit for f in flags.REGISTRY if f.release == "QR3"}
    assert qr3 == {"CROSSTALK": 20, "STREAK": 25, "SATELLITE_HALO": 29}
    bits = [f.bit for f in flags.REGISTRY]
    assert len(set(bits)) == len(bits) and not {3, 8, 13, 16, 18} & set(bits)


def test_mask_describe_and_lookup():
    assert int(flags.mask("HOT", "COLD")) == (1 << 10) | (1 << 11)
    assert flags.mask(Flag.PERSIST, "outlier") == Flag.PERSIST | Flag.OUTLIER
    assert flags.describe((1 << 21) | 1) == ["TRANSIENT", "SOURCE"]
    assert flags.flag_info(1 << 17).name == "PERSIST"
    with pytest.raises(KeyError, match="unknown FLAGS bit 'WARM'"):
        flags.mask("WARM")


def test_default_bad_never_contains_source_or_fullsample():
    bad = flags.describe(flags.DEFAULT_BAD)
    assert "SOURCE" not in bad and "FULLSAMPLE" not in bad
    assert {"NONFUNC", "HOT", "COLD", "PERSIST", "OUTLIER", "MISSING_DATA"} <= set(bad)


@pytest.mark.parametrize("backend", ["numpy", "dask", "xarray"])
def test_helpers_work_lazily_on_every_array_type(backend):
    base = np.array([[0, 1 << 21], [1 << 10, (1 << 10) | (1 << 21)]], dtype=np.uint32)
    where = np.array([[True, False], [False, True]])
    wrap = {
        "numpy": lambda a: a,
        "dask": lambda a: da.from_array(a, chunks=1),
        "xarray": lambda a: xr.DataArray(da.from_array(a, chunks=1), dims=("y", "x")),
    }[backend]
    with raise_if_dask_computes():
        flagged = flags.set_flag(wrap(base), wrap(where), "PERSIST")
        hot = flags.test_flag(flagged, "HOT")
        both = flags.test_flag(flagged, ["HOT", "SOURCE"], require="all")
        cleared = flags.clear_flag(flagged, Flag.SOURCE)
    np.testing.assert_array_equal(np.asarray(flagged), base | np.where(where, 1 << 17, 0))
    np.testing.assert_array_equal(np.asarray(hot), [[False, False], [True, True]])
    np.testing.assert_array_equal(np.asarray(both), [[False, False], [False, True]])
    assert not np.any(np.asarray(cleared) & (1 << 21))
    assert np.asarray(flagged).dtype == np.uint32


def test_counts_and_cf_attributes():
    a = np.array([1 << 10, 1 << 10, (1 << 21) | 1, 0], dtype=np.uint32)
    c = flags.counts(a)
    assert c["HOT"] == 2 and c["SOURCE"] == 1 and c["TRANSIENT"] == 1 and c["COLD"] == 0
    attrs = flags.cf_attrs()
    meanings = attrs["flag_meanings"].split()
    assert len(meanings) == len(attrs["flag_masks"]) == len(attrs["flag_descriptions"])
    assert dict(zip(meanings, attrs["flag_masks"], strict=True))["SOURCE"] == 1 << 21
