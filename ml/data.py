"""Parquet shards to torch batches: streamed (larger than memory), shuffled, augmented on the fly, seeded."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from qdsize.sim.contract import LABEL_COLUMNS, RESOLUTION_KEYS
from qdsize.sim.errors import InputError

from . import shards as layout

LABELS = LABEL_COLUMNS


def split_files(dataset_dir: str | Path, split: str) -> list[Path]:
    """The complete shards of a split, in shard order; an error naming the split when it has none."""
    files = layout.split_files(dataset_dir, split)
    if not files:
        raise InputError(f"dataset = {str(dataset_dir)!r}: split {split!r} has no shards "
                         f"(expected {Path(dataset_dir) / f'split={split}'}/part-*.parquet)")
    return files


def q_grid(dataset_dir: str | Path, split: str = "train") -> np.ndarray:
    """The Q grid (1/A) of a dataset."""
    if not Path(dataset_dir).is_dir():
        raise InputError(f"dataset = {str(dataset_dir)!r}: no such dataset folder (run `qdsize simulate` first)")
    return layout.q_grid(dataset_dir)


def class_edges(dataset_dir: str | Path) -> tuple[list[float], list[float]]:
    """(size class edges in nm, dispersion class edges in %) recorded in the dataset's manifest."""
    m = layout.read_manifest(dataset_dir) or {}
    lab = m.get("labels", {})
    if "size_class_edges_nm" not in lab:
        raise InputError(f"dataset = {str(dataset_dir)!r}: manifest.json records no class edges")
    return list(lab["size_class_edges_nm"]), list(lab["dispersion_class_edges_pct"])


def keep_rows(lab: dict, exclude: dict | None, only: dict | None = None) -> np.ndarray:
    """Boolean mask of the rows whose columns avoid every `exclude` value (and take an `only` value, if given)."""
    n = len(next(iter(lab.values())))
    keep = np.ones(n, dtype=bool)
    for col, values in (exclude or {}).items():
        keep &= ~np.isin(lab[col], list(values))
    for col, values in (only or {}).items():
        keep &= np.isin(lab[col], list(values))
    return keep


def read_split(dataset_dir: str | Path, split: str, limit: int | None = None, *, exclude: dict | None = None,
               only: dict | None = None) -> tuple[np.ndarray, dict]:
    """A whole split (or its first `limit` rows) in memory: patterns (n, n_q) float32 and label arrays.

    `exclude` / `only` map a column (e.g. `shape`) to values whose rows are dropped / kept (a shifted split).
    """
    filters = [*(exclude or {}), *(only or {})]
    cols = [*LABELS, *[c for c in filters if c not in LABELS]]
    pats, labels, n = [], {k: [] for k in LABELS}, 0
    for x, lab in layout.iter_batches(dataset_dir, split, 8192, columns=cols):
        if filters:
            keep = keep_rows(lab, exclude, only)
            x, lab = x[keep], {k: lab[k][keep] for k in LABELS}
        pats.append(x)
        for k in LABELS:
            labels[k].append(lab[k])
        n += len(x)
        if limit is not None and n >= limit:
            break
    if not pats:
        split_files(dataset_dir, split)
    return np.concatenate(pats)[:limit], {k: np.concatenate(v)[:limit] for k, v in labels.items()}


def augment_batch(augment, x: torch.Tensor, gen: torch.Generator, resolution_known: float = 0.0):
    """Augment a batch and say which instrument resolution each pattern got: (patterns, (n, 3) resolutions).

    A fraction `resolution_known` of the rows keep the resolution they were given (zeros: none), the rest are NaN:
    not told to the network, as when a user does not know the instrument.
    """
    drawn: dict = {}
    if augment is not None:
        x = augment(x, gen, drawn=drawn)
    res = drawn.get("resolution")
    res = x.new_zeros(len(x), 3) if res is None else res.to(x.dtype)
    if resolution_known < 1.0:
        hide = torch.rand(len(x), generator=gen, device=gen.device).to(x.device) >= resolution_known
        res = res.masked_fill(hide[:, None], float("nan"))
    return x, res


def resolution_range(augment_cfg: dict) -> dict[str, list[float]]:
    """[low, high] of each resolution parameter an augmentation config gives its patterns (sim.augment)."""
    from qdsize.sim import augment

    return augment.resolution_range(augment_cfg)


def solvent_dilation(augment_cfg: dict) -> tuple[float, float]:
    """[low, high] of the stretch k an augmentation config gives its solvents, I(Q / k); (1, 1) when none."""
    if augment_cfg.get("preset") == "none":
        return (1.0, 1.0)
    from qdsize.sim import augment

    return tuple(augment.config_from(augment_cfg).solvent.dilation)


def instrument_of(dataset_dir: str | Path) -> np.ndarray | None:
    """The resolution (RESOLUTION_KEYS) every pattern of the dataset's frozen splits was given, as its manifest
    records it (`frozen_instrument`; for datasets made before it did, from their augmentation preset); None when it
    varies or is unknown."""
    m = layout.read_manifest(dataset_dir) or {}
    if "frozen_instrument" in m:
        inst = m["frozen_instrument"]
        return None if inst is None else np.asarray([inst[k] for k in RESOLUTION_KEYS], dtype=np.float32)
    from qdsize.sim import augment

    preset = (((m.get("config") or {}).get("dataset") or {}).get("augment") or {}).get("preset")
    inst = augment.fixed_resolution({"preset": preset}) if preset else None
    return None if inst is None else np.asarray(inst.as_tuple(), dtype=np.float32)


