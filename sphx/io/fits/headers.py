"""Keyword map between a Level 2 exposure cube and SPHEREx spectral-image FITS headers.

Both directions live here so that the writer (:mod:`sphx.io.fits.spectral_image`) and the
reader (:mod:`sphx.io.fits.read`) cannot drift apart. The IMAGE header reproduces the
keyword set, roles and order of a real QR2 IMAGE header (see
``spherex-data-format.md`` section 1.4): identification, on-board readout parameters,
survey plan and spacecraft state, data quality, the TAN-SIP sky WCS, the ``A``
(0-based detector pixel) alternate WCS, time keywords, the ``W`` spectral alternate WCS
and HISTORY. The FLAGS header carries the ``L2 N_<NAME>`` counts, the
``HIERARCH MP_<NAME>`` bit table and a copy of the WCS and time keywords, as the real one.

Cube metadata that has no archive keyword is kept as ``HIERARCH SPHX <name>`` (per-image
variables) and ``HIERARCH SPHX OBS <name>`` (per-observation coordinates) cards, so that a
round trip cube -> FITS -> cube loses nothing; archive readers ignore them.

The per-image metadata travels as a flat ``dict`` ("meta") whose keys are the cube's
variable names (``wcs_crpix``, ``finast``, ``obsid``, ``mjd_beg``, ...).
"""

from __future__ import annotations

import datetime as _dt
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.time import Time

from ... import flags as _flags
from ...obsid import expidn
from . import raw
from .raw import Card

__all__ = [
    "FLAGS_BUNIT",
    "IMAGE_BUNIT",
    "VARIANCE_BUNIT",
    "WAVE_EXTNAME",
    "ZODI_BUNIT",
    "alt_a_cards",
    "build_flags_header",
    "build_image_header",
    "build_plane_header",
    "count_keyword",
    "flag_bits_from_header",
    "flags_header_cards",
    "header_to_meta",
    "image_header_cards",
    "origin_from_header",
    "plane_header_cards",
    "sky_wcs_cards",
    "time_cards",
    "to_header",
    "wave_w_cards",
]

# Units are fixed by the format, never taken from cube attrs (some of those are wrong).
IMAGE_BUNIT = "MJy / sr"
ZODI_BUNIT = "MJy / sr"
# The archive's VARIANCE BUNIT was not observed; this spelling parses with
# astropy.units.Unit (both generic and FITS formats), "(MJy / sr)2" does not.
VARIANCE_BUNIT = "MJy2 / sr2"
FLAGS_BUNIT = ""
WAVE_EXTNAME = "WCS-WAVE"

# ---------------------------------------------------------------------------------------
# Keyword <-> cube-variable tables
# ---------------------------------------------------------------------------------------

# L2 N_<NAME> count keywords whose suffix is not the flag name.
_COUNT_SUFFIX = {"MISSING_DATA": "MISSING"}
# Real IMAGE header counts in file order (FLAGS adds PHANTOM and REFERENCE).
_IMAGE_COUNT_FLAGS = ("NONLINEAR", "PERSIST", "HOT", "COLD")

# Per-observation values written as archive keywords: (keyword, variable, comment).
_OBS_KEYS: tuple[tuple[str, str, str], ...] = (
    ("SPS_TARGET", "target", "Target ID assigned by Survey Planning"),
    ("SPS_FLAGS", "sps_flags", "Flags defined by Survey Planning"),
)
_GROUND_TRACK: tuple[tuple[str, str, str], ...] = (
    ("SGT_LAT_MIDPT", "sgt_lat", "[deg] Ground track latitude at midpoint"),
    ("SGT_LON_MIDPT", "sgt_lon", "[deg] Ground track longitude at midpoint"),
    ("SGT_MIN_GCD2SAA", "saa_distance", "[deg] Closest ground track dist to SAA"),
)
_PLANNED: tuple[tuple[str, str, str], ...] = (
    ("SPS_ELON", "planned_elon", "[deg] Ecliptic longitude of planned telescope boresight"),
    ("SPS_ELAT", "planned_elat", "[deg] Ecliptic latitude of planned telescope boresight"),
    ("SPS_EPA", "planned_pa", "[deg] PA of FP y axis at planned boresight, E of ecl N"),
)
_TIMES = (("BEG", "mjd_beg"), ("AVG", "mjd_avg"), ("END", "mjd_end"))

