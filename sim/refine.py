"""Physics refinement: bounded least-squares fit of the cached-ladder DSE model to a measured pattern on its grid."""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field

import numpy as np

from . import distribution, scattering, solvents
from .errors import InputError, bad

# The default model ladder: one of the default dataset's families (conf/dataset/pbs.yaml), so that the cached tables
# of `qdsize simulate` are reused. Pb-rich spheres: real PbS dots are Pb-rich (physics notes).
DEFAULT_LADDER = {"material": "pbs", "a_angstrom": 5.936, "shape": "sphere", "surface": "cation_rich",
                  "anion_removal": 0.5, "centre": "random", "centre_seed": 0, "ladder_min_nm": 1.0,
                  "ladder_max_nm": 24.0, "ladder_relative_step": 0.025}
FINE_STEP_INV_ANGSTROM = 0.004  # the default dataset's fine grid step (compose.fine_step_inv_angstrom)
DEFAULT_FINE = (0.88, 0.004, 2436)  # fine grid of conf/dataset/pbs.yaml: sharing it shares the table cache
FINE_MARGIN_POINTS = 16
REQUIRED_Q_MIN_INV_ANGSTROM = 1.2  # DESIGN.md: a measured pattern must cover at least 1.2-7.0 1/A
REQUIRED_Q_MAX_INV_ANGSTROM = 7.0
COVERAGE_MARGIN_INV_ANGSTROM = 0.1
POOR_FIT_CHI2 = 3.0  # reduced chi-square above this flags a poor fit
SINGULAR_CONDITION = 1e13  # condition number of the scaled normal matrix beyond which the covariance is singular
TAIL_SIGMA = 3.0  # the fitted distribution must lie inside the ladder out to this many sigma of ln D
MICROSTRAIN_NODES_MAX = 121
MICROSTRAIN_START_PCT = 0.15

BOUNDS = {"mean_diameter_nm": (1.5, 14.0), "size_dispersion_pct": (0.0, 40.0), "strain": (-0.025, 0.025),
          "b_iso": (0.0, 8.0), "microstrain_pct": (0.0, 1.0)}
FD_STEP = {"mean_diameter_nm": 0.01, "size_dispersion_pct": 0.2, "strain": 2e-4, "b_iso": 0.02,
           "microstrain_pct": 0.01}


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
        """From the family tables of `qdsize.platform.simulate.get_family` (with fine_q0 / fine_step added)."""
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
    from qdsize.platform import config as cfgmod  # the family cache lives in the platform layer
    from qdsize.platform import simulate as psim

    s = dict(DEFAULT_LADDER)
    s.update(spec or {})
    unknown = sorted(set(s) - set(DEFAULT_LADDER))
    if unknown:
        raise bad("ladder", unknown, f"keys among {sorted(DEFAULT_LADDER)}")
    if s["surface"] != "cation_rich":
        s["anion_removal"] = 0.0  # as the dataset's family specs do
    s["format"] = psim.FAMILY_FORMAT
    s["family_id"] = cfgmod.content_hash({k: v for k, v in s.items() if k != "family_id"})
    sig = microstrain_max_pct / 100.0 * _node_reach(microstrain_max_pct)
    q0, h, n = fine_grid_for(q_min, q_max, (1 + strain_bounds[0]) * (1 - sig), (1 + strain_bounds[1]) * (1 + sig))
    fine = psim.FineGrid(q0, h, n)
    tab = psim.get_family(s, fine, cache if cache is not None else psim.cache_dir())
    tab["fine_q0"], tab["fine_step"] = fine.q0, fine.step
    return Ladder.from_tables(tab, s)


# ----------------------------------------------------------------------------------------------------------------
# The model: scale x DSE per atom of the number-weighted lognormal mixture + linear background
# ----------------------------------------------------------------------------------------------------------------
def _node_reach(microstrain_pct: float) -> float:
    return 6.0 if microstrain_pct > 0 else 0.0


