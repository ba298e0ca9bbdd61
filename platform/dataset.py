"""Parquet datasets on disk: atomic shard writes, the manifest, resume checks and validation (the layout and the
readers are `qdsize.ml.shards`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qdsize.ml.shards import (  # noqa: F401  (the layout and readers, re-exported for the writers' users)
    FORMAT, MANIFEST, META_HASH, META_Q, META_SHARD, META_SPLIT, iter_batches, load_split, patterns_from_column,
    q_from_schema, q_grid, read_manifest, read_row, shard_relpath, split_files)
from qdsize.sim.contract import LABEL_COLUMNS  # noqa: F401
from qdsize.sim.errors import bad

TMP_SUFFIX = ".tmp"
COMPRESSION = "zstd"
COMPRESSION_LEVEL = 3


# ----------------------------------------------------------------------------------------------------------------
# Checksums
# ----------------------------------------------------------------------------------------------------------------
def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------------------------
def shard_table(columns: dict[str, np.ndarray], patterns: dict[str, np.ndarray], q_inv_angstrom: np.ndarray,
                config_hash: str, split: str, index: int) -> pa.Table:
    """An Arrow table: fixed-size float32 list columns for patterns, scalar columns as given, Q grid in metadata."""
    n_q = int(len(q_inv_angstrom))
    arrays, fields = [], []
    for name, mat in patterns.items():
        mat = np.ascontiguousarray(mat, dtype=np.float32)
        if mat.ndim != 2 or mat.shape[1] != n_q:
            raise ValueError(f"{name}: expected shape (n, {n_q}), got {mat.shape}")
        arr = pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1), type=pa.float32()), n_q)
        arrays.append(arr)
        fields.append(pa.field(name, pa.list_(pa.float32(), n_q), nullable=False))
    for name, col in columns.items():
        arr = pa.array(col)
        arrays.append(arr)
        fields.append(pa.field(name, arr.type, nullable=False))
    meta = {META_Q: json.dumps([float(x) for x in np.asarray(q_inv_angstrom)]).encode(),
            META_HASH: config_hash.encode(), META_SPLIT: split.encode(), META_SHARD: str(index).encode()}
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=meta))


def write_shard(table: pa.Table, root: str | Path, split: str, index: int) -> dict:
    """Write one shard to a temporary name in its split folder, then rename it; return its record."""
    final = Path(root) / shard_relpath(split, index)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex}{TMP_SUFFIX}"
    try:
        pattern_cols = [f.name for f in table.schema if pa.types.is_fixed_size_list(f.type)]
        pq.write_table(table, tmp, compression=COMPRESSION, compression_level=COMPRESSION_LEVEL,
                       row_group_size=max(1, table.num_rows),
                       use_byte_stream_split=[f"{c}.list.element" for c in pattern_cols] or False,
                       use_dictionary=[f.name for f in table.schema if pa.types.is_string(f.type)])
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"split": split, "index": index, "file": shard_relpath(split, index), "rows": table.num_rows,
            "sha256": digest, "bytes": size}


def remove_temporaries(root: str | Path) -> int:
    """Delete leftover temporary shard files (from killed writers); return how many."""
    n = 0
    for p in Path(root).glob(f"split=*/.*{TMP_SUFFIX}"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def shard_info(path: str | Path) -> dict:
    """Row count, config hash, split and shard index of a shard file, from its footer only."""
    md = pq.read_metadata(path)
    meta = pq.read_schema(path).metadata or {}
    return {"rows": md.num_rows, "config_hash": meta.get(META_HASH, b"").decode(),
            "split": meta.get(META_SPLIT, b"").decode(), "index": int(meta.get(META_SHARD, b"-1"))}


# ----------------------------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------------------------
def write_manifest(root: str | Path, manifest: dict) -> Path:
    """Atomically replace manifest.json."""
    p = Path(root) / MANIFEST
    tmp = p.with_name(f".{MANIFEST}.{uuid.uuid4().hex}{TMP_SUFFIX}")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, p)
    return p


def package_versions() -> dict:
    import importlib.metadata as md
    import sys

    out = {"python": sys.version.split()[0]}
    for name in ("qdsize", "numpy", "scipy", "numba", "pyarrow", "ray", "torch", "xraydb"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def prepare_output(root: str | Path, config_hash: str, overwrite: bool = False) -> dict | None:
    """Check that `root` is empty, or holds this config's dataset (resume); with `overwrite` clear it.

    Returns the existing manifest of the same config (or None). A folder holding another config's dataset is
    refused with an InputError unless `overwrite`.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise bad("--out", str(root), "a directory (a file is in the way)")
    manifest = read_manifest(root) if root.is_dir() else None
    foreign = None
    if manifest is not None and manifest.get("config_hash") != config_hash:
        foreign = manifest.get("config_hash")
    elif manifest is None and root.is_dir():
        for p in sorted(root.glob("split=*/part-*.parquet"))[:1]:
            try:
                h = shard_info(p)["config_hash"]
            except Exception:
                h = "unreadable"
            if h != config_hash:
                foreign = h
    if foreign is not None:
        if not overwrite:
            raise bad("--out", str(root), f"an empty folder or one holding this config's dataset (hash "
                      f"{config_hash}); it holds a dataset of config hash {foreign}: pass --overwrite to replace it")
        for p in root.glob("split=*"):
            shutil.rmtree(p)
        (root / MANIFEST).unlink(missing_ok=True)
        manifest = None
    return manifest


