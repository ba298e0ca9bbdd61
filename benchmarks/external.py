"""Shared by the benchmarks on the QDots-sizer authors' data: name labels, readers, the peer network, scores, JSON."""

# The data come from the public repository DeByeUSerSYstem/QDots-sizer (GPL-3; read for facts, none of its code is
# used here); they are never committed nor fetched at run time but lie in a folder given on the command line:
#   Debussy patterns  data_training/partN.tar.gz: single-column .cal files of intensity on Q = 0.99 + 0.0028 k 1/A
#                     (k = 0..5003), labels in the name (Avg, SD, Str, Solv, Conc, noisy); part 51 is never read;
#   measured          commit 4cfc11d, experimental-data_SYNCHR/*.xye (2-theta deg, I, sigma) and
#                     experimental-data_LAB/*.xy (Cu K-alpha), wavelength and mean diameter in the name;
#   peer              PbS_model.h5, the reference's Keras classifier (17 classes, 2-10 nm by 0.5), run by a NumPy
#                     forward pass of its stored weights (needs h5py) after the preprocessing its README and
#                     prediction script describe (linear interpolation onto its grid, end values held beyond the
#                     measured range, area under the curve scaled to 1000).
# Not a script: the benchmarks import it (their own folder is on sys.path).

from __future__ import annotations

import json
import math
import os
import re
import shlex
import sys
import tarfile
from pathlib import Path

import numpy as np

from qdsize.sim.errors import InputError

# ---------------------------------------------------------------------------------------------------- Debussy set
DEBUSSY_Q_MIN = 0.99  # 1/A, the reference's grid: np.arange(0.99, 15.0, 0.0028)
DEBUSSY_Q_STEP = 0.0028
DEBUSSY_POINTS = 5004
KEPT_OUT_PART = 51  # never read: kept out of every benchmark here
# The reference's Debussy input (commit 4cfc11d, templates/template.dwa) states no instrumental profile: 'simu 1',
# 'wave 0.56', 'beam S', 'geom transmDS 0.0', 2-theta 0.51-83.9 deg by 0.0036 and 'esdw 0.0001' (apparently the
# wavelength's e.s.d.; were it a spread, Delta Q / Q ~ 1e-4: 0.0015 1/A at 15 1/A, half a grid cell). The particles'
# scattering is ideal; only the solvent patterns mixed in were measured. Told = an ideal instrument.
DEBUSSY_RESOLUTION = (0.0, 0.0, 0.0)  # fwhm0 (1/A), fwhm_relative, lorentz_fraction
DEBUSSY_SUFFIXES = (".cal",)

_TAG_SPELLING = {"noisy": "noisy", "solv": "Solv", "conc": "Conc", "avg": "Avg", "str": "Str", "sd": "SD"}
_DEBUSSY_TAGS = {  # name token prefix (case-insensitive) -> label, parser; longest prefixes first
    "noisy": ("noise", "number_or_none"),
    "solv": ("solvent", "text"),
    "conc": ("concentration_pct", "number"),
    "avg": ("mean_diameter_nm", "number"),
    "str": ("strain", "number"),
    "sd": ("size_dispersion_pct", "number"),
}
_NUMBER = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")


def debussy_grid() -> np.ndarray:
    """The reference's Q grid (1/A): 0.99 + 0.0028 k, k = 0..5003."""
    return DEBUSSY_Q_MIN + DEBUSSY_Q_STEP * np.arange(DEBUSSY_POINTS)


