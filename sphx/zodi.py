"""Zodiacal light: the Kelsall et al. (1998) DIRBE interplanetary-dust model at 0.75-5 um.

This is an independent re-implementation of the COBE/DIRBE zodiacal-light model of
Kelsall et al. (1998, ApJ 508, 44; "K98"), written from the published equations and
parameter tables (K98 Tables 1-3) and extended to the SPHEREx wavelength range.

Model
-----
The brightness along a line of sight leaving the observer in the unit direction u is::

    I_nu = sum_c  int_0^s_max  n_c(X) [ A F_sun Phi(Theta) / R^2 + (1 - A) E_c B_nu(T(R)) ] ds,
    T(R) = T0 R^-delta,   T0 = 286 K,   delta = 0.46686,

with X = observer + s u the heliocentric position of the line-of-sight element, R = |X| [AU],
n_c the density of component c [AU^-1], s the distance from the observer [AU], A the albedo,
E_c the emissivity, F_sun the solar flux density at 1 AU [MJy], Phi the phase function
[sr^-1], B_nu the Planck function [MJy/sr] and Theta the scattering angle (0 = forward
scattering, cos Theta = -X.u / R); I_nu comes out in MJy/sr.

The components are the smooth cloud (a "widened modified fan" with its centre offset from the
Sun), the three asteroidal dust bands, the circumsolar ring and the Earth-trailing feature. As
in K98 and the DIRBE model kernel, the ring and feature are
``n0 exp[-(R - R0)^2 / sigma_r^2 - |Z| / sigma_z (- dtheta^2 / sigma_theta^2)]``: Gaussian in R
(and, for the feature, in heliocentric longitude relative to the Earth's, centred 10 deg
behind it) with 1/e widths, and exponential in the height Z above their symmetry plane. The
integral runs from the observer to the heliocentric sphere of radius 5.2 AU (as in K98), with
Gauss-Legendre quadrature.

Frame
-----
Positions are heliocentric ecliptic cartesian [AU] and directions ecliptic (lon, lat) [deg],
both referred to the mean ecliptic and equinox of J2000 (astropy's ``HeliocentricMeanEcliptic``
and ``BarycentricMeanEcliptic``).

Wavelength scaling (0.75-5 um)
------------------------------
K98 fitted the model at the DIRBE bands 1.25, 2.2, 3.5 and 4.9 um. Following Tsumura et al.
(2013, PASJ 65, 121), who found that the spectral shapes of the scattered and thermal zodiacal
light do not change over the sky, the geometry is kept fixed and only the spectral quantities
are scaled:

* albedo and per-component emissivities are interpolated linearly in wavelength between the
  DIRBE bands and held at their 1.25 um values below 1.25 um and at their 4.9 um values above
  (the albedo is zero at 4.9 um in K98, so it falls linearly from 3.5 to 4.9 um);
* the phase function, fitted at 1.25, 2.2 and 3.5 um only, is the linear-in-wavelength mixture
  of the *normalised* phase functions of the two neighbouring bands, and that of 1.25 or 3.5 um
  outside. Interpolating C0, C1 and C2 themselves was rejected: the normalisation at 1.25 um is
  a near-cancellation, so that a 0.1 um step would halve the backscattering phase function
  (and the polar brightness would drop 26 % between 1.25 and 1.35 um). The mixture is exactly
  the K98 function at the bands, stays normalised and positive, and is smooth in wavelength;
* the solar flux density is a 5778 K blackbody, ``pi B_nu(5778 K) (R_sun / 1 AU)^2``, times a
  smooth correction that makes it equal, at the four DIRBE bands, to the in-band solar flux
  densities K98 adopted when fitting the albedo (correction interpolated linearly in wavelength,
  constant outside 1.25-4.9 um). The bare blackbody is 7 %, 2 %, 6 % and 3 % below those values
  at 1.25, 2.2, 3.5 and 4.9 um; as K98 fitted the product A F_sun, leaving the correction out
  would bias the scattered light low by as much (see :func:`solar_flux_density`);
* the thermal term uses the monochromatic Planck function at the local grain temperature (no
  DIRBE colour correction: SPHEREx channels are narrow).

Accuracy
--------
At the DIRBE bands this reproduces the K98 model as implemented in zodipy to 0.4 %. With the
default 64 quadrature nodes the integral is converged to 0.2 % or better for solar elongations
>= 20 deg (worst in the ecliptic plane at 40-60 deg, where the line of sight grazes the narrow
circumsolar ring) and to 1e-5 at the ecliptic poles. Between and beyond the DIRBE bands the
result is an interpolation or extrapolation of a fit, good to perhaps 10-20 %.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import numba
import numpy as np

from .errors import SimulationError

__all__ = [
    "COMPONENTS",
    "earth_position",
    "phase_function",
    "solar_flux_density",
    "sun_ecliptic_longitude",
    "zodi_brightness",
    "zodi_components",
]

#: Names of the model components, in the order used internally.
COMPONENTS: tuple[str, ...] = ("cloud", "band1", "band2", "band3", "ring", "feature")

# --- physical constants (SI, CODATA 2018 / IAU 2015) ------------------------------------
_H = 6.62607015e-34  # Planck constant [J s]
_C = 299792458.0  # speed of light [m/s]
_K = 1.380649e-23  # Boltzmann constant [J/K]
_AU_M = 1.495978707e11  # astronomical unit [m]
_RSUN_M = 6.957e8  # nominal solar radius [m]
_TSUN_K = 5778.0  # solar effective temperature [K]
_SI_TO_MJY = 1e20  # 1 W m^-2 Hz^-1 = 1e26 Jy = 1e20 MJy

# --- K98 spectral parameters at the DIRBE bands ------------------------------------------
# Fitted values to the precision of the DIRBE model files; numbers that are float32 renderings
# of round values there (0.10000000149, -0.94209999, ...) are written as the round values.
_DIRBE_UM = np.array([1.25, 2.2, 3.5, 4.9])
# Albedo, common to all components (K98 Table 2); 0 at 4.9 um by assumption in K98.
_ALBEDO = np.array([0.20411939612669797, 0.25521132892052301, 0.21043660481632315, 0.0])
# Phase-function coefficients (K98 Table 2), fitted at 1.25, 2.2 and 3.5 um only.
_PHASE_UM = _DIRBE_UM[:3]
_PHASE_C0 = np.array([-0.9421, -0.5267, -0.4312])
_PHASE_C1 = np.array([0.1214, 0.1872, 0.1715])
_PHASE_C2 = np.array([-0.1648, -0.5983, -0.6333])
# Emissivity per component (rows in COMPONENTS order) at 1.25, 2.2, 3.5, 4.9 um (K98 Table 3;
# fixed to 1 at 1.25 and 2.2 um where the thermal term is negligible; one value at 3.5 um).
_E35 = 1.6598924040649741
_EMISSIVITY = np.array(
    [
        [1.0, 1.0, _E35, 0.99740908486652979],  # cloud
        [1.0, 1.0, _E35, 0.35926451958350442],  # band 1
        [1.0, 1.0, _E35, 0.35926451958350442],  # band 2
        [1.0, 1.0, _E35, 0.35926451958350442],  # band 3
        [1.0, 1.0, _E35, 1.0675116768340536],  # ring
        [1.0, 1.0, _E35, 1.0675116768340536],  # feature
    ]
)
# In-band solar flux density at 1 AU adopted with the K98 fit [MJy] (DIRBE bands 1-4).
_SOLAR_FLUX_DIRBE_MJY = np.array([2.3405606e8, 1.2309874e8, 64292872.0, 35733824.0])
# Grain temperature law T = T0 R^-delta (K98 Table 2).
_T0_K = 286.0
_DELTA_T = 0.46686259861486573

# --- K98 geometric parameters (Table 1) ---------------------------------------------------
# Module-level floats, so that numba compiles them in as constants.


def _plane(incl_deg: float, node_deg: float) -> tuple[float, float, float, float]:
    """sin/cos of the ascending node Omega and of the inclination i of a symmetry plane."""
    o, i = np.deg2rad(node_deg), np.deg2rad(incl_deg)
    return float(np.sin(o)), float(np.cos(o)), float(np.sin(i)), float(np.cos(i))


# Smooth cloud ("widened modified fan"), centre offset from the Sun [AU].
_CL_N0 = 1.1344373881427960e-07  # [AU^-1]
_CL_ALPHA = 1.3370696705930281
_CL_BETA = 4.1415004157586637
_CL_GAMMA = 0.94206179393358036
_CL_MU = 0.18873176489090190
_CL_X0 = 0.011887800744346281
_CL_Y0 = 0.0054765064662263777
_CL_Z0 = -0.0021530908020710744
_CL_SIN_O, _CL_COS_O, _CL_SIN_I, _CL_COS_I = _plane(2.0335188072390769, 77.657955554097114)

# Dust bands, centred on the Sun:
#   n = 3 n0 / R exp(-(zeta/dzeta)^6) (1 + (zeta/dzeta)^p / v) (1 - exp(-(R/dr)^20)),
# zeta = |Z/R| [rad]; dzeta is tabulated in deg. p = 4 for all three.
_BAND_P = 4.0
_B1_N0, _B1_DZ, _B1_V, _B1_DR = 5.5890290403228370e-10, np.deg2rad(8.7850534408713035), 0.1, 1.5
_B2_N0, _B2_DZ, _B2_V, _B2_DR = 1.9877609422590801e-09, np.deg2rad(1.9917032425777641), 0.9, 0.94121881201651147
_B3_N0, _B3_DZ, _B3_V, _B3_DR = 1.4369827283512384e-10, np.deg2rad(15.0), 0.05, 1.5
_B1_SIN_O, _B1_COS_O, _B1_SIN_I, _B1_COS_I = _plane(0.56438265154389733, 80.0)
_B2_SIN_O, _B2_COS_O, _B2_SIN_I, _B2_COS_I = _plane(1.2, 30.347475578624532)
_B3_SIN_O, _B3_COS_O, _B3_SIN_I, _B3_COS_I = _plane(0.8, 80.0)

# Circumsolar ring and Earth-trailing feature: one symmetry plane, centred on the Sun;
# n0 [AU^-1], radius and 1/e widths in R and height [AU], azimuth offset and width [rad].
_RB_SIN_O, _RB_COS_O, _RB_SIN_I, _RB_COS_I = _plane(0.48707166006819241, 22.278979678854448)
_SR_N0, _SR_R, _SR_SIGR, _SR_SIGZ = 1.8260527826501675e-08, 1.0281924326308751, 0.025, 0.054068037356978099
_TB_N0, _TB_R = 2.0094267183590947e-08, 1.0579182694524214
_TB_SIGR, _TB_SIGZ = 0.10287314662396611, 0.091442963768716023
_TB_THETA, _TB_SIGTHETA = np.deg2rad(-10.0), np.deg2rad(12.115210933938741)

#: Heliocentric radius where the line-of-sight integration stops [AU] (Jupiter's orbit, K98).
R_MAX_AU = 5.2

_WAVELENGTH_RANGE_UM = (0.5, 6.0)

# numba's fallback "workqueue" threading layer (used when neither OpenMP nor TBB is available)
# aborts on concurrent parallel launches from several threads, e.g. dask workers. Each call
# already uses every core, so serialising the launches costs nothing.
_KERNEL_LOCK = threading.Lock()


# =========================================================================================
# Spectral ingredients (numpy)
# =========================================================================================


def _blackbody_nu_mjy(wavelength_um: np.ndarray, temperature_k: float) -> np.ndarray:
    """Planck function B_nu [MJy/sr] at ``wavelength_um`` [um] and ``temperature_k`` [K]."""
    nu = _C / (np.asarray(wavelength_um, dtype=np.float64) * 1e-6)
    x = _H * nu / (_K * temperature_k)
    return 2.0 * _H * nu**3 / _C**2 / np.expm1(x) * _SI_TO_MJY


def _blackbody_sun_mjy(wavelength_um: np.ndarray) -> np.ndarray:
    """Flux density at 1 AU of a 5778 K blackbody the size of the Sun [MJy]."""
    return np.pi * _blackbody_nu_mjy(wavelength_um, _TSUN_K) * (_RSUN_M / _AU_M) ** 2


def solar_flux_density(wavelength: float | np.ndarray, *, anchor_to_dirbe: bool = True) -> np.ndarray:
    """Solar flux density at 1 AU used by the model.

    Parameters
    ----------
    wavelength
        Wavelength [um].
    anchor_to_dirbe
        If true (the default, used by the model), multiply the 5778 K blackbody by a correction,
        linear in wavelength, that reproduces the in-band solar flux densities adopted by
        Kelsall et al. (1998) at 1.25, 2.2, 3.5 and 4.9 um (held constant outside that range).
        If false, return the bare blackbody ``pi B_nu(5778 K) (R_sun / 1 AU)^2``.

    Returns
    -------
    numpy.ndarray
        Flux density [MJy], the shape of ``wavelength``.
    """
    wl = np.asarray(wavelength, dtype=np.float64)
    bb = _blackbody_sun_mjy(wl)
    if not anchor_to_dirbe:
        return bb
    # K98 fitted A * F_sun, so their albedo is only right with their solar flux at the DIRBE
    # bands; the blackbody supplies the shape in between and beyond.
    ratio = _SOLAR_FLUX_DIRBE_MJY / _blackbody_sun_mjy(_DIRBE_UM)
    return bb * np.interp(wl, _DIRBE_UM, ratio)


def _phase_normalisation(c0: np.ndarray, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    """Normalisation N [sr^-1] of ``C0 + C1 t + exp(C2 t)`` over the sphere."""
    # Closed form of  int_0^pi (C0 + C1 t + exp(C2 t)) 2 pi sin t dt
    #   = 2 pi [2 C0 + pi C1 + (1 + exp(pi C2)) / (1 + C2^2)].
    return 1.0 / (2.0 * np.pi * (2.0 * c0 + np.pi * c1 + (1.0 + np.exp(np.pi * c2)) / (1.0 + c2 * c2)))


_PHASE_NORM = _phase_normalisation(_PHASE_C0, _PHASE_C1, _PHASE_C2)


def _phase_terms(wavelength_um: np.ndarray) -> tuple[np.ndarray, ...]:
    """Phase function at ``wavelength_um`` as ``p0 + p1 t + ea exp(ka t) + eb exp(kb t)`` [sr^-1].

    Between two DIRBE bands the *normalised* phase functions of the bands are mixed linearly in
    wavelength. Mixing the coefficients C0, C1, C2 instead is ill-conditioned: at 1.25 um the
    normalisation integral is a near-cancellation (2 C0 + pi C1 + ... = 0.05), so a 0.1 um step
    halves the backscattering phase function. The mixture stays normalised and positive.
    """
    wl = np.clip(np.asarray(wavelength_um, dtype=np.float64), _PHASE_UM[0], _PHASE_UM[-1])
    j = np.clip(np.searchsorted(_PHASE_UM, wl, side="right") - 1, 0, len(_PHASE_UM) - 2)
    f = (wl - _PHASE_UM[j]) / (_PHASE_UM[j + 1] - _PHASE_UM[j])
    wa = (1.0 - f) * _PHASE_NORM[j]
    wb = f * _PHASE_NORM[j + 1]
    p0 = wa * _PHASE_C0[j] + wb * _PHASE_C0[j + 1]
    p1 = wa * _PHASE_C1[j] + wb * _PHASE_C1[j + 1]
    return p0, p1, wa, _PHASE_C2[j], wb, _PHASE_C2[j + 1]


def phase_function(scattering_angle: float | np.ndarray, wavelength: float | np.ndarray) -> np.ndarray:
    """Normalised K98 phase function of the dust.

    At the DIRBE bands 1.25, 2.2 and 3.5 um, ``Phi(Theta) = N [C0 + C1 Theta + exp(C2 Theta)]``
    with ``N`` such that the integral of ``Phi`` over the sphere is 1. In between, the normalised
    functions of the neighbouring bands are mixed linearly in wavelength; outside 1.25-3.5 um the
    end band's function is used.

    Parameters
    ----------
    scattering_angle
        Scattering angle Theta [rad], 0 for forward scattering.
    wavelength
        Wavelength [um]; broadcasts with ``scattering_angle``.

    Returns
    -------
    numpy.ndarray
        Phase function [sr^-1].
    """
    theta, wl = np.broadcast_arrays(np.asarray(scattering_angle, float), np.asarray(wavelength, float))
    p0, p1, ea, ka, eb, kb = _phase_terms(wl)
    return p0 + p1 * theta + ea * np.exp(ka * theta) + eb * np.exp(kb * theta)


def _spectral_parameters(wavelength_um: np.ndarray) -> dict[str, np.ndarray]:
    """Per-point spectral inputs of the line-of-sight kernel at ``wavelength_um`` (1-D)."""
    albedo = np.interp(wavelength_um, _DIRBE_UM, _ALBEDO)
    p0, p1, ea, ka, eb, kb = _phase_terms(wavelength_um)
    emiss = np.stack([np.interp(wavelength_um, _DIRBE_UM, row) for row in _EMISSIVITY], axis=-1)
    nu = _C / (wavelength_um * 1e-6)
    return {
        # A F_sun: the scattered source per unit density is this times Phi(t) / R^2, with
        # Phi(t) = p0 + p1 t + ea exp(ka t) + eb exp(kb t)  [sr^-1].
        "scat_amp": albedo * solar_flux_density(wavelength_um),
        "phase": np.ascontiguousarray(np.stack([p0, p1, ea, ka, eb, kb], axis=-1)),
        # B_nu(T) = planck_a / expm1(planck_b / T)  [MJy/sr]
        "planck_a": 2.0 * _H * nu**3 / _C**2 * _SI_TO_MJY,
        "planck_b": _H * nu / _K,
        # (1 - A) E_c, per component
        "therm_w": np.ascontiguousarray((1.0 - albedo)[:, None] * emiss),
    }


# =========================================================================================
# Densities and line-of-sight kernel (numba)
# =========================================================================================


@numba.njit(inline="always", cache=True)
def _plane_height(x: float, y: float, z: float, sin_o: float, cos_o: float, sin_i: float, cos_i: float) -> float:
    """Height above a plane of inclination i and ascending node Omega."""
    return sin_o * sin_i * x - cos_o * sin_i * y + cos_i * z


@numba.njit(inline="always", cache=True)
def _cloud_density(x: float, y: float, z: float) -> float:
    """Smooth cloud, widened modified fan (K98) [AU^-1]."""
    xc, yc, zc = x - _CL_X0, y - _CL_Y0, z - _CL_Z0
    rc = np.sqrt(xc * xc + yc * yc + zc * zc)
    zeta = abs(_plane_height(xc, yc, zc, _CL_SIN_O, _CL_COS_O, _CL_SIN_I, _CL_COS_I)) / rc
    g = 0.5 * zeta * zeta / _CL_MU if zeta < _CL_MU else zeta - 0.5 * _CL_MU
    return _CL_N0 * rc**-_CL_ALPHA * np.exp(-_CL_BETA * g**_CL_GAMMA)


@numba.njit(inline="always", cache=True)
def _band_density(
    x: float,
    y: float,
    z: float,
    r: float,
    n0: float,
    dzeta: float,
    v: float,
    p: float,
    dr: float,
    sin_o: float,
    cos_o: float,
    sin_i: float,
    cos_i: float,
) -> float:
    """Asteroidal dust band (K98) [AU^-1]; ``dzeta`` in rad."""
    zz = abs(_plane_height(x, y, z, sin_o, cos_o, sin_i, cos_i)) / r / dzeta
    # 1 - exp(-(R/dr)^20): the inner edge of the band; -expm1 keeps precision for R << dr.
    edge = -np.expm1(-((r / dr) ** 20))
    return 3.0 * n0 / r * np.exp(-(zz**6)) * (1.0 + zz**p / v) * edge


@numba.njit(inline="always", cache=True)
def _wrap_pi(a: float) -> float:
    """Angle wrapped into [-pi, pi) [rad]."""
    return (a + np.pi) % (2.0 * np.pi) - np.pi


@numba.njit(parallel=True, cache=True, nogil=True)
def _los_kernel(
    u: np.ndarray,
    obs: np.ndarray,
    earth_lon_rad: float,
    scat_amp: np.ndarray,
    phase: np.ndarray,
    planck_a: np.ndarray,
    planck_b: np.ndarray,
    therm_w: np.ndarray,
    mask: np.ndarray,
    nodes: np.ndarray,
    weights: np.ndarray,
    r_max: float,
) -> np.ndarray:
    """Integrate every component along each line of sight.

    Parameters
    ----------
    u
        Unit direction vectors, shape (n, 3).
    obs
        Heliocentric observer position [AU], shape (3,), inside ``r_max``.
    earth_lon_rad
        Heliocentric longitude of the Earth [rad] (positions the trailing feature).
    scat_amp, planck_a, planck_b
        Per-point spectral inputs, shape (n,) (see ``_spectral_parameters``).
    phase
        Per-point phase-function terms (p0, p1, ea, ka, eb, kb), shape (n, 6).
    therm_w
        Per-point, per-component thermal weights (1 - A) E_c, shape (n, 6).
    mask
        Which components to compute, shape (6,) bool.
    nodes, weights
        Gauss-Legendre nodes and weights on [-1, 1].
    r_max
        Heliocentric radius at which the integration stops [AU].

    Returns
    -------
    numpy.ndarray
        Shape (n, 6, 2): per component, the scattered [:, :, 0] and thermal [:, :, 1]
        brightness [MJy/sr].
    """
    n = u.shape[0]
    nq = nodes.shape[0]
    out = np.zeros((n, 6, 2))
    ox, oy, oz = obs[0], obs[1], obs[2]
    o2 = ox * ox + oy * oy + oz * oz
    theta_feature = earth_lon_rad + _TB_THETA
    for i in numba.prange(n):
        ux, uy, uz = u[i, 0], u[i, 1], u[i, 2]
        # Distance to the sphere |o + s u| = r_max (the observer is inside it, so one root > 0).
        b = ox * ux + oy * uy + oz * uz
        s_max = -b + np.sqrt(b * b - (o2 - r_max * r_max))
        half = 0.5 * s_max
        p0, p1, ea, ka, eb, kb = phase[i, 0], phase[i, 1], phase[i, 2], phase[i, 3], phase[i, 4], phase[i, 5]
        acc = np.zeros((6, 2))
        for k in range(nq):
            s = half * (nodes[k] + 1.0)
            w = half * weights[k]
            x, y, z = ox + s * ux, oy + s * uy, oz + s * uz
            r2 = x * x + y * y + z * z
            r = np.sqrt(r2)
            # Sunlight travels along X/R, then towards the observer along -u.
            cos_t = -(x * ux + y * uy + z * uz) / r
            cos_t = min(1.0, max(-1.0, cos_t))
            t = np.arccos(cos_t)
            scat = scat_amp[i] * (p0 + p1 * t + ea * np.exp(ka * t) + eb * np.exp(kb * t)) / r2
            xb = planck_b[i] / (_T0_K * r**-_DELTA_T)
            bnu = planck_a[i] / np.expm1(xb) if xb < 700.0 else 0.0

            dens = np.zeros(6)
            if mask[0]:
                dens[0] = _cloud_density(x, y, z)
            if mask[1]:
                dens[1] = _band_density(
                    x, y, z, r, _B1_N0, _B1_DZ, _B1_V, _BAND_P, _B1_DR, _B1_SIN_O, _B1_COS_O, _B1_SIN_I, _B1_COS_I
                )
            if mask[2]:
                dens[2] = _band_density(
                    x, y, z, r, _B2_N0, _B2_DZ, _B2_V, _BAND_P, _B2_DR, _B2_SIN_O, _B2_COS_O, _B2_SIN_I, _B2_COS_I
                )
            if mask[3]:
                dens[3] = _band_density(
                    x, y, z, r, _B3_N0, _B3_DZ, _B3_V, _BAND_P, _B3_DR, _B3_SIN_O, _B3_COS_O, _B3_SIN_I, _B3_COS_I
                )
            if mask[4] or mask[5]:
                zr = abs(_plane_height(x, y, z, _RB_SIN_O, _RB_COS_O, _RB_SIN_I, _RB_COS_I))
                if mask[4]:
                    # Circumsolar ring.
                    dens[4] = _SR_N0 * np.exp(-(((r - _SR_R) / _SR_SIGR) ** 2) - zr / _SR_SIGZ)
                if mask[5]:
                    # Earth-trailing feature: also confined in azimuth.
                    dth = _wrap_pi(np.arctan2(y, x) - theta_feature)
                    dens[5] = _TB_N0 * np.exp(
                        -(((r - _TB_R) / _TB_SIGR) ** 2) - zr / _TB_SIGZ - (dth / _TB_SIGTHETA) ** 2
                    )
            for c in range(6):
                acc[c, 0] += w * dens[c] * scat
                acc[c, 1] += w * dens[c] * therm_w[i, c] * bnu
        for c in range(6):
            out[i, c, 0] = acc[c, 0]
            out[i, c, 1] = acc[c, 1]
    return out


# =========================================================================================
# Input checking and public API
# =========================================================================================


def _finite_array(name: str, value: object) -> np.ndarray:
    """``value`` as a float64 array, or SimulationError naming ``name``."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SimulationError(f"{name} must be numeric, got {value!r}") from exc
    if not np.all(np.isfinite(arr)):
        raise SimulationError(f"{name} must be finite; it contains NaN or inf")
    return arr