# Variables mapped onto archive keywords (everything else goes to SPHX cards).
_MAPPED_IMAGE_VARS = {
    "wcs_crpix", "wcs_crval", "wcs_cd", "wcs_sip_a", "wcs_sip_b", "wcs_sip_ap", "wcs_sip_bp",
    "finast", "l1dqa_pass", "l2dqa_pass", "flag_count", "n_tran_nb", "n_pers_nb",
    "source_fraction", "astrometry_nmatch", "psf_fwhm", "omega_median", "omega_stddev",
}
_MAPPED_OBS_VARS = {
    "obsid", "mjd_beg", "mjd_avg", "mjd_end", "xposure", "telapse", "target", "sps_flags",
    "sgt_lat", "sgt_lon", "saa_distance", "planned_elon", "planned_elat", "planned_pa",
    "sc_position", "sc_velocity",
}

_SPHX_IMAGE = "SPHX "
_SPHX_OBS = "SPHX OBS "


def count_keyword(name: str) -> str:
    """The ``L2 N_<NAME>`` keyword (astropy key, without ``HIERARCH``) of one flag."""
    return f"L2 N_{_COUNT_SUFFIX.get(name, name)}"


def _py(value: Any) -> Any:
    """A numpy scalar as the python type astropy writes (bool before int: bool is an int)."""
    if isinstance(value, np.ndarray):
        value = value.item()
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return str(value)


@functools.lru_cache(maxsize=256)  # the same four times go into four headers of an image
def _isot(mjd: float) -> str:
    return Time(float(mjd), format="mjd", scale="utc").isot


# ---------------------------------------------------------------------------------------
# Card blocks
# ---------------------------------------------------------------------------------------


def sky_wcs_cards(meta: Mapping[str, Any], *, origin: tuple[int, int]) -> list[Card]:
    """TAN-SIP celestial WCS with a PC matrix and ``CDELT = 1`` (SIP order 3, A/B/AP/BP).

    ``meta['wcs_crpix']`` is the 1-based FITS reference pixel in the full detector frame;
    the written ``CRPIX`` is relative to the written array, whose first pixel is the
    0-based detector pixel ``origin = (x0, y0)``. Returns no cards for an image without a
    WCS (NaN ``wcs_crval``): FITS headers cannot hold NaN.
    """
    crval = np.asarray(meta["wcs_crval"], dtype=np.float64)
    if not np.all(np.isfinite(crval)):
        return []
    crpix = np.asarray(meta["wcs_crpix"], dtype=np.float64) - np.asarray(origin, dtype=np.float64)
    cd = np.asarray(meta["wcs_cd"], dtype=np.float64)
    cards: list[Card] = [("WCSAXES", 2, "Number of coordinate axes")]
    cards += [(f"CRPIX{i + 1}", float(crpix[i]), "Pixel coordinate of reference point") for i in range(2)]
    cards += [
        (f"PC{i + 1}_{j + 1}", float(cd[i, j]), "Coordinate transformation matrix element")
        for i in range(2) for j in range(2)
    ]
    cards += [(f"CDELT{i}", 1.0, "[deg] Coordinate increment at reference point") for i in (1, 2)]
    cards += [(f"CUNIT{i}", "deg", "Units of coordinate increment and value") for i in (1, 2)]
    cards += [
        ("CTYPE1", "RA---TAN-SIP", "TAN (gnomonic) projection + SIP distortions"),
        ("CTYPE2", "DEC--TAN-SIP", "TAN (gnomonic) projection + SIP distortions"),
    ]
    cards += [(f"CRVAL{i + 1}", float(crval[i]), "[deg] Coordinate value at reference point") for i in range(2)]
    cards += [
        ("LONPOLE", 180.0, "[deg] Native longitude of celestial pole"),
        ("LATPOLE", float(crval[1]), "[deg] Native latitude of celestial pole"),
    ]
    return cards


def sip_cards(meta: Mapping[str, Any]) -> list[Card]:
    """SIP polynomial cards (order 3; every term ``p + q <= 3``, zeros included)."""
    if not np.all(np.isfinite(np.asarray(meta["wcs_crval"], dtype=np.float64))):
        return []
    cards: list[Card] = []
    for key, what in (("A", "axis 0, detector to sky"), ("B", "axis 1, detector to sky"),
                      ("AP", "axis 0, sky to detector"), ("BP", "axis 1, sky to detector")):
        coeffs = np.asarray(meta[f"wcs_sip_{key.lower()}"], dtype=np.float64)
        order = coeffs.shape[0] - 1
        cards.append((f"{key}_ORDER", order, f"SIP polynomial order, {what}"))
        for p in range(order + 1):
            for q in range(order + 1 - p):
                cards.append((f"{key}_{p}_{q}", float(coeffs[p, q]), "SIP distortion coefficient"))
    return cards


