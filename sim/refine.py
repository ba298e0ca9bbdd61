"""Physics refinement: bounded least-squares fit of the cached-ladder DSE model to a measured pattern on its grid."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from . import distribution, ladder, scattering, solvents
from .compose import T_MAX_SIGMA, quadrature_rules
from .errors import InputError, bad
from .io import content_hash

# The default model ladder: one of the default dataset's families (conf/dataset/pbs.yaml), so that the cached tables
# of `qdsize simulate` are reused. Pb-rich spheres: real PbS dots are Pb-rich (physics notes).
DEFAULT_LADDER = {"material": "pbs", "a_angstrom": 5.936, "shape": "sphere", "surface": "cation_rich",
                  "anion_removal": 0.5, "centre": "random", "centre_seed": 0, "ladder_min_nm": 1.0,
                  "ladder_max_nm": 24.0, "ladder_relative_step": 0.025}
FINE_STEP_INV_ANGSTROM = 0.004  # the default dataset's fine grid step (compose.fine_step_inv_angstrom)
DEFAULT_FINE = (0.88, 0.004, 2436)  # fine grid of conf/dataset/pbs.yaml: sharing it shares the table cache
FINE_MARGIN_POINTS = 16
DEFAULT_Q_MAX_INV_ANGSTROM = 10.0  # the default fit range ends here (inside DEFAULT_FINE with every margin)
# data sampled finer than the tables' step carry no detail the model has: consecutive points are averaged down to
# about this step before the fit (a box of this width broadens the narrowest peak the ladder holds, 24 nm, by < 1 %)
FIT_STEP_INV_ANGSTROM = FINE_STEP_INV_ANGSTROM
REQUIRED_Q_MIN_INV_ANGSTROM = 1.2  # DESIGN.md: a measured pattern must cover at least 1.2-7.0 1/A
REQUIRED_Q_MAX_INV_ANGSTROM = 7.0
COVERAGE_MARGIN_INV_ANGSTROM = 0.1
POOR_FIT_CHI2 = 3.0  # reduced chi-square above this flags a poor fit
SINGULAR_CONDITION = 1e13  # condition number of the scaled normal matrix beyond which the covariance is singular
TAIL_SIGMA = 3.0  # the fitted distribution must lie inside the ladder out to this many sigma of ln D

MICROSTRAIN_START_PCT = 0.15

BOUNDS = {"mean_diameter_nm": (1.5, 14.0), "size_dispersion_pct": (0.0, 40.0), "strain": (-0.025, 0.025),
          "b_iso": (0.0, 8.0), "microstrain_pct": (0.0, 1.0), "q_zero_inv_angstrom": (-0.03, 0.03),
          "fwhm0_inv_angstrom": (0.0, 0.06), "fwhm_rel": (0.0, 0.008)}
FD_STEP = {"mean_diameter_nm": 0.01, "size_dispersion_pct": 0.2, "strain": 2e-4, "b_iso": 0.02,
           "microstrain_pct": 0.01, "q_zero_inv_angstrom": 2e-4, "fwhm0_inv_angstrom": 5e-4, "fwhm_rel": 5e-5}
RESOLUTION_START = {"fwhm0_inv_angstrom": 0.012, "fwhm_rel": 0.001}  # off zero: the width acts quadratically there
RESOLUTION_REACH_SIGMA = 4.0  # the resolution kernel is cut at this many sigma
BACKGROUND_SPACING_SQRT_Q = 0.3  # spline background: knots evenly spaced in sqrt(Q) (0.6 1/A at 1, 1.9 at 10)
# the guard: when the refined answer replaces the network's
GUARD_CHI2_MAX = 30.0  # reduced chi-square beyond which the model does not describe the data
GUARD_RWP_MAX = 0.25
GUARD_SIGNAL_MIN = 2.0  # chi-square gain of the particle model over the background alone, relative to the fit's
GUARD_MOVE_FLAG_SIGMA = 1.0  # a move beyond this many combined standard uncertainties is flagged
GUARD_MOVE_REJECT_SIGMA = 2.0  # ... and beyond this many it is rejected (the network's answer stands)
NETWORK_STD_FALLBACK = 0.1  # relative uncertainty assumed for a start given without one
INFO_MIN = 1e-4  # weighted model change of one finite-difference step below which a parameter is undetermined
MODEL_FLOOR_REL = 0.01  # model error floor of the refined mean (relative, in quadrature): one family's surface and
# cut centre against another's move the mean by about this much at high counts, whatever the noise


# ----------------------------------------------------------------------------------------------------------------
# Ladder tables: fine-grid B-spline coefficients of every ladder member's pair sums (cached by content hash)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Ladder:
    """A family of clusters ready for fast composition: B-spline coefficients of the unstrained pair sums on a
    uniform fine Q grid, (K, P, F) float64, with atom counts (K, S), equal-volume diameters and pair distances."""

    species: tuple[str, ...]
    coef: np.ndarray
    atoms: np.ndarray
    diameters_nm: np.ndarray
    rmax_angstrom: np.ndarray
    fine_q0: float
    fine_step: float
    spec: dict = field(default_factory=dict)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        n = len(self.species)
        return [(s, t) for s in range(n) for t in range(s, n)]

    @property
    def q_range(self) -> tuple[float, float]:
        """Q range where the spline is valid (clear of the edges)."""
        n = self.coef.shape[-1]
        return (self.fine_q0 + FINE_MARGIN_POINTS * self.fine_step,
                self.fine_q0 + (n - 1 - FINE_MARGIN_POINTS) * self.fine_step)

    @classmethod
    def from_tables(cls, tab: dict, spec: dict | None = None) -> "Ladder":
        """From the family tables of `qdsize.sim.ladder.get_family` (with fine_q0 / fine_step added)."""
        k = len(tab["diameters_nm"])
        p = int(tab["n_pairs"])
        coef = np.asarray(tab["coef"], dtype=np.float64).reshape(k, p, int(tab["n_fine"]))
        return cls(tuple(str(s) for s in tab["species"]), coef, np.asarray(tab["atoms"], dtype=np.float64),
                   np.asarray(tab["diameters_nm"], dtype=np.float64),
                   np.asarray(tab["rmax_angstrom"], dtype=np.float64), float(tab["fine_q0"]),
                   float(tab["fine_step"]), dict(spec or {}))


def fine_grid_for(q_min: float, q_max: float, stretch_lo: float, stretch_hi: float,
                  step: float = FINE_STEP_INV_ANGSTROM) -> tuple[float, float, int]:
    """(q0, step, n) of a fine grid covering [q_min * stretch_lo, q_max * stretch_hi] with spline margins; the
    default dataset's grid when it covers the range (shared cache), else one on coarsely rounded limits."""
    lo = q_min * stretch_lo - FINE_MARGIN_POINTS * step
    hi = q_max * stretch_hi + FINE_MARGIN_POINTS * step
    q0, h, n = DEFAULT_FINE
    if h == step and q0 <= lo and q0 + (n - 1) * h >= hi:
        return DEFAULT_FINE
    # coarse alignment (0.1 1/A below, 0.5 1/A above): nearby fit ranges share one cached table
    lo = max(math.floor(lo / 0.1) * 0.1, step)
    hi = math.ceil(hi / 0.5) * 0.5
    return (round(lo, 12), step, int(round((hi - lo) / step)) + 1)


def load_ladder(q_min: float, q_max: float, *, spec: dict | None = None, cache=None,
                strain_bounds=BOUNDS["strain"], microstrain_max_pct: float = BOUNDS["microstrain_pct"][1]) -> Ladder:
    """Ladder tables covering a fit range, from the family cache ($QDSIZE_HOME/cache) or built there once.

    `spec` overrides DEFAULT_LADDER (shape, surface, ...). The fine grid covers every strained and microstrained
    evaluation point allowed by the bounds.
    """
    s = dict(DEFAULT_LADDER)
    s.update(spec or {})
    unknown = sorted(set(s) - set(DEFAULT_LADDER))
    if unknown:
        raise bad("ladder", unknown, f"keys among {sorted(DEFAULT_LADDER)}")
    if s["surface"] != "cation_rich":
        s["anion_removal"] = 0.0  # as the dataset's family specs do
    s["format"] = ladder.FAMILY_FORMAT
    s["family_id"] = content_hash({k: v for k, v in s.items() if k != "family_id"})
    sig = microstrain_max_pct / 100.0 * _node_reach(microstrain_max_pct)
    q0, h, n = fine_grid_for(q_min, q_max, (1 + strain_bounds[0]) * (1 - sig), (1 + strain_bounds[1]) * (1 + sig))
    fine = ladder.FineGrid(q0, h, n)
    tab = ladder.get_family(s, fine, cache if cache is not None else ladder.default_cache())
    tab["fine_q0"], tab["fine_step"] = fine.q0, fine.step
    return Ladder.from_tables(tab, s)


# ----------------------------------------------------------------------------------------------------------------
# The model: scale x DSE per atom of the number-weighted lognormal mixture + linear background
# ----------------------------------------------------------------------------------------------------------------
def _node_reach(microstrain_pct: float) -> float:
    return T_MAX_SIGMA if microstrain_pct > 0 else 0.0  # the nodes of sim.compose's rules lie within this


MICROSTRAIN_TOL = 1e-6  # quadrature error allowed on E[cos(x t)] = exp(-x^2 / 2)


