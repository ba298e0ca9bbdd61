"""Reading and writing files: xyz coordinates, two-column pattern files with a parameter header, content hashes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .cluster import Cluster, from_atoms
from .errors import InputError


def content_hash(data, length: int = 16) -> str:
    """Hex SHA-256 of the canonical JSON of `data` (sorted keys, no whitespace), shortened: the key of configs,
    datasets and cached families."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def read_xyz(path: str | Path) -> Cluster:
    """Read a standard xyz file (count line, comment line, `El x y z` in Angstrom)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"xyz = {str(path)!r}: file not found")
    if p.is_dir():
        raise InputError(f"xyz = {str(path)!r}: expected a file, found a directory")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"xyz = {str(path)!r}: not a UTF-8 text file") from None
    if len(lines) < 2:
        raise InputError(f"xyz = {str(path)!r}: expected an atom-count line and a comment line")
    try:
        n = int(lines[0].split()[0])
    except (ValueError, IndexError):
        raise InputError(f"xyz = {str(path)!r}: line 1 = {lines[0][:40]!r}: expected the number of atoms") from None
    if n <= 0:
        raise InputError(f"xyz = {str(path)!r}: atom count {n}: expected at least one atom")
    body = [ln for ln in lines[2:] if ln.strip()]
    if len(body) < n:
        raise InputError(f"xyz = {str(path)!r}: header says {n} atoms, found {len(body)} atom lines")
    els, pos = [], []
    for k, ln in enumerate(body[:n], start=3):
        parts = ln.split()
        try:
            if len(parts) < 4:
                raise ValueError
            pos.append([float(x) for x in parts[1:4]])
        except ValueError:
            raise InputError(f"xyz = {str(path)!r}: line {k} = {ln[:60]!r}: expected 'Element x y z'") from None
        els.append(parts[0])
    try:
        return from_atoms(els, pos, info={"source": str(p), "comment": lines[1].strip()})
    except InputError as exc:
        raise InputError(f"xyz = {str(path)!r}: {exc}") from None


def write_xyz(path: str | Path, c: Cluster, comment: str = "") -> None:
    lines = [str(c.n_atoms), comment.replace("\n", " ")]
    lines += [f"{e} {x:.8f} {y:.8f} {z:.8f}" for e, (x, y, z) in zip(c.elements, c.positions_angstrom)]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def write_pattern(path: str | Path, q_inv_angstrom, intensity, params: dict, columns=("Q_inv_angstrom",
                  "I_electron_units_per_particle")) -> None:
    """Two columns, Q in 1/A and I, with a `#` header holding every parameter (one `# key: json` per line)."""
    head = ["qdsize simulated pattern"]
    head += [f"{k}: {json.dumps(_jsonable(v))}" for k, v in params.items()]
    head.append(" ".join(columns))
    data = np.column_stack([np.asarray(q_inv_angstrom), np.asarray(intensity)])
    np.savetxt(path, data, fmt=["%.6f", "%.10e"], header="\n".join(head), comments="# ")


def read_pattern_header(path: str | Path) -> dict:
    """The parameters written by `write_pattern`."""
    out = {}
    for ln in Path(path).read_text(encoding="utf-8").splitlines():
        if not ln.startswith("#"):
            break
        body = ln[1:].strip()
        if ": " in body:
            k, v = body.split(": ", 1)
            try:
                out[k] = json.loads(v)
            except json.JSONDecodeError:
                out[k] = v
    return out