def alt_a_cards(*, origin: tuple[int, int]) -> list[Card]:
    """Alternate WCS ``A``: 0-based detector pixel coordinates (``CRPIXnA = 1 - origin``).

    Always written, full frames included (``CRPIXnA = 1``): the IRSA PSF notebook reads
    ``CRPIX1A``/``CRPIX2A`` unconditionally.
    """
    x0, y0 = origin
    return [
        ("WCSAXESA", 2, "Number of coordinate axes"),
        ("CRPIX1A", float(1 - x0), "Pixel coordinate of reference point"),
        ("CRPIX2A", float(1 - y0), "Pixel coordinate of reference point"),
        ("CDELT1A", 1.0, "[pixel] Coordinate increment at reference point"),
        ("CDELT2A", 1.0, "[pixel] Coordinate increment at reference point"),
        ("CUNIT1A", "pixel", "Units of coordinate increment and value"),
        ("CUNIT2A", "pixel", "Units of coordinate increment and value"),
        ("CTYPE1A", "LINEAR", "Coordinate type code"),
        ("CTYPE2A", "LINEAR", "Coordinate type code"),
        ("CRVAL1A", 0.0, "[pixel] Coordinate value at reference point"),
        ("CRVAL2A", 0.0, "[pixel] Coordinate value at reference point"),
        ("LATPOLEA", 90.0, "[deg] Native latitude of celestial pole"),
        ("WCSNAMEA", "0-based active pixel coordinates", "Coordinate system title"),
    ]


def time_cards(meta: Mapping[str, Any], *, with_timesys: bool = True) -> list[Card]:
    """``TIMESYS``, ``DATE-OBS``/``MJD-OBS`` (= start) and ``DATE-``/``MJD-`` BEG/AVG/END,
    ``XPOSURE`` and ``TELAPSE`` [s]. There is no plain ``MJD`` keyword in the archive."""
    cards: list[Card] = [("TIMESYS", "UTC", "Time scale")] if with_timesys else []
    beg = float(meta["mjd_beg"])
    cards += [
        ("DATE-OBS", _isot(beg), "ISO-8601 time of observation"),
        ("MJD-OBS", beg, "[d] MJD of observation"),
    ]
    words = {"BEG": "at start of", "AVG": "at midpoint of", "END": "at end of"}
    for suffix, var in _TIMES:
        mjd = float(meta[var])
        cards += [
            (f"DATE-{suffix}", _isot(mjd), f"ISO-8601 time {words[suffix]} observation"),
            (f"MJD-{suffix}", mjd, f"[d] MJD {words[suffix]} observation"),
        ]
    cards += [
        ("XPOSURE", float(meta["xposure"]), "[s] Exposure (integration) time"),
        ("TELAPSE", float(meta["telapse"]), "[s] Elapsed time (start to stop)"),
    ]
    return cards


def wave_w_cards(*, origin: tuple[int, int], table: str = WAVE_EXTNAME) -> list[Card]:
    """Alternate WCS ``W``: two WAVE-TAB axes looking up the ``WCS-WAVE`` table.

    The exact keywords of the archive (data-format section 1.8). Control points are
    1-based parent-detector pixels, so ``CRPIXnW`` shifts with cutouts like ``CRPIXnA``.
    """
    x0, y0 = origin
    raw = "Lookup table is in raw FITS coordinates"
    tab = "Bilinear lookup table, FITS Paper 3, Sect 6.1"
    return [
        ("WCSAXESW", 2, "Two output axes: wavelength and bandwidth"),
        ("WCSNAMEW", "Approximated per-pixel wavelength and bandwidth", "WCS label"),
        ("CNAME1W", "Wavelength", "First output axis is central wavelength"),
        ("CNAME2W", "Bandwidth", "Second output axis is bandwidth"),
        ("CRPIX1W", float(1 - x0), raw),
        ("CRPIX2W", float(1 - y0), raw),
        ("CDELT1W", 1, f"[pixel] {raw}"),
        ("CDELT2W", 1, f"[pixel] {raw}"),
        ("CUNIT1W", "um", "Wavelength is reported in microns"),
        ("CUNIT2W", "um", "Bandpass is reported in microns"),
        ("CTYPE1W", "WAVE-TAB", tab),
        ("CTYPE2W", "WAVE-TAB", tab),
        ("CRVAL1W", 1, f"[pixel] {raw}"),
        ("CRVAL2W", 1, f"[pixel] {raw}"),
        ("PV1_3W", 1, "Index of wavelength in VALUES array"),
        ("PV2_3W", 2, "Index of bandwidth in VALUES array"),
        ("PS1_0W", table, "Extension with wavelength lookup table"),
        ("PS2_0W", table, "Extension with bandwidth lookup table"),
        ("PS1_1W", "VALUES", "Column with values for wavelength"),
        ("PS2_1W", "VALUES", "Column with values for bandwidth"),
        ("PS1_2W", "X", "Column with control points for detector in X"),
        ("PS2_2W", "Y", "Column with control points for detector in Y"),
    ]