def parse_debussy_name(name: str) -> dict:
    """Labels of a Debussy pattern from its file name, e.g. PbS_Str1.0017_SD20_Avg2.00_SolvHEX_Conc25_noisy30.cal:
    mean_diameter_nm (Avg), size_dispersion_pct (SD, std / mean in %), strain (Str, the factor on the bulk lattice
    parameter), solvent (Solv), concentration_pct (Conc, % particles against solvent), noise (noisy, the `noisy`
    program's scale: higher = less noise). Avg and SD are required; the rest is None when absent; tokens that are no
    label are kept in "other". Tokens are split at '_', tags matched case-insensitively in any order. A missing Avg
    or SD, a label twice or a value that is not a number raises InputError naming the file."""
    base = os.path.basename(str(name))
    stem = base[:-len(Path(base).suffix)] if Path(base).suffix.lower() in DEBUSSY_SUFFIXES else base
    labels: dict = {"material": None, **{label: None for label, _ in _DEBUSSY_TAGS.values()}, "other": []}
    seen: set[str] = set()
    tokens = [t for t in stem.split("_") if t]
    for i, tok in enumerate(tokens):
        tag = next((t for t in _DEBUSSY_TAGS if tok.lower().startswith(t)), None)
        if tag is None:  # the material (PbS) starts the name; any other token is kept, unread
            if i == 0:
                labels["material"] = tok
            else:
                labels["other"].append(tok)
            continue
        if tag in seen:
            raise InputError(f"{base}: label {_TAG_SPELLING[tag]} appears twice: expected each of Avg, SD, Str, "
                             "Solv, Conc, noisy at most once")
        seen.add(tag)
        label, kind = _DEBUSSY_TAGS[tag]
        value = tok[len(tag):]
        if kind == "text":
            if not value:
                raise InputError(f"{base}: token {tok!r} names no solvent: expected e.g. SolvHEX or SolvTOL")
            labels[label] = value
        elif kind == "number_or_none" and value == "":
            labels[label] = None
        elif _NUMBER.match(value):
            labels[label] = float(value)
        else:
            raise InputError(f"{base}: token {tok!r}: {value!r} is not a number: expected e.g. Avg2.00, SD20, "
                             "Str1.0017, Conc25, noisy30")
    missing = [_TAG_SPELLING[t] for t in ("avg", "sd") if t not in seen]
    if missing:
        raise InputError(f"{base}: no {' or '.join(missing)} "
                         "label: expected a name like PbS_Str1.0017_SD20_Avg2.00_SolvHEX_Conc25_noisy30.cal")
    if not 0 < labels["mean_diameter_nm"] < 100:
        raise InputError(f"{base}: Avg = {labels['mean_diameter_nm']:g}: expected a mean diameter in nm (0-100)")
    if not 0 <= labels["size_dispersion_pct"] <= 100:
        raise InputError(f"{base}: SD = {labels['size_dispersion_pct']:g}: expected a dispersion in % (0-100)")
    return labels


