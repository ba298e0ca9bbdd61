"""Augmentation of simulated I(Q) by physics: counts, solvent, capillary, Compton, resolution, Q errors, background."""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from . import solvents
from .contract import RESOLUTION_KEYS, Resolution
from .errors import InputError, bad
from .scattering import check_q

PRESETS_DIR = Path(__file__).resolve().with_name("presets")  # package data: an installed wheel has them too
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
POISSON_EXACT_BELOW = 20.0  # expected counts below which Poisson counts are drawn exactly (inversion)
POISSON_INVERSION_TERMS = 64  # P(X > 64 | lambda <= 20) < 1e-14
# resolution: cells of the constant-width coordinate u: at least U_CELLS_PER_FWHM per FWHM of the profile, or
# U_CELLS_PER_Q_CELL per Q cell where that is finer (narrow profiles), and never wider than Q_CELLS_PER_U_CELL Q
# cells (a sharp feature inside a u cell loses its position within it)
U_CELLS_PER_FWHM = 4.0
U_CELLS_PER_Q_CELL = 2.0
Q_CELLS_PER_U_CELL = 1.5


def _rng(lo, hi, *, bounds=(None, None), log=False, unit="", integer=False):
    """Field metadata of a [lo, hi] strength range: physical bounds, log-uniform sampling (True: always, and the
    range must be positive; "above_zero": when the range starts above 0, else uniform), unit for messages."""
    return field(default=(lo, hi), metadata={"range": True, "bounds": bounds, "log": log, "unit": unit,
                                             "integer": integer})


def _num(lo, *, bounds=(None, None), unit="", integer=False):
    return field(default=lo, metadata={"bounds": bounds, "unit": unit, "integer": integer})


@dataclass
class ComptonConfig:
    """Incoherent scattering of the sample, in units of its physical level for the composition (1 = full)."""
    enabled: bool = True
    probability: float = _num(1.0, bounds=(0, 1))
    fraction: tuple = _rng(0.0, 1.2, bounds=(0, 10), unit="x the physical Compton level")
    elements: dict = field(default_factory=lambda: {"Pb": 1, "S": 1})


@dataclass
class SolventConfig:
    """Solvent scattering; ratio = (integral of solvent over the grid) / (integral of the particle pattern)."""
    enabled: bool = True
    probability: float = _num(1.0, bounds=(0, 1))
    names: list = field(default_factory=lambda: list(solvents.SOLVENTS))
    ratio: tuple = _rng(0.0, 3.0, bounds=(0, 1000), unit="solvent-to-particle integral ratio")
    # a liquid we did not tabulate: the solvent's curve stretched along Q, I(Q / k), so its structure peaks move
    # by k (denser or smaller molecules: k > 1); 1 = the tabulated solvent
    dilation: tuple = _rng(1.0, 1.0, bounds=(0.25, 4.0), log=True, unit="x the Q of the solvent's features")


@dataclass
class CapillaryConfig:
    """Sample-holder wall scattering; ratio of its integral over the grid to the particle pattern's."""
    enabled: bool = True
    probability: float = _num(1.0, bounds=(0, 1))
    materials: list = field(default_factory=lambda: list(solvents.CAPILLARIES))
    ratio: tuple = _rng(0.0, 0.5, bounds=(0, 1000), unit="capillary-to-particle integral ratio")


@dataclass
class ResolutionConfig:
    """Instrumental broadening, pseudo-Voigt with FWHM(Q) = sqrt(fwhm0^2 + (fwhm_relative Q)^2) (Caglioti-like in Q);
    lorentz_fraction is the pseudo-Voigt eta (0 = Gaussian, 1 = Lorentzian of the same FWHM). fwhm0 is a scale, drawn
    log-uniformly (each factor of two as likely) when its range starts above 0, uniformly from 0."""
    enabled: bool = True
    probability: float = _num(1.0, bounds=(0, 1))
    fwhm0_inv_angstrom: tuple = _rng(0.0, 0.04, bounds=(0, 0.5), log="above_zero", unit="1/A")
    fwhm_relative: tuple = _rng(0.0, 0.005, bounds=(0, 0.05), unit="(Delta Q / Q)")
    lorentz_fraction: tuple = _rng(0.0, 0.0, bounds=(0, 1), unit="(pseudo-Voigt eta: 0 = Gaussian, 1 = Lorentzian)")


@dataclass
class CalibrationConfig:
    """Q-axis errors: a true Q0 is reported at Q0 (1 + scale_error) + zero_shift."""
    enabled: bool = True
    probability: float = _num(1.0, bounds=(0, 1))
    zero_shift_inv_angstrom: tuple = _rng(-0.01, 0.01, bounds=(-0.5, 0.5), unit="1/A")
    scale_error: tuple = _rng(-0.005, 0.005, bounds=(-0.1, 0.1), unit="(relative wavelength error)")


@dataclass
class BackgroundConfig:
    """Flat and smooth (Legendre polynomial, non-negative) backgrounds, as fractions of the mean particle intensity."""
    enabled: bool = True
    probability: float = _num(1.0, bounds=(0, 1))
    flat_fraction: tuple = _rng(0.0, 0.2, bounds=(0, 100), unit="x mean particle intensity")
    poly_fraction: tuple = _rng(0.0, 0.2, bounds=(0, 100), unit="x mean particle intensity")
    poly_degree: int = _num(3, bounds=(1, 8), integer=True)


@dataclass
class SubtractionConfig:
    """Background subtraction of the added solvent + capillary with a factor (1 = perfect; 0.9 = 10 % under)."""
    enabled: bool = True
    probability: float = _num(0.7, bounds=(0, 1))
    factor: tuple = _rng(0.9, 1.1, bounds=(0, 3), unit="x the added solvent + capillary")


@dataclass
class CountsConfig:
    """Counting statistics: the strongest point gets max_counts; Poisson counts plus Gaussian readout noise."""
    enabled: bool = True
    probability: float = _num(1.0, bounds=(0, 1))
    max_counts: tuple = _rng(1.0e2, 1.0e6, bounds=(1.0, 1.0e12), log=True, unit="counts")
    readout_sigma_counts: tuple = _rng(0.0, 2.0, bounds=(0, 1.0e6), unit="counts")


