"""Number-weighted lognormal size distributions and their exact weights on a ladder of cluster sizes."""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr

from .errors import InputError, bad


def check_labels(mean_diameter_nm: float, dispersion_pct: float) -> None:
    if not np.isfinite(mean_diameter_nm) or mean_diameter_nm <= 0:
        raise bad("mean_diameter_nm", mean_diameter_nm, "a positive mean diameter in nm")
    if not np.isfinite(dispersion_pct) or not 0 <= dispersion_pct < 100:
        raise bad("dispersion_pct", dispersion_pct, "a size dispersion (std/mean) in percent, 0 <= value < 100")


def lognormal_params(mean_diameter_nm: float, dispersion_pct: float) -> tuple[float, float]:
    """(mu, s) of ln D for a number-weighted mean <D> and relative dispersion c = sigma_D / <D>."""
    check_labels(mean_diameter_nm, dispersion_pct)
    s2 = np.log1p((dispersion_pct / 100.0) ** 2)
    return float(np.log(mean_diameter_nm) - s2 / 2.0), float(np.sqrt(s2))


def quantile_range_nm(mean_diameter_nm: float, dispersion_pct: float, n_sigma: float = 4.0) -> tuple[float, float]:
    """Diameters that bracket all but a negligible tail (n_sigma of ln D) of the distribution."""
    mu, s = lognormal_params(mean_diameter_nm, dispersion_pct)
    return float(np.exp(mu - n_sigma * s)), float(np.exp(mu + n_sigma * s))


def ladder_weights(diameters_nm, mean_diameter_nm: float, dispersion_pct: float) -> np.ndarray:
    """Number fraction assigned to each ladder size: the lognormal integrated against hat functions.

    Each size k takes int p(D) hat_k(D) dD, with hat_k the piecewise-linear interpolation basis on the ladder
    (mass beyond the ends goes to the end sizes). Weights sum to one, vary smoothly with both labels, keep the
    number-weighted mean exactly when the distribution lies inside the ladder, and at zero dispersion reduce to
    linear interpolation between the two neighbouring sizes (exactly one size when the mean sits on the ladder).
    """
    d = np.asarray(diameters_nm, dtype=np.float64)
    if d.ndim != 1 or d.size < 1 or np.any(np.diff(d) <= 0):
        raise InputError("diameters_nm: expected a strictly increasing ladder of diameters")
    check_labels(mean_diameter_nm, dispersion_pct)
    if not d[0] <= mean_diameter_nm <= d[-1]:
        raise bad("mean_diameter_nm", mean_diameter_nm, f"a value inside the size ladder [{d[0]:.3f}, {d[-1]:.3f}] nm")
    w = np.zeros(d.size)
    if d.size == 1:
        w[0] = 1.0
        return w
    if dispersion_pct == 0:
        j = min(int(np.searchsorted(d, mean_diameter_nm, side="right")) - 1, d.size - 2)
        t = (mean_diameter_nm - d[j]) / (d[j + 1] - d[j])
        w[j], w[j + 1] = 1.0 - t, t
        return w
    mu, s = lognormal_params(mean_diameter_nm, dispersion_pct)
    z = (np.log(d) - mu) / s
    cdf = ndtr(z)  # P(D <= d_k)
    cdf_m = np.exp(mu + s * s / 2.0) * ndtr(z - s)  # int_0^{d_k} D p(D) dD
    p = np.diff(cdf)
    m = np.diff(cdf_m)
    h = np.diff(d)
    w[:-1] += (d[1:] * p - m) / h
    w[1:] += (m - d[:-1] * p) / h
    w[0] += cdf[0]
    w[-1] += 1.0 - cdf[-1]
    w = np.clip(w, 0.0, None)
    return w / w.sum()


def realised_labels(diameters_nm, weights) -> tuple[float, float]:
    """Number-weighted mean diameter (nm) and dispersion (%) of the discrete distribution actually composed."""
    d = np.asarray(diameters_nm, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    mean = float(np.sum(w * d) / np.sum(w))
    var = float(np.sum(w * (d - mean) ** 2) / np.sum(w))
    return mean, 100.0 * np.sqrt(max(var, 0.0)) / mean