def read_cal(data: bytes | str | Path, name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(Q 1/A, intensity) of a reference `.cal` pattern: one column of 5004 intensities on `debussy_grid()` (the
    rows the reference's training script stacks into its 5004-point input). `data`: the file's bytes or its path."""
    if isinstance(data, (str, Path)):
        name = name or str(data)
        data = Path(data).read_bytes()
    name = name or "pattern"
    lines = [ln.split() for ln in data.decode("utf-8", "replace").splitlines()]
    lines = [ln for ln in lines if ln and ln[0][0] not in "#!;%"]
    widths = {len(ln) for ln in lines}
    if widths != {1}:
        raise InputError(f"{name}: rows of {sorted(widths)} columns: expected one column of {DEBUSSY_POINTS} "
                         f"intensities on Q = {DEBUSSY_Q_MIN:g} + {DEBUSSY_Q_STEP:g} k 1/A")
    try:
        y = np.array([ln[0] for ln in lines], dtype=np.float64)
    except ValueError:
        bad_row = next(ln[0] for ln in lines if not _NUMBER.match(ln[0]))
        raise InputError(f"{name}: {bad_row[:30]!r} is not a number: expected one intensity per line") from None
    if len(y) != DEBUSSY_POINTS:
        raise InputError(f"{name}: {len(y)} intensities: expected {DEBUSSY_POINTS} (Q = {DEBUSSY_Q_MIN:g}-"
                         f"{debussy_grid()[-1]:.4f} 1/A by {DEBUSSY_Q_STEP:g})")
    if not np.all(np.isfinite(y)):
        raise InputError(f"{name}: NaN or infinity among the intensities: expected finite numbers")
    return debussy_grid(), y


def parse_parts(spec: str) -> list[int]:
    """'1-50', '3', '1,4,10-12' -> sorted part numbers; part 51 is refused."""
    parts: set[int] = set()
    for piece in str(spec).replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", piece)
        if not m:
            raise InputError(f"--parts = {spec!r}: expected part numbers and ranges such as 1-50 or 1,4,10-12")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo or lo < 1:
            raise InputError(f"--parts = {spec!r}: {piece!r} is no range of parts: expected ascending part numbers "
                             "from 1")
        parts.update(range(lo, hi + 1))
    if KEPT_OUT_PART in parts:
        raise InputError(f"--parts = {spec!r}: part {KEPT_OUT_PART} is kept out of every benchmark here and is never "
                         f"read: expected parts 1-{KEPT_OUT_PART - 1}")
    return sorted(parts)


def _is_pattern_file(member_name: str) -> bool:
    base = os.path.basename(member_name)
    return not base.startswith("._") and Path(base).suffix.lower() in DEBUSSY_SUFFIXES


def find_debussy_parts(folder: Path, parts: list[int]) -> tuple[dict[int, Path], list[int]]:
    """({part: its archive partN.tar.gz or extracted folder partN}, parts requested but absent). Part 51 is never
    returned, whatever lies in the folder."""
    found: dict[int, Path] = {}
    for n in parts:
        if n == KEPT_OUT_PART:
            continue
        for candidate in (folder / f"part{n}.tar.gz", folder / f"part{n}.tgz", folder / f"part{n}"):
            if candidate.exists():
                found[n] = candidate
                break
    return found, [n for n in parts if n not in found]


def list_debussy_part(source: Path) -> list[str]:
    """Pattern files of one part (member names of its archive, or paths under its folder), sorted; `._*` skipped."""
    if source.is_dir():
        return sorted(str(p) for p in source.rglob("*") if p.is_file() and _is_pattern_file(p.name))
    try:
        with tarfile.open(source, "r:*") as tar:
            return sorted(m.name for m in tar if m.isfile() and _is_pattern_file(m.name))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InputError(f"{source}: not a readable tar archive ({exc}): expected the reference's partN.tar.gz "
                         "(git blobs, not Git LFS pointers)") from None


def iter_debussy_part(source: Path, wanted: set[str]):
    """(name, bytes) of the wanted pattern files of one part, in archive order (one pass through a .tar.gz)."""
    if source.is_dir():
        for name in sorted(wanted):
            yield name, Path(name).read_bytes()
        return
    with tarfile.open(source, "r:*") as tar:
        for m in tar:
            if m.name in wanted and m.isfile():
                yield m.name, tar.extractfile(m).read()


# ---------------------------------------------------------------------------------------------------- measured set
_RE_WL = re.compile(r"(?:^|_)wl(\d+(?:p\d+)?)A?(?=_|$)", re.IGNORECASE)
_RE_SIZE = re.compile(r"(?:^|_)(\d+(?:p\d+)?)nm(?=_|$)", re.IGNORECASE)


def parse_measured_name(name: str) -> dict:
    """Wavelength (A) and true mean diameter (nm) from a measured file's name, e.g. PbS_synchr_wl0p564162A_3p52nm.xye
    -> 0.564162 A, 3.52 nm; PbS_lab_wl1p5406_5p03nm_hexane.xy -> 1.5406 A, 5.03 nm. Raises InputError otherwise."""
    base = os.path.basename(str(name))
    stem = Path(base).stem
    wl, size = _RE_WL.search(stem), _RE_SIZE.search(stem)
    if wl is None or size is None:
        raise InputError(f"{base}: no {'wavelength (wl0p564162A)' if wl is None else 'mean diameter (3p52nm)'} in the "
                         "name: expected a name like PbS_synchr_wl0p564162A_3p52nm.xye")
    rest = [t for t in stem.split("_") if t and not _RE_WL.fullmatch(t) and not _RE_SIZE.fullmatch(t)]
    return {"wavelength_angstrom": float(wl.group(1).replace("p", ".")),
            "mean_diameter_nm": float(size.group(1).replace("p", ".")), "tags": rest}


def read_measured(path: Path):
    """(MeasuredPattern in Q, labels) of a measured 2-theta file, the wavelength and true size taken from its name."""
    from qdsize.sim import measured

    labels = parse_measured_name(path.name)
    pattern = measured.read_pattern(path, x_unit="2theta", wavelength_angstrom=labels["wavelength_angstrom"])
    return pattern, labels


# ---------------------------------------------------------------------------------------------------- scores
def _mean(v) -> float | None:
    v = [x for x in v if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else None


def score(rows: list[dict]) -> dict:
    """Figures of a list of rows {"true_d": nm, "true_disp": % or None, "pred": a predict() dict or None,
    "refused": reason or None}: n (rows), n_scored, within_0p25nm, mae_nm, bias_nm (mean predicted - true),
    dispersion_mae_pct (rows with a dispersion label), coverage_1sigma / coverage_2sigma (|err| <= k * stated std),
    flagged (out_of_distribution, of the scored rows), refused (of all rows). None where nothing can be said."""
    scored = [r for r in rows if r.get("pred") is not None]
    out = {"n": len(rows), "n_scored": len(scored),
           "refused": (len(rows) - len(scored)) / len(rows) if rows else None}
    if not scored:
        return {**out, "within_0p25nm": None, "mae_nm": None, "bias_nm": None, "dispersion_mae_pct": None,
                "coverage_1sigma": None, "coverage_2sigma": None, "flagged": None}
    err = np.array([r["pred"]["mean_diameter_nm"] - r["true_d"] for r in scored])
    std = [r["pred"].get("mean_diameter_std_nm") for r in scored]
    disp = [(r["pred"].get("size_dispersion_pct"), r.get("true_disp")) for r in scored]
    disp = [abs(p - t) for p, t in disp if p is not None and t is not None]
    flags = [r["pred"].get("out_of_distribution") for r in scored]
    cover = {}
    for k in (1, 2):
        ok = [abs(e) <= k * s for e, s in zip(err, std) if s is not None]
        cover[k] = float(np.mean(ok)) if ok else None
    out.update({"within_0p25nm": float(np.mean(np.abs(err) <= 0.25 + 1e-9)), "mae_nm": float(np.mean(np.abs(err))),
                "bias_nm": float(np.mean(err)), "dispersion_mae_pct": _mean(disp),
                "coverage_1sigma": cover[1], "coverage_2sigma": cover[2],
                "flagged": _mean([float(f) for f in flags if f is not None])})
    return out


def size_bin(d: float) -> str:
    """The 1-nm bin of a true mean diameter: '2-3' for 2 <= d < 3."""
    lo = int(math.floor(d))
    return f"{lo}-{lo + 1}"


def per_bin(rows: list[dict], told_rows: list[dict] | None = None) -> dict:
    """{'2-3': {n, bias_nm, mae_nm, within_0p25nm[, told_bias_nm, told_mae_nm]}} by 1-nm bin of the true size."""
    out = {}
    for b in sorted({size_bin(r["true_d"]) for r in rows}, key=lambda s: int(s.split("-")[0])):
        s = score([r for r in rows if size_bin(r["true_d"]) == b])
        entry = {"n": s["n"], "bias_nm": s["bias_nm"], "mae_nm": s["mae_nm"], "within_0p25nm": s["within_0p25nm"]}
        if told_rows is not None:
            t = score([r for r in told_rows if size_bin(r["true_d"]) == b])
            entry.update({"told_bias_nm": t["bias_nm"], "told_mae_nm": t["mae_nm"]})
        out[b] = entry
    return out


def fmt(v, spec: str = ".3f", signed: bool = False) -> str:
    """A figure for a table: '-' for None."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, ("+" if signed else "") + spec)


# ---------------------------------------------------------------------------------------------------- output
def data_folder(arg: str | None, env: str, option: str, expected: str) -> Path:
    """The data folder from the option or the environment; a missing one exits with one line naming both."""
    value = arg or os.environ.get(env)
    if not value:
        raise SystemExit(f"{option}: no data folder given (nor {env} set): expected {expected}")
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise SystemExit(f"{option} = {value!r}{' (from ' + env + ')' if not arg else ''}: no such folder: expected "
                         f"{expected}")
    return folder


def command_line() -> str:
    """The command as run: the interpreter (relative to the working directory when inside it) and the arguments."""
    exe = sys.executable
    try:
        rel = os.path.relpath(exe)
        exe = rel if not rel.startswith("..") else exe
    except ValueError:
        pass
    return shlex.join([exe, *sys.argv])


def _clean(v):
    if isinstance(v, float):
        return None if not math.isfinite(v) else round(v, 6)
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, np.generic):
        return _clean(v.item())
    return v


def write_json(path: str | Path, benchmark: str, data: str, models: dict, **extra) -> Path:
    """{"benchmark", "data", "models": {uri: {"blind", "told", "per_bin", ...}}, "command", ...extra} as JSON
    (NaN written as null), the form `qdsize model export --figures` reads."""
    doc = {"benchmark": benchmark, "data": data, "models": models, "command": command_line(), **extra}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(doc), indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------- peer
PEER_NAME = "peer: reference PbS_model.h5"
PEER_CLASSES_NM = np.arange(2.0, 10.1, 0.5)  # the reference's 17 size classes (nm)
PEER_AREA = 1000.0


def peer_preprocess(q: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A measured pattern as the reference's network takes it: linear interpolation onto its grid; below / above the
    measured range the mean of the first / last five in-range values; then scaled to an area of 1000."""
    g = debussy_grid()
    q, y = np.asarray(q, np.float64), np.asarray(y, np.float64)
    inside = (g >= q[0]) & (g <= q[-1])
    if inside.sum() < 5:
        raise InputError(f"measured Q range {q[0]:.3f}-{q[-1]:.3f} 1/A: expected to overlap the reference's "
                         f"{g[0]:g}-{g[-1]:.3f} 1/A")
    out = np.interp(g, q, y)
    vals = out[inside]
    out[g < q[0]] = vals[:5].mean()
    out[g > q[-1]] = vals[-5:].mean()
    area = float(np.sum((out[1:] + out[:-1]) / 2 * np.diff(g)))
    if not area > 0:
        raise InputError("the pattern's area on the reference's grid is not positive: expected an intensity")
    return (out * (PEER_AREA / area)).astype(np.float32)


class PeerCNN:
    """The reference's published Keras Sequential (Conv1D 'same' with stride, global average pooling, dense softmax)
    evaluated with NumPy from the weights and layer settings stored in its .h5 file."""

    def __init__(self, path: str | Path):
        import h5py  # optional: only the peer needs it

        self.path = str(path)
        with h5py.File(path, "r") as f:
            cfg = json.loads(f.attrs["model_config"])
            self.layers = []
            for layer in cfg["config"]["layers"]:
                kind, c = layer["class_name"], layer["config"]
                if kind == "InputLayer":
                    continue
                if kind not in ("Conv1D", "Dense", "GlobalAveragePooling1D"):
                    raise InputError(f"{path}: layer {kind} is not one this forward pass knows")
                w = {}
                if kind != "GlobalAveragePooling1D":
                    g = f["model_weights"][c["name"]][c["name"]]
                    w = {k.split(":")[0]: np.asarray(g[k], np.float64) for k in g}
                self.layers.append((kind, c, w))
        dense = [c for k, c, _ in self.layers if k == "Dense"]
        if not dense or dense[-1]["units"] != len(PEER_CLASSES_NM):
            raise InputError(f"{path}: expected a last dense layer of {len(PEER_CLASSES_NM)} size classes")

    @staticmethod
    def _act(x, name):
        if name == "relu":
            return np.maximum(x, 0)
        if name == "softmax":
            e = np.exp(x - x.max(axis=-1, keepdims=True))
            return e / e.sum(axis=-1, keepdims=True)
        if name == "linear":
            return x
        raise InputError(f"activation {name!r} is not one this forward pass knows")

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """(n, 17) class probabilities of patterns (n, 5004) already preprocessed."""
        from numpy.lib.stride_tricks import sliding_window_view

        h = np.asarray(x, np.float64)[:, :, None]  # (n, length, channels): Keras channels_last
        for kind, c, w in self.layers:
            if kind == "Conv1D":
                k, s = c["kernel_size"][0], c["strides"][0]
                if c["padding"] != "same" or c.get("dilation_rate", [1])[0] != 1 or c.get("groups", 1) != 1:
                    raise InputError(f"{self.path}: Conv1D {c['padding']} / dilated / grouped is not handled")
                length = h.shape[1]
                n_out = -(-length // s)
                pad = max((n_out - 1) * s + k - length, 0)
                h = np.pad(h, ((0, 0), (pad // 2, pad - pad // 2), (0, 0)))
                win = sliding_window_view(h, k, axis=1)[:, ::s][:, :n_out]  # (n, out, channels, k)
                h = np.einsum("nock,kcf->nof", win, w["kernel"]) + w["bias"]
            elif kind == "GlobalAveragePooling1D":
                h = h.mean(axis=1)
                continue
            else:
                h = h @ w["kernel"] + w["bias"]
            h = self._act(h, c["activation"])
        return h

    def predict(self, q: np.ndarray, y: np.ndarray) -> dict:
        """The reference's answer for one measured pattern: the most probable class (nm) and its probability."""
        p = self.probabilities(peer_preprocess(q, y)[None])[0]
        i = int(p.argmax())
        return {"mean_diameter_nm": float(PEER_CLASSES_NM[i]), "class_probability": float(p[i]),
                "mean_diameter_std_nm": None, "size_dispersion_pct": None, "out_of_distribution": None}


def load_peer(path: str | Path | None) -> tuple[PeerCNN | None, str]:
    """(the peer or None, a line saying which or why not)."""
    if path is None:
        return None, "peer: none (no PbS_model.h5 given with --peer or found beside the data)"
    if not Path(path).is_file():
        return None, f"peer: none ({path}: no such file)"
    try:
        return PeerCNN(path), f"{PEER_NAME} ({path}), NumPy forward pass"
    except ImportError:
        return None, "peer: none (h5py is not installed: .venv/bin/pip install h5py to run it)"
    except (OSError, KeyError, ValueError) as exc:
        return None, f"peer: none ({path}: {exc})"