def _count_cards(meta: Mapping[str, Any], names: Iterable[str]) -> list[Card]:
    counts = meta.get("flag_count", {})
    return [
        (count_keyword(n), int(counts.get(n, 0)), f"number of pixels flagged {n.lower()}") for n in names
    ]


def _sphx_cards(meta: Mapping[str, Any]) -> list[Card]:
    """Cube metadata without an archive keyword (kept for an exact round trip)."""
    def enc(value: Any) -> Any:
        # FITS cannot hold NaN/inf: written as the strings 'NaN', 'inf', '-inf'.
        return str(value) if isinstance(value, float) and not np.isfinite(value) else value

    cards: list[Card] = []
    for name, value in meta.get("_extra_image", {}).items():
        cards.append((f"{_SPHX_IMAGE}{name.upper()}", enc(value), ""))
    for name, value in meta.get("_extra_obs", {}).items():
        cards.append((f"{_SPHX_OBS}{name.upper()}", enc(value), ""))
    return cards


def _dec(value: Any) -> Any:
    return float(value) if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf") else value


def to_header(cards: Iterable[Card]) -> fits.Header:
    """An astropy Header of ``(key, value, comment)`` triples (None and NaN values left out)."""
    return raw.header_from_cards(raw.render(cards))


# ---------------------------------------------------------------------------------------
# Headers
# ---------------------------------------------------------------------------------------

# On-board readout parameters we do not simulate: the flight values of the real header
# (they are what the pipeline writes for every flight exposure).
_FLIGHT_READOUT: dict[str, tuple[Any, str]] = {
    "KOVR_A": (25000, "[adu] Overflow detection limit, active pixels"),
    "KOVR_R": (25000, "[adu] Overflow detection limit, ref pixels"),
    "KOVR_P": (25000, "[adu] Overflow detection limit, phantom pixels"),
    "OVRDLY": (5, "threshold for overflow error flag"),
    "TRANDLY": (7, "Frame count when transient detection begins"),
    "TCUT": (38, "threshold for transient error flag"),
    "KEN_A": (20000, "Transient white noise threshold, active pixels"),
    "KEN_R": (10000, "Transient white noise threshold, ref pixels"),
    "KEN_P": (500, "Transient white noise threshold, phantom pixels"),
    "KSN_A": (100, "Transient shot noise threshold, active pixels"),
    "KSN_R": (0, "Transient shot noise threshold, ref pixels"),
    "KSN_P": (0, "Transient shot noise threshold, phantom pixels"),
    "NSKIP": (32, "Number of rows skipped after a full row is read"),
    "NVISITROW": (4, "Number of visits to each reference row"),
    "NVISITCOL": (1, "Number of visits to each reference col"),
}


def _readout_cards(instrument: Mapping[str, Any]) -> list[Card]:
    inst = dict(instrument)
    f = _FLIGHT_READOUT
    n_active = int(inst.get("n_active", 2040))
    n_ref = int(inst.get("n_reference", 4))
    cards: list[Card] = [
        ("TSAMP", float(inst.get("frame_time", 1.5349)), "[s] Interval between pixel readouts (frame)"),
        *(("KOVR_" + s, *f["KOVR_" + s]) for s in "ARP"),
        ("OVRDLY", *f["OVRDLY"]),
        ("SURLIM", int(inst.get("n_frames", 77)), "Number of frames detector accumulated charge"),
        ("SURDLY", int(inst.get("n_discarded_frames", 3)), "Frame count when SUR sums accumulation begins"),
        ("TRANDLY", *f["TRANDLY"]),
        ("TCUT", *f["TCUT"]),
        *(("KEN_" + s, *f["KEN_" + s]) for s in "ARP"),
        *(("KSN_" + s, *f["KSN_" + s]) for s in "ARP"),
        ("NSKIP", *f["NSKIP"]),
        ("NVISITROW", *f["NVISITROW"]),
        ("NVISITCOL", *f["NVISITCOL"]),
        ("MPHAN", int(inst.get("n_phantom", 4)), "Number of phantom columns reads"),
        ("NCHANNEL", int(inst.get("n_readout_channels", 32)), "Number of readout channels"),
        ("WCHANNEL", int(inst.get("readout_channel_width", 64)), "Number of columns in each readout channel"),
        # n_reference is the border width per edge; JREF/KREF count both edges (8 real).
        ("JREF", 2 * n_ref, "Number of physical reference rows on H2RG"),
        ("KREF", 2 * n_ref, "Number of physical reference cols on H2RG"),
        ("JACTIVE", n_active, "Number of light-sensitive pixel rows"),
        ("KACTIVE", n_active, "Number of light-sensitive pixel cols"),
    ]
    return cards


def build_image_header(meta: Mapping[str, Any], **options: Any) -> fits.Header:
    """The IMAGE extension header of one (band, observation) image (options as
    :func:`image_header_cards`)."""
    return raw.header_from_cards(image_header_cards(meta, **options))


