"""Number-weighted lognormal size distributions and their exact weights on a ladder of cluster sizes."""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr

from .errors import InputError, bad


def check_labels(mean_diameter_nm: float, size_dispersion_pct: float) -> None:
    if not np.isfinite(mean_diameter_nm) or mean_diameter_nm <= 0:
        raise bad("mean_diameter_nm", mean_diameter_nm, "a positive mean diameter in nm")
    if not np.isfinite(size_dispersion_pct) or not 0 <= size_dispersion_pct < 100:
        raise bad("size_dispersion_pct", size_dispersion_pct,
                  "a size dispersion (std/mean) in percent, 0 <= value < 100")


def lognormal_params(mean_diameter_nm: float, size_dispersion_pct: float) -> tuple[float, float]:
    """(mu, s) of ln D for a number-weighted mean <D> and relative dispersion c = sigma_D / <D>."""
    check_labels(mean_diameter_nm, size_dispersion_pct)
    s2 = np.log1p((size_dispersion_pct / 100.0) ** 2)
    return float(np.log(mean_diameter_nm) - s2 / 2.0), float(np.sqrt(s2))


def quantile_range_nm(mean_diameter_nm: float, size_dispersion_pct: float, n_sigma: float = 4.0) -> tuple[float, float]:
    """Diameters that bracket all but a negligible tail (n_sigma of ln D) of the distribution."""
    mu, s = lognormal_params(mean_diameter_nm, size_dispersion_pct)
    return float(np.exp(mu - n_sigma * s)), float(np.exp(mu + n_sigma * s))


def ladder_weights(diameters_nm, mean_diameter_nm: float, size_dispersion_pct: float) -> np.ndarray:
    """Number fraction assigned to each ladder size: the lognormal integrated against hat functions.

    Each size k takes int p(D) hat_k(D) dD, with hat_k the piecewise-linear interpolation basis on the ladder
    (mass beyond the ends goes to the end sizes). Weights sum to one, vary smoothly with both labels, keep the
    number-weighted mean exactly when the distribution lies inside the ladder, and at zero dispersion reduce to
    linear interpolation between the two neighbouring sizes (exactly one size when the mean sits on the ladder).
    """
    d = np.asarray(diameters_nm, dtype=np.float64)
    if d.ndim != 1 or d.size < 1 or np.any(np.diff(d) <= 0):
        raise InputError("diameters_nm: expected a strictly increasing ladder of diameters")
    check_labels(mean_diameter_nm, size_dispersion_pct)
    if not d[0] <= mean_diameter_nm <= d[-1]:
        raise bad("mean_diameter_nm", mean_diameter_nm, f"a value inside the size ladder [{d[0]:.3f}, {d[-1]:.3f}] nm")
    if d.size == 1:
        return np.ones(1)
    return ladder_weights_batch(d, np.array([mean_diameter_nm]), np.array([size_dispersion_pct]))[0]


def ladder_weights_batch(diameters_nm: np.ndarray, mean_nm: np.ndarray, size_dispersion_pct: np.ndarray) -> np.ndarray:
    """`ladder_weights` for many (mean, dispersion) pairs on one ladder (at least two sizes) at once, shape (n, K):
    the same hat-function integrals of the number-weighted lognormal, the one implementation of both."""
    d = np.asarray(diameters_nm, dtype=np.float64)
    m = np.asarray(mean_nm, dtype=np.float64)
    c = np.asarray(size_dispersion_pct, dtype=np.float64)
    if np.any(m < d[0]) or np.any(m > d[-1]):
        i = int(np.flatnonzero((m < d[0]) | (m > d[-1]))[0])
        raise bad("mean_diameter_nm", float(m[i]), f"a value inside the size ladder [{d[0]:.3f}, {d[-1]:.3f}] nm")
    n, k = m.size, d.size
    w = np.zeros((n, k))
    zero = c == 0
    if np.any(zero):
        mz = m[zero]
        j = np.minimum(np.searchsorted(d, mz, side="right") - 1, k - 2)
        t = (mz - d[j]) / (d[j + 1] - d[j])
        rows = np.flatnonzero(zero)
        w[rows, j] = 1.0 - t
        w[rows, j + 1] += t
    pos = ~zero
    if np.any(pos):
        s2 = np.log1p((c[pos] / 100.0) ** 2)
        mu = np.log(m[pos]) - s2 / 2.0
        s = np.sqrt(s2)
        z = (np.log(d)[None, :] - mu[:, None]) / s[:, None]
        cdf = ndtr(z)
        cdf_m = np.exp(mu + s2 / 2.0)[:, None] * ndtr(z - s[:, None])
        p = np.diff(cdf, axis=1)
        mm = np.diff(cdf_m, axis=1)
        h = np.diff(d)[None, :]
        wp = np.zeros((pos.sum(), k))
        wp[:, :-1] += (d[None, 1:] * p - mm) / h
        wp[:, 1:] += (mm - d[None, :-1] * p) / h
        wp[:, 0] += cdf[:, 0]
        wp[:, -1] += 1.0 - cdf[:, -1]
        wp = np.clip(wp, 0.0, None)
        w[pos] = wp / wp.sum(axis=1, keepdims=True)
    return w


def realised_labels_batch(diameters_nm, weights) -> tuple[np.ndarray, np.ndarray]:
    """Number-weighted mean diameters (nm) and dispersions (%) of many distributions on one ladder: `weights`
    (n, K), each row summing to one; the labels of the distributions actually composed."""
    d = np.asarray(diameters_nm, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    mean = w @ d
    return mean, 100.0 * np.sqrt(np.maximum(w @ d**2 - mean**2, 0.0)) / mean


def realised_labels(diameters_nm, weights) -> tuple[float, float]:
    """Number-weighted mean diameter (nm) and dispersion (%) of the discrete distribution actually composed."""
    w = np.asarray(weights, dtype=np.float64)
    mean, disp = realised_labels_batch(diameters_nm, (w / w.sum())[None])
    return float(mean[0]), float(disp[0])