def _check_observer(observer: object) -> np.ndarray:
    obs = _finite_array("observer", observer)
    if obs.shape != (3,):
        raise SimulationError(
            f"observer must be one heliocentric ecliptic position of shape (3,) [AU], got shape {obs.shape}"
        )
    dist = float(np.sqrt(obs @ obs))
    if not 0.0 < dist < R_MAX_AU:
        raise SimulationError(
            f"observer must lie between the Sun and the {R_MAX_AU} AU integration sphere, "
            f"got heliocentric distance {dist:.4g} AU"
        )
    return obs


def _component_mask(components: Iterable[str] | None) -> np.ndarray:
    if components is None:
        return np.ones(len(COMPONENTS), dtype=np.bool_)
    names = [components] if isinstance(components, str) else list(components)
    unknown = [c for c in names if c not in COMPONENTS]
    if unknown or not names:
        raise SimulationError(f"components must be a non-empty subset of {COMPONENTS}, got {names!r}")
    return np.array([c in names for c in COMPONENTS], dtype=np.bool_)


def _evaluate(
    lon: object,
    lat: object,
    wavelength: object,
    observer: object,
    earth_longitude: float | None,
    n_quad: int,
    components: Iterable[str] | None,
) -> tuple[np.ndarray, tuple[int, ...]]:
    """Validate inputs and run the kernel; returns the (n, 6, 2) result and the output shape."""
    lon_a = _finite_array("lon", lon)
    lat_a = _finite_array("lat", lat)
    wl_a = _finite_array("wavelength", wavelength)
    obs = _check_observer(observer)
    if np.any(np.abs(lat_a) > 90.0):
        raise SimulationError("lat must lie within [-90, 90] deg")
    lo, hi = _WAVELENGTH_RANGE_UM
    if np.any((wl_a < lo) | (wl_a > hi)):
        raise SimulationError(
            f"wavelength must lie within {lo}-{hi} um (the model is scaled for 0.75-5 um), "
            f"got {wl_a.min():.4g}-{wl_a.max():.4g} um"
        )
    if isinstance(n_quad, bool) or not isinstance(n_quad, int | np.integer) or not 2 <= n_quad <= 4096:
        raise SimulationError(f"n_quad must be an integer in 2..4096, got {n_quad!r}")
    if earth_longitude is None:
        earth_lon = float(np.arctan2(obs[1], obs[0]))
    else:
        e = _finite_array("earth_longitude", earth_longitude)
        if e.ndim != 0:
            raise SimulationError(f"earth_longitude must be a scalar [deg], got shape {e.shape}")
        earth_lon = float(np.deg2rad(e))
    mask = _component_mask(components)
    try:
        lon_b, lat_b, wl_b = np.broadcast_arrays(lon_a, lat_a, wl_a)
    except ValueError as exc:
        raise SimulationError(
            f"lon, lat and wavelength must broadcast together, got shapes {lon_a.shape}, {lat_a.shape}, {wl_a.shape}"
        ) from exc
    shape = lon_b.shape
    lon_r = np.deg2rad(lon_b.ravel())
    lat_r = np.deg2rad(lat_b.ravel())
    cos_lat = np.cos(lat_r)
    u = np.ascontiguousarray(np.stack([cos_lat * np.cos(lon_r), cos_lat * np.sin(lon_r), np.sin(lat_r)], axis=-1))
    sp = _spectral_parameters(np.ascontiguousarray(wl_b.ravel()))
    nodes, weights = np.polynomial.legendre.leggauss(int(n_quad))
    with _KERNEL_LOCK:
        out = _los_kernel(
            u,
            obs,
            earth_lon,
            sp["scat_amp"],
            sp["phase"],
            sp["planck_a"],
            sp["planck_b"],
            sp["therm_w"],
            mask,
            nodes,
            weights,
            R_MAX_AU,
        )
    return out, shape