def microstrain_nodes(x_max: float) -> tuple[np.ndarray, np.ndarray]:
    """Nodes t and weights for E[g(t)], t ~ N(0, 1), that integrate cos(x t) to MICROSTRAIN_TOL for x <= x_max:
    the cheapest of the dataset composer's rules (`qdsize.sim.compose.quadrature_rules`) that reaches x_max."""
    nodes, weights, counts, x_ok = quadrature_rules(MICROSTRAIN_TOL)
    r = min(int(np.searchsorted(x_ok, x_max)), len(counts) - 1)
    return nodes[r, :counts[r]], weights[r, :counts[r]]


@dataclass
class Problem:
    """Everything about one fit that does not change between evaluations (arrays on the measured grid)."""

    q: np.ndarray
    y: np.ndarray
    sigma: np.ndarray
    weighting: str  # poisson, file or robust
    ladder: Ladder
    ff_self: np.ndarray  # (S, Q) |f_s|^2
    ff_pair: np.ndarray  # (P, Q) 2 Re(f_s f_t*)
    basis: np.ndarray  # (M, Q) background basis, each of mean 1 over the fit range (Legendre: P_k itself)
    basis_names: list
    nonlinear: list  # names of the nonlinear parameters in order
    fixed_microstrain_pct: float = 0.0
    evaluations: int = 0


def _species_params(ladder: Ladder) -> list[str]:
    return [f"b_iso_{el}" for el in ladder.species]


def _unpack(prob: Problem, theta: np.ndarray) -> dict:
    names = prob.nonlinear
    out = {n: theta[:, i] for i, n in enumerate(names)}
    if "microstrain_pct" not in out:
        out["microstrain_pct"] = np.full(theta.shape[0], prob.fixed_microstrain_pct)
    if "q_zero_inv_angstrom" not in out:
        out["q_zero_inv_angstrom"] = np.zeros(theta.shape[0])
    return out


def ladder_weights_rows(diameters_nm: np.ndarray, mean_nm: np.ndarray, disp_pct: np.ndarray) -> np.ndarray:
    """Ladder weights (n, K) for n (mean, dispersion) pairs (hat-function integrals of the lognormal)."""
    return np.stack([distribution.ladder_weights(diameters_nm, float(m), float(c)) for m, c in zip(mean_nm, disp_pct)])


def dse_per_atom(prob: Problem, theta: np.ndarray) -> np.ndarray:
    """Mixture DSE per atom (electron units) on the measured grid for each row of nonlinear parameters, (n, Q)."""
    lad = prob.ladder
    th = np.atleast_2d(theta)
    p = _unpack(prob, th)
    n = th.shape[0]
    prob.evaluations += n
    w = ladder_weights_rows(lad.diameters_nm, p["mean_diameter_nm"], p["size_dispersion_pct"])  # (n, K)
    k, npair, nf = lad.coef.shape
    atoms = w @ lad.atoms  # (n, S)
    sig = p["microstrain_pct"] / 100.0
    # one quadrature rule for the batch: resolves the largest pair distance that carries intensity
    big = w * (lad.atoms.sum(axis=1) ** 2)[None, :]
    rmax = np.where(big >= 1e-7 * big.max(axis=1, keepdims=True), lad.rmax_angstrom[None, :], 0.0).max()
    t_n, t_w = microstrain_nodes(float(prob.q[-1] * rmax * sig.max() * (1 + abs(p["strain"]).max())))
    stretch = (1.0 + p["strain"])[:, None] * (1.0 + sig[:, None] * t_n[None, :])  # (n, J)
    q_true = prob.q[None, :] - p["q_zero_inv_angstrom"][:, None]  # (n, Q): the measured axis less its zero error
    x = (q_true[:, None, :] * stretch[:, :, None] - lad.fine_q0) / lad.fine_step  # (n, J, Q)
    i0 = np.floor(x).astype(np.int64)
    if i0.min() < 1 or i0.max() > nf - 3:
        raise InputError(f"Q x (1 + strain) = {q_true[:, 0].min() * stretch.min():.4f}-"
                         f"{q_true[:, -1].max() * stretch.max():.4f} 1/A: expected inside the ladder tables' range "
                         f"{lad.q_range[0]:.3f}-{lad.q_range[1]:.3f}")
    # the weighted sum over the members that carry weight (a few of the ladder), on the fine points in reach
    nz = np.flatnonzero(w.max(axis=0) > 0)
    f_lo, f_hi = int(i0.min()) - 1, int(i0.max()) + 3
    c = (w[:, nz] @ lad.coef[nz, :, f_lo:f_hi].reshape(nz.size, -1)).reshape(n, npair, f_hi - f_lo)
    u = x - i0
    um = 1.0 - u
    u2, u3 = u * u, u * u * u
    tw = t_w[None, :, None] / 6.0
    bw = (tw * um**3, tw * (3 * u3 - 6 * u2 + 4), tw * (-3 * u3 + 3 * u2 + 3 * u + 1), tw * u3)
    nq = prob.q.size
    jq = t_n.size * nq
    sums = np.zeros((n, npair, nq))
    for j, b in enumerate(bw):
        g = np.take_along_axis(c, (i0 + (j - 1 - f_lo)).reshape(n, 1, jq), axis=2).reshape(n, npair, t_n.size, nq)
        sums += np.einsum("npjq,njq->npq", g, b)
    q2 = prob.q**2 / (16.0 * np.pi**2)
    bvals = np.stack([p[nm] for nm in _species_params(lad)], axis=1)  # (n, S)
    tdw = np.exp(-bvals[:, :, None] * q2[None, None, :])  # (n, S, Q)
    out = atoms @ prob.ff_self
    for i, (s, t) in enumerate(lad.pairs):
        out += prob.ff_pair[i][None, :] * tdw[:, s] * tdw[:, t] * sums[:, i]
    return out / atoms.sum(axis=1, keepdims=True)


def spline_basis(q: np.ndarray, spacing_sqrt_q: float = BACKGROUND_SPACING_SQRT_Q) -> np.ndarray:
    """Cubic B-splines on knots evenly spaced in sqrt(Q) over the range, (M, Q), each of maximum 1: a smooth
    background that follows broad liquid and capillary maxima at low Q and stays stiff at high Q, where the peaks
    of small particles are broad."""
    from scipy.interpolate import BSpline

    if not isinstance(spacing_sqrt_q, (int, float)) or isinstance(spacing_sqrt_q, bool) or not \
            0.05 <= spacing_sqrt_q <= 5.0:
        raise bad("background_spacing", spacing_sqrt_q, "a knot spacing in sqrt(1/A) from 0.05 to 5")
    u = np.sqrt(q)
    n_int = max(1, int(math.ceil((u[-1] - u[0]) / spacing_sqrt_q - 1e-9)))
    inner = np.linspace(u[0], u[-1], n_int + 1)
    knots = np.concatenate([[inner[0]] * 3, inner, [inner[-1]] * 3])
    uu = np.clip(u, inner[0], np.nextafter(inner[-1], -np.inf))
    dm = BSpline.design_matrix(uu, knots, 3).toarray().T
    return dm / dm.max(axis=1, keepdims=True)


def background_basis(q: np.ndarray, degree: int, solvent_names=(), capillaries=(), compton=None,
                     spacing_sqrt_q: float | None = None):
    """Background terms on the fit grid: cubic B-splines in sqrt(Q) when `spacing_sqrt_q` is given, else Legendre
    P_0..P_degree of x in [-1, 1] over the range; then each solvent, capillary and Compton curve scaled to mean 1,
    so that every amplitude is in data units."""
    if spacing_sqrt_q is not None:
        sp = spline_basis(q, spacing_sqrt_q)
        rows = list(sp)
        names = [f"spline_{k}" for k in range(len(rows))]
    else:
        if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or not 0 <= degree <= 12:
            raise bad("background_degree", degree, "an integer polynomial degree from 0 to 12")
        x = 2.0 * (q - q[0]) / (q[-1] - q[0]) - 1.0
        rows = [np.polynomial.legendre.Legendre.basis(k)(x) for k in range(degree + 1)]
        names = [f"poly_{k}" for k in range(degree + 1)]
    for nm in solvent_names:
        s = solvents.solvent_intensity(solvents.check_solvent(nm, "solvent"), q)
        rows.append(s / s.mean())
        names.append(f"solvent_{nm.lower()}")
    for nm in capillaries:
        s = solvents.capillary_intensity(solvents.check_capillary(nm, "capillary"), q)
        rows.append(s / s.mean())
        names.append(f"capillary_{nm.lower()}")
    if compton:
        s = solvents.mean_incoherent(compton, q)
        rows.append(s / s.mean())
        names.append("compton")
    return np.array(rows), names


