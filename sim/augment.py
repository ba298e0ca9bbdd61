"""Physics-informed augmentation of simulated I(Q): counts, solvent, capillary, Compton, resolution, Q errors, background."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import solvents
from .errors import InputError, bad
from .scattering import check_q

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "augment"
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
POISSON_EXACT_BELOW = 20.0  # expected counts below which Poisson counts are drawn exactly (inversion)
POISSON_INVERSION_TERMS = 64  # P(X > 64 | lambda <= 20) < 1e-14


def _rng(lo, hi, *, bounds=(None, None), log=False, unit="", integer=False):
    """Field metadata of a [lo, hi] strength range: physical bounds, log-uniform sampling, unit for messages."""
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


@dataclass
class CapillaryConfig:
    """Sample-holder wall scattering; ratio of its integral over the grid to the particle pattern's."""
    enabled: bool = True
    probability: float = _num(1.0, bounds=(0, 1))
    materials: list = field(default_factory=lambda: list(solvents.CAPILLARIES))
    ratio: tuple = _rng(0.0, 0.5, bounds=(0, 1000), unit="capillary-to-particle integral ratio")


@dataclass
class ResolutionConfig:
    """Gaussian instrumental broadening, FWHM(Q) = sqrt(fwhm0^2 + (fwhm_relative Q)^2) (Caglioti-like in Q)."""
    enabled: bool = True
    probability: float = _num(1.0, bounds=(0, 1))
    fwhm0_inv_angstrom: tuple = _rng(0.0, 0.04, bounds=(0, 0.5), unit="1/A")
    fwhm_relative: tuple = _rng(0.0, 0.005, bounds=(0, 0.05), unit="(Delta Q / Q)")


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
            if meta.get("log") and lo <= 0:
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
        return {k: {n: (list(v) if isinstance(v, tuple) else v) for n, v in dataclasses.asdict(getattr(self, k)).items()}
                for k in SECTIONS}


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
    """The mapping of a preset: `none` (all off), a name in conf/augment/, or a path to a YAML file."""
    import yaml

    if str(preset) == "none":
        return AugmentConfig.disabled().to_dict()
    p = Path(preset)
    if not (p.suffix in (".yaml", ".yml") and p.exists()):
        p = CONF_DIR / f"{preset}.yaml"
    if not p.exists():
        names = sorted(x.stem for x in CONF_DIR.glob("*.yaml")) + ["none"]
        raise bad("augment.preset", str(preset), f"one of {', '.join(names)} or a path to a YAML file")
    d = yaml.safe_load(p.read_text()) or {}
    return d.get("augment", d) if isinstance(d, dict) else d


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
def _box_variance(length: np.ndarray) -> np.ndarray:
    """Variance (cells^2) of the cell-overlap weights of a centred window of `length` cells."""
    k = np.floor((length - 1.0) / 2.0)
    f = (length - 1.0) / 2.0 - k
    return (2.0 / length) * (k * (k + 1) * (2 * k + 1) / 6.0 + f * (k + 1) ** 2)


