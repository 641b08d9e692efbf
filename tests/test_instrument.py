import numpy as np
import pytest

from sphx import SPHEREX, SPHEREX_SMALL, Instrument
from sphx.errors import InstrumentError


def test_real_geometry_is_the_default():
    bands = {b.number: (b.wavelength_min, b.wavelength_max, b.resolving_power) for b in SPHEREX.bands}
    assert bands == {
        1: (0.75, 1.09, 39.0), 2: (1.10, 1.62, 41.0), 3: (1.63, 2.41, 41.0),
        4: (2.42, 3.82, 35.0), 5: (3.83, 4.41, 112.0), 6: (4.42, 5.00, 128.0),
    }
    assert (SPHEREX.n_active, SPHEREX.n_reference, SPHEREX.n_raw) == (2040, 4, 2048)
    assert (SPHEREX.n_readout_channels, SPHEREX.readout_channel_width, SPHEREX.n_phantom) == (32, 64, 4)
    assert SPHEREX.pixel_scale == 6.15 and SPHEREX.frame_time == 1.5349
    assert SPHEREX.exposure_time == pytest.approx(113.5826, abs=1e-9)  # XPOSURE of the real header
    assert SPHEREX.elapsed_time == pytest.approx(118.1873, abs=1e-9)  # TELAPSE
    assert sum(SPHEREX.n_spectral_channels for _ in SPHEREX.bands) == 102


def test_dichroic_pairs_and_mwir_flip():
    pairs = {b.number: b.dichroic_partner for b in SPHEREX.bands}
    assert pairs == {1: 4, 2: 5, 3: 6, 4: 1, 5: 2, 6: 3}
    assert [b.flipped_x for b in SPHEREX.bands] == [False] * 3 + [True] * 3
    assert [b.array for b in SPHEREX.bands] == ["SWIR"] * 3 + ["MWIR"] * 3


def test_readout_channels_account_for_border_and_flip():
    x = np.array([-4, -1, 0, 59, 60, 123, 124, 1979, 1980, 2043])
    np.testing.assert_array_equal(SPHEREX.readout_channel(1, x), [0, 0, 0, 0, 1, 1, 2, 30, 31, 31])
    np.testing.assert_array_equal(SPHEREX.readout_channel(4, x), [31, 31, 31, 31, 30, 30, 29, 1, 0, 0])
    counts = np.bincount(SPHEREX.readout_channel(2, SPHEREX.pixel_coords(reference_pixels=True)))
    assert counts.tolist() == [64] * 32
    with pytest.raises(InstrumentError, match="columns outside"):
        SPHEREX.readout_channel(1, np.array([2044]))


def test_small_geometry_keeps_the_structure():
    s = SPHEREX_SMALL
    assert s.n_raw == s.n_readout_channels * s.readout_channel_width == 256
    assert s.n_active == 248 and s.n_reference == SPHEREX.n_reference
    assert s.n_readout_channels == 32 and s.n_phantom == 4
    assert s.bands == SPHEREX.bands and s.n_spectral_channels == 17
    first = s.readout_channel(1, s.pixel_coords(reference_pixels=True))
    assert np.count_nonzero(first == 0) == s.readout_channel_width  # channel 0: border + active columns
    assert np.array_equal(s.pixel_coords(reference_pixels=False), np.arange(248))


def test_spectral_layout():
    for b in SPHEREX.bands:
        edges = SPHEREX.channel_edges(b.number)
        assert edges.size == 18 and np.all(np.diff(edges) > 0)
        assert edges[0] == pytest.approx(b.wavelength_min) and edges[-1] == pytest.approx(b.wavelength_max)
        centers = SPHEREX.channel_centers(b.number)
        assert centers.size == 17 and np.all((edges[:-1] < centers) & (centers < edges[1:]))
        lam = SPHEREX.nominal_wavelength(b.number, np.arange(-4, 2044))
        assert np.isnan(lam[:4]).all() and np.isnan(lam[-4:]).all()
        inner = lam[4:-4]
        assert np.all(np.diff(inner) < 0)
        assert b.wavelength_min < inner.min() < inner.max() < b.wavelength_max


def test_impossible_geometry_is_refused():
    with pytest.raises(InstrumentError, match="readout channels"):
        Instrument(name="bad", bands=SPHEREX.bands, n_active=2000)
    with pytest.raises(InstrumentError, match="dichroic partner"):
        Instrument(name="bad", bands=SPHEREX.bands[:3])
    with pytest.raises(InstrumentError, match="no band 7"):
        SPHEREX.band(7)


def test_serialisation_round_trip():
    for inst in (SPHEREX, SPHEREX_SMALL):
        assert Instrument.from_dict(inst.to_dict()) == inst
    with pytest.raises(InstrumentError, match="unknown instrument fields"):
        Instrument.from_dict({**SPHEREX.to_dict(), "n_legs": 3})