def image_header_cards(
    meta: Mapping[str, Any],
    *,
    band: int,
    instrument: Mapping[str, Any],
    history: Sequence[str] = (),
    origin: tuple[int, int] = (0, 0),
    date: str | None = None,
    refcat: str = "sphx simulated reference catalogue",
    persistence_threshold: float = 0.1,
) -> list[str]:
    """The 80-character cards of the IMAGE extension header of one (band, observation).

    Parameters
    ----------
    meta
        Per-image metadata (see module docstring), e.g. from
        :func:`sphx.io.fits.spectral_image.image_meta`.
    band
        Detector number (``DETECTOR``).
    instrument
        The cube's ``instrument`` attribute (readout parameters, frame size).
    history
        HISTORY lines (pipeline modules and calibration products used).
    origin
        0-based detector pixel ``(x0, y0)`` of the first written pixel.
    date
        HDU creation time (UTC ISO-8601); now by default.
    persistence_threshold
        ``PSTHRESH`` [electron / s].
    """
    date = date or _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
    counts = meta.get("flag_count", {})
    sc_pos, sc_vel = np.asarray(meta["sc_position"]), np.asarray(meta["sc_velocity"])
    cards: list[Card] = [
        ("EXTNAME", "IMAGE", "extension name"),
        ("EXTTYPE", "IMAGE", "Extension supports mask overlay"),
        ("BUNIT", IMAGE_BUNIT, "Unit of pixel value"),
        ("DETECTOR", int(band), "1-3: SWIR, 4-6: MWIR"),
        ("OBSID", str(meta["obsid"]), "Observation ID"),
        ("EXPIDN", expidn(str(meta["obsid"]), int(band)), "Integer Exposure ID"),
        ("DATE", date, "HDU creation time (UTC)"),
        *_readout_cards(instrument),
        *((k, _py(meta[v]), c) for k, v, c in _OBS_KEYS),
        # We simulate neither S-band passes nor non-survey observations: the pipeline
        # writes 'False' (a string, as in the archive) for every survey exposure.
        ("OBS_IN_SBAND", "False", "Observed during S-band transmission"),
        ("NON_SURVEY", "False", "Observation is not part of a science survey"),
        *((k, _py(meta[v]), c) for k, v, c in _GROUND_TRACK),
        *((k, _py(meta[v]), c) for k, v, c in _PLANNED),
        ("L1DQAFLG", "Pass" if bool(meta["l1dqa_pass"]) else "Fail", "L1 DQA outcome"),
        ("RADESYS", "ICRS", "Equatorial coordinate system"),
    ]
    epochs = (("START", 0, "START"), ("", 1, "MID"), ("END", 2, "END"))
    for suffix, i, word in epochs:
        tail = f"_{suffix}" if suffix else ""
        cards += [(f"{a}_SC{tail}", float(sc_pos[i, j]), f"[km] Exposure {word} {a.lower()} position")
                  for j, a in enumerate("XYZ")]
        cards += [(f"V{a}_SC{tail}", float(sc_vel[i, j]), f"[km/s] Exposure {word} v_{a.lower()} velocity")
                  for j, a in enumerate("XYZ")]
        if suffix == "START":
            cards += [
                ("XYZ_SC_SYSTEM", "GEOCENTER", "Reference frame for spacecraft position"),
                ("VXYZ_SC_SYSTEM", "GEOCENTER", "Reference frame for spacecraft velocity"),
            ]
    cards += [
        ("NBLMPIX", int(counts.get("BLOOM", 0)), "Number of Pixels Bloom Flag"),
        ("NHALOPIX", int(counts.get("HALO", 0)), "Number of Pixels Halo Flag"),
        ("NSNOWPIX", int(counts.get("SNOWBALL", 0)), "Number of Pixels Snowball Flag"),
        *_count_cards(meta, ("NONLINEAR",)),
        ("PSTHRESH", float(persistence_threshold), "[electron/s] persistence threshold"),
        *_count_cards(meta, ("PERSIST",)),
        ("DETCOORD", "sky", "MWIR pixels flipped on X to match SWIR view"),
        *_count_cards(meta, ("HOT", "COLD")),
        ("L2 N_TRAN_NB", int(meta.get("n_tran_nb", 0)), "number of not bad transient pixels"),
        ("L2 N_PERS_NB", int(meta.get("n_pers_nb", 0)), "number of persistence and not bad pixels"),
        ("OMEGA_MEDIAN", meta.get("omega_median"), " [arcsec**2] solid angle pixel map"),
        ("OMEGA_STDDEV", meta.get("omega_stddev"), " [arcsec**2] solid angle pixel map"),
        ("FINAST", int(meta["finast"]), "good fine-astrometric solution"),
        *sky_wcs_cards(meta, origin=origin),
        # Astrometry QA of the archive's astrometry.net/Gaia matcher, which sphx does not
        # run: DAXIS, CONTRAST and QS_NMATCH_VAR are written as 0.0 (not measured);
        # ASTRONETSOLVED is true when the blind pattern stage matched stars.
        ("DAXIS", 0.0, "not measured by sphx"),
        ("CONTRAST", 0.0, "not measured by sphx"),
        ("MATCH_NSTARS", int(meta.get("astrometry_nmatch", 0)), "astrometric calibrators used"),
        ("QS_NMATCH_VAR", 0.0, "not measured by sphx"),
        ("ASTRONETSOLVED", bool(meta.get("_astronetsolved", True)), "blind astrometric solution found"),
        ("PXSRCMSK", 100.0 * float(meta.get("source_fraction", 0.0)),
         "Percentage of pixels with SOURCE flag"),
        *_count_cards(meta, ("SOURCE", "GHOST", "GHOST_FPA", "GHOST_EXT")),
        ("L2 N_BLOOM_NS", int(meta.get("_bloom_ns", 0)), "number of BLOOM flagged pixels not flagged SOURCE"),
        ("L2 N_SNOW_NS", int(meta.get("_snow_ns", 0)), "number of SNOW flagged pixels not flagged SOURCE"),
        *_count_cards(meta, ("OUTLIER",)),
        ("PSF_FWHM", meta.get("psf_fwhm"), " [arcsec] PSF FWHM Median"),
        ("L2DQAFLG", "Pass" if bool(meta["l2dqa_pass"]) else "Fail", "L2 DQA outcome"),
        *_count_cards(meta, ("TRANSIENT", "OVERFLOW", "SUR_ERROR", "NONFUNC", "DICHROIC", "MISSING_DATA",
                             "FULLSAMPLE", "PHANMISS")),
        # Counts of the remaining registry bits (not in the real IMAGE header) so that
        # the cube's flag_count survives a round trip.
        *_count_cards(meta, [f.name for f in _flags.REGISTRY if f.name not in _REAL_IMAGE_COUNT_NAMES]),
        ("REFCAT.VERSION", refcat, "Reference catalog version"),
        *sip_cards(meta),
        *alt_a_cards(origin=origin),
        ("MJDREF", 0.0, "[d] MJD of fiducial time"),
        *time_cards(meta),
        *wave_w_cards(origin=origin),
        *_sphx_cards(meta),
    ]
    # The real header moves MJDREF next to TIMESYS.
    mjdref = next(i for i, c in enumerate(cards) if c[0] == "MJDREF")
    cards.insert(next(i for i, c in enumerate(cards) if c[0] == "TIMESYS"), cards.pop(mjdref))
    cards += [("COMMENT", line, "") for line in (
        "TELAPSE ends at MJD-END, starts prior to MJD-BEG:", "  includes discarded frames",
        "XPOSURE is the scientifically meaningful exposure time:",
        "  the time between the start and end of collecting data that",
        "  contributes to the photocurrent")]
    cards += [("HISTORY", str(line), "") for line in history]
    return raw.render(cards)