class Augmenter:
    """Turns ideal simulated patterns (batch, n_q) into what a diffractometer records, per-sample random strengths.

    Order (physical): particle + Compton + solvent + capillary -> resolution -> Q miscalibration -> + flat and
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
        n = q.size
        edges = np.concatenate([[q[0] - 0.5 * (q[1] - q[0])], 0.5 * (q[1:] + q[:-1]), [q[-1] + 0.5 * (q[-1] - q[-2])]])
        dq = np.diff(edges)  # cell widths (trapezoid-like integration weights)
        self._uniform = bool(np.allclose(np.diff(q), q[1] - q[0], rtol=1e-6, atol=0))
        self._dq = dq
        t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
        self._t = {"q": t(q), "dq": t(dq)}
        self._cache: dict = {}
        c = config
        if c.compton.enabled:
            upper = q >= np.median(q)  # self scattering estimate of atoms per pattern: where interference is weak
            fsq = solvents.mean_square_form_factor(c.compton.elements, q)
            self._t["compton_weight"] = t(np.where(upper, dq, 0.0) / np.sum(np.where(upper, dq * fsq, 0.0)))
            self._t["compton"] = t(solvents.mean_incoherent(c.compton.elements, q))
        if c.solvent.enabled:
            curves = [solvents.solvent_intensity(nm, q) for nm in c.solvent.names]
            self._t["solvent"] = t(np.array([s / np.sum(s * dq) for s in curves]))
        if c.capillary.enabled:
            curves = [solvents.capillary_intensity(nm, q) for nm in c.capillary.materials]
            self._t["capillary"] = t(np.array([s / np.sum(s * dq) for s in curves]))
        if c.resolution.enabled:
            # sigma^2 in cells = (fwhm0^2 + rel^2 Q^2) / (FWHM_PER_SIGMA^2 dq^2); 3 box passes of variance sigma^2/3
            self._t["inv_dq2"] = t(1.0 / (FWHM_PER_SIGMA * dq) ** 2)
            self._t["q2_dq2"] = t((q / (FWHM_PER_SIGMA * dq)) ** 2)
            sig_max = math.hypot(c.resolution.fwhm0_inv_angstrom[1], c.resolution.fwhm_relative[1] * q[-1]) \
                / FWHM_PER_SIGMA / dq.min()
            v_max = max(sig_max**2 / 3.0, 1.0) * 1.01
            lengths = np.linspace(1.0, 1.0 + 2.0 * math.sqrt(3.0 * v_max) + 4.0, 20001)
            var = _box_variance(lengths)
            self._var_step = v_max / 4096
            self._t["box_length"] = t(np.interp(np.arange(4098) * self._var_step, var, lengths))
        if c.calibration.enabled and not self._uniform:
            step = dq.min() / 8.0
            self._qt0, self._qt_step = q[0], step
            grid = q[0] + step * np.arange(int(np.ceil((q[-1] - q[0]) / step)) + 2)
            self._t["qindex"] = t(np.interp(grid, q, np.arange(n, dtype=np.float64)))
        if c.background.enabled:
            x = 2.0 * (q - q[0]) / (q[-1] - q[0]) - 1.0
            deg = c.background.poly_degree
            self._t["legendre"] = t(np.array([np.polynomial.legendre.Legendre.basis(k)(x) for k in range(1, deg + 1)]))
        self._q_span = float(q[-1] - q[0])

    # -- helpers ------------------------------------------------------------------------------------------------
    def _on(self, device, dtype):
        key = (str(device), dtype)
        if key not in self._cache:
            self._cache = {key: {k: v.to(device=device, dtype=dtype) for k, v in self._t.items()}}
        return self._cache[key]

    @staticmethod
    def _draw(gen, shape, device, kind="rand"):
        """Random numbers from the generator on its own device, moved to the batch's device (seeded on any device)."""
        gdev = gen.device if gen is not None else torch.device("cpu")
        fn = torch.rand if kind == "rand" else torch.randn
        return fn(shape, generator=gen, device=gdev, dtype=torch.float32).to(device)

    def _strength(self, gen, b, device, rng, meta_log=False):
        lo, hi = rng
        u = self._draw(gen, (b,), device)
        if meta_log:
            return torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
        return lo + u * (hi - lo)

    def _gate(self, gen, b, device, p):
        if p >= 1.0:
            return torch.ones(b, dtype=torch.bool, device=device)
        return self._draw(gen, (b,), device) < p

    def _pick(self, gen, b, device, k):
        return torch.clamp((self._draw(gen, (b,), device) * k).long(), max=k - 1)

    # -- effects ------------------------------------------------------------------------------------------------
    def _blur(self, y, var_cells, T):
        """Gaussian-like broadening with a per-sample, per-point width: three box passes of continuous length
        (cell-overlap weights on piecewise-constant cells, through float64 cumulative sums). Intensity per unit
        Q is conserved (cells weighted by their width)."""
        n = y.shape[1]
        v = (var_cells / 3.0).clamp(min=0.0) / self._var_step
        i0 = v.long().clamp(max=T["box_length"].numel() - 2)
        fr = (v - i0.to(v.dtype)).clamp(0.0, 1.0)
        tab = T["box_length"]
        length = (tab[i0] + fr * (tab[i0 + 1] - tab[i0])).double()
        centre = torch.arange(n, device=y.device, dtype=torch.float64) + 0.5
        lo = (centre - 0.5 * length).clamp(0.0, float(n))
        hi = (centre + 0.5 * length).clamp(0.0, float(n))
        span = (hi - lo).clamp(min=1e-12)
        ilo = lo.long().clamp(max=n - 1)
        ihi = hi.long().clamp(max=n - 1)
        flo, fhi = lo - ilo, hi - ihi
        cells = y.double() if self._uniform else y.double() * T["dq"].double()
        for _ in range(3):
            csum = torch.nn.functional.pad(torch.cumsum(cells, dim=1), (1, 0))
            c_lo = torch.gather(csum, 1, ilo) + flo * torch.gather(cells, 1, ilo)
            c_hi = torch.gather(csum, 1, ihi) + fhi * torch.gather(cells, 1, ihi)
            cells = (c_hi - c_lo) / span
        out = cells if self._uniform else cells / T["dq"].double()
        return out.to(y.dtype)

    def _shift(self, y, src_q, T):
        """Linear interpolation of each row at its own source positions (flat beyond the ends)."""
        n = y.shape[1]
        if self._uniform:
            pos = (src_q - float(self.q_inv_angstrom[0])) / float(self.q_inv_angstrom[1] - self.q_inv_angstrom[0])
        else:
            tab = T["qindex"]
            u = ((src_q - self._qt0) / self._qt_step).clamp(0.0, tab.numel() - 1.001)
            j = u.long()
            pos = tab[j] + (u - j) * (tab[j + 1] - tab[j])
        pos = pos.clamp(0.0, n - 1.0)
        i0 = pos.long().clamp(max=n - 2)
        f = pos - i0
        return torch.gather(y, 1, i0) * (1 - f) + torch.gather(y, 1, i0 + 1) * f

    def _poisson(self, lam, gen):
        """Poisson counts: exact inversion below POISSON_EXACT_BELOW, rounded normal above (variance + 1/12)."""
        z = self._draw(gen, lam.shape, lam.device, "randn")
        out = torch.floor(lam + lam.sqrt() * z + 0.5).clamp(min=0.0)
        small = lam < POISSON_EXACT_BELOW
        ls = lam[small]
        if ls.numel():
            u = self._draw(gen, ls.shape, lam.device)
            p = torch.exp(-ls)
            cdf = p.clone()
            k = torch.zeros_like(ls)
            for m in range(1, POISSON_INVERSION_TERMS + 1):
                more = u > cdf
                if m % 8 == 1 and not bool(more.any()):
                    break  # every draw has found its count (same result as running all terms)
                k = k + more.to(k.dtype)
                p = p * ls / m
                cdf = cdf + p
            out[small] = k
        return out

    # -- main ---------------------------------------------------------------------------------------------------
    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a (batch, n_q) tensor on its own device; every sample draws its own strengths."""
        if batch.ndim != 2 or batch.shape[1] != self.q_inv_angstrom.size:
            raise bad("batch", f"tensor of shape {tuple(batch.shape)}",
                      f"(batch, {self.q_inv_angstrom.size}) on the augmenter's Q grid")
        c = self.config
        if not any(getattr(c, k).enabled for k in SECTIONS):
            return batch
        dev = batch.device
        dt = batch.dtype if batch.dtype in (torch.float32, torch.float64) else torch.float32
        T = self._on(dev, dt)
        x = batch.to(dt)
        b = x.shape[0]
        g = generator
        tiny = torch.finfo(dt).tiny * 1e6
        particle = (x * T["dq"]).sum(1).clamp(min=tiny)  # integral of the particle pattern over the grid
        y = x
        if c.compton.enabled:
            on = self._gate(g, b, dev, c.compton.probability)
            frac = self._strength(g, b, dev, c.compton.fraction) * on
            atoms = (x * T["compton_weight"]).sum(1).clamp(min=0.0)
            y = y + (frac * atoms)[:, None] * T["compton"]
        blank = None
        if c.solvent.enabled:
            on = self._gate(g, b, dev, c.solvent.probability)
            which = self._pick(g, b, dev, len(c.solvent.names))
            ratio = self._strength(g, b, dev, c.solvent.ratio) * on
            blank = (ratio * particle)[:, None] * T["solvent"][which]
        if c.capillary.enabled:
            on = self._gate(g, b, dev, c.capillary.probability)
            which = self._pick(g, b, dev, len(c.capillary.materials))
            ratio = self._strength(g, b, dev, c.capillary.ratio) * on
            cap = (ratio * particle)[:, None] * T["capillary"][which]
            blank = cap if blank is None else blank + cap
        if blank is not None:
            y = y + blank
        if c.resolution.enabled:
            on = self._gate(g, b, dev, c.resolution.probability)
            w0 = self._strength(g, b, dev, c.resolution.fwhm0_inv_angstrom) * on
            rel = self._strength(g, b, dev, c.resolution.fwhm_relative) * on
            active = (w0 > 0) | (rel > 0)
            if bool(active.any()):
                var = (w0**2)[:, None] * T["inv_dq2"] + (rel**2)[:, None] * T["q2_dq2"]
                y = torch.where(active[:, None], self._blur(y, var, T), y)
        if c.calibration.enabled:
            on = self._gate(g, b, dev, c.calibration.probability)
            shift = self._strength(g, b, dev, c.calibration.zero_shift_inv_angstrom) * on
            scale = self._strength(g, b, dev, c.calibration.scale_error) * on
            active = (shift != 0) | (scale != 0)
            if bool(active.any()):
                src = (T["q"][None, :] - shift[:, None]) / (1.0 + scale[:, None])
                y = torch.where(active[:, None], self._shift(y, src, T), y)
                if blank is not None:
                    blank = torch.where(active[:, None], self._shift(blank, src, T), blank)
        if c.background.enabled:
            on = self._gate(g, b, dev, c.background.probability)
            mean = particle / self._q_span
            flat = self._strength(g, b, dev, c.background.flat_fraction) * on * mean
            amp = self._strength(g, b, dev, c.background.poly_fraction) * on * mean
            coef = (self._draw(g, (b, c.background.poly_degree), dev) * 2.0 - 1.0).to(dt)
            poly = coef @ T["legendre"]
            poly = poly - poly.amin(1, keepdim=True)
            poly = poly / poly.amax(1, keepdim=True).clamp(min=1e-6)
            y = y + flat[:, None] + amp[:, None] * poly
        if c.counts.enabled:
            on = self._gate(g, b, dev, c.counts.probability)
            top = self._strength(g, b, dev, c.counts.max_counts, meta_log=True)
            read = self._strength(g, b, dev, c.counts.readout_sigma_counts)
            k = top / y.amax(1).clamp(min=tiny)  # counts per input unit
            lam = (y * k[:, None]).clamp(min=0.0)
            counts = self._poisson(lam, g)
            if c.counts.readout_sigma_counts[1] > 0:
                counts = (counts + read[:, None] * self._draw(g, lam.shape, dev, "randn")).clamp(min=0.0)
            y = torch.where(on[:, None], counts / k[:, None], y)
        if c.subtraction.enabled and blank is not None:
            on = self._gate(g, b, dev, c.subtraction.probability)
            factor = self._strength(g, b, dev, c.subtraction.factor) * on
            y = y - factor[:, None] * blank
        if c.scale.enabled:
            y = y * self._strength(g, b, dev, c.scale.factor, meta_log=True)[:, None]
        if c.gaps.enabled:
            on = self._gate(g, b, dev, c.gaps.probability)
            lo_n, hi_n = c.gaps.number
            m = hi_n
            if m > 0:
                number = (lo_n + self._draw(g, (b,), dev) * (hi_n - lo_n + 1)).floor().clamp(max=hi_n) * on
                centre = T["q"][0] + self._draw(g, (b, m), dev) * self._q_span
                width = self._strength(g, b * m, dev, c.gaps.width_inv_angstrom).reshape(b, m)
                slot = torch.arange(m, device=dev)[None, :] < number[:, None]
                inside = (T["q"][None, None, :] - centre[:, :, None]).abs() < 0.5 * width[:, :, None]
                y = y * (~(inside & slot[:, :, None]).any(1)).to(dt)
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
    ("Resolution (FWHM 0.02+0.002Q / 0.06+0.006Q)",
     {"resolution": {"fwhm0_inv_angstrom": 0.02, "fwhm_relative": 0.002}},
     {"resolution": {"fwhm0_inv_angstrom": 0.06, "fwhm_relative": 0.006}}),
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