def zodi_components(
    lon: float | np.ndarray,
    lat: float | np.ndarray,
    wavelength: float | np.ndarray,
    *,
    observer: np.ndarray,
    earth_longitude: float | None = None,
    n_quad: int = 64,
    components: Iterable[str] | None = None,
) -> dict[str, np.ndarray]:
    """Scattered and thermal zodiacal brightness separately.

    Parameters are those of :func:`zodi_brightness`.

    Returns
    -------
    dict
        ``{"scattered": ..., "thermal": ...}``, each [MJy/sr] with the broadcast shape of
        ``lon``, ``lat`` and ``wavelength``, summed over the selected components. Their sum is
        :func:`zodi_brightness`.
    """
    out, shape = _evaluate(lon, lat, wavelength, observer, earth_longitude, n_quad, components)
    total = out.sum(axis=1)
    return {"scattered": total[:, 0].reshape(shape), "thermal": total[:, 1].reshape(shape)}


def zodi_brightness(
    lon: float | np.ndarray,
    lat: float | np.ndarray,
    wavelength: float | np.ndarray,
    *,
    observer: np.ndarray,
    earth_longitude: float | None = None,
    n_quad: int = 64,
    components: Iterable[str] | None = None,
) -> np.ndarray:
    """Zodiacal-light brightness of the K98 model scaled to ``wavelength``.

    Parameters
    ----------
    lon, lat
        Ecliptic longitude and latitude of the line of sight [deg] (mean ecliptic and equinox
        of J2000).
    wavelength
        Wavelength [um], 0.5-6 um accepted (the scaling is meant for 0.75-5 um).
        ``lon``, ``lat`` and ``wavelength`` broadcast together.
    observer
        Heliocentric ecliptic cartesian position of the observer [AU], shape (3,), e.g.
        :func:`earth_position`. Must lie inside the 5.2 AU integration sphere.
    earth_longitude
        Heliocentric ecliptic longitude of the Earth [deg], which positions the Earth-trailing
        feature. Default: the observer's heliocentric longitude (right for an observer near the
        Earth such as SPHEREx).
    n_quad
        Number of Gauss-Legendre nodes along each line of sight.
    components
        Subset of :data:`COMPONENTS` (``'cloud'``, ``'band1'``, ``'band2'``, ``'band3'``,
        ``'ring'``, ``'feature'``) to include, for diagnostics. Default: all.

    Returns
    -------
    numpy.ndarray
        Surface brightness I_nu [MJy/sr], float64, with the broadcast shape of the inputs.

    Raises
    ------
    sphx.errors.SimulationError
        Non-finite inputs, wavelength outside 0.5-6 um, latitude outside +-90 deg, observer not of
        shape (3,) or outside 5.2 AU, bad ``n_quad`` or unknown component names.
    """
    out, shape = _evaluate(lon, lat, wavelength, observer, earth_longitude, n_quad, components)
    return out.sum(axis=(1, 2)).reshape(shape)


