"""X-ray atomic form factors (Waasmaier-Kirfel f0 plus anomalous f', f''), Debye-Waller factors and Q grids."""

from __future__ import annotations

import functools

import numpy as np

from .errors import InputError, bad

HC_KEV_ANGSTROM = 12.398419843320026  # h c in keV * Angstrom (CODATA 2018)


def wavelength_angstrom(energy_kev: float) -> float:
    """Photon wavelength in Angstrom for an energy in keV."""
    if not np.isfinite(energy_kev) or energy_kev <= 0:
        raise bad("energy_kev", energy_kev, "a positive photon energy in keV")
    return HC_KEV_ANGSTROM / energy_kev


def energy_kev(wavelength_angstrom_: float) -> float:
    """Photon energy in keV for a wavelength in Angstrom."""
    if not np.isfinite(wavelength_angstrom_) or wavelength_angstrom_ <= 0:
        raise bad("wavelength_angstrom", wavelength_angstrom_, "a positive wavelength in Angstrom")
    return HC_KEV_ANGSTROM / wavelength_angstrom_


def q_grid(q_min: float, q_max: float, q_step: float) -> np.ndarray:
    """Inclusive, evenly spaced Q grid in 1/Angstrom (q_max included when it falls on the grid)."""
    for name, v in (("q_min", q_min), ("q_max", q_max), ("q_step", q_step)):
        if not np.isfinite(v):
            raise bad(name, v, "a finite number in 1/Angstrom")
    if q_min < 0:
        raise bad("q_min", q_min, "Q >= 0 in 1/Angstrom")
    if q_step <= 0:
        raise bad("q_step", q_step, "a positive step in 1/Angstrom")
    if q_max <= q_min:
        raise bad("q_max", q_max, f"a value above q_min = {q_min} (the Q grid must increase)")
    n = int(np.floor((q_max - q_min) / q_step + 1e-9)) + 1
    return q_min + q_step * np.arange(n, dtype=np.float64)


def q_from_two_theta(two_theta_deg, wavelength_angstrom_: float) -> np.ndarray:
    """Q = 4 pi sin(theta) / lambda for scattering angles 2-theta in degrees."""
    tt = np.asarray(two_theta_deg, dtype=np.float64)
    return 4.0 * np.pi * np.sin(np.deg2rad(tt) / 2.0) / wavelength_angstrom_


def two_theta_from_q(q_inv_angstrom, wavelength_angstrom_: float) -> np.ndarray:
    """2-theta in degrees for Q in 1/Angstrom; NaN where Q is beyond the wavelength's reach."""
    s = np.asarray(q_inv_angstrom, dtype=np.float64) * wavelength_angstrom_ / (4.0 * np.pi)
    with np.errstate(invalid="ignore"):
        return np.where(np.abs(s) <= 1, 2.0 * np.rad2deg(np.arcsin(np.clip(s, -1, 1))), np.nan)


def check_q(q_inv_angstrom) -> np.ndarray:
    """Validate a Q grid: 1-D, finite, non-negative and strictly increasing."""
    q = np.asarray(q_inv_angstrom, dtype=np.float64)
    if q.ndim != 1 or q.size < 1:
        raise bad("q_inv_angstrom", f"array of shape {q.shape}", "a 1-D grid with at least one point")
    if not np.all(np.isfinite(q)) or np.any(q < 0):
        raise bad("q_inv_angstrom", "grid with negative or non-finite values", "finite Q >= 0")
    if q.size > 1 and np.any(np.diff(q) <= 0):
        i = int(np.argmin(np.diff(q) > 0))
        raise bad("q_inv_angstrom", f"... {q[i]:g}, {q[i + 1]:g} ...", "a strictly increasing Q grid")
    return q


@functools.lru_cache(maxsize=None)
def _xraydb():
    import xraydb  # imported lazily: its SQLite tables take a moment to open

    return xraydb


def check_element(symbol: str) -> str:
    """Return a canonical element symbol or raise naming it."""
    s = str(symbol).strip()
    s = s[:1].upper() + s[1:].lower()
    try:
        _xraydb().atomic_number(s)
    except Exception:
        raise bad("element", symbol, "a chemical element symbol such as Pb or S") from None
    return s


def f0(element: str, q_inv_angstrom) -> np.ndarray:
    """Non-resonant form factor f0(Q) in electrons (Waasmaier-Kirfel via xraydb; neutral atoms)."""
    el = check_element(element)
    q = np.asarray(q_inv_angstrom, dtype=np.float64)
    return np.asarray(_xraydb().f0(el, q / (4.0 * np.pi)), dtype=np.float64).reshape(q.shape)


def anomalous(element: str, energy_kev_: float) -> complex:
    """Anomalous correction f' + i f'' in electrons at a photon energy (Chantler tables via xraydb)."""
    el = check_element(element)
    if not np.isfinite(energy_kev_) or energy_kev_ <= 0:
        raise bad("energy_kev", energy_kev_, "a positive photon energy in keV")
    xdb = _xraydb()
    e_ev = float(energy_kev_) * 1000.0
    f1 = float(np.asarray(xdb.f1_chantler(el, e_ev)))
    f2 = float(np.asarray(xdb.f2_chantler(el, e_ev)))
    return complex(f1, f2)


def form_factors(elements, q_inv_angstrom, energy_kev: float | None = None) -> np.ndarray:
    """Complex form factors f(Q) = f0(Q) + f' + i f'', shape (n_elements, n_Q); f0 only without an energy."""
    q = np.asarray(q_inv_angstrom, dtype=np.float64)
    out = np.empty((len(elements), q.size), dtype=np.complex128)
    for i, el in enumerate(elements):
        out[i] = f0(el, q)
        if energy_kev is not None:
            out[i] += anomalous(el, energy_kev)
    return out


def debye_waller(b_iso_angstrom2, q_inv_angstrom) -> np.ndarray:
    """Amplitude damping T(Q) = exp(-B Q^2 / (16 pi^2)) per element, shape (n_elements, n_Q)."""
    b = np.atleast_1d(np.asarray(b_iso_angstrom2, dtype=np.float64))
    if np.any(~np.isfinite(b)) or np.any(b < 0):
        raise bad("b_iso", b.tolist(), "isotropic displacement parameters B >= 0 in Angstrom^2")
    q = np.asarray(q_inv_angstrom, dtype=np.float64)
    return np.exp(-b[:, None] * q[None, :] ** 2 / (16.0 * np.pi**2))


def per_element(value, elements, name: str) -> np.ndarray:
    """Expand a scalar or a {element: value} mapping into one value per element, in order."""
    if isinstance(value, dict):
        canon = {check_element(k): float(v) for k, v in value.items()}
        missing = [e for e in elements if e not in canon]
        if missing:
            raise InputError(f"{name} = {value!r}: expected a value for every element, missing {missing}")
        return np.array([canon[e] for e in elements], dtype=np.float64)
    return np.full(len(elements), float(value), dtype=np.float64)
