"""Benchmark: models on the reference authors' Debussy patterns of PbS (QDots-sizer), scored blind and told.

The data, made by others and never committed here nor fetched at run time: `data_training/partN.tar.gz` (N = 1-50)
of the public repository DeByeUSerSYstem/QDots-sizer (GPL-3; Allara, Bertolotti, Guagliardi, npj Comput. Mater.
2024). Their patterns: Debussy (Debye-function) simulations of PbS spheres with a lognormal size distribution (Avg
= mean diameter nm, SD = std / mean %), a lattice factor Str, mixed by area with a measured hexane or toluene
pattern (Conc = % particles), Poisson noise by their `noisy` program (noisy = its scale; higher = less noise), each
scaled to an area of 1000 and stored as one column of 5004 intensities on Q = 0.99 + 0.0028 k 1/A. Part 51 is kept
out and never read. DIR holds the archives as fetched (partN.tar.gz, read in place) or folders partN extracted from
them; `._*` files are skipped.
Each pattern goes the way of `qdsize predict`: MeasuredPattern in Q, resampled onto the model's grid (refused when
it does not cover the grid's required range), then predicted in batches. Blind: no resolution (as `qdsize predict`
runs by default). Told: an ideal instrument, resolution (0, 0, 0): the reference's Debussy input (templates/
template.dwa, commit 4cfc11d) gives no instrumental profile (at most a wavelength e.s.d. of 1e-4, Delta Q / Q 1e-4).
Figures: within 0.25 nm, MAE, mean error, dispersion MAE, 1 and 2 sigma coverage, flagged and refused fractions,
overall, by label and by 1-nm bin of the true mean diameter; --json writes them for `qdsize model export --figures`.

    .venv/bin/python benchmarks/external_debussy.py MODEL [MODEL ...] --data DIR [--parts 1-50] [--max-files N]
        [--seed 7] [--json PATH]      (DIR also from QDSIZE_DEBUSSY_DIR)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich import box
from rich.console import Console
from rich.progress import track
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import external as ext  # noqa: E402

BENCHMARK = "external_debussy"
ENV = "QDSIZE_DEBUSSY_DIR"
EXPECTED = ("a folder holding the reference's data_training/partN.tar.gz (DeByeUSerSYstem/QDots-sizer, N = 1-50) "
            "or folders partN extracted from them")


def discover(folder: Path, parts: list[int], console: Console) -> tuple[list[tuple[int, Path, str, dict]], list[int]]:
    """[(part, its source, file name, labels)] of every pattern of the parts found; parts absent."""
    found, missing = ext.find_debussy_parts(folder, parts)
    if not found:
        raise SystemExit(f"--data = {str(folder)!r}: none of parts {ext_range(parts)} is there: expected {EXPECTED}")
    if any((folder / f"part{ext.KEPT_OUT_PART}{s}").exists() for s in ("", ".tar.gz", ".tgz")):
        console.print(f"part {ext.KEPT_OUT_PART} lies in {folder}: not read (kept out)")
    entries = []
    for n, src in track(sorted(found.items()), description="listing parts", console=console):
        names = ext.list_debussy_part(src)
        if not names:
            raise SystemExit(f"{src}: no .cal patterns inside: expected the reference's part{n}.tar.gz (if it is a "
                             "Git LFS pointer or truncated, fetch the real archive)")
        entries += [(n, src, name, ext.parse_debussy_name(name)) for name in names]
    return entries, missing


def ext_range(parts: list[int]) -> str:
    """'1-50' or '1-3, 7' for a sorted list of part numbers."""
    runs, start = [], None
    for i, n in enumerate(parts):
        if start is None:
            start = n
        if i + 1 == len(parts) or parts[i + 1] != n + 1:
            runs.append(f"{start}" if start == n else f"{start}-{n}")
            start = None
    return ", ".join(runs)


def load_patterns(entries, predictors: dict, console: Console):
    """Per model: (x, mask) of the accepted patterns, their row indices, and {row: refusal} for the rest."""
    from qdsize.sim import measured
    from qdsize.sim.errors import InputError

    by_part: dict[int, tuple[Path, dict[str, int]]] = {}
    for i, (n, src, name, _) in enumerate(entries):
        by_part.setdefault(n, (src, {}))[1][name] = i
    out = {m: {"x": [], "mask": [], "rows": [], "refused": {}} for m in predictors}

    def stream():
        for n, (src, wanted) in sorted(by_part.items()):
            for name, data in ext.iter_debussy_part(src, set(wanted)):
                yield wanted[name], name, data

    for i, name, data in track(stream(), total=len(entries), description="reading patterns", console=console):
        try:
            q, y = ext.read_cal(data, Path(name).name)
        except InputError as exc:
            for m in predictors:
                out[m]["refused"][i] = f"unreadable: {exc}"
            continue
        pattern = measured.MeasuredPattern(q, y, None, Path(name).name, "q_A")
        for m, p in predictors.items():
            try:
                xi, mi, _ = measured.resample(pattern, p.q_inv_angstrom)
            except InputError as exc:
                out[m]["refused"][i] = str(exc)
                continue
            out[m]["x"].append(xi)
            out[m]["mask"].append(mi.astype(bool))
            out[m]["rows"].append(i)
    return out


def predict_all(predictor, x: list, mask: list, resolution, batch: int, console: Console, what: str) -> list[dict]:
    preds = []
    for a in track(range(0, len(x), batch), description=what, console=console):
        xb = np.stack(x[a:a + batch])
        mb = np.stack(mask[a:a + batch]).astype(np.float32)
        preds += predictor.predict(xb, mb, resolution=resolution)
    return preds


def summary_table(name: str, rows: dict, entries, console: Console) -> None:
    """Figures overall and by noise level, concentration and solvent, blind and told."""
    table = Table("patterns", "res.", "n", "in .25", "MAE nm", "bias nm", "disp MAE", "1 sig", "2 sig", "flagged",
                  "refused", title=f"{name}: Debussy patterns (QDots-sizer)", box=box.SIMPLE_HEAD)
    groups = [("all", lambda lab: True)]
    for key, label, unit in (("noise", "noisy", ""), ("concentration_pct", "conc", " %"), ("solvent", "solv", "")):
        values = sorted({e[3][key] for e in entries if e[3][key] is not None}, key=lambda v: (str(type(v)), v))
        if len(values) > 1:
            groups += [(f"{label} {v:g}{unit}" if isinstance(v, float) else f"{label} {v}",
                        lambda lab, k=key, v=v: lab[k] == v) for v in values]
    for g, keep in groups:
        for mode in ("blind", "told"):
            if rows.get(mode) is None:
                continue
            s = ext.score([r for r in rows[mode] if keep(r["labels"])])
            if not s["n"]:
                continue
            table.add_row(g if mode == "blind" else "", mode, str(s["n"]), ext.fmt(s["within_0p25nm"]),
                          ext.fmt(s["mae_nm"]), ext.fmt(s["bias_nm"], signed=True),
                          ext.fmt(s["dispersion_mae_pct"], ".2f"), ext.fmt(s["coverage_1sigma"]),
                          ext.fmt(s["coverage_2sigma"]), ext.fmt(s["flagged"]), ext.fmt(s["refused"]))
    console.print(table)


def bin_table(name: str, bins: dict, console: Console) -> None:
    table = Table("true D nm", "n", "blind in .25", "blind MAE", "blind bias", "told MAE", "told bias",
                  title=f"{name}: by 1-nm bin of the true mean diameter", box=box.SIMPLE_HEAD)
    for b, v in bins.items():
        table.add_row(b, str(v["n"]), ext.fmt(v["within_0p25nm"]), ext.fmt(v["mae_nm"]),
                      ext.fmt(v["bias_nm"], signed=True), ext.fmt(v.get("told_mae_nm")),
                      ext.fmt(v.get("told_bias_nm"), signed=True))
    console.print(table)


def describe(entries, n_all: int, parts_found: list[int]) -> str:
    labs = [e[3] for e in entries]
    d = [lab["mean_diameter_nm"] for lab in labs]

    def values(key, unit=""):
        v = sorted({lab[key] for lab in labs if lab[key] is not None}, key=lambda x: (str(type(x)), x))
        return ", ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) + unit if v else "not labelled"

    sample = "all" if len(entries) == n_all else f"a random {len(entries)} of the {n_all}"
    return (f"{len(entries)} files ({sample} in parts {ext_range(parts_found)}): the reference authors' Debussy "
            "patterns of PbS spheres (DeByeUSerSYstem/QDots-sizer data_training), one column of 5004 intensities on "
            f"Q 0.99-15.0 1/A by 0.0028; mean diameters {min(d):g}-{max(d):g} nm, "
            f"SD {values('size_dispersion_pct', ' %')}, "
            f"solvent {values('solvent')} at Conc {values('concentration_pct', ' %')}, noisy scale {values('noise')}; "
            "told: an ideal instrument (resolution 0, 0, 0; their Debussy input has no instrumental profile)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="model URIs or folders (models:/..., runs:/..., builtin:qdsize-pbs, "
                                              "a qdsize_model folder)")
    ap.add_argument("--data", metavar="DIR", help=f"the reference's partN.tar.gz (or extracted partN folders); "
                                                  f"default ${ENV}")
    ap.add_argument("--parts", default="1-50", help="parts to read, e.g. 1-50 or 1,4,10-12 (51 is never read)")
    ap.add_argument("--max-files", type=int, default=None, metavar="N", help="score a random N of the files")
    ap.add_argument("--seed", type=int, default=7, help="seed of the --max-files draw")
    ap.add_argument("--batch", type=int, default=256, help="patterns per predict call")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
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
    parts = ext.parse_parts(args.parts)
    if args.max_files is not None and args.max_files < 1:
        raise SystemExit(f"--max-files = {args.max_files}: expected a positive number of files")
    if args.batch < 1:
        raise SystemExit(f"--batch = {args.batch}: expected a positive number of patterns")
    from qdsize.ml import predict as pr
    from qdsize.platform.cli_ml import resolution_warnings

    predictors = {m: pr.load(m) for m in args.models}
    entries, missing = discover(folder, parts, console)
    parts_found = sorted({e[0] for e in entries})
    if missing:
        console.print(f"parts not in {folder}: {ext_range(missing)} (scoring the {len(parts_found)} found)")
    n_all = len(entries)
    if args.max_files is not None and args.max_files < n_all:
        keep = np.sort(np.random.default_rng(args.seed).choice(n_all, args.max_files, replace=False))
        entries = [entries[i] for i in keep]
    loaded = load_patterns(entries, predictors, console)
    t_read = time.perf_counter() - t0

    results = {}
    for name, p in predictors.items():
        got = loaded[name]
        rows = {}
        told_by = ext.DEBUSSY_RESOLUTION if p.takes_resolution else None
        for line in resolution_warnings(p, ext.DEBUSSY_RESOLUTION):
            console.print(f"{name}: {line}")
        for mode, res in (("blind", None), ("told", told_by)):
            if mode == "told" and res is None:
                rows[mode] = None
                continue
            preds = predict_all(p, got["x"], got["mask"], res, args.batch, console, f"{mode}: {name}")
            pred_of = dict(zip(got["rows"], preds))
            rows[mode] = [{"file": e[2], "part": e[0], "labels": e[3], "true_d": e[3]["mean_diameter_nm"],
                           "true_disp": e[3]["size_dispersion_pct"], "pred": pred_of.get(i),
                           "refused": got["refused"].get(i)} for i, e in enumerate(entries)]
        summary_table(name, rows, entries, console)
        bins = ext.per_bin(rows["blind"], rows["told"])
        bin_table(name, bins, console)
        refusals = sorted(set(got["refused"].values()))
        for reason in refusals[:5]:
            console.print(f"refused: {reason}", overflow="ellipsis", no_wrap=True)
        if len(refusals) > 5:
            console.print(f"... and {len(refusals) - 5} other refusal messages")
        results[name] = {"blind": ext.score(rows["blind"]),
                         "told": None if rows["told"] is None else ext.score(rows["told"]),
                         "per_bin": bins, "grid_points": int(len(p.q_inv_angstrom)),
                         "told_resolution": None if told_by is None else list(told_by)}
    wall = time.perf_counter() - t0
    data = describe(entries, n_all, parts_found)
    console.print(data)
    console.print(f"{len(entries)} patterns, {len(predictors)} model(s): {wall:.1f} s ({t_read:.1f} s listing, "
                  f"reading and resampling); coverage: the fraction whose error lies within 1 and 2 stated standard "
                  "deviations (0.683 and 0.954 if honest)")
    if args.json:
        path = ext.write_json(args.json, BENCHMARK, data, results, wall_s=round(wall, 1),
                              parts=parts_found, parts_missing=missing, seed=args.seed,
                              told_resolution={"fwhm0_inv_angstrom": 0.0, "fwhm_relative": 0.0,
                                               "lorentz_fraction": 0.0, "source": "DeByeUSerSYstem/QDots-sizer "
                                               "templates/template.dwa (commit 4cfc11d): no instrumental profile"})
        console.print(f"figures: {path}")


if __name__ == "__main__":
    main()