@dataclass
class TruncationConfig:
    """Random Q-range truncation during training, so that the model stays right on short-range data."""

    probability: float = 0.5
    q_min_range: list[float] = field(default_factory=lambda: [1.0, 1.2])
    q_max_range: list[float] = field(default_factory=lambda: [7.0, 10.0])


def truncation_mask(q: torch.Tensor, batch: int, cfg: TruncationConfig, gen: torch.Generator) -> torch.Tensor:
    """(batch, n_q) mask: 1 inside a random [q_lo, q_hi] for a fraction of samples, 1 everywhere otherwise."""
    dev = q.device
    u = torch.rand(batch, 3, generator=gen, device=gen.device).to(dev)
    lo = cfg.q_min_range[0] + u[:, 0:1] * (cfg.q_min_range[1] - cfg.q_min_range[0])
    hi = cfg.q_max_range[0] + u[:, 1:2] * (cfg.q_max_range[1] - cfg.q_max_range[0])
    m = ((q[None, :] >= lo) & (q[None, :] <= hi)).float()
    keep_all = (u[:, 2:3] >= cfg.probability).float()
    return torch.maximum(m, keep_all)


class ShardStream:
    """Iterate over (patterns, mask, labels, resolution) batches of a split: shard order and a shuffle buffer are
    seeded per epoch.

    Memory holds one shuffle buffer, never the dataset. Augmentation (a callable on (batch, n_q) tensors with a
    generator) and truncation run on the target device; `augment_batch` says which resolution rows are known.
    """

    def __init__(self, dataset_dir, split: str, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 buffer_rows: int = 16384, augment=None, truncation: TruncationConfig | None = None,
                 device: torch.device | str = "cpu", limit: int | None = None, exclude: dict | None = None,
                 resolution_known: float = 0.0):
        self.files = split_files(dataset_dir, split)
        self.exclude = {k: list(v) for k, v in (exclude or {}).items() if v}  # column -> values kept out
        self.q = torch.as_tensor(q_grid(dataset_dir, split), dtype=torch.float32, device=device)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.buffer_rows, self.augment, self.truncation = buffer_rows, augment, truncation
        self.device, self.limit = torch.device(device), limit
        self.resolution_known = resolution_known
        self.epoch = 0

    def _rows(self, rng):
        order = rng.permutation(len(self.files)) if self.shuffle else np.arange(len(self.files))
        seen = 0
        for i in order:
            pf = pq.ParquetFile(self.files[i])
            for rb in pf.iter_batches(batch_size=4096, columns=["pattern", *LABELS, *self.exclude]):
                x = layout.patterns_from_column(rb.column("pattern"))
                lab = {k: rb.column(k).to_numpy() for k in LABELS}
                if self.exclude:
                    keep = keep_rows({k: rb.column(k).to_numpy(zero_copy_only=False) for k in self.exclude},
                                     self.exclude)
                    x, lab = x[keep], {k: v[keep] for k, v in lab.items()}
                if self.limit is not None:
                    take = min(len(x), self.limit - seen)
                    x, lab = x[:take], {k: v[:take] for k, v in lab.items()}
                seen += len(x)
                yield x, lab
                if self.limit is not None and seen >= self.limit:
                    return

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        gen = torch.Generator(device=self.device if self.device.type == "cuda" else "cpu")
        gen.manual_seed(int(rng.integers(2**62)))
        self.epoch += 1
        buf_x, buf_l = [], []
        size = 0
        for x, lab in self._rows(rng):
            buf_x.append(x)
            buf_l.append(lab)
            size += len(x)
            if size >= self.buffer_rows:
                yield from self._emit(buf_x, buf_l, rng, gen, final=False)
                kept = sum(len(b) for b in buf_x)
                size = kept
        yield from self._emit(buf_x, buf_l, rng, gen, final=True)

    def _emit(self, buf_x, buf_l, rng, gen, final: bool):
        if not buf_x:  # the rows ended exactly at a buffer boundary
            return
        x = np.concatenate(buf_x)
        lab = {k: np.concatenate([b[k] for b in buf_l]) for k in LABELS}
        idx = rng.permutation(len(x)) if self.shuffle else np.arange(len(x))
        n_full = len(idx) // self.batch_size
        stop = len(idx) if final else n_full * self.batch_size
        for a in range(0, stop, self.batch_size):
            sel = idx[a:a + self.batch_size]
            yield self._batch(x[sel], {k: v[sel] for k, v in lab.items()}, gen)
        rest = idx[stop:]
        buf_x.clear()
        buf_l.clear()
        if len(rest):
            buf_x.append(x[rest])
            buf_l.append({k: v[rest] for k, v in lab.items()})

    def _batch(self, x, lab, gen):
        xt, res = augment_batch(self.augment, torch.as_tensor(x, device=self.device), gen, self.resolution_known)
        mask = None
        if self.truncation is not None:
            mask = truncation_mask(self.q, len(xt), self.truncation, gen)
        y = {k: torch.as_tensor(v, device=self.device) for k, v in lab.items()}
        return xt, mask, y, res