def verify_existing(root: str | Path, planned: list[dict], config_hash: str, manifest: dict | None) -> dict:
    """Records of planned shards already complete on disk: (split, index) -> record.

    A final file counts as complete when its checksum matches the manifest's record, or (no record yet: the
    previous run was cut off before it updated the manifest) when its footer carries this config hash and the
    planned row count. Anything else under a final name is removed so that it gets rewritten.
    """
    root = Path(root)
    known = {(s["split"], s["index"]): s for s in (manifest or {}).get("shards", [])}
    done = {}
    for sh in planned:
        key = (sh["split"], sh["index"])
        path = root / shard_relpath(*key)
        if not path.is_file():
            continue
        rec = known.get(key)
        digest = sha256_file(path)
        ok = False
        if rec is not None:
            ok = rec.get("sha256") == digest and rec.get("rows") == sh["rows"]
        else:
            try:
                info = shard_info(path)
                ok = info["config_hash"] == config_hash and info["rows"] == sh["rows"]
            except Exception:
                ok = False
            rec = {"split": key[0], "index": key[1], "file": shard_relpath(*key), "rows": sh["rows"],
                   "sha256": digest, "bytes": path.stat().st_size, "node_id": None, "node_ip": None}
        if ok:
            done[key] = rec
        else:
            path.unlink()
    return done


# ----------------------------------------------------------------------------------------------------------------
# Validation and summary
# ----------------------------------------------------------------------------------------------------------------
def validate(root: str | Path) -> tuple[dict, list[str]]:
    """Check every shard of the manifest (exists, checksum, row count, config hash); return (manifest, problems)."""
    root = Path(root)
    if not root.is_dir():
        raise bad("path", str(root), "a dataset folder")
    manifest = read_manifest(root)
    if manifest is None:
        raise bad("path", str(root), f"a dataset folder with {MANIFEST}")
    problems = []
    if manifest.get("status") != "complete":
        problems.append(f"status is {manifest.get('status')!r}: the dataset is incomplete (re-run simulate)")
    seen = set()
    for rec in manifest.get("shards", []):
        p = root / rec["file"]
        key = (rec["split"], rec["index"])
        if key in seen:
            problems.append(f"{rec['file']}: listed twice")
        seen.add(key)
        if not p.is_file():
            problems.append(f"{rec['file']}: missing")
            continue
        if sha256_file(p) != rec["sha256"]:
            problems.append(f"{rec['file']}: checksum mismatch")
            continue
        info = shard_info(p)
        if info["rows"] != rec["rows"]:
            problems.append(f"{rec['file']}: {info['rows']} rows, manifest says {rec['rows']}")
        if info["config_hash"] != manifest.get("config_hash"):
            problems.append(f"{rec['file']}: config hash {info['config_hash']}, expected {manifest['config_hash']}")
    for split, plan in manifest.get("plan", {}).items():
        have = sum(r["rows"] for r in manifest.get("shards", []) if r["split"] == split)
        if have != plan["rows"]:
            problems.append(f"split {split}: {have} rows, planned {plan['rows']}")
    listed = {r["file"] for r in manifest.get("shards", [])}
    for p in sorted(root.glob("split=*/part-*.parquet")):
        rel = p.relative_to(root).as_posix()
        if rel not in listed:
            problems.append(f"{rel}: on disk but not in the manifest")
    return manifest, problems


def summary_rows(manifest: dict) -> list[dict]:
    """Per split: shards, rows, bytes, bytes per pattern, and which nodes wrote them."""
    out = []
    for split in manifest.get("plan", {}):
        recs = [r for r in manifest.get("shards", []) if r["split"] == split]
        rows = sum(r["rows"] for r in recs)
        size = sum(r["bytes"] for r in recs)
        nodes = sorted({str(r.get("node_ip")) for r in recs if r.get("node_ip")})
        out.append({"split": split, "shards": len(recs), "rows": rows, "bytes": size,
                    "bytes_per_pattern": size / rows if rows else float("nan"), "nodes": nodes})
    return out