MICROSTRAIN_TOL = 1e-6  # quadrature error allowed on E[cos(x t)] = exp(-x^2 / 2)


@functools.lru_cache(maxsize=1)
def _gauss_hermite_reach() -> list[tuple[float, np.ndarray, np.ndarray]]:
    """(largest x integrated to MICROSTRAIN_TOL, nodes, weights) of Gauss-Hermite rules for t ~ N(0, 1)."""
    xs = np.linspace(0.0, 12.0, 1201)
    out = []
    for n in range(2, 41):
        x, w = np.polynomial.hermite.hermgauss(n)
        t, w = np.sqrt(2.0) * x, w / np.sqrt(np.pi)
        err = np.abs(np.cos(np.outer(xs, t)) @ w - np.exp(-xs**2 / 2))
        badx = np.flatnonzero(err > MICROSTRAIN_TOL)
        out.append((float(xs[badx[0] - 1]) if len(badx) else float(xs[-1]), t, w))
    return out


def microstrain_nodes(x_max: float) -> tuple[np.ndarray, np.ndarray]:
    """Nodes t and weights for E[g(t)], t ~ N(0, 1), that integrate cos(x t) to MICROSTRAIN_TOL for x <= x_max:
    one node at 0 when there is nothing to average, the smallest adequate Gauss-Hermite rule for small x, else a
    Gaussian-weighted trapezoid rule on [-6, 6] (aliasing error exp(-(2 pi / dt - x)^2 / 2))."""
    if x_max <= np.sqrt(2 * MICROSTRAIN_TOL):
        return np.zeros(1), np.ones(1)
    dt = min(0.75, 2.0 * np.pi / (x_max + 5.5))
    n_trap = min(MICROSTRAIN_NODES_MAX, 2 * int(math.ceil(6.0 / dt)) + 1)
    for reach, t, w in _gauss_hermite_reach():
        if reach >= x_max and len(t) < n_trap:
            return t, w
    t = np.linspace(-6.0, 6.0, n_trap)
    w = np.exp(-t**2 / 2.0)
    return t, w / w.sum()


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
    c = (w @ lad.coef.reshape(k, -1)).reshape(n, npair, nf)
    atoms = w @ lad.atoms  # (n, S)
    sig = p["microstrain_pct"] / 100.0
    # one quadrature rule for the batch: resolves the largest pair distance that carries intensity
    big = w * (lad.atoms.sum(axis=1) ** 2)[None, :]
    rmax = np.where(big >= 1e-7 * big.max(axis=1, keepdims=True), lad.rmax_angstrom[None, :], 0.0).max()
    t_n, t_w = microstrain_nodes(float(prob.q[-1] * rmax * sig.max() * (1 + abs(p["strain"]).max())))
    stretch = (1.0 + p["strain"])[:, None] * (1.0 + sig[:, None] * t_n[None, :])  # (n, J)
    x = (prob.q[None, None, :] * stretch[:, :, None] - lad.fine_q0) / lad.fine_step  # (n, J, Q)
    i0 = np.floor(x).astype(np.int64)
    if i0.min() < 1 or i0.max() > nf - 3:
        raise InputError(f"Q x (1 + strain) = {prob.q[0] * stretch.min():.4f}-{prob.q[-1] * stretch.max():.4f} "
                         f"1/A: expected inside the ladder tables' range {lad.q_range[0]:.3f}-{lad.q_range[1]:.3f}")
    u = x - i0
    um = 1.0 - u
    u2, u3 = u * u, u * u * u
    tw = t_w[None, :, None] / 6.0
    bw = (tw * um**3, tw * (3 * u3 - 6 * u2 + 4), tw * (-3 * u3 + 3 * u2 + 3 * u + 1), tw * u3)
    nq = prob.q.size
    jq = t_n.size * nq
    sums = np.zeros((n, npair, nq))
    for j, b in enumerate(bw):
        g = np.take_along_axis(c, (i0 + (j - 1)).reshape(n, 1, jq), axis=2).reshape(n, npair, t_n.size, nq)
        sums += np.einsum("npjq,njq->npq", g, b)
    q2 = prob.q**2 / (16.0 * np.pi**2)
    bvals = np.stack([p[nm] for nm in _species_params(lad)], axis=1)  # (n, S)
    tdw = np.exp(-bvals[:, :, None] * q2[None, None, :])  # (n, S, Q)
    out = atoms @ prob.ff_self
    for i, (s, t) in enumerate(lad.pairs):
        out += prob.ff_pair[i][None, :] * tdw[:, s] * tdw[:, t] * sums[:, i]
    return out / atoms.sum(axis=1, keepdims=True)


