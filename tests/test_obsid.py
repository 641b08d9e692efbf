import pytest
from astropy.io.fits import Header

from sphx.errors import ObservationIdError
from sphx.obsid import expidn, obs_key, obsid_from_key, parse_obsid

from .conftest import DATA


def test_expidn_of_the_real_header():
    h = Header.fromtextfile(DATA / "qr2_l2_image_header.txt")
    assert expidn(h["OBSID"], h["DETECTOR"]) == h["EXPIDN"] == 202551101068423


def test_documented_expidn_example():
    assert expidn("2026W30_1B_0001_1", 1) == 202630102000111


def test_parse_and_invert():
    o = parse_obsid("2025W51_1A_0684_2")
    assert (o.year, o.week, o.period, o.letter, o.target, o.step) == (2025, 51, 1, "A", 684, 2)
    assert o.planning_period == "2025W51_1A" and str(o) == "2025W51_1A_0684_2"
    assert obsid_from_key(obs_key("2026W30_1B_0001_1")) == "2026W30_1B_0001_1"


@pytest.mark.parametrize("bad", ["2025W51_1A_684_2", "2025-51_1A_0684_2", "", "2025W51_1a_0684_2", 5])
def test_invalid_ids_are_named(bad):
    with pytest.raises(ObservationIdError, match="SPHEREx form"):
        obs_key(bad)
