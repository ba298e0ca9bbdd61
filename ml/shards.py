"""The dataset on disk as readers see it: shard layout, manifest, Q grid and Parquet readers (numpy, no torch,
no Ray); `qdsize.platform.dataset` writes what these read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qdsize.sim.contract import LABEL_COLUMNS, SPLITS
from qdsize.sim.errors import InputError, bad

MANIFEST = "manifest.json"
FORMAT = "qdsize-dataset/1"
META_Q = b"qdsize.q_inv_angstrom"
META_HASH = b"qdsize.config_hash"
META_SPLIT = b"qdsize.split"
META_SHARD = b"qdsize.shard"


def shard_relpath(split: str, index: int) -> str:
    """Deterministic shard name relative to the dataset root: `split=train/part-00042.parquet`."""
    return f"split={split}/part-{index:05d}.parquet"


def split_files(root: str | Path, split: str) -> list[Path]:
    """Final shard files of one split, in shard order (temporary files are never listed)."""
    d = Path(root) / f"split={split}"
    return sorted(p for p in d.glob("part-*.parquet") if p.is_file()) if d.is_dir() else []


def read_manifest(root: str | Path) -> dict | None:
    p = Path(root) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise InputError(f"{p}: manifest is not valid JSON") from None


def q_grid(root: str | Path) -> np.ndarray:
    """The Q grid (1/Angstrom) of a dataset, from its manifest (or the first shard's schema metadata)."""
    m = read_manifest(root)
    if m is not None and "q_inv_angstrom" in m:
        return np.asarray(m["q_inv_angstrom"], dtype=np.float64)
    for split in SPLITS:
        files = split_files(root, split)
        if files:
            return q_from_schema(pq.read_schema(files[0]))
    raise bad("path", str(root), "a dataset folder with shards")


def q_from_schema(schema: pa.Schema) -> np.ndarray:
    return np.asarray(json.loads(schema.metadata[META_Q]), dtype=np.float64)


def patterns_from_column(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(n, n_Q) float32 array from a fixed-size list column (zero-copy when it is one chunk)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n_q = col.type.list_size
    flat = col.flatten() if col.offset else col.values
    return flat.to_numpy(zero_copy_only=False).reshape(-1, n_q)


def iter_batches(root: str | Path, split: str = "train", batch_size: int = 1024, columns=None,
                 pattern_column: str = "pattern") -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Yield (patterns float32 (n, n_Q), labels {column: array}) batches of one split, in shard order.

    `columns` names the label / parameter columns to return (default: the four labels and `sample_index`).
    """
    files = split_files(root, split)
    if not files:
        raise bad("split", split, f"a split with shards under {root} (found none)")
    cols = list(columns) if columns is not None else [*LABEL_COLUMNS, "sample_index"]
    for f in files:
        pf = pq.ParquetFile(f)
        for rb in pf.iter_batches(batch_size=batch_size, columns=[pattern_column, *cols]):
            yield patterns_from_column(rb.column(pattern_column)), {c: rb.column(c).to_numpy(zero_copy_only=False)
                                                                   for c in cols}


def load_split(root: str | Path, split: str = "train", columns=None,
               pattern_column: str = "pattern") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A whole split in memory: (patterns float32 (n, n_Q), labels {column: array})."""
    pats, labels = [], {}
    for p, lab in iter_batches(root, split, 1 << 16, columns, pattern_column):
        pats.append(p)
        for k, v in lab.items():
            labels.setdefault(k, []).append(v)
    return np.concatenate(pats), {k: np.concatenate(v) for k, v in labels.items()}


def read_row(root: str | Path, split: str, index: int) -> dict:
    """One sample (row `index` of the split, counted over shards in order) as a dict of Python/numpy values."""
    if index < 0:
        raise bad("--index", index, "a row index >= 0")
    start = 0
    for f in split_files(root, split):
        n = pq.read_metadata(f).num_rows
        if index < start + n:
            t = pq.read_table(f).slice(index - start, 1)
            out = {}
            for name in t.column_names:
                col = t.column(name)
                out[name] = patterns_from_column(col)[0] if pa.types.is_fixed_size_list(col.type) else \
                    col.to_pylist()[0]
            return out
        start += n
    raise bad("--index", index, f"a row index below {start} (rows in split {split})")