def background_basis(q: np.ndarray, degree: int, solvent_names=(), capillaries=(), compton=None):
    """Background terms on the fit grid: Legendre P_0..P_degree of x in [-1, 1] over the range, then each solvent,
    capillary and Compton curve scaled to mean 1, so that every amplitude is in data units."""
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

    @property
    def flags(self) -> list[str]:
        return self.refined["flags"]


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


def refine(q_inv_angstrom, intensity, start: dict, *, sigma=None, energy_kev: float | None = None,
           ladder: Ladder | None = None, ladder_spec: dict | None = None, q_range=(1.0, None),
           background_degree: int = 3, solvent=(), capillary=(), compton: bool = False,
           b_iso_start: float | dict = 1.0, microstrain_pct: float = 0.0, refine_microstrain: bool = True,
           max_evaluations: int = 4000, name: str = "pattern") -> RefineResult:
    """Refine a pattern from the network's estimates `start` (mean_diameter_nm, size_dispersion_pct; optional
    lattice_parameter_angstrom / strain, b_iso) against the data on its own grid.

    Fitted: mean diameter and dispersion of the number-weighted lognormal, uniform strain (lattice parameter),
    B per element, optionally the microstrain, a scale, and a linear background (Legendre polynomial of
    `background_degree` plus free amplitudes of the named solvent / capillary curves and, optionally, Compton).
    The microstrain (rms spread of lattice parameters between particles, averaged exactly by quadrature) is
    refined by default: left at zero, a 0.4 % spread biases a 6 nm mean by about -0.3 nm.
    Each evaluation is a weighted sum over the cached ladder (fine-grid B-splines), never a new DSE. BLAS runs
    on one thread: the matrices are small, and threads fighting over shared cores cost more than they give.
    """
    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    with threadpool_limits(1):
        res = _refine(q_inv_angstrom, intensity, start, sigma=sigma, energy_kev=energy_kev, ladder=ladder,
                      ladder_spec=ladder_spec, q_range=q_range, background_degree=background_degree, solvent=solvent,
                      capillary=capillary, compton=compton, b_iso_start=b_iso_start, microstrain_pct=microstrain_pct,
                      refine_microstrain=refine_microstrain, max_evaluations=max_evaluations, name=name)
    res.refined["seconds"] = time.perf_counter() - t0
    return res


