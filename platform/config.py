"""Config files: load YAML, apply dotted `key=value` overrides, validate into dataclasses, resolve and hash."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qdsize.sim.errors import InputError, bad
from qdsize.sim.io import content_hash  # noqa: F401  (the configs' key, as datasets and caches use it)

# ----------------------------------------------------------------------------------------------------------------
# Generic machinery (reused by train / sweep configs): dataclass schemas with per-class `check(path)` hooks
# ----------------------------------------------------------------------------------------------------------------


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping from a file, naming the file in every error."""
    p = Path(path)
    if not p.is_file():
        raise bad("config", str(path), "an existing YAML file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"config = {str(path)!r}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise bad("config", str(path), "a YAML mapping at the top level")
    return data


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """A deep copy of `data` with `a.b.c=value` overrides applied; values are parsed as YAML scalars."""
    out = json.loads(json.dumps(data))
    for item in overrides or ():
        if "=" not in item:
            raise bad("override", item, "key=value with a dotted key, e.g. dataset.samples=1000")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not key or any(not p for p in parts):
            raise bad("override", item, "key=value with a dotted key, e.g. dataset.samples=1000")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise bad(key, text, "a YAML scalar, list or mapping") from None
        node = out
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise bad(".".join(parts[: i + 1]), nxt, f"a mapping (to set {key})")
            node = nxt
        node[parts[-1]] = value
    return out


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {float: "a number", int: "an integer", str: "a string", bool: "true or false",
            type(None): "null"}.get(tp, str(tp))


def _convert(tp, value, path: str):
    """Convert one YAML value to the annotated type, or raise naming the field."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, path)
            except InputError:
                continue
        raise bad(path, value, _type_name(tp))
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise bad(path, value, "a mapping")
        return from_dict(tp, value, path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad(path, value, _type_name(tp))
        (inner,) = typing.get_args(tp)
        return [_convert(inner, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad(path, value, _type_name(tp))
        _, inner = typing.get_args(tp)
        return {str(k): _convert(inner, v, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise bad(path, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or isinstance(value, float) and (
                not math.isfinite(value) or value != int(value)):
            raise bad(path, value, "an integer")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            raise bad(path, value, "a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad(path, value, "a string")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def from_dict(cls, data: dict, path: str = ""):
    """Build dataclass `cls` from a mapping: unknown keys are refused, defaults fill gaps, `check` hooks run."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{path}." if path else ""
        raise bad(f"{where}{unknown[0]}", data[unknown[0]],
                  f"no such key here; known keys: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], f"{path}.{name}" if path else name)
    obj = cls(**kwargs)
    # nested defaults still need their own checks
    for name in names:
        if name not in data:
            val = getattr(obj, name)
            if dataclasses.is_dataclass(val) and hasattr(val, "check"):
                val.check(f"{path}.{name}" if path else name)
    if hasattr(obj, "check"):
        obj.check(path)
    return obj


def to_dict(obj) -> dict:
    """The resolved config as plain data (every default filled in)."""
    return dataclasses.asdict(obj)


@dataclass
class Loaded:
    """A validated config: the typed object, the resolved plain dict and its content hash."""

    config: Any
    resolved: dict
    hash: str
    source: str | None = None


def load(schema, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
         data: dict | None = None) -> Loaded:
    """Load a YAML file (or take `data`), apply overrides, validate against `schema`, resolve and hash."""
    raw = load_yaml(path) if path is not None else dict(data or {})
    raw = apply_overrides(raw, overrides)
    obj = from_dict(schema, raw)
    resolved = to_dict(obj)
    return Loaded(obj, resolved, content_hash(resolved), None if path is None else str(Path(path).resolve()))


def _sub(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _positive(path, name, value):
    if not value > 0:
        raise bad(_sub(path, name), value, "a positive number")


def _range_pair(path: str, name: str, value: list[float], lo: float = -math.inf, hi: float = math.inf,
                unit: str = ""):
    if len(value) != 2 or not (lo <= value[0] <= value[1] <= hi):
        raise bad(_sub(path, name), value, f"[low, high] with {lo} <= low <= high <= {hi}{unit}")


# ----------------------------------------------------------------------------------------------------------------
# Dataset config (conf/dataset/*.yaml)
# ----------------------------------------------------------------------------------------------------------------
from qdsize.sim.contract import FROZEN_SPLITS, SPLITS  # noqa: E402,F401  (one definition, shared by every layer)


@dataclass
class QGridConfig:
    min_inv_angstrom: float = 1.0
    max_inv_angstrom: float = 10.0
    step_inv_angstrom: float = 0.005

    def check(self, path):
        if not self.min_inv_angstrom > 0:
            raise bad(_sub(path, "min_inv_angstrom"), self.min_inv_angstrom, "Q > 0 in 1/Angstrom")
        _positive(path, "step_inv_angstrom", self.step_inv_angstrom)
        if not self.max_inv_angstrom > self.min_inv_angstrom + self.step_inv_angstrom:
            raise bad(_sub(path, "max_inv_angstrom"), self.max_inv_angstrom,
                      f"a value above min_inv_angstrom + step = {self.min_inv_angstrom + self.step_inv_angstrom}")
        if self.max_inv_angstrom > 40:
            raise bad(_sub(path, "max_inv_angstrom"), self.max_inv_angstrom, "Q <= 40 1/Angstrom")


@dataclass
class SizesConfig:
    """Mean-diameter label range and its 1-nm (by default) classes [min, min+w), ... [max-w, max]."""

    min_nm: float = 2.0
    max_nm: float = 12.0
    class_width_nm: float = 1.0

    def check(self, path):
        if not self.min_nm > 0.5:
            raise bad(_sub(path, "min_nm"), self.min_nm, "a mean diameter above 0.5 nm")
        if not self.max_nm > self.min_nm:
            raise bad(_sub(path, "max_nm"), self.max_nm, f"a diameter in nm above sizes.min_nm = {self.min_nm}")
        _positive(path, "class_width_nm", self.class_width_nm)
        n = (self.max_nm - self.min_nm) / self.class_width_nm
        if abs(n - round(n)) > 1e-9:
            raise bad(_sub(path, "class_width_nm"), self.class_width_nm,
                      f"a width that divides max_nm - min_nm = {self.max_nm - self.min_nm} into whole classes")

    @property
    def edges_nm(self) -> list[float]:
        n = int(round((self.max_nm - self.min_nm) / self.class_width_nm))
        return [round(self.min_nm + i * self.class_width_nm, 9) for i in range(n + 1)]


@dataclass
class DispersionConfig:
    """Size-dispersion label classes (std / mean in %): [e0, e1), [e1, e2) ... [e_{n-1}, e_n]."""

    class_edges_pct: list[float] = field(default_factory=lambda: [0.0, 5.0, 10.0, 15.0, 25.0])

    def check(self, path):
        e = self.class_edges_pct
        if len(e) < 2 or e[0] < 0 or e[-1] > 60 or any(b <= a for a, b in zip(e, e[1:])):
            raise bad(_sub(path, "class_edges_pct"), e, "at least two increasing edges between 0 and 60 %")


@dataclass
class VariantsConfig:
    """Structure variants: one size family per (shape, surface, centring seed) of the material."""

    material: str = "pbs"
    a_angstrom: float = 5.936
    shapes: list[str] = field(default_factory=lambda: ["sphere", "cuboctahedron", "truncated_octahedron", "cube"])
    # more shapes for the train and val splits only: the frozen splits and test keep to `shapes`
    training_shapes: list[str] = field(default_factory=lambda: ["octahedron"])
    surfaces: list[str] = field(default_factory=lambda: ["stoichiometric", "cation_rich"])
    anion_removal: float = 0.5
    centre: str = "random"
    centre_seeds: list[int] = field(default_factory=lambda: [0, 1])

    def check(self, path):
        from qdsize.sim import cluster, crystal

        if self.material.lower() not in crystal.BUILTIN:
            raise bad(_sub(path, "material"), self.material, f"one of {sorted(crystal.BUILTIN)}")
        if not 1.0 < self.a_angstrom < 20.0:
            raise bad(_sub(path, "a_angstrom"), self.a_angstrom, "a lattice parameter between 1 and 20 Angstrom")
        shapes = [s for s in cluster.SHAPES if s != "polyhedron"]
        for key, listed in (("shapes", self.shapes), ("training_shapes", self.training_shapes)):
            for i, s in enumerate(listed):
                try:
                    cluster.parse_shape(s)  # checks a polyhedron's facet ratio; a bare "polyhedron" has none
                except InputError:
                    raise bad(f"{_sub(path, key)}[{i}]", s, f"one of {shapes}, or polyhedron:RHO with the facet "
                              "ratio d111/d100 RHO >= 0.577") from None
        if not self.shapes or len(set(self.shapes)) != len(self.shapes):
            raise bad(_sub(path, "shapes"), self.shapes, "a non-empty list of distinct shapes")
        if len(set(self.training_shapes)) != len(self.training_shapes) or set(self.training_shapes) & set(self.shapes):
            raise bad(_sub(path, "training_shapes"), self.training_shapes,
                      "distinct shapes that are not already in `shapes` (which every split has)")
        for i, s in enumerate(self.surfaces):
            if s not in cluster.SURFACES:
                raise bad(f"{_sub(path, 'surfaces')}[{i}]", s, f"one of {list(cluster.SURFACES)}")
        if not self.surfaces or len(set(self.surfaces)) != len(self.surfaces):
            raise bad(_sub(path, "surfaces"), self.surfaces, "a non-empty list of distinct surfaces")
        if not 0.0 <= self.anion_removal <= 1.0:
            raise bad(_sub(path, "anion_removal"), self.anion_removal, "a fraction between 0 and 1")
        if self.centre not in cluster.CENTRES:
            raise bad(_sub(path, "centre"), self.centre, f"one of {list(cluster.CENTRES)}")
        if not self.centre_seeds or len(set(self.centre_seeds)) != len(self.centre_seeds) or min(
                self.centre_seeds) < 0:
            raise bad(_sub(path, "centre_seeds"), self.centre_seeds, "a non-empty list of distinct seeds >= 0")


@dataclass
class LadderConfig:
    """Diameters of the clusters built per family: geometric from min_nm to max_nm with a relative step."""

    min_nm: float = 1.0
    max_nm: float = 24.0
    relative_step: float = 0.025

    def check(self, path):
        if not 0.3 <= self.min_nm:
            raise bad(_sub(path, "min_nm"), self.min_nm, "a diameter of at least 0.3 nm")
        if not self.max_nm > self.min_nm:
            raise bad(_sub(path, "max_nm"), self.max_nm, f"a diameter above ladder.min_nm = {self.min_nm}")
        if self.max_nm > 40:
            raise bad(_sub(path, "max_nm"), self.max_nm, "at most 40 nm (cluster building cost grows as D^3)")
        if not 0.002 <= self.relative_step <= 0.2:
            raise bad(_sub(path, "relative_step"), self.relative_step, "a relative step between 0.002 and 0.2")


@dataclass
class NuisanceConfig:
    """Ranges of the physical parameters that are not labels, drawn uniformly per sample."""

    lattice_rel_range: float = 0.01
    microstrain_pct: list[float] = field(default_factory=lambda: [0.0, 0.5])
    b_iso_angstrom2: dict[str, list[float]] = field(default_factory=lambda: {"Pb": [0.3, 3.0], "S": [0.3, 3.0]})
    energies_kev: list[float] = field(default_factory=lambda: [8.048, 17.479, 22.163, 60.0])

    def check(self, path):
        if not 0 <= self.lattice_rel_range <= 0.05:
            raise bad(_sub(path, "lattice_rel_range"), self.lattice_rel_range,
                      "a relative half-range of the lattice parameter between 0 and 0.05")
        _range_pair(path, "microstrain_pct", self.microstrain_pct, 0.0, 2.0, " %")
        for el, r in self.b_iso_angstrom2.items():
            _range_pair(path, f"b_iso_angstrom2.{el}", r, 0.0, 20.0, " Angstrom^2")
        if not self.energies_kev or any(not 1.0 <= e <= 200.0 for e in self.energies_kev):
            raise bad(_sub(path, "energies_kev"), self.energies_kev, "photon energies between 1 and 200 keV")


@dataclass
class SplitsConfig:
    """Fractions of `samples` per split (they must sum to 1)."""

    train: float = 0.8
    val: float = 0.08
    test: float = 0.08
    benchmark: float = 0.02
    seedgrid: float = 0.02

    def check(self, path):
        vals = dataclasses.asdict(self)
        for k, v in vals.items():
            if not 0 <= v <= 1:
                raise bad(_sub(path, k), v, "a fraction between 0 and 1")
        if abs(sum(vals.values()) - 1.0) > 1e-9:
            raise bad(path or "splits", vals, "fractions that sum to 1")


@dataclass
class SeedgridConfig:
    """Labels of the frozen `seedgrid` split: the reference work's grid."""

    mean_start_nm: float = 2.0
    mean_stop_nm: float = 10.0
    mean_step_nm: float = 0.5
    dispersions_pct: list[float] = field(default_factory=lambda: [5.0, 10.0, 15.0, 20.0])

    def check(self, path):
        _positive(path, "mean_step_nm", self.mean_step_nm)
        if not 0 < self.mean_start_nm <= self.mean_stop_nm:
            raise bad(_sub(path, "mean_stop_nm"), self.mean_stop_nm, f"a value >= mean_start_nm = {self.mean_start_nm}")
        if not self.dispersions_pct or any(not 0 <= d < 60 for d in self.dispersions_pct):
            raise bad(_sub(path, "dispersions_pct"), self.dispersions_pct, "dispersions between 0 and 60 %")

    @property
    def means_nm(self) -> list[float]:
        n = int(math.floor((self.mean_stop_nm - self.mean_start_nm) / self.mean_step_nm + 1e-9)) + 1
        return [round(self.mean_start_nm + i * self.mean_step_nm, 9) for i in range(n)]


@dataclass
class FrozenAugmentConfig:
    """Augmentation of the frozen splits (qdsize.sim.augment preset, fixed seed)."""

    preset: str = "realistic"
    seed: int = 20261124


@dataclass
class ComposeConfig:
    """Fast exact-enough composition: fine-grid pair sums, cubic B-splines, Gaussian microstrain quadrature."""

    fine_step_inv_angstrom: float = 0.004
    quadrature_tol: float = 1e-5
    batch: int = 512

    def check(self, path):
        if not 0.0005 <= self.fine_step_inv_angstrom <= 0.01:
            raise bad(_sub(path, "fine_step_inv_angstrom"), self.fine_step_inv_angstrom,
                      "a fine-grid step between 0.0005 and 0.01 1/Angstrom")
        if not 1e-9 <= self.quadrature_tol <= 1e-3:
            raise bad(_sub(path, "quadrature_tol"), self.quadrature_tol, "a tolerance between 1e-9 and 1e-3")
        if not 1 <= self.batch <= 65536:
            raise bad(_sub(path, "batch"), self.batch, "a batch size between 1 and 65536")


@dataclass
class DatasetConfig:
    name: str = "pbs"
    samples: int = 200_000
    seed: int = 0
    shard_size: int = 2048
    q: QGridConfig = field(default_factory=QGridConfig)
    sizes: SizesConfig = field(default_factory=SizesConfig)
    dispersion: DispersionConfig = field(default_factory=DispersionConfig)
    variants: VariantsConfig = field(default_factory=VariantsConfig)
    ladder: LadderConfig = field(default_factory=LadderConfig)
    nuisance: NuisanceConfig = field(default_factory=NuisanceConfig)
    splits: SplitsConfig = field(default_factory=SplitsConfig)
    seedgrid: SeedgridConfig = field(default_factory=SeedgridConfig)
    augment: FrozenAugmentConfig = field(default_factory=FrozenAugmentConfig)
    compose: ComposeConfig = field(default_factory=ComposeConfig)

    def check(self, path):
        import re

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", self.name):
            raise bad(_sub(path, "name"), self.name, "a short name of letters, digits, '.', '_' or '-'")
        if not 1 <= self.samples <= 100_000_000:
            raise bad(_sub(path, "samples"), self.samples, "a total sample count between 1 and 1e8")
        if not 0 <= self.seed < 2**63:
            raise bad(_sub(path, "seed"), self.seed, "a seed >= 0")
        if not 1 <= self.shard_size <= 1_000_000:
            raise bad(_sub(path, "shard_size"), self.shard_size, "rows per shard between 1 and 1e6")
        from qdsize.sim import distribution

        disp_max = self.dispersion.class_edges_pct[-1]
        if self.ladder.min_nm > self.sizes.min_nm:
            raise bad(_sub(path, "ladder.min_nm"), self.ladder.min_nm,
                      f"a diameter <= sizes.min_nm = {self.sizes.min_nm} (the ladder must cover every mean)")
        # the largest mean's distribution must fit inside the ladder up to two standard deviations of ln D
        need = distribution.quantile_range_nm(self.sizes.max_nm, max(disp_max, 1e-6), 2.0)[1]
        if self.ladder.max_nm < need:
            raise bad(_sub(path, "ladder.max_nm"), self.ladder.max_nm,
                      f">= {need:.2f} nm: the largest mean ({self.sizes.max_nm} nm) at the largest dispersion "
                      f"({disp_max} %) plus two standard deviations of ln D")
        grid = self.seedgrid
        if grid.means_nm[0] < self.ladder.min_nm or grid.means_nm[-1] > self.ladder.max_nm:
            raise bad(_sub(path, "seedgrid.mean_stop_nm"), grid.mean_stop_nm, "seedgrid means inside the ladder")
        if set(self.nuisance.b_iso_angstrom2) != set(self.species):
            raise bad(_sub(path, "nuisance.b_iso_angstrom2"), sorted(self.nuisance.b_iso_angstrom2),
                      f"one [low, high] range per element of {self.variants.material}: {list(self.species)}")

    @property
    def species(self) -> tuple[str, ...]:
        from qdsize.sim import crystal

        return crystal.material(self.variants.material).species


@dataclass
class DatasetFile:
    """Top level of a dataset config file."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)


def load_dataset_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Loaded:
    """Load and validate a dataset config (`dataset:` at the top level)."""
    return load(DatasetFile, path, overrides)