_REAL_IMAGE_COUNT_NAMES = {
    "NONLINEAR", "PERSIST", "HOT", "COLD", "SOURCE", "GHOST", "GHOST_FPA", "GHOST_EXT", "OUTLIER",
    "TRANSIENT", "OVERFLOW", "SUR_ERROR", "NONFUNC", "DICHROIC", "MISSING_DATA", "FULLSAMPLE", "PHANMISS",
}


def _shared_wcs_cards(meta: Mapping[str, Any], origin: tuple[int, int]) -> list[Card]:
    """WCS and time keywords repeated in FLAGS, VARIANCE and ZODI (FLAGS-header order)."""
    return [
        *sky_wcs_cards(meta, origin=origin),
        ("MJDREF", 0.0, "[d] MJD of fiducial time"),
        ("RADESYS", "ICRS", "Equatorial coordinate system"),
        *sip_cards(meta),
        *alt_a_cards(origin=origin),
        *time_cards(meta),
        *wave_w_cards(origin=origin),
    ]


def build_flags_header(meta: Mapping[str, Any], *, origin: tuple[int, int] = (0, 0)) -> fits.Header:
    """The FLAGS extension header (see :func:`flags_header_cards`)."""
    return raw.header_from_cards(flags_header_cards(meta, origin=origin))


