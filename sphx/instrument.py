"""The SPHEREx instrument as a value.

Geometry is data, not constants: every function that needs pixel counts, readout
channels or wavelength ranges takes an :class:`Instrument`. :data:`SPHEREX` is the real
instrument and the default everywhere; :data:`SPHEREX_SMALL` keeps the same structure
(six bands, 4-pixel reference border, 32 readout channels, phantom reads, MWIR flip,
17 spectral channels per band) on 248x248 active pixels so that tests run in seconds.

Orientation
-----------
All images are stored in sky orientation (the real files' ``DETCOORD = 'sky'``): MWIR
detectors (D4-D6) are flipped in x to match the SWIR view. Labelled pixel coordinates
put active pixel (0, 0) at ``x = 0, y = 0`` at every level; raw frames carry the
reference border at ``-n_reference .. -1`` and ``n_active .. n_active + n_reference - 1``.
Readout channel ``c`` reads detector columns ``c * w .. (c + 1) * w - 1`` counted from the
first reference column of the un-flipped detector, so on MWIR bands channel 0 lies at
the high-x edge of the stored image.

The linear variable filter makes wavelength vary along y (for D2 the IRSA documentation
shows the longest wavelength at the bottom); :meth:`Instrument.nominal_wavelength`
gives the nominal, uncurved map. The measured per-pixel maps are calibration products
(``spectral_wcs``) made by the simulator or read from the archive.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .errors import InstrumentError

__all__ = ["SPHEREX", "SPHEREX_SMALL", "Band", "Instrument"]


@dataclass(frozen=True)
class Band:
    """One SPHEREx detector and the wavelength range its linear variable filter covers.

    Parameters
    ----------
    number
        Detector number, 1-6 (the ``DETECTOR`` keyword).
    wavelength_min, wavelength_max
        Wavelength range covered by the filter [um].
    resolving_power
        Spectral resolving power R = lambda / delta-lambda of one pixel.
    array
        Focal plane array: ``"SWIR"`` (D1-D3) or ``"MWIR"`` (D4-D6).
    dichroic_partner
        The detector of the other array that sees the same sky through the dichroic.
    """

    number: int
    wavelength_min: float
    wavelength_max: float
    resolving_power: float
    array: Literal["SWIR", "MWIR"]
    dichroic_partner: int

    @property
    def name(self) -> str:
        """Detector name, ``"D1"`` .. ``"D6"``."""
        return f"D{self.number}"

    @property
    def flipped_x(self) -> bool:
        """Whether stored images are flipped in x with respect to the readout (MWIR)."""
        return self.array == "MWIR"


@dataclass(frozen=True)
class Instrument:
    """Detector, readout and band geometry of a SPHEREx-like instrument.

    Parameters
    ----------
    name
        Label stored with every repository made for this instrument.
    bands
        The detectors, in detector-number order.
    n_active
        Light-sensitive pixels per side (``JACTIVE``/``KACTIVE``).
    n_reference
        Width of the reference-pixel border on each edge [pixel].
    n_readout_channels, readout_channel_width
        Readout channels per detector (``NCHANNEL``) and columns per channel
        (``WCHANNEL``); they must tile the raw frame exactly.
    n_phantom
        Phantom (reference-voltage) reads per row and readout channel (``MPHAN``).
    n_spectral_channels
        Spectral channels per band (17: 102 over the six bands).
    pixel_scale
        Pixel scale [arcsec].
    frame_time
        Interval between frame reads (``TSAMP``) [s].
    n_frames, n_discarded_frames
        Frames per ramp (``SURLIM``) and frames discarded at its start (``SURDLY``).
    psf_zones, psf_oversampling, psf_size
        PSF zone grid per side, oversampling factor and PSF stamp size of the average
        PSF product [oversampled pixels].
    """

    name: str
    bands: tuple[Band, ...]
    n_active: int = 2040
    n_reference: int = 4
    n_readout_channels: int = 32
    readout_channel_width: int = 64
    n_phantom: int = 4
    n_spectral_channels: int = 17
    pixel_scale: float = 6.15
    frame_time: float = 1.5349
    n_frames: int = 77
    n_discarded_frames: int = 3
    psf_zones: int = 11
    psf_oversampling: int = 10
    psf_size: int = 101
    _by_number: Mapping[int, Band] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problems = []
        if self.n_active <= 0 or self.n_reference < 0:
            problems.append(f"n_active={self.n_active} and n_reference={self.n_reference} must be positive")
        readout = self.n_readout_channels * self.readout_channel_width
        if readout != self.n_raw:
            problems.append(
                f"{self.n_readout_channels} readout channels of {self.readout_channel_width} columns "
                f"read {readout} columns, but the raw frame is n_active + 2 * n_reference = {self.n_raw}"
            )
        if self.n_reference and self.readout_channel_width <= self.n_reference:
            problems.append(
                f"readout_channel_width={self.readout_channel_width} must exceed the reference border "
                f"n_reference={self.n_reference}, so that every channel has active columns"
            )
        if self.n_discarded_frames >= self.n_frames or self.frame_time <= 0:
            problems.append(
                f"n_frames={self.n_frames}, n_discarded_frames={self.n_discarded_frames} and "
                f"frame_time={self.frame_time} leave no integration"
            )
        if self.psf_zones <= 0 or self.psf_zones > self.n_active:
            problems.append(f"psf_zones={self.psf_zones} must lie in 1..n_active")
        numbers = [b.number for b in self.bands]
        if not numbers or len(set(numbers)) != len(numbers) or numbers != sorted(numbers):
            problems.append(f"band numbers {numbers} must be unique and increasing")
        for b in self.bands:
            if not 0 < b.wavelength_min < b.wavelength_max:
                problems.append(f"band {b.name}: wavelength range {b.wavelength_min}-{b.wavelength_max} um")
            if b.resolving_power <= 0:
                problems.append(f"band {b.name}: resolving power {b.resolving_power} must be positive")
            if b.dichroic_partner not in numbers:
                problems.append(f"band {b.name}: dichroic partner D{b.dichroic_partner} is not a band")
        if problems:
            raise InstrumentError(f"impossible instrument geometry {self.name!r}: " + "; ".join(problems))
        object.__setattr__(self, "_by_number", {b.number: b for b in self.bands})

    # --- sizes and coordinates -------------------------------------------------------
    @property
    def n_raw(self) -> int:
        """Pixels per side of the raw frame, reference border included."""
        return self.n_active + 2 * self.n_reference

    @property
    def band_numbers(self) -> tuple[int, ...]:
        return tuple(b.number for b in self.bands)

    @property
    def exposure_time(self) -> float:
        """Integration time ``XPOSURE`` = (frames - discarded) x frame time [s]."""
        return (self.n_frames - self.n_discarded_frames) * self.frame_time

    @property
    def elapsed_time(self) -> float:
        """Elapsed time ``TELAPSE`` = frames x frame time, discarded frames included [s]."""
        return self.n_frames * self.frame_time

    def pixel_coords(self, *, reference_pixels: bool) -> np.ndarray:
        """Labelled pixel coordinates along one axis (int64).

        Active pixels are ``0 .. n_active - 1``; with ``reference_pixels=True`` the border
        adds ``-n_reference .. -1`` and ``n_active .. n_active + n_reference - 1``.
        """
        border = self.n_reference if reference_pixels else 0
        return np.arange(-border, self.n_active + border, dtype=np.int64)

    def band(self, number: int) -> Band:
        """The band with detector number ``number``."""
        try:
            return self._by_number[int(number)]
        except (KeyError, TypeError, ValueError):
            raise InstrumentError(
                f"instrument {self.name!r} has no band {number!r}; bands are {list(self.band_numbers)}"
            ) from None

    # --- readout ---------------------------------------------------------------------
    def readout_channel(self, band: int, x: np.ndarray) -> np.ndarray:
        """Readout channel (0 .. n_readout_channels - 1) of labelled columns ``x``.

        Accounts for the MWIR x flip, so the result is right in sky orientation.
        """
        column = np.asarray(x) + self.n_reference  # 0 .. n_raw - 1 in stored orientation
        if np.any((column < 0) | (column >= self.n_raw)):
            raise InstrumentError(f"columns outside -{self.n_reference}..{self.n_active + self.n_reference - 1}")
        if self.band(band).flipped_x:
            column = self.n_raw - 1 - column
        return column // self.readout_channel_width

    # --- spectral layout -------------------------------------------------------------
    def channel_edges(self, band: int) -> np.ndarray:
        """Edges of the band's spectral channels [um], equal steps in log wavelength."""
        b = self.band(band)
        k = np.arange(self.n_spectral_channels + 1) / self.n_spectral_channels
        return b.wavelength_min * (b.wavelength_max / b.wavelength_min) ** k

    def channel_centers(self, band: int) -> np.ndarray:
        """Geometric centres of the band's spectral channels [um]."""
        e = self.channel_edges(band)
        return np.sqrt(e[:-1] * e[1:])

    def nominal_wavelength(self, band: int, y: np.ndarray) -> np.ndarray:
        """Nominal central wavelength of rows ``y`` [um], decreasing with y.

        Equal steps in log wavelength from ``wavelength_max`` at the bottom edge of the
        active area to ``wavelength_min`` at the top; NaN on reference rows.
        """
        b = self.band(band)
        yy = np.asarray(y, dtype=np.float64)
        frac = (yy + 0.5) / self.n_active
        lam = b.wavelength_max * (b.wavelength_min / b.wavelength_max) ** frac
        return np.where((yy >= 0) & (yy < self.n_active), lam, np.nan)

    # --- derived instruments and serialisation ----------------------------------------
    def scaled(self, *, readout_channel_width: int, name: str | None = None, **changes: Any) -> Instrument:
        """The same structure with narrower readout channels (a smaller detector).

        The frame stays ``n_readout_channels x readout_channel_width`` wide with the same
        reference border; other fields may be changed by keyword.
        """
        n_raw = self.n_readout_channels * readout_channel_width
        return dataclasses.replace(
            self,
            name=name or f"{self.name}-{n_raw - 2 * self.n_reference}px",
            readout_channel_width=readout_channel_width,
            n_active=n_raw - 2 * self.n_reference,
            **changes,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description; :meth:`from_dict` inverts it."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        d["bands"] = [dataclasses.asdict(b) for b in self.bands]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Instrument:
        d = dict(d)
        bands = tuple(Band(**b) for b in d.pop("bands"))
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = set(d) - known
        if unknown:
            raise InstrumentError(f"unknown instrument fields {sorted(unknown)}")
        return cls(bands=bands, **d)


SPHEREX = Instrument(
    name="SPHEREx",
    bands=(
        Band(1, 0.75, 1.09, 39.0, "SWIR", 4),
        Band(2, 1.10, 1.62, 41.0, "SWIR", 5),
        Band(3, 1.63, 2.41, 41.0, "SWIR", 6),
        Band(4, 2.42, 3.82, 35.0, "MWIR", 1),
        Band(5, 3.83, 4.41, 112.0, "MWIR", 2),
        Band(6, 4.42, 5.00, 128.0, "MWIR", 3),
    ),
)
"""The real SPHEREx instrument (Akeson et al.; the QR2 Level 2 headers)."""

SPHEREX_SMALL = SPHEREX.scaled(readout_channel_width=8, name="SPHEREx-small")
"""SPHEREx structure on 248x248 active pixels (32 channels of 8 columns), for tests."""
