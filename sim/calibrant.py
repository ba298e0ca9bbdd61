"""Instrument resolution and Q calibration from a calibrant pattern (Si, LaB6, CeO2): pseudo-Voigt fits of its lines."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares, nnls

from .contract import Resolution
from .errors import InputError

# Cubic line-position standards: lattice parameter (A, NIST certificates near 22.5 C) and reflection rule.
# SRM 640f silicon 5.431144 A; SRM 660c LaB6 4.156826 A; SRM 674b CeO2 5.411651 A. Their crystallites are large
# and unstrained, so their line widths are the instrument's.
STANDARDS = {"Si": (5.431144, "diamond"), "LaB6": (4.156826, "primitive"), "CeO2": (5.411651, "fcc")}
MIN_LINES = 3  # usable lines needed for a two-parameter width law
MIN_SNR = 8.0  # a line's height over the local noise for its width to count
MAX_POSITION_MISFIT = 0.3  # rms line-position misfit after the axis correction, in units of the median FWHM
STRONG_PEAK = 0.2  # a peak of at least this fraction of the strongest prominence must be one of the standard's
MAX_SCALE_ERROR = 0.002  # beyond this Q-scale error, another standard that needs a third of it is named instead


@dataclass
class Line:
    """One fitted calibrant line: expected and fitted centre, FWHM, Lorentzian fraction (all Q in 1/A)."""

    hkl: tuple[int, int, int]
    q_expected_inv_angstrom: float
    q_fitted_inv_angstrom: float
    fwhm_inv_angstrom: float
    lorentz_fraction: float
    snr: float
    used: bool


@dataclass
class ResolutionFit:
    """FWHM(Q) = sqrt(fwhm0^2 + (fwhm_relative Q)^2), pseudo-Voigt with Lorentzian fraction eta (as the augmentation
    and `qdsize predict --resolution` define them), and the Q-axis error the line positions show."""

    standard: str
    fwhm0_inv_angstrom: float
    fwhm_relative: float
    lorentz_fraction: float
    zero_shift_inv_angstrom: float  # measured Q = true Q (1 + scale_error) + zero_shift
    scale_error: float
    rms_fwhm_misfit_inv_angstrom: float
    lines: list[Line] = field(default_factory=list)

    @property
    def resolution(self) -> Resolution:
        """The fitted law as the one Resolution every layer takes."""
        return Resolution(self.fwhm0_inv_angstrom, self.fwhm_relative, self.lorentz_fraction)

    @property
    def argument(self) -> str:
        """The value for `qdsize predict --resolution`."""
        return self.resolution.argument

    def fwhm_at(self, q_inv_angstrom) -> np.ndarray:
        return self.resolution.fwhm_at(q_inv_angstrom)


def check_standard(name: str) -> str:
    for key in STANDARDS:
        if name.lower() == key.lower():
            return key
    raise InputError(f"standard = {name!r}: expected one of {', '.join(STANDARDS)}")


def reflections(standard: str, q_min: float, q_max: float) -> list[tuple[tuple[int, int, int], float]]:
    """Allowed reflections (one hkl per distinct Q) of a cubic standard between q_min and q_max (1/A)."""
    a, rule = STANDARDS[check_standard(standard)]
    n_max = int(np.ceil(q_max * a / (2 * np.pi))) + 1
    seen: dict[int, tuple[int, int, int]] = {}
    for h in range(n_max + 1):
        for k in range(h + 1):
            for l in range(k + 1):
                s = h * h + k * k + l * l
                if s == 0 or s in seen:
                    continue
                same = h % 2 == k % 2 == l % 2
                if rule == "fcc" and not same:
                    continue
                if rule == "diamond" and not (same and (h % 2 == 1 or s % 4 == 0 and (h + k + l) % 4 == 0)):
                    continue
                seen[s] = (h, k, l)
    out = [(hkl, 2 * np.pi * np.sqrt(s) / a) for s, hkl in seen.items()]
    return sorted((r for r in out if q_min <= r[1] <= q_max), key=lambda r: r[1])


def pseudo_voigt(q, centre, fwhm, eta):
    """Unit-area pseudo-Voigt: eta Lorentzian + (1 - eta) Gaussian of the same FWHM."""
    x = (np.asarray(q) - centre) / fwhm
    g = 2.0 * np.sqrt(np.log(2) / np.pi) / fwhm * np.exp(-4.0 * np.log(2) * x * x)
    lor = 2.0 / (np.pi * fwhm) / (1.0 + 4.0 * x * x)
    return eta * lor + (1.0 - eta) * g


def _fit_line(q, y, centre, half_window, step):
    win = (q >= centre - half_window) & (q <= centre + half_window)
    if win.sum() < 12:
        return None
    qw, yw = q[win], y[win]
    i = int(np.argmax(yw))
    base = np.percentile(yw, 10)
    height = yw[i] - base
    noise = np.median(np.abs(np.diff(yw, 2))) / 0.8  # second differences: about 2.4 x the point noise, minus shape
    if height <= 0:
        return None
    above = qw[yw - base > height / 2]
    w0 = float(np.clip(above[-1] - above[0] if above.size > 1 else 3 * step, 2 * step, half_window))
    c0 = float(qw[i])
    p0 = [c0, w0, 0.1, height * w0, base, 0.0]
    lo = [qw[0], step, 0.0, 0.0, -np.inf, -np.inf]
    hi = [qw[-1], half_window, 1.0, np.inf, np.inf, np.inf]

    def resid(p):
        return p[3] * pseudo_voigt(qw, p[0], p[1], p[2]) + p[4] + p[5] * (qw - c0) - yw

    try:
        r = least_squares(resid, p0, bounds=(lo, hi), x_scale="jac")
    except ValueError:
        return None
    c, w, eta, area = r.x[:4]
    snr = area * pseudo_voigt(c, c, w, eta) / max(noise, 1e-12 * max(abs(height), 1e-30))
    return float(c), float(w), float(eta), float(snr)


def fit_resolution(q_inv_angstrom, intensity, standard: str, *, name: str = "pattern") -> ResolutionFit:
    """Fit every separable line of the standard with a pseudo-Voigt on a linear background, then the width law
    FWHM^2 = fwhm0^2 + (fwhm_relative Q)^2 (non-negative least squares) and the Q-axis error (positions).
    Refuses (InputError) a pattern whose lines are not the standard's: positions that a linear Q-axis correction
    does not bring onto its reflections, strong peaks it has no reflection for, or a Q-scale error that another
    standard does not need."""
    fit = _fit_resolution(q_inv_angstrom, intensity, standard, name=name)
    why = position_misfit(q_inv_angstrom, intensity, fit)
    if why is None and abs(fit.scale_error) > MAX_SCALE_ERROR:
        why = (f"the line positions need a Q-scale error of {fit.scale_error:+.2%}, more than "
               f"{MAX_SCALE_ERROR:.1%}")
    if why is None:
        return fit
    better = []
    for other in STANDARDS:
        if other == fit.standard:
            continue
        try:
            alt = _fit_resolution(q_inv_angstrom, intensity, other, name=name)
        except InputError:
            continue
        if position_misfit(q_inv_angstrom, intensity, alt) is None and \
                abs(alt.scale_error) <= max(MAX_SCALE_ERROR, abs(fit.scale_error) / 3):
            better.append(f"{other} (scale error {alt.scale_error:+.2%})")
    hint = f"its lines fit {' or '.join(better)}" if better else \
        "check the standard, the x unit and the wavelength"
    raise InputError(f"{name}: not a {fit.standard} pattern as given: {why}; {hint}; expected the lines of "
                     f"--standard {fit.standard}")


def position_misfit(q_inv_angstrom, intensity, fit: ResolutionFit) -> str | None:
    """Why the pattern's lines are not where the standard's are (None if they are): the rms position misfit after
    the fitted axis correction, or a strong peak far from every reflection."""
    from scipy.signal import find_peaks

    good = [ln for ln in fit.lines if ln.used]
    qe = np.array([ln.q_expected_inv_angstrom for ln in good])
    qg = np.array([ln.q_fitted_inv_angstrom for ln in good])
    width = float(np.median([ln.fwhm_inv_angstrom for ln in good]))
    rms = float(np.sqrt(np.mean((qg - qe * (1 + fit.scale_error) - fit.zero_shift_inv_angstrom) ** 2)))
    if rms > MAX_POSITION_MISFIT * width:
        return (f"the fitted lines lie {rms:.4f} 1/A (rms) from its reflections after the Q-axis correction, "
                f"against widths of {width:.4f} 1/A")
    q = np.asarray(q_inv_angstrom, dtype=float)
    y = np.asarray(intensity, dtype=float)
    ok = np.isfinite(q) & np.isfinite(y)
    q, y = q[ok], y[ok]
    step = float(np.median(np.diff(q)))
    peaks, props = find_peaks(y, prominence=0.0, width=1.5)
    if not peaks.size:
        return None
    strong = peaks[props["prominences"] >= STRONG_PEAK * props["prominences"].max()]
    expected = np.array([qc for _, qc in reflections(fit.standard, q[0] - 1.0, q[-1] + 1.0)])
    expected = expected * (1 + fit.scale_error) + fit.zero_shift_inv_angstrom
    for i in strong:
        tol = max(2.0 * float(fit.fwhm_at(q[i])), 3 * step)
        if expected.size == 0 or np.abs(expected - q[i]).min() > tol:
            return f"a strong peak at Q = {q[i]:.3f} 1/A is none of its reflections"
    return None


def _fit_resolution(q_inv_angstrom, intensity, standard: str, *, name: str = "pattern") -> ResolutionFit:
    standard = check_standard(standard)
    q = np.asarray(q_inv_angstrom, dtype=float)
    y = np.asarray(intensity, dtype=float)
    ok = np.isfinite(q) & np.isfinite(y)
    q, y = q[ok], y[ok]
    if q.size < 50:
        raise InputError(f"{name}: {q.size} finite points; expected a calibrant pattern of at least 50 points")
    step = float(np.median(np.diff(q)))
    refl = reflections(standard, q[0] + 0.05, q[-1] - 0.05)
    lines: list[Line] = []
    for j, (hkl, qc) in enumerate(refl):
        gaps = [abs(qc - refl[t][1]) for t in (j - 1, j + 1) if 0 <= t < len(refl)]
        half = min(0.45 * min(gaps, default=0.3), 0.25)
        got = _fit_line(q, y, qc, half, step)
        if got is None:
            continue
        c, w, eta, snr = got
        # a width counts when the line stands out, its window holds its tails and it is not a neighbour's shoulder
        used = bool(snr >= MIN_SNR and w <= half / 2.5 and abs(c - qc) <= half / 2)
        lines.append(Line(hkl, float(qc), c, w, eta, snr, used))
    good = [ln for ln in lines if ln.used]
    if len(good) < MIN_LINES:
        raise InputError(f"{name}: {len(good)} usable {standard} lines between {q[0]:.2f} and {q[-1]:.2f} 1/A; "
                         f"expected at least {MIN_LINES} (is it a {standard} pattern, with Q in 1/A or the right "
                         "wavelength?)")
    qg = np.array([ln.q_fitted_inv_angstrom for ln in good])
    w2 = np.array([ln.fwhm_inv_angstrom for ln in good]) ** 2
    weight = 1.0 / w2  # relative errors of the widths are alike
    coef, _ = nnls(np.stack([np.ones_like(qg), qg**2], 1) * weight[:, None], w2 * weight)
    fwhm0, rel = float(np.sqrt(coef[0])), float(np.sqrt(coef[1]))
    model = np.sqrt(coef[0] + coef[1] * qg**2)
    misfit = float(np.sqrt(np.mean((np.sqrt(w2) - model) ** 2)))
    qe = np.array([ln.q_expected_inv_angstrom for ln in good])
    scale, shift = np.polyfit(qe, qg - qe, 1)
    eta = float(np.clip(np.median([ln.lorentz_fraction for ln in good]), 0.0, 1.0))
    return ResolutionFit(standard, fwhm0, rel, eta, float(shift), float(scale), misfit, lines)
