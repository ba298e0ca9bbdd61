"""Benchmark: models on measured PbS quantum-dot patterns of the reference authors (QDots-sizer), file by file.

The data, measured by others and never committed here nor fetched at run time: the folders experimental-data_SYNCHR
(14 synchrotron patterns, `.xye`: 2-theta deg, I, sigma; four beamline settings at 0.495-0.566 A) and
experimental-data_LAB (8 Cu K-alpha laboratory patterns, `.xy`) of the public repository DeByeUSerSYstem/QDots-sizer
at commit 4cfc11d (GPL-3; removed from later trees), here as DIR/SYNCHR and DIR/LAB. The wavelength and the true
mean diameter (the authors' value) are in each name: PbS_synchr_wl0p564162A_3p52nm.xye = 0.564162 A, 3.52 nm.
Each file goes the way of `qdsize predict FILE --x-unit 2theta --wavelength-angstrom WL`: read, resampled onto the
model's grid (refused when it does not cover the required Q range, as most laboratory files do), predicted blind:
no instrument resolution is known for these instruments, so there is no told figure. The synchrotron set is scored
(within 0.25 nm, MAE, mean error, 1 and 2 sigma coverage, flagged); the laboratory files are listed, one line each.
Side by side, when its file and h5py are there: the reference's own network (`peer: reference PbS_model.h5`, a
classifier in 0.5-nm classes, run by a NumPy forward pass after its published preprocessing; see external.py).

With --refine, each answered synchrotron file is then refined as `qdsize predict FILE --refine` does (the exact DSE
fit from the network's answer, shape auto unless --refine-shape, the instrument fitted; the guard decides), and the
answer reported (the refinement's where the guard accepts it, else the network's) is scored beside the network's.

    .venv/bin/python benchmarks/measured.py MODEL [MODEL ...] --data DIR [--peer PbS_model.h5] [--json PATH]
        [--refine [--refine-shape SHAPE] [--plots DIR]]
        (DIR also from QDSIZE_MEASURED_DIR; the peer from QDSIZE_PEER_MODEL or DIR/../peer/PbS_model.h5)
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich import box
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import external as ext  # noqa: E402

BENCHMARK = "measured"
ENV = "QDSIZE_MEASURED_DIR"
PEER_ENV = "QDSIZE_PEER_MODEL"
EXPECTED = ("a folder with SYNCHR/*.xye (and LAB/*.xy): the reference's experimental-data_SYNCHR and "
            "experimental-data_LAB (DeByeUSerSYstem/QDots-sizer, commit 4cfc11d)")
SETS = (("synchrotron", "SYNCHR", "*.xye"), ("laboratory", "LAB", "*.xy"))


def short_name(path: Path) -> str:
    """The name less its material, set and wavelength tokens (shown in their own columns): 5p03nm_toluene."""
    keep = [t for t in path.stem.split("_") if t.lower() not in ("pbs", "synchr", "lab")
            and not t.lower().startswith("wl")]
    return "_".join(keep) or path.stem


def reason(exc: Exception, path: Path) -> str:
    """An InputError's problem, without the file name it starts with and the advice after ': expected'."""
    msg = str(exc)
    for prefix in (f"{path}: ", f"{path.name}: "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return msg.split(": expected")[0]


def read_all(folder: Path) -> list[dict]:
    """Every file of both sets, read once: {set, path, labels, pattern or None, refused or None}."""
    from qdsize.sim.errors import InputError

    files = []
    for set_name, sub, pattern in SETS:
        for path in sorted((folder / sub).glob(pattern)):
            if path.name.startswith("._") or not path.is_file():
                continue
            labels = ext.parse_measured_name(path.name)
            entry = {"set": set_name, "path": path, "labels": labels, "pattern": None, "refused": None}
            try:
                entry["pattern"] = ext.read_measured(path)[0]
            except InputError as exc:
                entry["refused"] = f"unreadable: {reason(exc, path)}"
            files.append(entry)
    return files


def predict_model(predictor, files: list[dict]) -> list[dict]:
    """Rows {file, set, true_d, true_disp, pred, refused} of one model, blind, in the order of `files`."""
    from qdsize.sim import measured
    from qdsize.sim.errors import InputError

    rows, x, m, at = [], [], [], []
    for i, f in enumerate(files):
        row = {"file": f["path"].name, "set": f["set"], "wavelength_angstrom": f["labels"]["wavelength_angstrom"],
               "true_d": f["labels"]["mean_diameter_nm"], "true_disp": None, "pred": None, "refused": f["refused"]}
        if f["pattern"] is not None:
            try:
                y, mask, _ = measured.resample(f["pattern"], predictor.q_inv_angstrom)
                x.append(y)
                m.append(mask)
                at.append(i)
            except InputError as exc:
                row["refused"] = reason(exc, f["path"])
        rows.append(row)
    if x:
        for i, pred in zip(at, predictor.predict(np.stack(x), np.stack(m))):
            rows[i]["pred"] = pred
    return rows


def predict_peer(peer, files: list[dict]) -> list[dict]:
    rows = []
    for f in files:
        row = {"file": f["path"].name, "set": f["set"], "wavelength_angstrom": f["labels"]["wavelength_angstrom"],
               "true_d": f["labels"]["mean_diameter_nm"], "true_disp": None, "pred": None, "refused": f["refused"]}
        if f["pattern"] is not None:
            row["pred"] = peer.predict(f["pattern"].q_inv_angstrom, f["pattern"].intensity)
        rows.append(row)
    return rows


def refine_rows(rows: list[dict], files: list[dict], shape: str, plots: Path | None, console) -> list[dict]:
    """The rows with `answer` (what `predict --refine` reports, as a pred dict) and `refined` (the fit's fields)
    for each answered synchrotron file; the network's answer stands where the fit fails or the guard rejects it."""
    from qdsize.sim import refine as rf
    from qdsize.sim.errors import InputError

    opts = rf.fit_options({"shape": shape})
    out = []
    todo = [(r, f) for r, f in zip(rows, files) if f["set"] == "synchrotron" and r["pred"] is not None]
    for k, (r, f) in enumerate(todo):
        t0 = time.perf_counter()
        start = {key: r["pred"][key] for key in rf.START_KEYS if r["pred"].get(key) is not None}
        row = dict(r)
        try:
            res = rf.refine_pattern(f["pattern"], start, opts)
            ref = res.refined
            ans = ref["answer"]
            row["answer"] = {**r["pred"], **{key: ans[key] for key in rf.START_KEYS if key in ans}}
            lad = ref.get("ladder") or {}
            row["refined"] = {**{key: ref.get(key) for key in ("mean_diameter_nm", "mean_diameter_std_nm",
                                                               "size_dispersion_pct", "accepted", "verdict",
                                                               "reduced_chi2", "rwp")},
                              "shape": f"{lad.get('shape', '?')}/{lad.get('surface', '?')}"}
            if plots is not None:
                from qdsize.platform.cli_refine import plot_refinement

                plot_refinement(plots / f"{f['path'].stem}_refine.png", res, title=f["path"].name)
        except InputError as exc:
            row["answer"] = r["pred"]
            row["refined"] = {"error": str(exc)}
        row["refine_s"] = time.perf_counter() - t0
        console.print(f"  refined {k + 1}/{len(todo)} {short_name(f['path'])}: "
                      f"{row['refined'].get('verdict', row['refined'].get('error'))} ({row['refine_s']:.1f} s)",
                      highlight=False)
        out.append(row)
    return out


def refine_table(name: str, rows: list[dict]) -> Table:
    table = Table("file", "true D", "network", "refined D nm", "shape", "chi2/dof", "answer", "error", "refinement",
                  title=f"{name} --refine: synchrotron patterns", box=box.SIMPLE_HEAD)
    for r in rows:
        ref = r["refined"]
        net = r["pred"]["mean_diameter_nm"]
        ans = r["answer"]["mean_diameter_nm"]
        if "error" in ref:
            table.add_row(r["file"][:24], f"{r['true_d']:.2f}", f"{net:.2f}", "-", "-", "-", f"{ans:.2f}",
                          f"{ans - r['true_d']:+.2f}", ref["error"][:40])
            continue
        std = ref.get("mean_diameter_std_nm")
        table.add_row(short_name(Path(r["file"])), f"{r['true_d']:.2f}", f"{net:.2f} ({net - r['true_d']:+.2f})",
                      f"{ref['mean_diameter_nm']:.3f}" + ("" if std is None else f" ± {std:.3f}"),
                      str(ref.get("shape") or "-"), f"{ref['reduced_chi2']:.3g}", f"{ans:.2f}",
                      f"{ans - r['true_d']:+.2f}", (ref.get("verdict") or "")[:48])
    return table


def figures_line(label: str, s: dict) -> str:
    cover = "" if s["coverage_1sigma"] is None else \
        f", 1/2 sigma {ext.fmt(s['coverage_1sigma'], '.2f')}/{ext.fmt(s['coverage_2sigma'], '.2f')}"
    flagged = "" if s["flagged"] is None else f", flagged {ext.fmt(s['flagged'], '.2f')}"
    return (f"{label}: {s['n_scored']}/{s['n']} sized, MAE {ext.fmt(s['mae_nm'])} nm, mean error "
            f"{ext.fmt(s['bias_nm'], signed=True)} nm, within 0.25 nm {ext.fmt(s['within_0p25nm'], '.2f')}"
            f"{cover}{flagged}")


def file_table(name: str, rows: list[dict], peer_rows: list[dict] | None, files: list[dict]) -> Table:
    cols = ["file", "wl A", "true D", "pred D nm", "error", "disp %", "evid.", "flag"]
    if peer_rows is not None:
        cols += ["peer D", "peer err"]
    table = Table(*cols, title=f"{name}: synchrotron patterns (QDots-sizer, blind)", box=box.SIMPLE_HEAD)
    for k, (f, r) in enumerate(zip(files, rows)):
        if f["set"] != "synchrotron":
            continue
        p = r["pred"]
        cells = [short_name(f["path"]), f"{r['wavelength_angstrom']:.5f}", f"{r['true_d']:.2f}"]
        if p is None:
            cells += ["refused", "", "", "", ""]
        else:
            ev = p.get("material_evidence")
            cells += [f"{p['mean_diameter_nm']:.2f} ± {p['mean_diameter_std_nm']:.2f}",
                      f"{p['mean_diameter_nm'] - r['true_d']:+.2f}",
                      f"{p['size_dispersion_pct']:.1f} ± {p['size_dispersion_std_pct']:.1f}",
                      "-" if ev is None else f"{ev:.2f}", "OOD" if p["out_of_distribution"] else ""]
        if peer_rows is not None:
            q = peer_rows[k]["pred"]
            cells += ["-", ""] if q is None else [f"{q['mean_diameter_nm']:.1f}",
                                                  f"{q['mean_diameter_nm'] - r['true_d']:+.2f}"]
        table.add_row(*cells)
    return table


def lab_lines(rows: list[dict], peer_rows: list[dict] | None, files: list[dict]) -> list[str]:
    out = []
    for k, (f, r) in enumerate(zip(files, rows)):
        if f["set"] != "laboratory":
            continue
        head = f"  {short_name(f['path']):<15} {r['true_d']:5.2f}  "
        p = r["pred"]
        if p is None:
            why = r["refused"] or ""
            short = re.match(r"measured Q range (\S+) 1/A.*too short; the model needs (\S+) 1/A", why)
            if short:  # the whole message is in the JSON
                why = f"Q {short.group(1)} 1/A measured, {short.group(2)} 1/A needed"
            line = head + "refused: " + why
        else:
            line = head + (f"{p['mean_diameter_nm']:.2f} ± {p['mean_diameter_std_nm']:.2f} nm "
                           f"({p['mean_diameter_nm'] - r['true_d']:+.2f}), disp {p['size_dispersion_pct']:.1f} %"
                           + (", OOD" if p["out_of_distribution"] else ""))
        if peer_rows is not None and peer_rows[k]["pred"] is not None:
            q = peer_rows[k]["pred"]["mean_diameter_nm"]
            line += f"; peer {q:.1f} ({q - r['true_d']:+.2f})"
        out.append(line)
    return out


def per_file(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        p = r["pred"] or {}
        d = p.get("mean_diameter_nm")
        out.append({"file": r["file"], "set": r["set"], "wavelength_angstrom": r["wavelength_angstrom"],
                    "true_mean_diameter_nm": r["true_d"], "mean_diameter_nm": d,
                    "mean_diameter_std_nm": p.get("mean_diameter_std_nm"),
                    "error_nm": None if d is None else d - r["true_d"],
                    "size_dispersion_pct": p.get("size_dispersion_pct"),
                    "size_dispersion_std_pct": p.get("size_dispersion_std_pct"),
                    "material_evidence": p.get("material_evidence"),
                    "out_of_distribution": p.get("out_of_distribution"), "refused": r["refused"]})
    return out


def peer_path(arg: str | None, folder: Path) -> str | None:
    if arg:
        return arg
    if os.environ.get(PEER_ENV):
        return os.environ[PEER_ENV]
    for candidate in (folder / "peer" / "PbS_model.h5", folder.parent / "peer" / "PbS_model.h5"):
        if candidate.is_file():
            return str(candidate)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="model URIs or folders (models:/..., runs:/..., builtin:qdsize-pbs, "
                                              "a qdsize_model folder)")
    ap.add_argument("--data", metavar="DIR", help=f"folder with SYNCHR/ and LAB/; default ${ENV}")
    ap.add_argument("--peer", metavar="H5", help=f"the reference's PbS_model.h5 (default ${PEER_ENV}, else "
                                                 "DIR/peer or DIR/../peer)")
    ap.add_argument("--no-peer", action="store_true", help="leave the reference's network out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    ap.add_argument("--refine", action="store_true", help="then refine each synchrotron answer (predict --refine)")
    ap.add_argument("--refine-shape", default="auto", help="the refinement's shape (default auto)")
    ap.add_argument("--plots", metavar="DIR", help="with --refine: a figure of each fit into DIR")
    args = ap.parse_args()
    from qdsize.sim.errors import InputError

    try:
        run(args)
    except InputError as exc:
        raise SystemExit(str(exc)) from None


def run(args) -> None:
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    console = Console(width=110)
    folder = ext.data_folder(args.data, ENV, "--data", EXPECTED)
    if not (folder / "SYNCHR").is_dir():
        raise SystemExit(f"--data = {str(folder)!r}: no SYNCHR folder inside: expected {EXPECTED}")
    if args.peer and not Path(args.peer).is_file():
        raise SystemExit(f"--peer = {args.peer!r}: no such file: expected the reference's PbS_model.h5")
    from qdsize.ml import predict as pr

    predictors = {m: pr.load(m) for m in args.models}
    files = read_all(folder)
    n_sync = sum(f["set"] == "synchrotron" for f in files)
    n_lab = len(files) - n_sync
    if not n_sync:
        raise SystemExit(f"--data = {str(folder)!r}: no .xye file in SYNCHR: expected {EXPECTED}")
    peer, peer_line = (None, "peer: left out (--no-peer)") if args.no_peer else \
        ext.load_peer(peer_path(args.peer, folder))
    peer_rows = predict_peer(peer, files) if peer is not None else None

    results = {}
    for name, p in predictors.items():
        rows = predict_model(p, files)
        sync = [r for r, f in zip(rows, files) if f["set"] == "synchrotron"]
        lab = [r for r, f in zip(rows, files) if f["set"] == "laboratory"]
        console.print(file_table(name, rows, peer_rows, files))
        console.print(figures_line(f"{name}, synchrotron", ext.score(sync)))
        if peer_rows is not None:
            console.print(figures_line(f"{ext.PEER_NAME}, synchrotron",
                                       ext.score([r for r in peer_rows if r["set"] == "synchrotron"])))
        if lab:
            console.print(f"{name}: laboratory patterns (Cu K-alpha, blind)\n  {'file':<15} {'true D':>6} answer")
            for line in lab_lines(rows, peer_rows, files):
                console.print(line, overflow="ellipsis", no_wrap=True, highlight=False)
            console.print(figures_line(f"{name}, laboratory", ext.score(lab)))
        results[name] = {"blind": ext.score(sync), "told": None, "per_bin": ext.per_bin(sync),
                         "per_file": per_file(rows), "laboratory": ext.score(lab) if lab else None}
        if args.refine:
            plots = Path(args.plots) if args.plots else None
            refined = refine_rows(rows, files, args.refine_shape, plots, console)
            console.print(refine_table(name, refined))
            answered = [{**r, "pred": r["answer"]} for r in refined]
            console.print(figures_line(f"{name}, network", ext.score(refined)))
            console.print(figures_line(f"{name}, --refine answer", ext.score(answered)))
            accepted = sum(bool(r["refined"].get("accepted")) for r in refined)
            console.print(f"refinement accepted on {accepted}/{len(refined)}; "
                          f"{np.mean([r['refine_s'] for r in refined]):.1f} s a file", highlight=False)
            results[name]["refined"] = {"answer": ext.score(answered), "accepted": accepted, "per_file": [
                {"file": r["file"], "true_mean_diameter_nm": r["true_d"],
                 "network_mean_diameter_nm": r["pred"]["mean_diameter_nm"],
                 "answer_mean_diameter_nm": r["answer"]["mean_diameter_nm"], **r["refined"],
                 "seconds": r["refine_s"]} for r in refined]}
        console.print()
    wall = time.perf_counter() - t0
    data = (f"{n_sync} synchrotron .xye patterns (experimental-data_SYNCHR) and {n_lab} Cu K-alpha laboratory .xy "
            "patterns (experimental-data_LAB) of PbS quantum dots, measured by the QDots-sizer authors "
            "(DeByeUSerSYstem/QDots-sizer, commit 4cfc11d); true mean diameters from the file names; scored: the "
            "synchrotron set, blind (no resolution is known for these instruments)")
    console.print(peer_line)
    console.print(f"{len(files)} files, {len(predictors)} model(s): {wall:.1f} s; coverage: the fraction whose error "
                  "lies within 1 and 2 stated standard deviations (0.683 and 0.954 if honest)")
    if args.json:
        peer_doc = None
        if peer_rows is not None:
            ps = [r for r in peer_rows if r["set"] == "synchrotron"]
            pl = [r for r in peer_rows if r["set"] == "laboratory"]
            peer_doc = {"name": ext.PEER_NAME, "path": peer.path, "blind": ext.score(ps),
                        "laboratory": ext.score(pl) if pl else None, "per_file": per_file(peer_rows)}
        path = ext.write_json(args.json, BENCHMARK, data, results, peer=peer_doc, wall_s=round(wall, 1),
                              told_resolution=None)
        console.print(f"figures: {path}")


if __name__ == "__main__":
    main()