def _refine(q_inv_angstrom, intensity, start, *, sigma, energy_kev, ladder, ladder_spec, q_range, background_degree,
            solvent, capillary, compton, b_iso_start, microstrain_pct, refine_microstrain, max_evaluations, name):
    t0 = time.perf_counter()
    q_all = np.asarray(q_inv_angstrom, dtype=np.float64).ravel()
    y_all = np.asarray(intensity, dtype=np.float64).ravel()
    if q_all.size != y_all.size:
        raise InputError(f"{name}: {q_all.size} Q values but {y_all.size} intensities: expected one intensity per Q")
    if not np.all(np.isfinite(q_all)) or not np.all(np.isfinite(y_all)):
        raise InputError(f"{name}: NaN or infinity in Q or intensity: expected finite numbers")
    if q_all.size > 1 and np.any(np.diff(q_all) <= 0):
        raise InputError(f"{name}: Q is not strictly increasing: expected a sorted grid without repeats")
    lo_req = q_range[0] if q_range and q_range[0] is not None else 1.0
    hi_req = q_range[1] if q_range and len(q_range) > 1 and q_range[1] is not None else float(q_all[-1])
    if not (math.isfinite(lo_req) and math.isfinite(hi_req) and 0 < lo_req < hi_req):
        raise bad("q_range", tuple(q_range), "(q_min, q_max) in 1/A with 0 < q_min < q_max")
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
    m0 = _check_start("start.mean_diameter_nm", start["mean_diameter_nm"], 0.0, np.inf, "a positive diameter in nm")
    c0 = _check_start("start.size_dispersion_pct", start["size_dispersion_pct"], 0.0, np.inf,
                      "a dispersion in percent >= 0")
    m0 = float(np.clip(m0, *BOUNDS["mean_diameter_nm"]))
    c0 = float(np.clip(c0, 1.0, BOUNDS["size_dispersion_pct"][1] - 1.0))  # off the 0 bound: its gradient is 0
    micro_max = BOUNDS["microstrain_pct"][1] if refine_microstrain else microstrain_pct
    if ladder is None:
        ladder = load_ladder(float(q[0]), float(q[-1]), spec=ladder_spec, microstrain_max_pct=micro_max)
    sig_max = micro_max / 100.0 * 6.0
    need = (q[0] * (1 + BOUNDS["strain"][0]) * (1 - sig_max), q[-1] * (1 + BOUNDS["strain"][1]) * (1 + sig_max))
    if need[0] < ladder.q_range[0] or need[1] > ladder.q_range[1]:
        raise bad("ladder", f"tables for Q = {ladder.q_range[0]:.3f}-{ladder.q_range[1]:.3f} 1/A",
                  f"tables covering {need[0]:.3f}-{need[1]:.3f} 1/A (the fit range stretched by the strain and "
                  "microstrain bounds): load_ladder(q_min, q_max) of this fit range")
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

    # ---- fixed arrays
    ff = scattering.form_factors(ladder.species, q, energy_kev)
    ff_self = np.abs(ff) ** 2
    ff_pair = np.array([2.0 * np.real(ff[s] * np.conj(ff[t])) for s, t in ladder.pairs])
    basis, bnames = background_basis(q, background_degree, tuple(solvent or ()), tuple(capillary or ()),
                                     {el: 1 for el in ladder.species} if compton else None)
    nonlinear = ["mean_diameter_nm", "size_dispersion_pct", "strain", *_species_params(ladder)]
    if refine_microstrain:
        nonlinear.append("microstrain_pct")
    prob = Problem(q, y, s_used, weighting, ladder, ff_self, ff_pair, basis, bnames, nonlinear,
                   fixed_microstrain_pct=float(microstrain_pct))
    n_nl = len(nonlinear)
    lin_names = ["scale", *[f"background_{b}" for b in bnames]]
    n_par = n_nl + len(lin_names)
    if q.size <= n_par + 5:
        raise InputError(f"{name}: {q.size} points in the fit range for {n_par} parameters: expected many more points")
    lb = [lo_m, BOUNDS["size_dispersion_pct"][0], BOUNDS["strain"][0]] + [BOUNDS["b_iso"][0]] * len(ladder.species)
    ub = [hi_m, BOUNDS["size_dispersion_pct"][1], BOUNDS["strain"][1]] + [BOUNDS["b_iso"][1]] * len(ladder.species)
    if refine_microstrain:
        lb.append(BOUNDS["microstrain_pct"][0])
        ub.append(BOUNDS["microstrain_pct"][1])
    lb += [0.0] + [-np.inf] * len(bnames)
    ub += [np.inf] * len(lin_names)
    lb, ub = np.array(lb), np.array(ub)
    steps = np.array([FD_STEP["mean_diameter_nm"], FD_STEP["size_dispersion_pct"], FD_STEP["strain"]]
                     + [FD_STEP["b_iso"]] * len(ladder.species)
                     + ([FD_STEP["microstrain_pct"]] if refine_microstrain else []))
    inv_s = 1.0 / s_used

    def linear_start(theta_rows):
        """Best scale and background for each row of nonlinear parameters, and its chi-square."""
        dse = dse_per_atom(prob, theta_rows)
        out = []
        for row in dse:
            design = np.vstack([row[None, :], basis])
            coef = _linear_solve(design, y, inv_s)
            chi2 = float(np.sum(((coef @ design - y) * inv_s) ** 2))
            out.append((chi2, coef))
        return out

    # microstrain starts off zero: its effect is quadratic there, so the gradient would vanish
    theta0 = np.array([m0, c0, e0, *b_start] + ([max(microstrain_pct, MICROSTRAIN_START_PCT)] if refine_microstrain
                                               else []))
    if scan_strain:  # peak positions: a coarse scan keeps the fit out of a neighbouring peak's minimum
        grid = np.linspace(BOUNDS["strain"][0] * 0.9, BOUNDS["strain"][1] * 0.9, 31)
        rows = np.repeat(theta0[None, :], grid.size, axis=0)
        rows[:, 2] = grid
        fits = linear_start(rows)
        theta0[2] = grid[int(np.argmin([f[0] for f in fits]))]
    chi0, lin0 = linear_start(theta0[None, :])[0]
    lin0[0] = max(lin0[0], 1e-12 * max(float(np.abs(y).max()), 1e-300))
    x0 = np.concatenate([theta0, lin0])
    pad = 1e-9 * np.where(np.isfinite(ub - lb), ub - lb, 1.0)
    x0 = np.minimum(np.maximum(x0, lb + pad), ub - pad)

    cache = {}

    def model_parts(x):
        key = x.tobytes()
        if key not in cache:
            cache.clear()
            cache[key] = dse_per_atom(prob, x[None, :n_nl])[0]
        return cache[key]

    def residual(x):
        dse = model_parts(x)
        m = x[n_nl] * dse + x[n_nl + 1:] @ basis
        return (m - y) * inv_s

    def jacobian(x, central=False):
        """Forward differences while iterating; central ones (one-sided at a bound) for the covariance. The
        perturbed rows go through the model as one batch; the linear columns are exact."""
        th = x[:n_nl]
        base = model_parts(x)
        rows, cols = [], []
        for j in range(n_nl):
            if central:
                hp = max(min(steps[j], ub[j] - th[j]), 0.0)
                hm = max(min(steps[j], th[j] - lb[j]), 0.0)
                if hp + hm <= 0:
                    hp = steps[j]
                up, dn = th.copy(), th.copy()
                up[j] += hp
                dn[j] -= hm
                rows += [up, dn]
                cols.append(hp + hm)
            else:
                h = steps[j] if th[j] + steps[j] <= ub[j] else -steps[j]
                up = th.copy()
                up[j] += h
                rows.append(up)
                cols.append(h)
        dse = dse_per_atom(prob, np.array(rows))
        jac = np.empty((q.size, n_par))
        for j in range(n_nl):
            diff = dse[2 * j] - dse[2 * j + 1] if central else dse[j] - base
            jac[:, j] = x[n_nl] * diff / cols[j] * inv_s
        jac[:, n_nl] = base * inv_s
        jac[:, n_nl + 1:] = (basis * inv_s).T
        return jac

    from scipy.optimize import least_squares

    def run_fit(x_start):
        return least_squares(residual, x_start, jac=jacobian, bounds=(lb, ub), method="trf", x_scale="jac",
                             max_nfev=max(20, max_evaluations // (n_nl + 1)), ftol=1e-9, xtol=1e-9, gtol=1e-9)

    try:
        with np.errstate(over="ignore", invalid="ignore"):
            sol = run_fit(x0)
            if weighting == "poisson" and np.min(sol.fun * s_used + y) < 100:
                # low counts: weight by the model, not the data (Neyman chi-square is biased low)
                mod = sol.fun * s_used + y
                s_used = np.sqrt(np.maximum(mod, 1.0))
                prob.sigma = s_used
                inv_s = 1.0 / s_used
                cache.clear()
                sol = run_fit(sol.x)
    except InputError:
        raise
    except (np.linalg.LinAlgError, ValueError, FloatingPointError) as exc:
        raise InputError(f"{name}: the refinement did not converge from the start "
                         f"({m0:.2f} nm, {c0:.1f} %): {exc}; expected a pattern of PbS dots near the network's "
                         "estimate (check the x unit, the wavelength and the fit range)") from None
    if not np.all(np.isfinite(sol.fun)) or not np.all(np.isfinite(sol.x)):
        raise InputError(f"{name}: the refinement did not converge from the start ({m0:.2f} nm, {c0:.1f} %): "
                         "non-finite model; expected a pattern of PbS dots near the network's estimate")
    x = sol.x
    r = sol.fun
    jac = jacobian(x, central=True)
    dof = max(q.size - n_par, 1)
    chi2 = float(r @ r)
    red = chi2 / dof
    model = r * s_used + y
    bg = x[n_nl + 1:] @ basis
    w = 1.0 / s_used**2
    rwp = float(np.sqrt(np.sum(w * (y - model) ** 2) / np.sum(w * y**2)))

    # ---- covariance (J^T W J)^-1, scaled by the reduced chi-square unless the weights are Poisson
    flags: list[str] = []
    names = nonlinear + lin_names
    d = np.sqrt(np.sum(jac**2, axis=0))
    d[d == 0] = 1.0
    js = jac / d
    u_, sv, vt = np.linalg.svd(js, full_matrices=False)
    cond = float(sv[0] / sv[-1]) if sv[-1] > 0 else np.inf
    if cond**2 > SINGULAR_CONDITION or not np.isfinite(cond):
        flags.append("singular_covariance")
        weakest = vt[-1]
        involved = [names[i] for i in np.argsort(-np.abs(weakest))[:3]]
        messages.append(f"covariance: singular (condition {cond**2:.2g}); parameters {', '.join(involved)} are not "
                        "separately determined by these data (fix or remove one: fewer background terms, a wider "
                        "Q range)")
        cov = np.full((n_par, n_par), np.nan)
    else:
        cov = (vt.T / sv**2) @ vt / np.outer(d, d)
        if weighting != "poisson":
            cov = cov * red
    std = np.sqrt(np.clip(np.diag(cov), 0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = cov / np.outer(std, std)

    # ---- realised labels of the fitted distribution on the ladder, and their uncertainties (delta method)
    def labels(mean, disp):
        return distribution.realised_labels(d_lad, distribution.ladder_weights(d_lad, mean, disp))

    mr, cr = labels(x[0], x[1])
    g = np.zeros((2, 2))
    for j, hstep in enumerate((0.01, 0.1)):
        up, dn = x[:2].copy(), x[:2].copy()
        up[j] = min(up[j] + hstep, ub[j])
        dn[j] = max(dn[j] - hstep, lb[j])
        g[:, j] = (np.array(labels(*up)) - np.array(labels(*dn))) / (up[j] - dn[j])
    cov_lab = g @ cov[:2, :2] @ g.T
    std_lab = np.sqrt(np.clip(np.diag(cov_lab), 0, None))

    # ---- flags
    if sol.status == 0:
        flags.append("not_converged")
        messages.append(f"fit: stopped after {prob.evaluations} evaluations without meeting the tolerances")
    if red > POOR_FIT_CHI2:
        flags.append("poor_fit")
        messages.append(f"fit: reduced chi-square {red:.3g} > {POOR_FIT_CHI2:g} ({weighting} weights): the model "
                        "misses features of the data (background terms? shape? Q calibration?)")
    for i, nm in enumerate(nonlinear + ["scale"]):
        span = ub[i] - lb[i] if np.isfinite(ub[i] - lb[i]) else max(abs(x[i]), 1.0)
        tol = 1e-3 * span
        low = np.isfinite(lb[i]) and x[i] - lb[i] < tol and nm != "microstrain_pct"  # no spread: a valid answer
        if low or (np.isfinite(ub[i]) and ub[i] - x[i] < tol):
            flags.append(f"at_bound:{nm}")
            messages.append(f"fit: {nm} = {x[i]:.4g} is at its bound [{lb[i]:g}, {ub[i]:g}]; its uncertainty "
                            "does not describe a free minimum")
    lo_t, hi_t = distribution.quantile_range_nm(x[0], x[1], TAIL_SIGMA) if x[1] > 0 else (x[0], x[0])
    if lo_t < d_lad[0] or hi_t > d_lad[-1]:
        flags.append("ladder_edge")
        messages.append(f"model: the fitted distribution ({lo_t:.2f}-{hi_t:.2f} nm at {TAIL_SIGMA:g} sigma) runs "
                        f"past the ladder ({d_lad[0]:.2f}-{d_lad[-1]:.2f} nm)")
    if energy_kev is None:
        messages.append("form factors without anomalous terms: no wavelength or energy was given")

    si = {nm: i for i, nm in enumerate(names)}
    refined = {
        "mean_diameter_nm": mr, "mean_diameter_std_nm": float(std_lab[0]),
        "size_dispersion_pct": cr, "size_dispersion_std_pct": float(std_lab[1]),
        "lognormal_mean_nm": float(x[0]), "lognormal_dispersion_pct": float(x[1]),
        "lattice_parameter_angstrom": a_ref * (1.0 + float(x[2])),
        "lattice_parameter_std_angstrom": a_ref * float(std[2]),
        "strain": float(x[2]), "strain_std": float(std[2]),
        "b_iso": {el: float(x[si[f"b_iso_{el}"]]) for el in ladder.species},
        "b_iso_std": {el: float(std[si[f"b_iso_{el}"]]) for el in ladder.species},
        "microstrain_pct": float(x[si["microstrain_pct"]]) if refine_microstrain else float(microstrain_pct),
        "microstrain_std_pct": float(std[si["microstrain_pct"]]) if refine_microstrain else 0.0,
        "scale": float(x[n_nl]), "scale_std": float(std[n_nl]),
        "background": {b: float(x[n_nl + 1 + i]) for i, b in enumerate(bnames)},
        "background_std": {b: float(std[n_nl + 1 + i]) for i, b in enumerate(bnames)},
        "rwp": rwp, "reduced_chi2": red, "weighting": weighting,
        "correlation": {"parameters": names, "matrix": np.round(corr, 4).tolist()},
        "flags": flags, "messages": messages,
        "n_points": int(q.size), "q_range_inv_angstrom": [float(q[0]), float(q[-1])],
        "start": {"mean_diameter_nm": float(start["mean_diameter_nm"]),
                  "size_dispersion_pct": float(start["size_dispersion_pct"])},
        "ladder": {k: ladder.spec[k] for k in ("shape", "surface", "centre", "family_id") if k in ladder.spec},
        "energy_kev": energy_kev, "n_evaluations": int(prob.evaluations),
        "seconds": time.perf_counter() - t0,
    }
    return RefineResult(_finite_or_none(refined), q, y, s_used, model, bg)


def _finite_or_none(v):
    """JSON-safe copy: NaN or infinite numbers (undetermined uncertainties) become None."""
    if isinstance(v, dict):
        return {k: _finite_or_none(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite_or_none(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    return v