@dataclass
class ScaleConfig:
    """Overall scale factor (log-uniform)."""
    enabled: bool = True
    factor: tuple = _rng(0.1, 10.0, bounds=(1e-12, 1e12), log=True, unit="x")


@dataclass
class GapsConfig:
    """Detector gaps: windows of the pattern set to zero."""
    enabled: bool = False
    probability: float = _num(0.2, bounds=(0, 1))
    number: tuple = _rng(1, 2, bounds=(0, 8), integer=True, unit="gaps")
    width_inv_angstrom: tuple = _rng(0.02, 0.1, bounds=(0, 10), unit="1/A")


SECTIONS = {"compton": ComptonConfig, "solvent": SolventConfig, "capillary": CapillaryConfig,
            "resolution": ResolutionConfig, "calibration": CalibrationConfig, "background": BackgroundConfig,
            "subtraction": SubtractionConfig, "counts": CountsConfig, "scale": ScaleConfig, "gaps": GapsConfig}
_META = {name: {f.name: f.metadata for f in dataclasses.fields(cls)} for name, cls in SECTIONS.items()}


def log_range(section: str, key: str, lo_hi) -> bool:
    """Whether a [lo, hi] range of a field is drawn log-uniformly (its `_rng(log=...)`)."""
    log = _META[section].get(key, {}).get("log")
    return log is True or (log == "above_zero" and float(lo_hi[0]) > 0)


def _number(name, v, meta):
    """A finite number (int when asked) within the field's physical bounds, else InputError naming the field."""
    lo, hi = meta.get("bounds", (None, None))
    unit = meta.get("unit", "")
    what = f"{'an integer' if meta.get('integer') else 'a number'}"
    if lo is not None and hi is not None:
        what += f" in [{lo:g}, {hi:g}]"
    what += f" {unit}".rstrip()
    if isinstance(v, bool):
        raise bad(name, v, what)
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise bad(name, v, what) from None
    if not math.isfinite(x) or (lo is not None and x < lo) or (hi is not None and x > hi):
        raise bad(name, v, what)
    if meta.get("integer"):
        if x != int(x):
            raise bad(name, v, what)
        return int(x)
    return x


def _parse_section(cls, d, prefix):
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise bad(prefix, d, "a mapping of settings")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise bad(f"{prefix}.{unknown[0]}", d[unknown[0]], f"one of the keys {', '.join(known)}")
    kw = {}
    for name, f in known.items():
        if name not in d:
            continue
        v, fname = d[name], f"{prefix}.{name}"
        meta = f.metadata
        if name == "enabled":
            if not isinstance(v, bool):
                raise bad(fname, v, "true or false")
            kw[name] = v
        elif meta.get("range"):
            pair = list(v) if isinstance(v, (list, tuple)) else [v, v]
            if len(pair) != 2:
                raise bad(fname, v, f"a range [low, high] (or one number) {meta['unit']}".rstrip())
            lo, hi = (_number(fname, p, meta) for p in pair)
            if lo > hi:
                raise bad(fname, v, "a range [low, high] with low <= high")
            if meta.get("log") is True and lo <= 0:
                raise bad(fname, v, "positive values (sampled log-uniformly)")
            kw[name] = (lo, hi)
        elif name in ("names", "materials"):
            items = [v] if isinstance(v, str) else v
            if not isinstance(items, (list, tuple)) or not items:
                raise bad(fname, v, "a non-empty list of names")
            check = solvents.check_solvent if name == "names" else solvents.check_capillary
            kw[name] = [check(x, fname) for x in items]
        elif name == "elements":
            try:
                kw[name] = solvents.composition_counts(v)
            except InputError as e:
                raise InputError(f"{prefix}.{e}") from None
        else:
            kw[name] = _number(fname, v, meta)
    return cls(**kw)