# ----------------------------------------------------------------------------------------------------------------
# Instrument resolution: a Gaussian of FWHM(Q) = sqrt(FWHM0^2 + (REL Q)^2), row-normalised on the grid
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Broadening:
    """Banded Gaussian smoothing on an (extended) grid: neighbour indices (Q, 2H+1), trapezoid weights."""

    q: np.ndarray
    idx: np.ndarray
    valid: np.ndarray
    dq: np.ndarray
    _weights: dict = field(default_factory=dict)  # (fwhm0, rel) -> row-normalised weights, the last few

    @classmethod
    def on(cls, q: np.ndarray, sigma_max: float) -> "Broadening":
        step = float(np.min(np.diff(q))) if q.size > 1 else 1.0
        h = int(min(max(math.ceil(RESOLUTION_REACH_SIGMA * sigma_max / step), 1), 200))
        off = np.arange(-h, h + 1)
        raw = np.arange(q.size)[:, None] + off[None, :]
        valid = (raw >= 0) & (raw < q.size)
        idx = np.clip(raw, 0, q.size - 1)
        dq = np.gradient(q) if q.size > 1 else np.ones(1)
        return cls(q, idx, valid, dq)

    def apply(self, y: np.ndarray, fwhm0: float, rel: float) -> np.ndarray:
        """y (n, Q) smoothed by the Gaussian of FWHM(Q) = sqrt(fwhm0^2 + (rel Q)^2)."""
        key = (float(fwhm0), float(rel))
        hit = self._weights.get(key)
        if hit is None:
            sig = np.sqrt(fwhm0**2 + (rel * self.q) ** 2) / (2.0 * math.sqrt(2.0 * math.log(2.0)))
            sig = np.maximum(sig, 1e-9)
            h_all = self.idx.shape[1] // 2  # only the taps this width reaches
            step = float(np.min(np.diff(self.q))) if self.q.size > 1 else 1.0
            h = min(h_all, int(math.ceil(RESOLUTION_REACH_SIGMA * float(sig.max()) / step)) + 1)
            cols = slice(h_all - h, h_all + h + 1)
            idx = self.idx[:, cols]
            z = (self.q[idx] - self.q[:, None]) / sig[:, None]
            w = np.where(self.valid[:, cols] & (np.abs(z) <= RESOLUTION_REACH_SIGMA), np.exp(-0.5 * z * z), 0.0) \
                * self.dq[idx]
            w /= w.sum(axis=1, keepdims=True)
            if len(self._weights) > 8:
                self._weights.clear()
            hit = self._weights[key] = (idx, w)
        idx, w = hit
        return np.einsum("nqk,qk->nq", np.atleast_2d(y)[:, idx], w)


# ----------------------------------------------------------------------------------------------------------------
# Weights: Poisson for counts, the file's sigma, or a robust estimate from the data's own scatter
# ----------------------------------------------------------------------------------------------------------------
def is_counts(y: np.ndarray) -> bool:
    """Non-negative integer values (detector counts), not all zero or one."""
    return bool(np.all(y >= 0) and np.all(np.abs(y - np.rint(y)) < 1e-6) and y.max() > 1)