# =========================================================================================
# Low-precision solar ephemeris
# =========================================================================================

_MJD_J2000 = 51544.5  # MJD of JD 2451545.0
_ABERRATION_DEG = 20.4955 / 3600.0  # annual aberration constant [deg]


def _solar_elements(mjd: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Days since J2000.0, apparent solar longitude of date [deg] and Sun-Earth distance [AU].

    The Astronomical Almanac's low-precision formulae (section C, "Sun"), good to 0.01 deg
    for 1950-2050.
    """
    n = _finite_array("mjd", mjd) - _MJD_J2000
    mean_lon = 280.460 + 0.9856474 * n
    g = np.deg2rad(357.528 + 0.9856003 * n)
    lam = mean_lon + 1.915 * np.sin(g) + 0.020 * np.sin(2.0 * g)
    dist = 1.00014 - 0.01671 * np.cos(g) - 0.00014 * np.cos(2.0 * g)
    return n, lam, dist


def sun_ecliptic_longitude(mjd: float | np.ndarray) -> np.ndarray:
    """Geocentric apparent ecliptic longitude of the Sun.

    Parameters
    ----------
    mjd
        Modified Julian Date (TT or UTC; the difference is negligible here).

    Returns
    -------
    numpy.ndarray
        Longitude [deg] in [0, 360), referred to the mean equinox of date and including
        aberration (accuracy ~ 0.01 deg, 1950-2050); the shape of ``mjd``.
    """
    _, lam, _ = _solar_elements(mjd)
    return np.mod(lam, 360.0)


def earth_position(mjd: float | np.ndarray) -> np.ndarray:
    """Heliocentric ecliptic cartesian position of the Earth.

    From the low-precision solar ephemeris (:func:`sun_ecliptic_longitude`): the Earth is
    opposite the Sun, with the aberration removed (geometric position) and the longitude
    precessed from the equinox of date to J2000, so that the frame is astropy's
    ``HeliocentricMeanEcliptic`` (J2000). The Earth is put in the ecliptic plane (its
    latitude is < 1 arcsec). Accuracy ~ 2e-4 AU.

    Parameters
    ----------
    mjd
        Modified Julian Date.

    Returns
    -------
    numpy.ndarray
        Position [AU], shape ``np.shape(mjd) + (3,)``.
    """
    n, lam_sun, dist = _solar_elements(mjd)
    t_cent = n / 36525.0
    # General precession in longitude (IAU 2006), converting "of date" to J2000 [deg].
    precession = (5028.796195 * t_cent + 1.1054348 * t_cent**2) / 3600.0
    lam_earth = np.deg2rad(lam_sun + 180.0 + _ABERRATION_DEG - precession)
    return np.stack([dist * np.cos(lam_earth), dist * np.sin(lam_earth), np.zeros_like(dist)], axis=-1)