@dataclass
class AugmentConfig:
    """Every augmentation effect with its strength ranges; each sample draws its own strengths from them."""
    compton: ComptonConfig = field(default_factory=ComptonConfig)
    solvent: SolventConfig = field(default_factory=SolventConfig)
    capillary: CapillaryConfig = field(default_factory=CapillaryConfig)
    resolution: ResolutionConfig = field(default_factory=ResolutionConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    subtraction: SubtractionConfig = field(default_factory=SubtractionConfig)
    counts: CountsConfig = field(default_factory=CountsConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    gaps: GapsConfig = field(default_factory=GapsConfig)

    @classmethod
    def from_dict(cls, d: dict | None) -> "AugmentConfig":
        """Validated config from a mapping (optionally wrapped in {'augment': ...}); omitted keys keep defaults."""
        d = {} if d is None else d
        if isinstance(d, dict) and set(d) == {"augment"}:
            d = d["augment"]
        if not isinstance(d, dict):
            raise bad("augment", d, "a mapping of effect sections")
        unknown = sorted(set(d) - set(SECTIONS))
        if unknown:
            raise bad(f"augment.{unknown[0]}", d[unknown[0]], f"one of the sections {', '.join(SECTIONS)}")
        return cls(**{k: _parse_section(c, d.get(k), f"augment.{k}") for k, c in SECTIONS.items()})

    @classmethod
    def disabled(cls) -> "AugmentConfig":
        """Every effect off: the identity."""
        return cls.from_dict({k: {"enabled": False} for k in SECTIONS})

    def to_dict(self) -> dict:
        return {k: {n: (list(v) if isinstance(v, tuple) else v)
                    for n, v in dataclasses.asdict(getattr(self, k)).items()} for k in SECTIONS}


# ---------------------------------------------------------------------------------------------------------------
# Presets and overrides
# ---------------------------------------------------------------------------------------------------------------
def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if "." in k:  # dotted override such as counts.max_counts
            head, rest = k.split(".", 1)
            v, k = {rest: v}, head
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_preset(preset: str | Path) -> dict:
    """The mapping of a preset: `none` (all off), a name in sim/presets/ (package data), or a path to a YAML file."""
    import yaml

    if str(preset) == "none":
        return AugmentConfig.disabled().to_dict()
    p = Path(preset)
    if not (p.suffix in (".yaml", ".yml") and p.exists()):
        p = PRESETS_DIR / f"{preset}.yaml"
    if not p.exists():
        names = sorted(x.stem for x in PRESETS_DIR.glob("*.yaml")) + ["none"]
        raise bad("augment.preset", str(preset), f"one of {', '.join(names)} or a path to a YAML file")
    d = yaml.safe_load(p.read_text()) or {}
    return d.get("augment", d) if isinstance(d, dict) else d


def resolution_range(augment_cfg: dict) -> dict[str, list[float]]:
    """[low, high] of each resolution parameter (RESOLUTION_KEYS) an augmentation config gives its patterns; 0 is
    included where the broadening is not always applied (then the instrument is perfect)."""
    r = config_from(augment_cfg).to_dict()["resolution"]
    out = {}
    for key in RESOLUTION_KEYS:
        v = [float(t) for t in np.ravel(r[key])] if r.get("enabled") else [0.0]
        lo = 0.0 if not r.get("enabled") or r.get("probability", 1.0) < 1.0 else min(v)
        out[key] = [lo, max(v)]
    return out


def fixed_resolution(augment_cfg: dict) -> Resolution | None:
    """The one resolution every pattern of an augmentation config is given, when it fixes one (the `realistic`
    preset does; no broadening at all is the perfect instrument, zeros); None when it varies or for `none`."""
    if augment_cfg.get("preset") == "none":
        return None
    ranges = resolution_range(augment_cfg)
    if any(hi > lo for lo, hi in ranges.values()):
        return None
    return Resolution(*(lo for lo, _ in ranges.values()))


def config_from(cfg: dict | None) -> AugmentConfig:
    """{'preset': name or path, **overrides} -> validated AugmentConfig (overrides merged into the preset)."""
    cfg = dict(cfg or {})
    preset = cfg.pop("preset", "default")
    base = load_preset(preset)
    if not isinstance(base, dict):
        raise bad("augment.preset", str(preset), "a YAML file holding a mapping of effect sections")
    return AugmentConfig.from_dict(_deep_merge(base, cfg))


def from_config(cfg: dict | None, q_inv_angstrom) -> "Augmenter":
    """The augmenter for a preset plus overrides on a Q grid (the entry point the training and dataset code use)."""
    return Augmenter(config_from(cfg), q_inv_angstrom)


# ---------------------------------------------------------------------------------------------------------------
# The augmenter
# ---------------------------------------------------------------------------------------------------------------
@functools.cache
def _prime_allocator() -> None:
    """Once per process: allocate and free one untouched 31 MiB block. glibc's malloc then serves blocks up to that
    size from its heap and keeps up to twice that free (its dynamic mmap threshold, mallopt(3)) instead of mapping
    and page-faulting the augmenter's large temporaries afresh on every batch (~30 % of its CPU time on the default
    grid). Costs nothing; other allocators simply free the block."""
    torch.empty(31 << 20, dtype=torch.uint8)


STEPS = ("compton", "solvent", "capillary", "resolution", "calibration", "background", "counts", "subtraction",
         "scale", "gaps")  # the physical order of the effects (and the keys of the per-effect timings)


def _fft_friendly(n: int) -> int:
    """The smallest even 2^a 3^b 5^c >= n (a length the real FFT handles fast)."""
    m = max(int(n) + int(n) % 2, 2)
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 2


def _warp_sizes(edges: np.ndarray, dq: np.ndarray, ratios: np.ndarray, cap: int) -> tuple[int, ...]:
    """Cell counts (ascending) offered for the constant-width coordinate u = integral dQ / FWHM(Q). The largest
    keeps every u cell within 1 / U_CELLS_PER_Q_CELL of a Q cell for every ratio r = fwhm_relative / fwhm0
    (FWHM = fwhm0 sqrt(1 + r^2 Q^2), widest relative to the cells at the top of the grid), capped at `cap`; then
    smaller ones in steps of 1/sqrt(2), down to 1/8 of it."""
    r = np.asarray(ratios, dtype=np.float64)
    u_span = (np.arcsinh(r * edges[-1]) - np.arcsinh(r * edges[0])) / r  # in units of 1 / fwhm0
    widest = np.max(u_span * np.sqrt(1.0 + (r * edges[-1]) ** 2)) / dq.min()  # u span x FWHM(top) / cell
    top = _fft_friendly(min(int(np.ceil(U_CELLS_PER_Q_CELL * widest)), cap))
    return tuple(sorted({_fft_friendly(max(top * 2 ** (-j / 2), 64)) for j in range(1, 7)} | {top}))


def _asinh(x: torch.Tensor) -> torch.Tensor:
    """asinh of x >= 0, accurate in float32 (torch.asinh is not vectorised on CPU)."""
    return torch.log1p(x + x * x / (1.0 + torch.sqrt(1.0 + x * x)))


def _running_sum(rows: torch.Tensor) -> torch.Tensor:
    """float64 running sums of each row, starting from 0 (batch, k + 1)."""
    run = torch.empty(rows.shape[0], rows.shape[1] + 1, dtype=torch.float64, device=rows.device)
    run[:, 0] = 0.0
    run[:, 1:] = rows
    return run.cumsum_(1)


def _rebin_cells(cells: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Contents between consecutive fractional positions pos (batch, m + 1), non-decreasing from 0 to n, of the
    piecewise-constant cells (batch, n): exact overlaps, so the total is conserved. The running sum is float64 so
    that weak cells far along a strong pattern keep their precision."""
    i = pos.long()
    whole = torch.gather(_running_sum(cells), 1, i)
    part = torch.frac(pos).mul_(torch.gather(torch.nn.functional.pad(cells, (0, 1)), 1, i))
    return (whole[:, 1:] - whole[:, :-1]).to(cells.dtype).add_(part[:, 1:] - part[:, :-1])


def _rebin_linear(padded: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Integrals between consecutive positions x (batch, k + 1), non-decreasing from 0.5 to m + 0.5 (in cells of
    `padded`, whose first one is centred at 0), of the piecewise-linear curve through m values at the cell centres,
    flat in the outer half cells; `padded` (batch, m + 2) holds them with the first and last repeated. The total is
    conserved and smooth curves come back without steps, whatever the cell sizes."""
    whole = _running_sum(padded[:, 1:] + padded[:, :-1])  # twice the integral up to each centre
    k = x.long()
    t = torch.frac(x)
    left = torch.gather(padded, 1, k)
    part = torch.addcmul(left, t, torch.gather(padded[:, 1:], 1, k).sub_(left), value=0.5).mul_(t)
    whole = torch.gather(whole, 1, k)
    return (whole[:, 1:] - whole[:, :-1]).to(padded.dtype).mul_(0.5).add_(part[:, 1:] - part[:, :-1])


def _makhoul_orders(m: int) -> tuple[np.ndarray, np.ndarray]:
    """The order in which _mirror_convolve reads m cells (evens, then odds backwards) and, for its output, where
    cell j of the natural order sits in that order, padded by repeating the first and last cell."""
    to_dct = np.concatenate([np.arange(0, m, 2), np.arange(m - 1, 0, -2)])
    where = np.argsort(to_dct)
    return to_dct, np.concatenate([where[:1], where, where[-1:]])


def _mirror_convolve(rows, multiplier, twiddle, to_dct, from_dct) -> torch.Tensor:
    """Convolution of each row (batch, m), m even, with a symmetric kernel under mirror (reflecting) ends: DCT-II,
    multiply, DCT-III, each DCT one m-point real FFT (Makhoul, IEEE Trans. ASSP 28, 27 (1980)). multiplier
    (batch, m/2 + 1, 2) holds the kernel's transform at frequencies pi k / m and pi (m - k) / m; twiddle is
    exp(-i pi k / 2m), k = 0 .. m/2; to_dct and from_dct are _makhoul_orders(m) (the output comes back in the
    order from_dct asks for). Intensity is conserved exactly when the multiplier is 1 at frequency 0."""
    spectrum = torch.fft.rfft(rows.index_select(1, to_dct)) * twiddle
    spectrum = torch.view_as_complex(torch.view_as_real(spectrum) * multiplier) * twiddle.conj()
    return torch.fft.irfft(spectrum, n=rows.shape[1]).index_select(1, from_dct)


def _rows_where(rows: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """new where rows (batch,) is true, else old (no copy when every row is)."""
    return new if bool(rows.all()) else torch.where(rows[:, None], new, old)


class _Batch(NamedTuple):
    """What every effect of one call sees: the clean batch, its integrals, the grid constants, the generator."""
    x: torch.Tensor
    particle: torch.Tensor  # integral of each clean pattern over the grid
    T: dict
    gen: torch.Generator | None
    size: int
    device: torch.device
    dtype: torch.dtype
    tiny: float
    drawn: dict | None = None  # when a dict: the per-sample instrument parameters drawn, for the caller


class Augmenter:
    """Turns ideal simulated patterns (batch, n_q) into what a diffractometer records, per-sample random strengths.

    Order (physical, STEPS): particle + Compton + solvent + capillary -> resolution -> Q miscalibration -> + flat and
    polynomial background -> counting (Poisson, readout) -> imperfect subtraction of solvent + capillary ->
    overall scale -> detector gaps. Everything that does not depend on the sample is precomputed here.
    """

    def __init__(self, config: AugmentConfig | dict | None, q_inv_angstrom):
        if not isinstance(config, AugmentConfig):
            config = AugmentConfig.from_dict(config)
        self.config = config
        q = check_q(q_inv_angstrom)
        if q.size < 4:
            raise bad("q_inv_angstrom", f"grid of {q.size} points", "at least 4 points")
        self.q_inv_angstrom = q
        _prime_allocator()
        n = q.size
        edges = np.concatenate([[q[0] - 0.5 * (q[1] - q[0])], 0.5 * (q[1:] + q[:-1]), [q[-1] + 0.5 * (q[-1] - q[-2])]])
        dq = np.diff(edges)  # cell widths (trapezoid-like integration weights)
        self._uniform = bool(np.allclose(np.diff(q), q[1] - q[0], rtol=1e-6, atol=0))
        self._edge0_inv_angstrom, self._cell_inv_angstrom = float(edges[0]), float(q[1] - q[0])
        self._t = {"q": q, "dq": dq, "edges": edges}  # float64 here; cast to the batch's device and dtype on use
        self._cache: dict = {}
        c = config
        if c.compton.enabled:
            upper = q >= np.median(q)  # self scattering estimate of atoms per pattern: where interference is weak
            fsq = solvents.mean_square_form_factor(c.compton.elements, q)
            self._t["compton_weight"] = np.where(upper, dq, 0.0) / np.sum(np.where(upper, dq * fsq, 0.0))
            self._t["compton"] = solvents.mean_incoherent(c.compton.elements, q)
        if c.solvent.enabled:
            curves = [solvents.solvent_intensity(nm, q) for nm in c.solvent.names]
            self._t["solvent"] = np.array([s / np.sum(s * dq) for s in curves])
            k_lo, k_hi = c.solvent.dilation
            if (k_lo, k_hi) != (1.0, 1.0):  # the curves on a grid that covers Q / k for every k drawn
                step = float(dq.min()) / (2.0 * k_hi)
                fine = np.arange(edges[0] / k_hi, edges[-1] / k_lo + 2 * step, step)
                self._dil0_inv_angstrom, self._dil_step_inv_angstrom = float(fine[0]), step
                self._t["solvent_fine"] = np.array([solvents.solvent_intensity(nm, fine) for nm in c.solvent.names])
        if c.capillary.enabled:
            curves = [solvents.capillary_intensity(nm, q) for nm in c.capillary.materials]
            self._t["capillary"] = np.array([s / np.sum(s * dq) for s in curves])
        if c.resolution.enabled:
            # r = fwhm_relative / fwhm0 is clamped to [r_min, r_max]: below, FWHM(Q) differs from fwhm0 by < 1e-6
            # relative; above, fwhm0 is raised to 1 % of fwhm_relative max(Q0, one cell), i.e. 5e-5 relative.
            self._ratio_min, self._ratio_max = 1e-3 / edges[-1], 100.0 / max(q[0], dq.min())
            self._u_sizes = _warp_sizes(edges, dq, np.geomspace(self._ratio_min, self._ratio_max, 512),
                                        cap=max(8 * n, 4096))
            for m in self._u_sizes:
                k = np.arange(m // 2 + 1)
                omega = np.pi * np.stack([k, m - k], 1) / m  # rad per u cell, the pairs _mirror_convolve takes
                self._t[f"omega{m}"], self._t[f"half_omega2_{m}"] = omega, 0.5 * omega**2
                self._t[f"log_transfer{m}"] = 3.0 * np.log(np.sinc(omega / (2 * np.pi)))  # of the two rebinnings
                self._t[f"twiddle{m}"] = np.stack([np.cos(np.pi * k / (2 * m)), -np.sin(np.pi * k / (2 * m))], 1)
                self._t[f"u_fraction{m}"] = np.arange(m + 1) / m
                self._t[f"to_dct{m}"], self._t[f"from_dct{m}"] = _makhoul_orders(m)
            self._edges_signed = bool(edges[0] < 0)
            self._top_inv_angstrom, self._cell_min_inv_angstrom = float(edges[-1]), float(dq.min())
        if c.calibration.enabled and not self._uniform:
            step = dq.min() / 8.0
            self._qt0, self._qt_step = q[0], step
            grid = q[0] + step * np.arange(int(np.ceil((q[-1] - q[0]) / step)) + 2)
            self._t["qindex"] = np.interp(grid, q, np.arange(n, dtype=np.float64))
        if c.background.enabled:
            x = 2.0 * (q - q[0]) / (q[-1] - q[0]) - 1.0
            deg = c.background.poly_degree
            self._t["legendre"] = np.array([np.polynomial.legendre.Legendre.basis(k)(x) for k in range(1, deg + 1)])
        self._q_span = float(q[-1] - q[0])

    # -- helpers ------------------------------------------------------------------------------------------------
    def _on(self, device, dtype):
        key = (str(device), dtype)
        if key not in self._cache:
            self._cache = {key: {k: torch.as_tensor(v).to(device=device, dtype=dtype if v.dtype.kind == "f" else None)
                                 for k, v in self._t.items()}}
        return self._cache[key]

    @staticmethod
    def _draw(s: _Batch, shape, kind="rand"):
        """Random numbers from the generator on its own device, moved to the batch's device (seeded on any device)."""
        gdev = s.gen.device if s.gen is not None else torch.device("cpu")
        fn = torch.rand if kind == "rand" else torch.randn
        return fn(shape, generator=s.gen, device=gdev, dtype=torch.float32).to(device=s.device, dtype=s.dtype)

    def _strength(self, s: _Batch, rng, log=False, size=None):
        lo, hi = rng
        u = self._draw(s, (s.size if size is None else size,))
        if log:
            return torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
        return lo + u * (hi - lo)

    def _gate(self, s: _Batch, p):
        if p >= 1.0:
            return torch.ones(s.size, dtype=torch.bool, device=s.device)
        return self._draw(s, (s.size,)) < p

    def _pick(self, s: _Batch, k):
        return torch.clamp((self._draw(s, (s.size,)) * k).long(), max=k - 1)

    @staticmethod
    def _mix(which, amount, curves):
        """Row `which` of curves times amount, per sample, as one small matrix product."""
        weights = torch.zeros(which.shape[0], curves.shape[0], dtype=curves.dtype, device=curves.device)
        return weights.scatter_(1, which[:, None], amount[:, None]) @ curves

    def _cell_position(self, q, T):
        """Fractional position of Q values on the grid's cells (0 at the first cell's lower edge, n at the last's
        upper edge)."""
        n = self.q_inv_angstrom.size
        if self._uniform:
            return ((q - self._edge0_inv_angstrom) / self._cell_inv_angstrom).clamp_(0.0, float(n))
        i = (torch.searchsorted(T["edges"], q.contiguous(), right=True) - 1).clamp_(0, n - 1)
        return (i + (q - T["edges"][i]) / T["dq"][i]).clamp_(0.0, float(n))

    # -- resolution ---------------------------------------------------------------------------------------------
    def _broaden(self, y, fwhm0, rel, eta, active, T):
        """Pseudo-Voigt broadening of the active rows with FWHM(Q) = sqrt(fwhm0^2 + (rel Q)^2), Lorentzian fraction eta.

        In u(Q) = integral dQ / FWHM(Q) (closed form: asinh(r Q) / rel with r = rel / fwhm0) every row's profile has
        FWHM 1, so the Q-dependent broadening is one convolution with a fixed profile there. Each row gets m equal u
        cells as the U_CELLS_* constants ask; rows are grouped by the size they need (a few fixed sizes, so the
        Python loop is over groups, not rows).
        """
        ratio = (rel / fwhm0.clamp(min=1e-30)).clamp(self._ratio_min, self._ratio_max)
        rel_eff = torch.maximum(rel, ratio * fwhm0)  # the clamped law: FWHM = rel_eff sqrt(1/ratio^2 + Q^2)
        ends = self._warp(ratio, T["edges"][[0, -1]])
        u_span = (ends[:, 1] - ends[:, 0]) / rel_eff  # the grid's width in FWHMs
        fwhm_top = rel_eff * torch.sqrt(ratio**-2 + self._top_inv_angstrom**2)
        cells_per_fwhm = fwhm_top / self._cell_min_inv_angstrom  # Q cells per FWHM where that is fewest
        need = u_span * torch.maximum(torch.clamp(U_CELLS_PER_Q_CELL * cells_per_fwhm, max=U_CELLS_PER_FWHM),
                                      cells_per_fwhm / Q_CELLS_PER_U_CELL)
        sizes = self._u_sizes
        group = (need[:, None] > torch.tensor(sizes[:-1], device=y.device, dtype=need.dtype)).sum(1)
        group = torch.where(active, group, len(sizes))  # inactive rows: a group of their own, left as they are
        counts = torch.bincount(group, minlength=len(sizes) + 1).tolist()
        if max(counts[:-1]) == y.shape[0]:
            return self._broaden_rows(y, ratio, u_span, eta, sizes[counts.index(y.shape[0])], T)
        out = y.clone() if counts[-1] else torch.empty_like(y)
        for g, m in enumerate(sizes):
            if counts[g]:
                rows = torch.nonzero(group == g)[:, 0]
                out[rows] = self._broaden_rows(y[rows], ratio[rows], u_span[rows], eta[rows], m, T)
        return out

    def _warp(self, ratio, q):
        """asinh(ratio Q), i.e. rel_eff u(Q), for each row's ratio (b,) at the Q values q (k,): (b, k)."""
        arg = ratio[:, None] * q
        return _asinh(arg.abs()).mul_(arg.sign()) if self._edges_signed else _asinh(arg)

    def _broaden_rows(self, y, ratio, u_span, eta, m, T):
        """_broaden on m u cells: the Q cells are rebinned onto the u cells (exact overlaps), convolved under mirror
        ends (intensity conserved exactly) and integrated back over the Q cells along the piecewise-linear curve.
        The two rebinnings act as sinc^3(omega / 2) on the spectrum; the profile's transform is divided by it
        (but kept <= 1), so the result is the exact profile wherever the u cells resolve it."""
        n = y.shape[1]
        a = self._warp(ratio, T["edges"])  # (b, n + 1)
        a0, a_span = a[:, :1], a[:, -1:] - a[:, :1]
        sinh = torch.sinh(torch.addcmul(a0, a_span, T[f"u_fraction{m}"]))  # ratio x Q at the u cell edges
        if self._uniform:
            pos = torch.addcmul(torch.tensor(-self._edge0_inv_angstrom / self._cell_inv_angstrom, dtype=y.dtype,
                                             device=y.device),
                                sinh, (1.0 / (ratio * self._cell_inv_angstrom))[:, None]).clamp_(0.0, float(n))
        else:
            pos = self._cell_position(sinh / ratio[:, None], T)
        pos[:, 0], pos[:, -1] = 0.0, float(n)
        content = _rebin_cells(y if self._uniform else y * T["dq"], pos)  # (b, m)
        fwhm_cells = (m / u_span)[:, None, None]
        log_transfer = T[f"log_transfer{m}"]
        multiplier = torch.addcmul(-log_transfer, (fwhm_cells / FWHM_PER_SIGMA) ** 2, T[f"half_omega2_{m}"],
                                   value=-1.0).exp_()  # the Gaussian's transform / the rebinnings'
        if self.config.resolution.lorentz_fraction[1] > 0:
            lorentz = torch.addcmul(-log_transfer, 0.5 * fwhm_cells, T[f"omega{m}"], value=-1.0).exp_()
            multiplier = torch.lerp(multiplier, lorentz, eta[:, None, None])
        padded = _mirror_convolve(content, multiplier.clamp_(max=1.0), torch.view_as_complex(T[f"twiddle{m}"]),
                                  T[f"to_dct{m}"], T[f"from_dct{m}"])
        per_cell = m / a_span
        pos = torch.addcmul(0.5 - a0 * per_cell, a, per_cell)  # u position of the Q cell edges, + 1/2
        pos[:, 0], pos[:, -1] = 0.5, m + 0.5
        cells = _rebin_linear(padded, pos)
        return cells if self._uniform else cells / T["dq"]

    # -- calibration --------------------------------------------------------------------------------------------
    def _source_cells(self, shift, scale, T):
        """Left grid index and weight for reading each row at its true Q, (Q - shift) / (1 + scale), by linear
        interpolation (flat beyond the grid)."""
        n = self.q_inv_angstrom.size
        if self._uniform:  # fractional index, one fused multiply-add
            per_cell = 1.0 / ((1.0 + scale) * self._cell_inv_angstrom)
            offset = -(shift / (1.0 + scale) + float(self.q_inv_angstrom[0])) / self._cell_inv_angstrom
            pos = torch.addcmul(offset[:, None], T["q"], per_cell[:, None])
        else:
            tab = T["qindex"]
            u = (((T["q"][None, :] - shift[:, None]) / (1.0 + scale[:, None]) - self._qt0) / self._qt_step)
            u = u.clamp_(0.0, tab.numel() - 1.0)
            j = u.long().clamp_(max=tab.numel() - 2)
            pos = torch.lerp(tab[j], tab[j + 1], u - j)
        pos = pos.clamp_(0.0, n - 1.0)
        i0 = pos.long().clamp_(max=n - 2)
        return i0, pos.sub_(i0)

    @staticmethod
    def _lerp(y, i0, f):
        return torch.lerp(torch.gather(y, 1, i0), torch.gather(y[:, 1:], 1, i0), f)

    # -- counts -------------------------------------------------------------------------------------------------
    def _poisson(self, lam, s: _Batch):
        """Poisson counts: exact inversion below POISSON_EXACT_BELOW, rounded normal above (variance + 1/12). The
        inversion runs on the draws still searching only (compacted every few terms), so its cost follows the
        counts drawn rather than the largest."""
        z = self._draw(s, lam.shape, "randn")
        out = torch.floor(torch.addcmul(lam, lam.sqrt(), z).add_(0.5)).clamp_(min=0.0)
        where = torch.nonzero((lam < POISSON_EXACT_BELOW).view(-1))[:, 0]
        if where.numel():
            flat = out.view(-1)
            ls = lam.view(-1)[where]
            u = self._draw(s, ls.shape)
            p = torch.exp(-ls)
            cdf = p.clone()
            k = torch.zeros_like(ls)
            for m in range(1, POISSON_INVERSION_TERMS + 1):
                k += u > cdf
                p = p * ls / m
                cdf += p
                if m % 8 == 0 or m == POISSON_INVERSION_TERMS:
                    done = u <= cdf  # found its count: no later term can add to it
                    flat[where[done]] = k[done]
                    searching = ~done
                    if not bool(searching.any()):
                        break
                    where, ls, u, p, cdf, k = (t[searching] for t in (where, ls, u, p, cdf, k))
        return out

    # -- effects: (y, blank, batch) -> (y, blank) ---------------------------------------------------------------
    def _compton(self, y, blank, s: _Batch):
        c = self.config.compton
        on = self._gate(s, c.probability)
        frac = self._strength(s, c.fraction) * on
        atoms = (s.x @ s.T["compton_weight"]).clamp(min=0.0)
        return torch.addcmul(y, (frac * atoms)[:, None], s.T["compton"]), blank

    def _blank_term(self, y, blank, s: _Batch, c, n_kinds: int, table: str, rows=None):
        """Add one of `n_kinds` tabulated blanks (solvents or capillaries) at a ratio to the particle signal;
        `rows(which)`, when given, makes each sample's unit-integral curve instead of the table's."""
        on = self._gate(s, c.probability)
        which = self._pick(s, n_kinds)
        ratio = self._strength(s, c.ratio) * on
        if rows is None:
            added = self._mix(which, ratio * s.particle, s.T[table])
        else:
            added = (ratio * s.particle)[:, None] * rows(which)
        return y + added, added if blank is None else blank + added

    def _stretched_solvents(self, which, s: _Batch):
        """Each sample's solvent stretched along Q, I(Q / k), read off the fine table and normalised to unit
        integral over the grid like the tabulated ones."""
        k = self._strength(s, self.config.solvent.dilation, log=True)
        pos = (s.T["q"][None, :] / k[:, None] - self._dil0_inv_angstrom) / self._dil_step_inv_angstrom
        table = s.T["solvent_fine"][which]
        i0 = pos.long().clamp_(0, table.shape[1] - 2)
        curve = self._lerp(table, i0, (pos - i0).clamp_(0.0, 1.0))
        return curve / (curve @ s.T["dq"]).clamp(min=s.tiny)[:, None]

    def _solvent(self, y, blank, s: _Batch):
        c = self.config.solvent
        rows = (lambda which: self._stretched_solvents(which, s)) if "solvent_fine" in s.T else None
        return self._blank_term(y, blank, s, c, len(c.names), "solvent", rows)

    def _capillary(self, y, blank, s: _Batch):
        c = self.config.capillary
        return self._blank_term(y, blank, s, c, len(c.materials), "capillary")

    def _resolution(self, y, blank, s: _Batch):
        c = self.config.resolution
        on = self._gate(s, c.probability)
        log0 = log_range("resolution", "fwhm0_inv_angstrom", c.fwhm0_inv_angstrom)
        fwhm0 = self._strength(s, c.fwhm0_inv_angstrom, log=log0) * on
        rel = self._strength(s, c.fwhm_relative) * on
        eta = self._strength(s, c.lorentz_fraction)
        active = (fwhm0 > 0) | (rel > 0)
        if s.drawn is not None:
            s.drawn["resolution"] = torch.stack([fwhm0, rel, eta * active], dim=1)
        if bool(active.any()):
            y = self._broaden(y, fwhm0, rel, eta, active, s.T)
        return y, blank

    def _calibration(self, y, blank, s: _Batch):
        c = self.config.calibration
        on = self._gate(s, c.probability)
        shift = self._strength(s, c.zero_shift_inv_angstrom) * on
        scale = self._strength(s, c.scale_error) * on
        active = (shift != 0) | (scale != 0)
        if bool(active.any()):
            i0, f = self._source_cells(shift, scale, s.T)
            y = _rows_where(active, self._lerp(y, i0, f), y)
            if blank is not None:
                blank = _rows_where(active, self._lerp(blank, i0, f), blank)
        return y, blank

    def _background(self, y, blank, s: _Batch):
        c = self.config.background
        on = self._gate(s, c.probability)
        mean = s.particle / self._q_span
        flat = self._strength(s, c.flat_fraction) * on * mean
        amp = self._strength(s, c.poly_fraction) * on * mean
        poly = (self._draw(s, (s.size, c.poly_degree)) * 2.0 - 1.0) @ s.T["legendre"]
        low, high = poly.aminmax(dim=1)
        scale = amp / (high - low).clamp(min=1e-6)  # the polynomial spans [0, amp]
        return torch.addcmul(y, scale[:, None], poly).add_((flat - low * scale)[:, None]), blank

    def _counts(self, y, blank, s: _Batch):
        c = self.config.counts
        on = self._gate(s, c.probability)
        top = self._strength(s, c.max_counts, log=True)
        read = self._strength(s, c.readout_sigma_counts)
        per_unit = (top / y.amax(1).clamp(min=s.tiny))[:, None]  # counts per input unit
        counts = self._poisson((y * per_unit).clamp_(min=0.0), s)
        if c.readout_sigma_counts[1] > 0:
            counts = counts.addcmul_(read[:, None], self._draw(s, counts.shape, "randn")).clamp_(min=0.0)
        return _rows_where(on, counts.div_(per_unit), y), blank

    def _subtraction(self, y, blank, s: _Batch):
        if blank is None:
            return y, blank
        c = self.config.subtraction
        on = self._gate(s, c.probability)
        factor = self._strength(s, c.factor) * on
        return torch.addcmul(y, factor[:, None], blank, value=-1.0), blank

    def _scale(self, y, blank, s: _Batch):
        return y * self._strength(s, self.config.scale.factor, log=True)[:, None], blank

    def _gaps(self, y, blank, s: _Batch):
        c = self.config.gaps
        on = self._gate(s, c.probability)
        lo_n, hi_n = c.number
        if hi_n == 0:
            return y, blank
        number = (lo_n + self._draw(s, (s.size,)) * (hi_n - lo_n + 1)).floor().clamp(max=hi_n) * on
        centre = s.T["q"][0] + self._draw(s, (s.size, hi_n)) * self._q_span
        width = self._strength(s, c.width_inv_angstrom, size=s.size * hi_n).reshape(s.size, hi_n)
        used = torch.arange(hi_n, device=s.device)[None, :] < number[:, None]
        # grid points inside each window: [first, last) by a search on Q; marked +1 / -1 and summed along Q
        first = torch.searchsorted(s.T["q"], (centre - 0.5 * width).contiguous(), right=True)
        last = torch.searchsorted(s.T["q"], (centre + 0.5 * width).contiguous())
        marks = torch.zeros(s.size, y.shape[1] + 1, dtype=torch.int32, device=s.device)
        marks.scatter_add_(1, first, used.to(torch.int32)).scatter_add_(1, last.clamp(min=first), -used.to(torch.int32))
        return y.masked_fill(marks[:, :-1].cumsum(1) > 0, 0.0), blank

    # -- main ---------------------------------------------------------------------------------------------------
    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None, *,
                 timings: dict | None = None, drawn: dict | None = None) -> torch.Tensor:
        """Augment a (batch, n_q) tensor on its own device; every sample draws its own strengths. With a dict as
        `timings`, the seconds spent in each effect (STEPS) are added to it (device synchronised per effect). With a
        dict as `drawn`, the instrument each sample was given is put in it: "resolution", (batch, 3) of fwhm0 (1/A),
        fwhm_relative and lorentz_fraction (zeros where no broadening was applied; absent if resolution is off)."""
        if batch.ndim != 2 or batch.shape[1] != self.q_inv_angstrom.size:
            raise bad("batch", f"tensor of shape {tuple(batch.shape)}",
                      f"(batch, {self.q_inv_angstrom.size}) on the augmenter's Q grid")
        steps = [k for k in STEPS if getattr(self.config, k).enabled]
        if not steps:
            return batch
        dev = batch.device
        dt = batch.dtype if batch.dtype in (torch.float32, torch.float64) else torch.float32
        T = self._on(dev, dt)
        x = batch.to(dt)
        tiny = torch.finfo(dt).tiny * 1e6
        s = _Batch(x, (x @ T["dq"]).clamp(min=tiny), T, generator, x.shape[0], dev, dt, tiny, drawn)
        y, blank = x, None
        for name in steps:
            start = time.perf_counter()
            y, blank = getattr(self, f"_{name}")(y, blank, s)
            if timings is not None:
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
        return y.to(batch.dtype) if batch.dtype in (torch.float32, torch.float64) else y


# ---------------------------------------------------------------------------------------------------------------
# Gallery
# ---------------------------------------------------------------------------------------------------------------
GALLERY = [  # (title, {section: settings} typical, strong)
    ("Counting statistics (max counts 1e4 / 1e2)", {"counts": {"max_counts": 1e4, "readout_sigma_counts": 1.0}},
     {"counts": {"max_counts": 1e2, "readout_sigma_counts": 2.0}}),
    ("Solvent, unsubtracted (toluene 1x / hexane 5x)", {"solvent": {"names": ["toluene"], "ratio": 1.0}},
     {"solvent": {"names": ["hexane"], "ratio": 5.0}}),
    ("Capillary (borosilicate 0.3x / Kapton 1x)", {"capillary": {"materials": ["borosilicate"], "ratio": 0.3}},
     {"capillary": {"materials": ["kapton"], "ratio": 1.0}}),
    ("Compton of PbS (0.5 / 1.2 x physical)", {"compton": {"fraction": 0.5}}, {"compton": {"fraction": 1.2}}),
    ("Resolution (FWHM 0.02+0.002Q Gaussian / 0.06+0.006Q pseudo-Voigt eta 0.5)",
     {"resolution": {"fwhm0_inv_angstrom": 0.02, "fwhm_relative": 0.002}},
     {"resolution": {"fwhm0_inv_angstrom": 0.06, "fwhm_relative": 0.006, "lorentz_fraction": 0.5}}),
    ("Q miscalibration (0.01 + 0.2 % / 0.05 + 1 %)",
     {"calibration": {"zero_shift_inv_angstrom": 0.01, "scale_error": 0.002}},
     {"calibration": {"zero_shift_inv_angstrom": 0.05, "scale_error": 0.01}}),
    ("Flat + polynomial background (0.1 / 0.5)", {"background": {"flat_fraction": 0.1, "poly_fraction": 0.1}},
     {"background": {"flat_fraction": 0.5, "poly_fraction": 0.5}}),
    ("Toluene 2x subtracted (3 % / 15 % short)",
     {"solvent": {"names": ["toluene"], "ratio": 2.0}, "subtraction": {"factor": 0.97}},
     {"solvent": {"names": ["toluene"], "ratio": 2.0}, "subtraction": {"factor": 0.85}}),
    ("Detector gaps (1 / 3)", {"gaps": {"probability": 1.0, "number": 1, "width_inv_angstrom": 0.05}},
     {"gaps": {"probability": 1.0, "number": 3, "width_inv_angstrom": 0.15}}),
]


def _only(sections: dict) -> dict:
    d = {k: {"enabled": False} for k in SECTIONS}
    for k, v in sections.items():
        d[k] = {"enabled": True, "probability": 1.0, **v} if k != "scale" else {"enabled": True, **v}
    return d


def augment_gallery(out_png, diameter_nm: float = 5.0, q_inv_angstrom=None, seed: int = 0):
    """Plot one clean PbS pattern and the same pattern under each effect at a typical and a strong setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import cluster, crystal, debye

    q = np.arange(1.0, 10.0 + 1e-9, 0.005) if q_inv_angstrom is None else check_q(q_inv_angstrom)
    c = cluster.cut(crystal.pbs(), "sphere", float(diameter_nm))
    clean = debye.intensity(debye.lattice_statistics(c), q, b_iso={"Pb": 1.0, "S": 1.0})[0]
    x = torch.as_tensor(clean[None], dtype=torch.float64)
    norm = clean.max()
    ncol = 3
    nrow = int(np.ceil(len(GALLERY) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.2 * nrow), sharex=True, constrained_layout=True)
    for ax, (title, typical, strong) in zip(axes.ravel(), GALLERY):
        ax.plot(q, clean / norm, color="0.55", lw=1.0, label="clean")
        for lab, sec, col in (("strong", strong, "tab:red"), ("typical", typical, "tab:blue")):
            y = Augmenter(_only(sec), q)(x, torch.Generator().manual_seed(seed))[0].numpy()
            ax.plot(q, y / norm, color=col, lw=0.8, alpha=0.85, label=lab)
        ax.set_title(title, fontsize=9)
        ax.set_yscale("symlog", linthresh=0.05)
        ax.legend(fontsize=7, loc="upper right")
    for ax in axes.ravel()[len(GALLERY):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("Q (1/A)")
    for ax in axes[:, 0]:
        ax.set_ylabel("I / max(clean)")
    fig.suptitle(f"qdsize augmentation: {diameter_nm:g} nm PbS sphere, each effect alone", fontsize=11)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