def robust_sigma(y: np.ndarray, window: int = 9, span: int = 101) -> np.ndarray:
    """Point noise estimated from the data: residuals of a local cubic (Savitzky-Golay) smooth, their running
    median absolute value scaled to a standard deviation, corrected for what the smooth absorbs."""
    from scipy.ndimage import median_filter, uniform_filter1d
    from scipy.signal import savgol_coeffs, savgol_filter

    window = min(window, (len(y) // 2) * 2 - 1)
    res = y - savgol_filter(y, window, 3, mode="interp")
    h0 = savgol_coeffs(window, 3)[window // 2]
    s = 1.4826 * median_filter(np.abs(res), size=min(span, len(y)), mode="nearest") / np.sqrt(1.0 - h0)
    s = uniform_filter1d(s, size=min(span, len(y)), mode="nearest")
    floor = 1e-6 * max(float(np.abs(y).max()), 1e-300)
    return np.maximum(s, max(floor, 1e-3 * float(np.median(s)) if np.median(s) > 0 else floor))


def bin_points(q: np.ndarray, y: np.ndarray, sigma: np.ndarray, step: float = FIT_STEP_INV_ANGSTROM):
    """(q, y, sigma, k): groups of k consecutive points averaged, k = the whole number of median Q steps in `step`
    (1: returned as given), sigma propagated (sqrt of the sum of squares over k); a last partial group is dropped."""
    dq = float(np.median(np.diff(q))) if q.size > 1 else step
    k = int(step / dq + 1e-9) if dq > 0 else 1
    if k < 2 or q.size < 4 * k:
        return q, y, sigma, 1
    n = (q.size // k) * k
    qb = q[:n].reshape(-1, k).mean(axis=1)
    yb = y[:n].reshape(-1, k).mean(axis=1)
    sb = np.sqrt((sigma[:n].reshape(-1, k) ** 2).sum(axis=1)) / k
    return qb, yb, sb, k


def choose_sigma(y: np.ndarray, sigma_file) -> tuple[np.ndarray, str, list[str]]:
    """(sigma, kind, messages): the file's column when given, Poisson for counts, else a robust estimate."""
    msgs = []
    if sigma_file is not None:
        s = np.asarray(sigma_file, dtype=np.float64).copy()
        ok = np.isfinite(s) & (s > 0)
        if ok.sum() >= 0.9 * len(s):
            if not ok.all():
                s[~ok] = np.median(s[ok])
                msgs.append(f"sigma: {int((~ok).sum())} zero or invalid uncertainties replaced by the median")
            return s, "file", msgs
        msgs.append("sigma: the file's uncertainty column is mostly zero or invalid; estimated from the data instead")
    if is_counts(y):
        return np.sqrt(np.maximum(y, 1.0)), "poisson", msgs
    return robust_sigma(y), "robust", msgs


# ----------------------------------------------------------------------------------------------------------------
# Result
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class RefineResult:
    """Refined parameters with standard uncertainties and goodness of fit (`refined`, JSON-ready), plus the curves
    for plotting. `scale` is in data units per electron unit per atom of the model (the DSE of the mixture divided
    by its mean atom count); background amplitudes are in data units (each basis curve has mean 1 over the range)."""

    refined: dict
    q_inv_angstrom: np.ndarray
    data: np.ndarray
    sigma: np.ndarray
    model: np.ndarray
    background: np.ndarray
    components: dict = field(default_factory=dict)  # name -> curve: the particles and each background term

    @property
    def flags(self) -> list[str]:
        return self.refined["flags"]

    @property
    def accepted(self) -> bool:
        return bool(self.refined["accepted"])


def _linear_solve(a: np.ndarray, y: np.ndarray, inv_sigma: np.ndarray) -> np.ndarray:
    """Weighted least squares for the linear amplitudes: a (M, Q) design rows."""
    coef, *_ = np.linalg.lstsq((a * inv_sigma).T, y * inv_sigma, rcond=None)
    return coef


def _check_start(name: str, value, lo: float, hi: float, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise bad(name, value, what) from None
    if not math.isfinite(v):
        raise bad(name, value, what)
    if not lo <= v <= hi:
        raise bad(name, value, f"{what} within the refinement bounds [{lo:g}, {hi:g}]")
    return v


def fit_range(q_inv_angstrom: np.ndarray, q_range=(1.0, None)) -> tuple[float, float]:
    """(q_min, q_max) fitted: `q_range` where given; else from 1.0 1/A to the data's end, at most
    DEFAULT_Q_MAX_INV_ANGSTROM (the shared tables' reach: beyond it a PbS dot's pattern holds little on its size
    but the cost of tables built for that range)."""
    lo = q_range[0] if q_range and q_range[0] is not None else 1.0
    hi = q_range[1] if q_range and len(q_range) > 1 and q_range[1] is not None else \
        min(float(q_inv_angstrom[-1]), DEFAULT_Q_MAX_INV_ANGSTROM)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
        raise bad("q_range", tuple(q_range), "(q_min, q_max) in 1/A with 0 < q_min < q_max")
    return float(lo), float(hi)


def fit_ladder_range(q_fit: np.ndarray, *, resolution="fit", q_zero: bool = True,
                     refine_microstrain: bool = False, microstrain_pct: float = 0.0) -> tuple[float, float, float]:
    """(q_min, q_max, microstrain_max_pct) for `load_ladder`: the fit range widened by the resolution kernel's
    reach and the Q-zero bound, as `refine` evaluates the model (shared with batch pre-builds)."""
    f0, rel = _resolution_max(resolution)
    sig_lo = math.hypot(f0, rel * q_fit[0]) / 2.3548
    sig_hi = math.hypot(f0, rel * q_fit[-1]) / 2.3548
    z = BOUNDS["q_zero_inv_angstrom"][1] if q_zero else 0.0
    micro = BOUNDS["microstrain_pct"][1] if refine_microstrain else float(microstrain_pct)
    return (max(float(q_fit[0]) - RESOLUTION_REACH_SIGMA * sig_lo - z, 0.2),
            float(q_fit[-1]) + RESOLUTION_REACH_SIGMA * sig_hi + z, micro)


def _check_resolution(resolution):
    """'fit', None (no smoothing) or a fixed (fwhm0, rel[, eta]) in 1/A and relative units."""
    if resolution is None or (isinstance(resolution, str) and resolution in ("none", "fit")):
        return None if resolution in (None, "none") else "fit"
    try:
        vals = [float(v) for v in (resolution.split(",") if isinstance(resolution, str) else resolution)]
    except (TypeError, ValueError):
        raise bad("resolution", resolution, "'fit', 'none' or FWHM0,REL (1/A, relative)") from None
    if len(vals) not in (2, 3) or not all(math.isfinite(v) and v >= 0 for v in vals) or vals[0] > 0.5 \
            or vals[1] > 0.05:
        raise bad("resolution", resolution, "'fit', 'none' or FWHM0,REL with 0 <= FWHM0 <= 0.5 1/A and "
                  "0 <= REL <= 0.05")
    return (vals[0], vals[1])


def _resolution_max(resolution) -> tuple[float, float]:
    r = _check_resolution(resolution)
    if r is None:
        return 0.0, 0.0
    if r == "fit":
        return BOUNDS["fwhm0_inv_angstrom"][1], BOUNDS["fwhm_rel"][1]
    return r


def refine(q_inv_angstrom, intensity, start: dict, *, sigma=None, energy_kev: float | None = None,
           ladder: Ladder | None = None, ladder_spec: dict | None = None, q_range=(1.0, None),
           background: str = "spline", background_degree: int = 3,
           background_spacing: float = BACKGROUND_SPACING_SQRT_Q, solvent=(), capillary=(), compton: bool = False,
           resolution="fit", q_zero: bool = True, b_iso_start: float | dict = 1.0, microstrain_pct: float = 0.0,
           refine_microstrain: bool = False, n_starts: int = 3, network_prior: bool = True,
           max_evaluations: int = 4000, name: str = "pattern") -> RefineResult:
    """Refine a pattern from the network's estimates `start` (mean_diameter_nm, size_dispersion_pct, and their
    mean_diameter_std_nm / size_dispersion_std_pct for the guard; optional lattice_parameter_angstrom / strain,
    b_iso) against the data on its own grid, and decide whether the refined answer replaces the network's.

    Model: scale x R[DSE per atom of the number-weighted lognormal mixture at (Q - Q0)(1 + strain)] + background.
    R is the instrument's Gaussian resolution, FWHM(Q) = sqrt(FWHM0^2 + (REL Q)^2), fitted (`resolution="fit"`),
    fixed (a (fwhm0, rel) pair from a calibrant) or absent ("none"); Q0 is a Q-axis zero error (`q_zero`), the
    strain also absorbs a Q-scale error. The background is linear: cubic B-splines evenly spaced in sqrt(Q)
    (`background="spline"`, knot spacing `background_spacing`) or a Legendre polynomial of `background_degree`
    (`"legendre"`), plus free amplitudes of the named solvent / capillary curves and, optionally, Compton.
    Fitting is stepwise and bounded, the linear amplitudes solved exactly at every step (variable projection):
    peak positions (strain scan, then strain, B, Q0), then size from `n_starts` starts spread over the network's
    uncertainty, then everything from the best. The microstrain (rms lattice-parameter spread, exact quadrature)
    can be refined too; with a fitted resolution REL plays its part and it stays fixed by default.
    With `network_prior` and the network's uncertainties given, its mean and dispersion enter as a Gaussian prior
    (the refined values are then the combination of network and data; without them, of the data alone).
    The guard (`refined["accepted"]`, `refined["verdict"]`) keeps the network's answer unless the fit is good,
    the size is free of its bounds, the particles' signal is significant and the move from the network's estimate
    is within GUARD_MOVE_REJECT_SIGMA combined uncertainties; `refined["answer"]` is what to report.
    BLAS runs on one thread: the matrices are small, and threads fighting over shared cores cost more than they give.
    """
    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    with threadpool_limits(1):
        res = _refine(q_inv_angstrom, intensity, start, sigma=sigma, energy_kev=energy_kev, ladder=ladder,
                      ladder_spec=ladder_spec, q_range=q_range, background=background,
                      background_degree=background_degree, background_spacing=background_spacing, solvent=solvent,
                      capillary=capillary, compton=compton, resolution=resolution, q_zero=q_zero,
                      b_iso_start=b_iso_start, microstrain_pct=microstrain_pct,
                      refine_microstrain=refine_microstrain, n_starts=n_starts, network_prior=network_prior,
                      max_evaluations=max_evaluations, name=name)
    res.refined["seconds"] = time.perf_counter() - t0
    return res


def _optional_std(start: dict, key: str):
    v = start.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not math.isfinite(v) or v <= 0:
        return None
    return float(v)


def _refine(q_inv_angstrom, intensity, start, *, sigma, energy_kev, ladder, ladder_spec, q_range, background,
            background_degree, background_spacing, solvent, capillary, compton, resolution, q_zero, b_iso_start,
            microstrain_pct, refine_microstrain, n_starts, network_prior, max_evaluations, name):
    t0 = time.perf_counter()
    q_all = np.asarray(q_inv_angstrom, dtype=np.float64).ravel()
    y_all = np.asarray(intensity, dtype=np.float64).ravel()
    if q_all.size != y_all.size:
        raise InputError(f"{name}: {q_all.size} Q values but {y_all.size} intensities: expected one intensity per Q")
    if not np.all(np.isfinite(q_all)) or not np.all(np.isfinite(y_all)):
        raise InputError(f"{name}: NaN or infinity in Q or intensity: expected finite numbers")
    if q_all.size > 1 and np.any(np.diff(q_all) <= 0):
        raise InputError(f"{name}: Q is not strictly increasing: expected a sorted grid without repeats")
    lo_req, hi_req = fit_range(q_all, q_range)
    sel = (q_all >= lo_req) & (q_all <= hi_req)
    if not sel.any():
        raise InputError(f"{name}: no data in the fit range {lo_req:g}-{hi_req:g} 1/A: expected points there")
    q, y = q_all[sel], y_all[sel]
    if (q[0] - REQUIRED_Q_MIN_INV_ANGSTROM > COVERAGE_MARGIN_INV_ANGSTROM + 1e-9
            or REQUIRED_Q_MAX_INV_ANGSTROM - q[-1] > COVERAGE_MARGIN_INV_ANGSTROM + 1e-9):
        raise InputError(f"{name}: data in the fit range cover Q = {q[0]:.3f}-{q[-1]:.3f} 1/A: expected at least "
                         f"{REQUIRED_Q_MIN_INV_ANGSTROM:g}-{REQUIRED_Q_MAX_INV_ANGSTROM:g} 1/A (the refinement needs "
                         "the (111) to (420) region)")
    if not np.any(y):
        raise InputError(f"{name}: all intensities in the fit range are zero: expected a measured pattern")
    sig_file = None
    if sigma is not None:
        sig_file = np.asarray(sigma, dtype=np.float64).ravel()
        if sig_file.size != q_all.size:
            raise InputError(f"{name}: {sig_file.size} sigma values for {q_all.size} points: expected one per point")
        sig_file = sig_file[sel]
    s_used, weighting, messages = choose_sigma(y, sig_file)
    q_selected = q  # the tables are sized on the selected range, as a batch pre-build sizes them
    q, y, s_used, every = bin_points(q, y, s_used)
    if every > 1:
        messages.append(f"{q_selected.size} points finer than {FIT_STEP_INV_ANGSTROM:g} 1/A averaged in groups of "
                        f"{every}: {q.size} points fitted")
    if background not in ("spline", "legendre"):
        raise bad("background", background, "'spline' (B-splines in sqrt(Q)) or 'legendre' (polynomial)")
    res_mode = _check_resolution(resolution)
    if isinstance(res_mode, tuple):
        given = resolution.split(",") if isinstance(resolution, str) else list(resolution)
        if len(given) == 3 and float(given[2]) > 0:
            messages.append(f"resolution: the Lorentzian fraction {float(given[2]):g} is not modelled (a Gaussian "
                            "of the same FWHM is)")
    if isinstance(n_starts, bool) or not isinstance(n_starts, (int, np.integer)) or not 1 <= n_starts <= 9:
        raise bad("n_starts", n_starts, "an integer number of starts from 1 to 9")

    # ---- starting values
    if not isinstance(start, dict):
        raise bad("start", start, "a dict with mean_diameter_nm and size_dispersion_pct (the network's estimates)")
    for key in ("mean_diameter_nm", "size_dispersion_pct"):
        if key not in start:
            raise InputError(f"start: missing {key!r}: expected the network's estimates "
                             "(mean_diameter_nm, size_dispersion_pct)")
    if not isinstance(microstrain_pct, (int, float)) or not BOUNDS["microstrain_pct"][0] <= microstrain_pct \
            <= BOUNDS["microstrain_pct"][1]:
        raise bad("microstrain_pct", microstrain_pct, f"an rms lattice spread in % within {BOUNDS['microstrain_pct']}")
    m_net = _check_start("start.mean_diameter_nm", start["mean_diameter_nm"], 0.0, np.inf, "a positive diameter in nm")
    c_net = _check_start("start.size_dispersion_pct", start["size_dispersion_pct"], 0.0, np.inf,
                         "a dispersion in percent >= 0")
    sm_net = _optional_std(start, "mean_diameter_std_nm")
    sc_net = _optional_std(start, "size_dispersion_std_pct")
    m0 = float(np.clip(m_net, *BOUNDS["mean_diameter_nm"]))
    c0 = float(np.clip(c_net, 1.0, BOUNDS["size_dispersion_pct"][1] - 1.0))  # off the 0 bound: its gradient is 0
    lad_lo, lad_hi, micro_max = fit_ladder_range(q_selected, resolution=res_mode, q_zero=q_zero,
                                                 refine_microstrain=refine_microstrain,
                                                 microstrain_pct=microstrain_pct)
    if ladder is None:
        ladder = load_ladder(lad_lo, lad_hi, spec=ladder_spec, microstrain_max_pct=micro_max)
    sig_max = micro_max / 100.0 * _node_reach(micro_max)
    z_max = BOUNDS["q_zero_inv_angstrom"][1] if q_zero else 0.0
    stretch_lo = (1 + BOUNDS["strain"][0]) * (1 - sig_max)
    stretch_hi = (1 + BOUNDS["strain"][1]) * (1 + sig_max)
    need = ((q[0] - z_max) * stretch_lo, (q[-1] + z_max) * stretch_hi)
    if need[0] < ladder.q_range[0] or need[1] > ladder.q_range[1]:
        raise bad("ladder", f"tables for Q = {ladder.q_range[0]:.3f}-{ladder.q_range[1]:.3f} 1/A",
                  f"tables covering {need[0]:.3f}-{need[1]:.3f} 1/A (the fit range stretched by the strain, Q-zero "
                  "and microstrain bounds): load_ladder(*fit_ladder_range(q)[:2]) of this fit range")
    a_ref = float(ladder.spec.get("a_angstrom", DEFAULT_LADDER["a_angstrom"]))
    if start.get("lattice_parameter_angstrom") is not None:
        e0 = _check_start("start.lattice_parameter_angstrom", start["lattice_parameter_angstrom"], 0.0, np.inf,
                          "a positive lattice parameter in Angstrom") / a_ref - 1.0
    else:
        e0 = float(start.get("strain", 0.0) or 0.0)
    scan_strain = start.get("lattice_parameter_angstrom") is None and start.get("strain") is None
    e0 = float(np.clip(e0, *BOUNDS["strain"]))
    b_start = scattering.per_element(start.get("b_iso", b_iso_start), ladder.species, "b_iso")
    b_start = np.clip(b_start, BOUNDS["b_iso"][0] + 0.05, BOUNDS["b_iso"][1] - 0.05)
    d_lad = ladder.diameters_nm
    lo_m = max(BOUNDS["mean_diameter_nm"][0], float(d_lad[0]) * 1.2)
    hi_m = min(BOUNDS["mean_diameter_nm"][1], float(d_lad[-1]) / 1.5)
    m0 = float(np.clip(m0, lo_m, hi_m))

    # ---- the evaluation grid: the fit grid extended by the resolution kernel's reach, inside the tables
    f0_max, rel_max = _resolution_max(res_mode)
    q_ext = q
    n_lo = 0
    if q.size > 1 and (f0_max > 0 or rel_max > 0):
        lo_ok = ladder.q_range[0] / stretch_lo + z_max + 1e-6
        hi_ok = ladder.q_range[1] / stretch_hi - z_max - 1e-6
        h_lo, h_hi = q[1] - q[0], q[-1] - q[-2]
        pad_lo = RESOLUTION_REACH_SIGMA * math.hypot(f0_max, rel_max * q[0]) / 2.3548
        pad_hi = RESOLUTION_REACH_SIGMA * math.hypot(f0_max, rel_max * q[-1]) / 2.3548
        lo_pts = q[0] - h_lo * np.arange(int(math.ceil(pad_lo / h_lo)), 0, -1)
        hi_pts = q[-1] + h_hi * np.arange(1, int(math.ceil(pad_hi / h_hi)) + 1)
        lo_pts, hi_pts = lo_pts[lo_pts >= lo_ok], hi_pts[hi_pts <= hi_ok]
        n_lo = lo_pts.size
        q_ext = np.concatenate([lo_pts, q, hi_pts])
    inner = slice(n_lo, n_lo + q.size)
    smoother = Broadening.on(q_ext, math.hypot(f0_max, rel_max * q_ext[-1]) / 2.3548) \
        if (f0_max > 0 or rel_max > 0) else None

    # ---- fixed arrays
    ff = scattering.form_factors(ladder.species, q_ext, energy_kev)
    ff_self = np.abs(ff) ** 2
    ff_pair = np.array([2.0 * np.real(ff[s] * np.conj(ff[t])) for s, t in ladder.pairs])
    basis, bnames = background_basis(q, background_degree, tuple(solvent or ()), tuple(capillary or ()),
                                     {el: 1 for el in ladder.species} if compton else None,
                                     spacing_sqrt_q=background_spacing if background == "spline" else None)
    dse_names = ["mean_diameter_nm", "size_dispersion_pct", "strain", *_species_params(ladder)]
    if q_zero:
        dse_names.append("q_zero_inv_angstrom")
    if refine_microstrain:
        dse_names.append("microstrain_pct")
    res_names = ["fwhm0_inv_angstrom", "fwhm_rel"] if res_mode == "fit" else []
    nonlinear = dse_names + res_names
    n_d, n_nl = len(dse_names), len(nonlinear)
    prob = Problem(q_ext, np.zeros_like(q_ext), np.ones_like(q_ext), weighting, ladder, ff_self, ff_pair, basis,
                   bnames, dse_names, fixed_microstrain_pct=float(microstrain_pct))
    lin_names = ["scale", *[f"background_{b}" for b in bnames]]
    n_par = n_nl + len(lin_names)
    if q.size <= n_par + 5:
        raise InputError(f"{name}: {q.size} points in the fit range for {n_par} parameters: expected many more points")

    def bound(nm):
        if nm == "mean_diameter_nm":
            return lo_m, hi_m
        return BOUNDS["b_iso" if nm.startswith("b_iso_") else nm]

    lb = np.array([bound(nm)[0] for nm in nonlinear])
    ub = np.array([bound(nm)[1] for nm in nonlinear])
    steps = np.array([FD_STEP["b_iso" if nm.startswith("b_iso_") else nm] for nm in nonlinear])
    ix = {nm: i for i, nm in enumerate(nonlinear)}
    inv_s = 1.0 / s_used

    raw_cache: dict = {}

    def particle(th_rows: np.ndarray) -> np.ndarray:
        """Particles' intensity per atom on the fit grid, (n, Q), for rows of nonlinear parameters: the DSE
        (cached by its own parameters) smoothed by the resolution."""
        th_rows = np.atleast_2d(th_rows)
        keys = [r[:n_d].tobytes() for r in th_rows]
        if len(raw_cache) > 256:
            raw_cache.clear()
        todo = {k: i for i, k in enumerate(keys) if k not in raw_cache}
        if todo:
            for k, row in zip(todo, dse_per_atom(prob, th_rows[list(todo.values()), :n_d])):
                raw_cache[k] = row
        raw = np.stack([raw_cache[k] for k in keys])
        if smoother is None:
            return raw[:, inner]
        if res_mode == "fit":
            sm = np.stack([smoother.apply(raw[i], th_rows[i, ix["fwhm0_inv_angstrom"]],
                                          th_rows[i, ix["fwhm_rel"]])[0] for i in range(len(raw))])
        else:
            sm = smoother.apply(raw, *res_mode)
        return sm[:, inner]

    qr_cache: dict = {}

    def project(prow: np.ndarray):
        """(weighted residual, linear amplitudes) with scale and background solved exactly: the background's
        weighted span is factored once (QR), so each row costs two products."""
        if qr_cache.get("inv_s") is not inv_s:
            qb, rb = np.linalg.qr((basis * inv_s).T)
            yw = y * inv_s
            qr_cache.update(inv_s=inv_s, qb=qb, rb=rb, yw=yw, ry=yw - qb @ (qb.T @ yw))
        qb, rb, yw, ry = qr_cache["qb"], qr_cache["rb"], qr_cache["yw"], qr_cache["ry"]
        pw = prow * inv_s
        rp = pw - qb @ (qb.T @ pw)
        den = float(rp @ rp)
        scale = float(rp @ ry) / den if den > 0 else 0.0
        bcoef = np.linalg.solve(rb, qb.T @ (yw - scale * pw)) if rb.size else np.zeros(0)
        return scale * rp - ry, np.concatenate([[scale], bcoef])

    # the network's estimates as a Gaussian prior on mean and dispersion (when their uncertainties are given):
    # where the data cannot tell size broadening from the instrument's, the network's answer decides
    prior_at = [i for i, sd in ((ix["mean_diameter_nm"], sm_net), (ix["size_dispersion_pct"], sc_net))
                if network_prior and sd is not None]
    prior_mu = np.array([m_net, c_net])[[0 if i == ix["mean_diameter_nm"] else 1 for i in prior_at]]
    prior_sd = np.array([sm_net if i == ix["mean_diameter_nm"] else sc_net for i in prior_at], dtype=np.float64)

    def prior(th: np.ndarray) -> np.ndarray:
        return (th[prior_at] - prior_mu) / prior_sd

    def chi2_of(th: np.ndarray) -> float:
        r, _ = project(particle(th)[0])
        p_ = prior(th)
        return float(r @ r + p_ @ p_)

    fit_status = {"nfev": 0, "not_converged": False}

    def fit_subset(th: np.ndarray, free: list[int], nfev: int) -> np.ndarray:
        """Variable-projection least squares over the nonlinear parameters `free`, the others held."""
        from scipy.optimize import least_squares

        free = list(free)
        pad = 1e-6 * (ub[free] - lb[free])
        x0 = np.clip(th[free], lb[free] + pad, ub[free] - pad)

        def full(xf):
            t = th.copy()
            t[free] = xf
            return t

        def fun(xf):
            t = full(xf)
            return np.concatenate([project(particle(t)[0])[0], prior(t)])

        def jac(xf):
            t0_ = full(xf)
            rows, hs = [t0_], []
            for j in free:
                h = steps[j] if t0_[j] + steps[j] <= ub[j] else -steps[j]
                t = t0_.copy()
                t[j] += h
                rows.append(t)
                hs.append(h)
            pr = particle(np.array(rows))
            r0 = np.concatenate([project(pr[0])[0], prior(rows[0])])
            return np.stack([(np.concatenate([project(pr[k + 1])[0], prior(rows[k + 1])]) - r0) / hs[k]
                             for k in range(len(free))], axis=1)

        sol = least_squares(fun, x0, jac=jac, bounds=(lb[free], ub[free]), method="trf", x_scale="jac",
                            max_nfev=nfev, ftol=1e-8, xtol=1e-8, gtol=1e-8)
        fit_status["nfev"] += sol.nfev
        fit_status["last_status"] = sol.status
        return full(sol.x)

    theta0 = np.zeros(n_nl)
    theta0[ix["mean_diameter_nm"]], theta0[ix["size_dispersion_pct"]], theta0[ix["strain"]] = m0, c0, e0
    for k, el in enumerate(ladder.species):
        theta0[ix[f"b_iso_{el}"]] = b_start[k]
    if refine_microstrain:  # off zero: its effect is quadratic there, so the gradient would vanish
        theta0[ix["microstrain_pct"]] = max(microstrain_pct, MICROSTRAIN_START_PCT)
    for nm in res_names:
        theta0[ix[nm]] = RESOLUTION_START[nm]
    size_idx = [ix["mean_diameter_nm"], ix["size_dispersion_pct"]]
    position_idx = [ix["strain"]] + ([ix["q_zero_inv_angstrom"]] if q_zero else [])
    b_idx = [ix[f"b_iso_{el}"] for el in ladder.species]
    budget = max(20, max_evaluations // (n_nl + 1))
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            if scan_strain:  # peak positions: a coarse scan keeps the fit out of a neighbouring peak's minimum
                grid = np.linspace(BOUNDS["strain"][0] * 0.9, BOUNDS["strain"][1] * 0.9, 31)
                rows = np.repeat(theta0[None, :], grid.size, axis=0)
                rows[:, ix["strain"]] = grid
                pr = particle(rows)
                theta0[ix["strain"]] = grid[int(np.argmin([np.sum(project(p)[0] ** 2) for p in pr]))]
                raw_cache.clear()
            # step 1: peak positions and damping at the network's size; step 2: size from several starts
            th1 = fit_subset(theta0, position_idx + b_idx, 25)
            spread = sm_net if sm_net is not None else NETWORK_STD_FALLBACK * m0
            offsets = [0.0, -1.0, 1.0, -2.0, 2.0, -0.5, 0.5, -1.5, 1.5][:n_starts]
            cands = []
            for off in offsets:
                th = th1.copy()
                th[ix["mean_diameter_nm"]] = float(np.clip(m0 + off * spread, lo_m, hi_m))
                th = fit_subset(th, size_idx + position_idx + b_idx, 30)
                cands.append((chi2_of(th), th))
            cands.sort(key=lambda c: c[0])
            # step 3: everything, from the best start
            th = fit_subset(cands[0][1], list(range(n_nl)), budget)
            if weighting == "poisson":
                r, coef = project(particle(th)[0])
                mod = r * s_used + y
                if np.min(mod) < 100:  # low counts: weight by the model, not the data (Neyman chi-square is low)
                    s_used = np.sqrt(np.maximum(mod, 1.0))
                    inv_s = 1.0 / s_used
                    th = fit_subset(th, list(range(n_nl)), budget)
            fit_status["not_converged"] = fit_status.get("last_status", 1) == 0
            p_final = particle(th)[0]
            r, coef = project(p_final)
    except InputError:
        raise
    except (np.linalg.LinAlgError, ValueError, FloatingPointError) as exc:
        raise InputError(f"{name}: the refinement did not converge from the start "
                         f"({m0:.2f} nm, {c0:.1f} %): {exc}; expected a pattern of PbS dots near the network's "
                         "estimate (check the x unit, the wavelength and the fit range)") from None
    if not np.all(np.isfinite(r)) or not np.all(np.isfinite(th)):
        raise InputError(f"{name}: the refinement did not converge from the start ({m0:.2f} nm, {c0:.1f} %): "
                         "non-finite model; expected a pattern of PbS dots near the network's estimate")
    x = np.concatenate([th, coef])
    dof = max(q.size - n_par, 1)
    chi2 = float(r @ r)
    red = chi2 / dof
    model = r * s_used + y
    bg = coef[1:] @ basis
    w = 1.0 / s_used**2
    rwp = float(np.sqrt(np.sum(w * (y - model) ** 2) / np.sum(w * y**2)))
    coef_bg = _linear_solve(basis, y, inv_s)  # the background alone: how much the particles explain
    chi2_bg = float(np.sum(((coef_bg @ basis - y) * inv_s) ** 2))
    signal_gain = (chi2_bg - chi2) / max(chi2, 1e-300)

    # ---- parameters at a bound: no standard uncertainty (not a free minimum)
    flags: list[str] = []
    names = nonlinear + lin_names
    lb_all = np.concatenate([lb, [0.0], np.full(len(bnames), -np.inf)])
    ub_all = np.concatenate([ub, np.full(len(lin_names), np.inf)])
    at_low = np.zeros(n_par, bool)
    at_high = np.zeros(n_par, bool)
    for i in range(n_nl):
        tol = 1e-3 * (ub[i] - lb[i])
        at_low[i] = x[i] - lb[i] < tol
        at_high[i] = ub[i] - x[i] < tol
    at_low[n_nl] = x[n_nl] <= 0
    at_bound = at_low | at_high
    free = ~at_bound

    # ---- covariance of the free parameters, (J^T W J)^-1 scaled by the reduced chi-square when it exceeds 1
    jac = np.empty((q.size, n_par))
    rows, hsum = [], []
    for j in range(n_nl):
        hp = max(min(steps[j], ub[j] - th[j]), 0.0)
        hm = max(min(steps[j], th[j] - lb[j]), 0.0)
        if hp + hm <= 0:
            hp = steps[j]
        up, dn = th.copy(), th.copy()
        up[j] += hp
        dn[j] -= hm
        rows += [up, dn]
        hsum.append(hp + hm)
    with np.errstate(over="ignore", invalid="ignore"):
        pr = particle(np.array(rows))
    for j in range(n_nl):
        jac[:, j] = coef[0] * (pr[2 * j] - pr[2 * j + 1]) / hsum[j] * inv_s
    jac[:, n_nl] = p_final * inv_s
    jac[:, n_nl + 1:] = (basis * inv_s).T
    # a parameter whose finite-difference step moves the model by far less than the noise (a resolution width
    # below the grid step, where its effect is quadratic) carries no information here: undetermined, not singular
    info = np.sqrt(np.sum(jac[:, :n_nl] ** 2, axis=0)) * steps
    blind = np.zeros(n_par, bool)
    blind[:n_nl] = free[:n_nl] & (info < INFO_MIN)
    for i in np.flatnonzero(blind):
        flags.append(f"undetermined:{nonlinear[i]}")
        messages.append(f"fit: {nonlinear[i]} = {x[i]:.4g} is not determined by these data (no uncertainty)")
    free = free & ~blind
    cov = np.full((n_par, n_par), np.nan)
    jp = np.zeros((len(prior_at), n_par))
    jp[np.arange(len(prior_at)), prior_at] = 1.0 / prior_sd
    jf = np.vstack([jac, jp])[:, free]
    d = np.sqrt(np.sum(jf**2, axis=0))
    d[d == 0] = 1.0
    js = jf / d
    u_, sv, vt = np.linalg.svd(js, full_matrices=False)
    cond = float(sv[0] / sv[-1]) if sv.size and sv[-1] > 0 else np.inf
    free_names = [nm for nm, f in zip(names, free) if f]
    if cond**2 > SINGULAR_CONDITION or not np.isfinite(cond):
        flags.append("singular_covariance")
        weakest = vt[-1]
        involved = [free_names[i] for i in np.argsort(-np.abs(weakest))[:3]]
        messages.append(f"covariance: singular (condition {cond**2:.2g}); parameters {', '.join(involved)} are not "
                        "separately determined by these data (fix or remove one: fewer background terms, a wider "
                        "Q range)")
    else:
        cf = (vt.T / sv**2) @ vt / np.outer(d, d) * max(red, 1.0)
        cov[np.ix_(free, free)] = cf
    std = np.sqrt(np.clip(np.diag(cov), 0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = cov / np.outer(std, std)

    # ---- realised labels of the fitted distribution on the ladder, and their uncertainties (delta method)
    i_m, i_c = size_idx

    def labels(mean, disp):
        return distribution.realised_labels(d_lad, distribution.ladder_weights(d_lad, mean, disp))

    mr, cr = labels(x[i_m], x[i_c])
    g = np.zeros((2, 2))
    for col, (j, hstep) in enumerate(((i_m, 0.01), (i_c, 0.1))):
        up, dn = x[[i_m, i_c]].copy(), x[[i_m, i_c]].copy()
        up[col] = min(up[col] + hstep, ub[j])
        dn[col] = max(dn[col] - hstep, lb[j])
        g[:, col] = (np.array(labels(*up)) - np.array(labels(*dn))) / (up[col] - dn[col])
    sub = cov[np.ix_([i_m, i_c], [i_m, i_c])].copy()
    for k, j in enumerate((i_m, i_c)):
        if at_bound[j] or blind[j]:  # a parameter at a bound: no spread from it (and none reported for it)
            sub[k, :] = 0.0
            sub[:, k] = 0.0
    cov_lab = g @ sub @ g.T
    std_lab = np.sqrt(np.clip(np.diag(cov_lab), 0, None))
    std_lab[0] = math.hypot(std_lab[0], MODEL_FLOOR_REL * mr)
    if at_bound[i_m] or blind[i_m]:
        std_lab[0] = np.nan
    if at_bound[i_c] or blind[i_c]:
        std_lab[1] = np.nan

    # ---- flags and the guard: why the network's answer would stand (the first reason is the verdict)
    reasons: list[str] = []
    if fit_status["not_converged"]:
        flags.append("not_converged")
        messages.append(f"fit: stopped after {prob.evaluations} evaluations without meeting the tolerances")
        reasons.append((4, "the fit did not converge"))
    for i, nm in enumerate(nonlinear + ["scale"]):
        if not at_bound[i]:
            continue
        side = "lower" if at_low[i] else "upper"
        flags.append(f"at_bound:{nm}")
        messages.append(f"fit: {nm} = {x[i]:.4g} is at its {side} bound [{lb_all[i]:g}, {ub_all[i]:g}]: no "
                        "uncertainty (not a free minimum)")
        benign = at_low[i] and (nm in ("size_dispersion_pct", "microstrain_pct", "fwhm0_inv_angstrom", "fwhm_rel")
                                or nm.startswith("b_iso_"))
        if not benign:
            reasons.append((3, f"{nm} at its {side} bound ({x[i]:.4g})") if nm != "scale" else
                           (0, "no particle signal (scale at 0)"))
    if signal_gain < GUARD_SIGNAL_MIN:
        flags.append("no_signal")
        reasons.append((0, f"no significant PbS signal (the particle model improves chi2 on the background alone by "
                       f"{signal_gain:.2g} x, expected > {GUARD_SIGNAL_MIN:g} x)"))
    if red > POOR_FIT_CHI2:
        flags.append("poor_fit")
        messages.append(f"fit: reduced chi-square {red:.3g} > {POOR_FIT_CHI2:g} ({weighting} weights): the model "
                        "misses features of the data (background terms? shape? Q calibration?); uncertainties "
                        "scaled by it")
    if red > GUARD_CHI2_MAX:
        reasons.append((1, f"poor fit (reduced chi2 {red:.3g} > {GUARD_CHI2_MAX:g})"))
    if rwp > GUARD_RWP_MAX:
        reasons.append((1, f"poor fit (Rwp {rwp:.3f} > {GUARD_RWP_MAX:g})"))
    if "singular_covariance" in flags:
        reasons.append((2, "the size is not determined by these data (singular covariance)"))
    lo_t, hi_t = distribution.quantile_range_nm(x[i_m], x[i_c], TAIL_SIGMA) if x[i_c] > 0 else (x[i_m], x[i_m])
    if lo_t < d_lad[0] or hi_t > d_lad[-1]:
        flags.append("ladder_edge")
        messages.append(f"model: the fitted distribution ({lo_t:.2f}-{hi_t:.2f} nm at {TAIL_SIGMA:g} sigma) runs "
                        f"past the ladder ({d_lad[0]:.2f}-{d_lad[-1]:.2f} nm)")
        reasons.append((3, "the fitted distribution runs past the model's size ladder"))
    if energy_kev is None:
        messages.append("form factors without anomalous terms: no wavelength or energy was given")

    si = {nm: i for i, nm in enumerate(names)}

    def val_std(nm, fixed=0.0):
        if nm not in si:
            return float(fixed), 0.0
        return float(x[si[nm]]), float(std[si[nm]])

    qz, qz_std = val_std("q_zero_inv_angstrom")
    micro, micro_std = val_std("microstrain_pct", microstrain_pct)
    if res_mode == "fit":
        res_out = {"mode": "fit", "fwhm0_inv_angstrom": float(x[ix["fwhm0_inv_angstrom"]]),
                   "fwhm0_std_inv_angstrom": float(std[ix["fwhm0_inv_angstrom"]]),
                   "fwhm_rel": float(x[ix["fwhm_rel"]]), "fwhm_rel_std": float(std[ix["fwhm_rel"]])}
    elif res_mode is None:
        res_out = {"mode": "none"}
    else:
        res_out = {"mode": "fixed", "fwhm0_inv_angstrom": res_mode[0], "fwhm_rel": res_mode[1]}
    i_s = ix["strain"]
    components = {"particles": coef[0] * p_final}
    smooth = [i for i, b in enumerate(bnames) if b.startswith(("spline_", "poly_"))]
    if smooth:
        components["smooth background"] = coef[1 + np.array(smooth)] @ basis[smooth]
    for i, b in enumerate(bnames):
        if i not in smooth:
            components[b] = coef[1 + i] * basis[i]
    refined = {
        "mean_diameter_nm": mr, "mean_diameter_std_nm": float(std_lab[0]),
        "size_dispersion_pct": cr, "size_dispersion_std_pct": float(std_lab[1]),
        "fit_reasons": [list(r_) for r_ in reasons], "signal_gain": float(signal_gain),
        "network": {"mean_diameter_nm": m_net, "mean_diameter_std_nm": sm_net, "size_dispersion_pct": c_net,
                    "size_dispersion_std_pct": sc_net},
        "lognormal_mean_nm": float(x[i_m]), "lognormal_dispersion_pct": float(x[i_c]),
        "lattice_parameter_angstrom": a_ref * (1.0 + float(x[i_s])),
        "lattice_parameter_std_angstrom": a_ref * float(std[i_s]),
        "strain": float(x[i_s]), "strain_std": float(std[i_s]),
        "q_zero_inv_angstrom": qz, "q_zero_std_inv_angstrom": qz_std,
        "resolution": res_out,
        "b_iso": {el: float(x[si[f"b_iso_{el}"]]) for el in ladder.species},
        "b_iso_std": {el: float(std[si[f"b_iso_{el}"]]) for el in ladder.species},
        "microstrain_pct": micro, "microstrain_std_pct": micro_std,
        "scale": float(x[n_nl]), "scale_std": float(std[n_nl]),
        "background": {b: float(x[n_nl + 1 + i]) for i, b in enumerate(bnames)},
        "background_std": {b: float(std[n_nl + 1 + i]) for i, b in enumerate(bnames)},
        "at_bound": [nm for nm, a in zip(names, at_bound) if a],
        "rwp": rwp, "reduced_chi2": red, "weighting": weighting,
        "uncertainty_scaled_by_chi2": bool(red > 1.0),
        "correlation": {"parameters": names, "matrix": np.round(corr, 4).tolist()},
        "flags": flags, "messages": messages,
        "n_points": int(q.size), "q_range_inv_angstrom": [float(q[0]), float(q[-1])],
        "start": {"mean_diameter_nm": m_net, "size_dispersion_pct": c_net},
        "ladder": {k: ladder.spec[k] for k in ("shape", "surface", "centre", "family_id") if k in ladder.spec},
        "energy_kev": energy_kev, "n_evaluations": int(prob.evaluations),
        "seconds": time.perf_counter() - t0,
    }
    decide(refined)
    return RefineResult(_finite_or_none(refined), q, y, s_used, model, bg, components)


def decide(refined: dict, model_std_nm: float = 0.0) -> dict:
    """The guard, in place: `accepted`, `verdict` (one line), `reasons`, `answer` (what to report: the refined
    values, or the network's) and the move in combined standard uncertainties. The refined mean's uncertainty is
    widened by `model_std_nm` (the spread between model shapes) before the comparison."""
    net = refined["network"]
    m_net, sm_net = net["mean_diameter_nm"], net["mean_diameter_std_nm"]
    reasons = [tuple(r) for r in refined.get("fit_reasons", [])]
    flags = [f for f in refined["flags"] if f != "moved_beyond_uncertainty"]
    messages = [m for m in refined["messages"] if not m.startswith("guard:")]
    s_fit = refined["mean_diameter_std_nm"]
    s_fit = float(s_fit) if s_fit is not None and math.isfinite(s_fit) else None
    s_ref = math.hypot(s_fit, model_std_nm) if s_fit is not None else None
    move = refined["mean_diameter_nm"] - m_net
    s_net_used = sm_net if sm_net is not None else NETWORK_STD_FALLBACK * m_net
    s_comb = math.hypot(s_net_used, s_ref or 0.0)
    move_sigma = abs(move) / s_comb if s_comb > 0 else math.inf
    if sm_net is None:
        messages.append(f"guard: no network uncertainty given; assumed {NETWORK_STD_FALLBACK:.0%} of the mean")
    if move_sigma > GUARD_MOVE_FLAG_SIGMA:
        flags.append("moved_beyond_uncertainty")
        messages.append(f"guard: the refinement moves the mean diameter by {move:+.3f} nm, {move_sigma:.1f} combined "
                        f"standard uncertainties (network ± {s_net_used:.3f}, refinement ± "
                        f"{'?' if s_ref is None else f'{s_ref:.3f}'} nm)")
    if move_sigma > GUARD_MOVE_REJECT_SIGMA:
        reasons.append((5, f"it moves the size by {move:+.2f} nm, {move_sigma:.1f} > {GUARD_MOVE_REJECT_SIGMA:g} "
                        "combined standard uncertainties from the network's estimate"))
    if s_ref is not None and sm_net is not None and s_ref >= sm_net:
        reasons.append((6, f"no sharper than the network (± {s_ref:.3f} nm against ± {sm_net:.3f} nm)"))
    texts = [text for _, text in sorted(reasons, key=lambda pr: pr[0])]  # the weightiest reason first
    accepted = not texts
    if accepted:
        answer = {"source": "refinement", "mean_diameter_nm": refined["mean_diameter_nm"],
                  "mean_diameter_std_nm": s_ref, "size_dispersion_pct": refined["size_dispersion_pct"],
                  "size_dispersion_std_pct": refined["size_dispersion_std_pct"]}
        verdict = "accepted" + (f" (flagged: moved {move_sigma:.1f} combined sigma)"
                                if move_sigma > GUARD_MOVE_FLAG_SIGMA else "")
    else:
        answer = {"source": "network", **net}
        verdict = f"rejected: {texts[0]}"
        messages.append(f"guard: refinement rejected, the network's answer stands: {'; '.join(texts)}")
    refined.update(accepted=accepted, verdict=verdict, reasons=texts, answer=answer, move_nm=float(move),
                   move_sigma=float(move_sigma), model_std_nm=float(model_std_nm), flags=flags, messages=messages)
    return refined


# The shapes and surfaces tried when the model's shape is not given (shape="auto"): qdsize's families that differ
# most in peak shape at one equal-volume diameter, with a Pb-rich and an as-cut surface.
AUTO_MODELS = ({"shape": "sphere", "surface": "cation_rich"}, {"shape": "sphere", "surface": "as_cut"},
               {"shape": "cube", "surface": "cation_rich"}, {"shape": "octahedron", "surface": "as_cut"},
               {"shape": "cuboctahedron", "surface": "cation_rich"})
AUTO_SURFACES = ("cation_rich", "as_cut")  # the surfaces tried for a shape given without one
AUTO_SCREEN_STARTS = 1  # starts for each candidate model; the best is then refined with the full n_starts
AUTO_SCREEN_BUDGET_DIVISOR = 4  # ... and a quarter of the evaluation budget
AUTO_SCREEN_THIN_POINTS = 800  # patterns with this many points are screened on every other point


def refine_models(q_inv_angstrom, intensity, start: dict, *, models=AUTO_MODELS, ladders: dict | None = None,
                  ladder_spec: dict | None = None, n_starts: int = 3, **kw) -> RefineResult:
    """`refine` with each candidate model family (`models`: ladder specs of shape and surface), keeping the best
    by chi-square; the spread of the mean diameter over the families that fit about as well (Akaike weights
    exp(-(chi2 - chi2_min) / (2 max(1, reduced chi2)))) widens its uncertainty for the guard. `ladders`: a dict
    {(shape, surface): Ladder} of prepared tables (else loaded for each fit range)."""
    fits, errors = [], []
    base = dict(ladder_spec or {})
    screen_evaluations = max(kw.get("max_evaluations", 4000) // AUTO_SCREEN_BUDGET_DIVISOR, 200)
    q_all = np.asarray(q_inv_angstrom, dtype=np.float64).ravel()
    y_all = np.asarray(intensity, dtype=np.float64).ravel()
    every = 2 if q_all.size >= AUTO_SCREEN_THIN_POINTS else 1  # the screen sees every other point: half the cost
    sig = kw.pop("sigma", None)
    sig_screen = None if sig is None else np.asarray(sig, dtype=np.float64).ravel()[::every]
    for spec in models:
        key = (spec["shape"], spec.get("surface", DEFAULT_LADDER["surface"]))
        lad = (ladders or {}).get(key)
        try:
            res = refine(q_all[::every], y_all[::every], start, sigma=sig_screen, ladder=lad,
                         ladder_spec={**base, **spec}, n_starts=AUTO_SCREEN_STARTS,
                         **{**kw, "max_evaluations": screen_evaluations})
        except InputError as exc:
            errors.append(exc)
            continue
        chi2 = res.refined["reduced_chi2"] * max(res.refined["n_points"], 1)
        fits.append((chi2, key, lad, res.refined))
    if not fits:
        raise errors[0]
    fits.sort(key=lambda f: f[0])
    _, key, lad, screened = fits[0]
    # the best family on every point, from the screen's peak positions and damping
    best = refine(q_all, y_all, {**start, "strain": screened["strain"], "b_iso": screened["b_iso"]}, sigma=sig,
                  ladder=lad, ladder_spec={**base, "shape": key[0], "surface": key[1]}, n_starts=n_starts, **kw)
    fits[0] = (fits[0][0], key, lad, best.refined)
    red = max(screened["reduced_chi2"], 1.0)
    wts = np.array([math.exp(-(f[0] - fits[0][0]) / (2.0 * red)) for f in fits])
    wts /= wts.sum()
    means = np.array([f[3]["mean_diameter_nm"] for f in fits])
    model_std = float(np.sqrt(np.sum(wts * (means - means[0]) ** 2)))
    r = best.refined
    r["models"] = [{"shape": f[1][0], "surface": f[1][1], "mean_diameter_nm": float(f[3]["mean_diameter_nm"]),
                    "reduced_chi2": float(f[3]["reduced_chi2"]), "weight": float(w)} for f, w in zip(fits, wts)]
    r["start"] = {"mean_diameter_nm": float(start["mean_diameter_nm"]),
                  "size_dispersion_pct": float(start["size_dispersion_pct"])}
    decide(r, model_std)
    best.refined = _finite_or_none(r)
    return best


def _finite_or_none(v):
    """JSON-safe copy: NaN or infinite numbers (undetermined uncertainties) become None."""
    if isinstance(v, dict):
        return {k: _finite_or_none(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite_or_none(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    return v


# ----------------------------------------------------------------------------------------------------------------
# One measured pattern, from the network's estimate: what `qdsize predict --refine`, `qdsize refine` and
# `qdsize.ml.predict.predict_files(..., refine=True)` all call
# ----------------------------------------------------------------------------------------------------------------
# what a refinement starts from: the network's answer, and its uncertainties for the guard where given
START_KEYS = ("mean_diameter_nm", "size_dispersion_pct", "mean_diameter_std_nm", "size_dispersion_std_pct")
OPTION_KEYS = ("ladder_spec", "shape", "surface", "q_range", "background", "background_degree", "background_spacing",
               "solvent", "capillary", "compton", "resolution", "q_zero", "n_starts", "network_prior",
               "refine_microstrain", "microstrain_pct")


def fit_options(options: dict) -> dict:
    """User-facing refinement options (OPTION_KEYS), checked, as `refine_pattern` takes them: `shape` ("auto" by
    default: each of AUTO_MODELS; a shape without a surface: each of AUTO_SURFACES) and `surface` become the ladder
    spec or the candidate `models`; `solvent` / `capillary` are a name or names (None or () for none)."""
    from . import cluster

    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise bad("options", unknown, f"refinement options among {list(OPTION_KEYS)}")
    opts = dict(options)
    spec = dict(opts.pop("ladder_spec", None) or {})
    shape = opts.pop("shape", None) or spec.pop("shape", None) or "auto"
    surface = opts.pop("surface", None) or spec.pop("surface", None)
    if surface is not None and surface not in ("cation_rich", "stoichiometric", "as_cut"):
        raise bad("surface", surface, "cation_rich (Pb-rich), stoichiometric or as_cut")
    if shape == "auto":  # the best of the candidate families (a given surface applies to each)
        models = [{**m, **({"surface": surface} if surface else {})} for m in AUTO_MODELS]
        opts["models"] = [dict(t) for t in dict.fromkeys(tuple(sorted(m.items())) for m in models)]
    else:
        cluster.parse_shape(shape)
        spec["shape"] = shape
        if surface is not None:
            spec["surface"] = surface
        else:  # a shape without a surface: both surfaces tried, their spread in the uncertainty
            opts["models"] = [{"shape": shape, "surface": sf} for sf in AUTO_SURFACES]
    if spec:
        opts["ladder_spec"] = spec
    for key, check in (("solvent", solvents.check_solvent), ("capillary", solvents.check_capillary)):
        v = opts.get(key)
        if v is None:
            opts.pop(key, None)
            continue
        names = (v,) if isinstance(v, str) else tuple(v)
        opts[key] = tuple(check(n, key) for n in names)
    return opts


def refine_pattern(pattern, start: dict, options: dict | None = None) -> RefineResult:
    """Refine a measured pattern (`qdsize.sim.measured.MeasuredPattern`) from `start` (the network's
    mean_diameter_nm and size_dispersion_pct, with their std for the guard), with options from `fit_options`;
    an InputError names the pattern's file."""
    opts = dict(options or {})
    models = opts.pop("models", None)
    en = scattering.energy_kev(pattern.wavelength_angstrom) if pattern.wavelength_angstrom else None
    name = str(pattern.path)
    try:
        if models:
            return refine_models(pattern.q_inv_angstrom, pattern.intensity, start, models=models,
                                 sigma=pattern.sigma, energy_kev=en, name=name, **opts)
        return refine(pattern.q_inv_angstrom, pattern.intensity, start, sigma=pattern.sigma, energy_kev=en,
                      name=name, **opts)
    except InputError as exc:
        msg = str(exc)
        raise InputError(msg if msg.startswith(name) else f"{name}: {msg}") from None