def flags_header_cards(meta: Mapping[str, Any], *, origin: tuple[int, int] = (0, 0)) -> list[str]:
    """Cards of the FLAGS extension header: counts, ``BUNIT=''``, ``EXTTYPE='MASK'``, one
    ``HIERARCH MP_<NAME> = bit / description`` card per defined bit, then the WCSs."""
    first = ("OUTLIER", "TRANSIENT", "OVERFLOW", "SUR_ERROR", "PHANTOM", "REFERENCE", "NONFUNC", "DICHROIC",
             "MISSING_DATA", "FULLSAMPLE", "PHANMISS")
    rest = [f.name for f in _flags.REGISTRY if f.name not in first]
    cards: list[Card] = [
        *_count_cards(meta, first),
        *_count_cards(meta, rest),
        ("BUNIT", FLAGS_BUNIT, "Unit of flag pixel value (dimensionless)"),
        ("EXTTYPE", "MASK", "Extension can be used as a mask overlay"),
        *((f"MP_{f.name}", f.bit, f.description) for f in _flags.REGISTRY),
        ("EXTNAME", "FLAGS", "extension name"),
        *_shared_wcs_cards(meta, origin),
    ]
    return raw.render(cards)


def build_plane_header(
    meta: Mapping[str, Any], *, extname: str, bunit: str, origin: tuple[int, int] = (0, 0)
) -> fits.Header:
    """Header of the VARIANCE or ZODI extension (see :func:`plane_header_cards`)."""
    return raw.header_from_cards(plane_header_cards(meta, extname=extname, bunit=bunit, origin=origin))


def plane_header_cards(
    meta: Mapping[str, Any], *, extname: str, bunit: str, origin: tuple[int, int] = (0, 0)
) -> list[str]:
    """Cards of the VARIANCE or ZODI extension header (unit, then the same WCSs as FLAGS)."""
    what = {"VARIANCE": "Variance of IMAGE", "ZODI": "Zodiacal light model, not subtracted from IMAGE"}
    cards: list[Card] = [
        ("EXTNAME", extname, "extension name"),
        ("BUNIT", bunit, what.get(extname, "Unit of pixel value")),
        *_shared_wcs_cards(meta, origin),
    ]
    return raw.render(cards)


# ---------------------------------------------------------------------------------------
# Header -> metadata
# ---------------------------------------------------------------------------------------


def origin_from_header(header: fits.Header) -> tuple[int, int]:
    """0-based detector pixel ``(x0, y0)`` of the first array pixel, from the ``A`` WCS
    (``CRPIXnA = 1 - origin``); ``(0, 0)`` when the header has no ``A`` WCS."""
    x0 = 1.0 - float(header.get("CRPIX1A", 1.0))
    y0 = 1.0 - float(header.get("CRPIX2A", 1.0))
    return int(round(x0)), int(round(y0))  # noqa: RUF046 (numpy floats)


def _sip_from_header(header: fits.Header, key: str, order: int) -> np.ndarray:
    out = np.zeros((order + 1, order + 1))
    for p in range(order + 1):
        for q in range(order + 1 - p):
            out[p, q] = float(header.get(f"{key}_{p}_{q}", 0.0))
    return out


def header_to_meta(header: fits.Header, *, sip_order: int = 3) -> dict[str, Any]:
    """Per-image metadata from an IMAGE header (inverse of :func:`build_image_header`).

    WCS values are expressed in the full detector frame (``wcs_crpix`` 1-based FITS
    pixel of the detector, i.e. the written ``CRPIX`` plus the ``A``-WCS origin).
    Keywords that are missing give NaN (floats) or are left out.
    """
    x0, y0 = origin_from_header(header)
    meta: dict[str, Any] = {"detector": int(header["DETECTOR"]), "obsid": str(header["OBSID"]).strip()}
    if "CRVAL1" in header:
        meta["wcs_crpix"] = np.array([float(header["CRPIX1"]) + x0, float(header["CRPIX2"]) + y0])
        meta["wcs_crval"] = np.array([float(header["CRVAL1"]), float(header["CRVAL2"])])
        cdelt = [float(header.get("CDELT1", 1.0)), float(header.get("CDELT2", 1.0))]
        pc = np.array([[float(header.get(f"PC{i}_{j}", float(i == j))) for j in (1, 2)] for i in (1, 2)])
        if "CD1_1" in header:  # CD-matrix headers (not written by us, accepted)
            pc = np.array([[float(header.get(f"CD{i}_{j}", 0.0)) for j in (1, 2)] for i in (1, 2)])
            cdelt = [1.0, 1.0]
        meta["wcs_cd"] = pc * np.array(cdelt)[:, None]
    else:
        meta["wcs_crpix"], meta["wcs_crval"] = np.full(2, np.nan), np.full(2, np.nan)
        meta["wcs_cd"] = np.full((2, 2), np.nan)
    for key in ("A", "B", "AP", "BP"):
        order = int(header.get(f"{key}_ORDER", sip_order))
        sip = _sip_from_header(header, key, order) if f"{key}_ORDER" in header else np.zeros((1, 1))
        full = np.zeros((sip_order + 1, sip_order + 1))
        n = min(sip.shape[0], sip_order + 1)
        full[:n, :n] = sip[:n, :n]
        meta[f"wcs_sip_{key.lower()}"] = full
    meta["finast"] = int(header.get("FINAST", -1))
    meta["l1dqa_pass"] = str(header.get("L1DQAFLG", "")).strip() == "Pass"
    meta["l2dqa_pass"] = str(header.get("L2DQAFLG", "")).strip() == "Pass"
    meta["source_fraction"] = float(header.get("PXSRCMSK", np.nan)) / 100.0
    meta["astrometry_nmatch"] = int(header.get("MATCH_NSTARS", -1))
    meta["n_tran_nb"] = int(header.get("L2 N_TRAN_NB", -1))
    meta["n_pers_nb"] = int(header.get("L2 N_PERS_NB", -1))
    meta["psf_fwhm"] = float(header.get("PSF_FWHM", np.nan))
    meta["omega_median"] = float(header.get("OMEGA_MEDIAN", np.nan))
    meta["omega_stddev"] = float(header.get("OMEGA_STDDEV", np.nan))
    meta["flag_count"] = {
        f.name: int(header[count_keyword(f.name)]) for f in _flags.REGISTRY if count_keyword(f.name) in header
    }
    meta["mjd_beg"] = float(header.get("MJD-BEG", header.get("MJD-OBS", np.nan)))
    meta["mjd_avg"] = float(header.get("MJD-AVG", np.nan))
    meta["mjd_end"] = float(header.get("MJD-END", np.nan))
    meta["xposure"] = float(header.get("XPOSURE", np.nan))
    meta["telapse"] = float(header.get("TELAPSE", np.nan))
    for key, var, _ in (*_OBS_KEYS, *_GROUND_TRACK, *_PLANNED):
        if key in header:
            value = header[key]
            meta[var] = value.strip() if isinstance(value, str) else value
    pos, vel = np.full((3, 3), np.nan), np.full((3, 3), np.nan)
    for i, tail in enumerate(("_START", "", "_END")):
        for j, a in enumerate("XYZ"):
            pos[i, j] = float(header.get(f"{a}_SC{tail}", np.nan))
            vel[i, j] = float(header.get(f"V{a}_SC{tail}", np.nan))
    meta["sc_position"], meta["sc_velocity"] = pos, vel
    meta["history"] = [str(h) for h in header.get("HISTORY", [])]
    extra_image, extra_obs = {}, {}
    for card in header.cards:
        key = card.keyword
        if key.upper().startswith(_SPHX_OBS):
            extra_obs[key[len(_SPHX_OBS):].lower()] = _dec(card.value)
        elif key.upper().startswith(_SPHX_IMAGE):
            extra_image[key[len(_SPHX_IMAGE):].lower()] = _dec(card.value)
    meta["_extra_image"], meta["_extra_obs"] = extra_image, extra_obs
    return meta


_MSKN = re.compile(r"^MSKN(\d{4})$")


def flag_bits_from_header(header: fits.Header, *, file: str | None = None) -> dict[str, int]:
    """``{name: bit}`` of a FLAGS header, QR2 (``MP_<NAME> = bit``) or QR3
    (``MSKNnnnn = '<NAME>'``, nnnn the bit) convention.

    Raises
    ------
    FitsFormatError
        For a flag name or bit that the SPHEREx registry does not define: its pixels
        could not be interpreted.
    """
    from ...errors import FitsFormatError

    bits: dict[str, int] = {}
    for card in header.cards:
        key = card.keyword.upper()
        if key.startswith("MP_"):
            bits[key[3:]] = int(card.value)
        elif (m := _MSKN.match(key)) is not None:
            bits[str(card.value).strip().upper()] = int(m.group(1))
    known = {f.name: f.bit for f in _flags.REGISTRY}
    for name, bit in bits.items():
        if name not in known:
            raise FitsFormatError(
                f"unknown flag name {name!r} (bit {bit}); known names: {', '.join(known)}", file=file, hdu="FLAGS"
            )
        if known[name] != bit:
            raise FitsFormatError(
                f"flag {name!r} is bit {bit} in the file but bit {known[name]} in SPHEREx data", file=file, hdu="FLAGS"
            )
    return bits


def split_extra(meta: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The SPHX per-image and per-observation extras of a metadata dict."""
    return dict(meta.get("_extra_image", {})), dict(meta.get("_extra_obs", {}))


MAPPED_IMAGE_VARS = frozenset(_MAPPED_IMAGE_VARS)
MAPPED_OBS_VARS = frozenset(_MAPPED_OBS_VARS)
