"""Benchmark: models on PbS patterns that other code simulated, made experiment-like by recipes written only here.

Nothing in these patterns comes from qdsize's simulator or augmentation:
  clusters     ASE (`ase.build.bulk("PbS", "rocksalt")`) cut here by a norm of the position: spheres (|r|),
               cubes (max |r_i|) and octahedra (sum |r_i|), each ladder at its own random centre; the cubes lose
               40 % of the S atoms in their outer 3 A (a Pb-rich surface, cut differently from qdsize's);
  scattering   DebyeCalculator (its own form factors and pair sum; float32) on its own Q grid, 0.5-14 1/A in steps
               of 0.01; the pair part and the self part apart, so that a Debye-Waller factor exp(-B Q^2 / 8 pi^2)
               with one B (0.5-2.5 A^2, drawn per sample) damps the pairs and leaves the self term;
  samples      4,000 diameters drawn from a number-weighted lognormal (mean 2.5-10 nm, dispersion 0-15 %), each
               taken as the nearest cluster of the ladder; the labels are the mean and the std/mean of the
               clusters' equal-volume diameters as drawn;
  experiment   a Gaussian resolution FWHM(Q) = sqrt(f0^2 + (rel Q)^2), f0 log-uniform 0.008-0.04 1/A and rel
               0.0005-0.003, as a matrix on the grid; a Q-axis error of up to +-0.3 %; what a blank subtraction
               leaves (a liquid's two broad maxima at -5 % to +30 %, a rising Compton-like term, a constant);
               Poisson counting noise with 10^3-10^5 counts at the maximum; a Q range from 0.6-1.15 to 7.5-14 1/A.
The patterns go through `qdsize predict`'s resampling onto the model's grid. Each model is scored blind (as
`qdsize predict` runs by default) and told each pattern's resolution (as `--resolution` from a calibrant): MAE,
the fraction within 0.25 nm and 2.5 points, the coverage of the stated 1 and 2 sigma, and how many are flagged.

With --refine N, N of the patterns are also refined from the first model's blind answer as `qdsize predict
--refine` does (sim/refine.py, its guard included): the network's, the reported (guarded) and the raw refined MAE
by subset, how many refinements were accepted and why not, and the time per pattern; --clean does the same on the
particles' clean patterns.

    .venv/bin/python benchmarks/independent_sim.py MODEL [MODEL ...] [--samples 1500] [--keep DIR]
    .venv/bin/python benchmarks/independent_sim.py builtin --samples 600 --keep DIR --refine 60 --clean
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

A_PBS = 5.936  # rock-salt lattice parameter (A)
SHAPES = ("sphere", "cube_pb_rich", "octahedron")
MATCHED = {"sphere": ("sphere", "as_cut"), "cube_pb_rich": ("cube", "cation_rich"),
           "octahedron": ("octahedron", "as_cut")}  # qdsize's nearest model of each (--refine-shape matched)


def ladder(shape: str, max_diameter_nm: float, step_nm: float, rng: np.random.Generator):
    """(equal-volume diameters nm, [ase.Atoms]) of one shape, each cut from one block at one random centre."""
    from ase.build import bulk

    n = int(math.ceil(max_diameter_nm * 10 * 1.5 / A_PBS)) + 2
    block = bulk("PbS", "rocksalt", a=A_PBS, cubic=True).repeat((n, n, n))
    r = block.get_positions() - block.get_cell().sum(axis=0) / 2 + rng.uniform(0, A_PBS, 3)
    norm = {"sphere": lambda: np.linalg.norm(r, axis=1), "cube_pb_rich": lambda: np.abs(r).max(axis=1),
            "octahedron": lambda: np.abs(r).sum(axis=1)}[shape]()
    order = np.argsort(norm, kind="stable")
    v_atom = A_PBS ** 3 / 8 / 1000  # nm^3
    diameters, clusters = [], []
    for d in np.arange(2.0, max_diameter_nm + 1e-9, step_nm):
        k = int(round(math.pi * d ** 3 / 6 / v_atom))
        cut = norm[order[k - 1]]  # every atom at the cut's norm is in: whole shells, no half-cut facets
        keep = norm <= cut + 1e-6
        if shape == "cube_pb_rich":
            outer_s = keep & (norm > cut - 3.0) & (block.numbers == 16)
            keep &= ~(outer_s & (rng.random(len(keep)) < 0.4))
        atoms = block[keep]
        diameter = (6 * len(atoms) * v_atom / math.pi) ** (1 / 3)
        if diameters and abs(diameter - diameters[-1]) < 1e-3:
            continue
        diameters.append(diameter)
        clusters.append(atoms)
    return np.array(diameters), clusters


def ladder_intensities(shape: str, max_diameter_nm: float, step_nm: float, seed: int, keep: Path | None):
    """(Q, diameters, pair part (n, q), self part (n, q)) by DebyeCalculator, per particle; cached in `keep`."""
    cache = keep / f"{shape}_{max_diameter_nm:g}_{step_nm:g}_{seed}.npz" if keep else None
    if cache is not None and cache.exists():
        z = np.load(cache)
        return z["q"], z["d"], z["pair"], z["self"]
    from debyecalculator import DebyeCalculator

    device = "cuda" if torch.cuda.is_available() else "cpu"
    calc = DebyeCalculator(qmin=0.5, qmax=14.0, qstep=0.01, biso=0.0, device=device)
    single = {z: calc.iq(([el], np.zeros((1, 3))))[1] for z, el in ((82, "Pb"), (16, "S"))}
    d, clusters = ladder(shape, max_diameter_nm, step_nm, np.random.default_rng(seed))
    pair, self_part = [], []
    for atoms in track(clusters, description=f"DebyeCalculator, {shape} ladder"):
        q, i_pair = calc.iq(atoms, include_self_scattering=False)
        pair.append(np.asarray(i_pair, dtype=np.float64))
        self_part.append(sum(np.count_nonzero(atoms.numbers == z) * np.asarray(s, np.float64)
                             for z, s in single.items()))
    q, pair, self_part = np.asarray(q, np.float64), np.array(pair), np.array(self_part)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, q=q, d=d, pair=pair, self=self_part)
    return q, d, pair, self_part


def sample(q, d, pair, self_part, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """One experiment-like pattern: (Q measured, intensity, truth and conditions)."""
    mean = rng.uniform(2.5, min(10.0, 0.8 * d[-1]))  # a dispersed sample's tail stays on the ladder
    cv = rng.uniform(0.0, 0.15)
    s2 = math.log1p(cv ** 2)
    draws = np.exp(rng.normal(math.log(mean) - s2 / 2, math.sqrt(s2), 4000)) if cv > 0 else np.full(4000, mean)
    idx = np.abs(draws[:, None] - d[None, :]).argmin(axis=1)
    w = np.bincount(idx, minlength=len(d)).astype(np.float64)
    w /= w.sum()
    true_mean = float(w @ d)
    true_cv = float(math.sqrt(max(w @ (d - true_mean) ** 2, 0.0)) / true_mean * 100)
    b_iso = rng.uniform(0.5, 2.5)
    y = np.exp(-b_iso * q ** 2 / (8 * math.pi ** 2)) * (w @ pair) + w @ self_part
    q_measured, y_measured, conditions = experiment(q, y, rng)
    return q_measured, y_measured, {"mean_diameter_nm": true_mean, "size_dispersion_pct": true_cv, "b_iso": b_iso,
                                    "clean": y, **conditions}


def experiment(q: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """A clean pattern made experiment-like: (Q measured, intensity, conditions). Resolution, what a blank
    subtraction leaves, Poisson noise, a Q-axis error and a Q range, as the module docstring says."""
    # instrument: Gaussian FWHM(Q) as a row-normalised matrix
    f0, rel = math.exp(rng.uniform(math.log(0.008), math.log(0.04))), rng.uniform(0.0005, 0.003)
    sigma = np.sqrt(f0 ** 2 + (rel * q) ** 2) / (2 * math.sqrt(2 * math.log(2)))
    kernel = np.exp(-0.5 * ((q[None, :] - q[:, None]) / sigma[:, None]) ** 2)
    y = (kernel / kernel.sum(axis=1, keepdims=True)) @ y
    # what a blank subtraction leaves, relative to the particles' mean intensity
    level = y.mean()
    liquid = np.exp(-0.5 * ((q - rng.normal(1.35, 0.1)) / 0.35) ** 2) \
        + 0.4 * np.exp(-0.5 * ((q - rng.normal(2.9, 0.2)) / 0.6) ** 2)
    y = y + level * (rng.uniform(-0.05, 0.3) * liquid + rng.uniform(0, 0.3) * (1 - np.exp(-(q / 4) ** 2))
                     + rng.uniform(0, 0.1))
    y = np.clip(y, 0, None)
    counts = math.exp(rng.uniform(math.log(1e3), math.log(1e5)))
    scale = counts / y.max()
    y = rng.poisson(y * scale) / scale
    q_measured = q * (1 + rng.uniform(-0.003, 0.003))
    keep = (q_measured >= rng.uniform(0.6, 1.15)) & (q_measured <= rng.uniform(7.5, 14.0))
    return q_measured[keep], y[keep], {"resolution": (f0, rel, 0.0), "max_counts": counts}


def scores(pred: dict, d: np.ndarray, s: np.ndarray) -> dict:
    err = np.abs(pred["mean_diameter_nm"] - d)
    s_err = np.abs(np.maximum(pred["size_dispersion_pct"], 0) - s)
    z = err / pred["mean_diameter_std_nm"]
    return {"MAE nm": err.mean(), "within 0.25 nm": np.mean(err <= 0.25), "disp. MAE pts": s_err.mean(),
            "joint within": np.mean((err <= 0.25) & (s_err <= 2.5)), "1 sigma": np.mean(z <= 1),
            "2 sigma": np.mean(z <= 2), "bias nm": float(np.mean(pred["mean_diameter_nm"] - d))}


def refine_subsets(d: np.ndarray, shape_of: np.ndarray) -> dict:
    """Subsets scored for the refinement: all, each shape, each 1-nm size bin."""
    groups = {"all": np.ones(len(d), bool), **{sh: shape_of == sh for sh in SHAPES}}
    for lo in range(2, 10):
        sel = (d >= lo) & (d < lo + 1)
        if sel.any():
            groups[f"{lo}-{lo + 1} nm"] = sel
    return groups


def refine_benchmark(args, predictor, x, mask, truth, shape_of, console) -> dict:
    """Refine N patterns from the network's blind answers; print network / guarded / raw refined MAE by subset,
    the acceptance rate and the time per pattern (and the same for the clean patterns with --clean)."""
    import time

    from qdsize.ml import evaluate
    from qdsize.sim import refine as rf

    pick = np.unique(np.linspace(0, len(truth) - 1, min(args.refine, len(truth))).round().astype(int))
    pred = evaluate.predict_arrays(predictor.model, x[pick], mask[pick])
    rng = np.random.default_rng(args.seed + 1000)
    cases = {"experiment-like": [(t["q_measured"], t["y_measured"]) for t in (truth[i] for i in pick)]}
    if args.clean:
        q_clean = truth[0]["q"]
        keep = (q_clean >= 1.0) & (q_clean <= 10.0)
        cases["clean"] = []
        for i in pick:
            c = truth[i]["clean"][keep]
            scale = 1e5 / c.max()
            cases["clean"].append((q_clean[keep], rng.poisson(c * scale).astype(np.float64)))
    from qdsize.sim import measured

    d = np.array([truth[i]["mean_diameter_nm"] for i in pick])
    q_hi = max(float(qq[-1]) for pats in cases.values() for qq, _ in pats)
    # one table per model family for all patterns: built once
    lad_range = rf.fit_ladder_range(np.array([1.0, q_hi]))[:2]
    if args.refine_shape != "matched":  # the families `qdsize predict --refine --shape SHAPE` tries
        from qdsize.sim.refine import fit_options

        cli_models = fit_options({"shape": args.refine_shape}).get("models") or [{"shape": args.refine_shape}]
        auto = {(m["shape"], m.get("surface", rf.DEFAULT_LADDER["surface"])): rf.load_ladder(*lad_range, spec=m)
                for m in cli_models}
    else:
        models = {sh: {"shape": MATCHED[sh][0], "surface": MATCHED[sh][1]} for sh in SHAPES}
        ladders = {sh: rf.load_ladder(*lad_range, spec=spec) for sh, spec in models.items()}
    out = {}
    for kind, pats in cases.items():
        if kind == "clean":  # the network's answer on the clean pattern is the start there
            xs, ms = zip(*[measured.resample(measured.MeasuredPattern(qq, yy, None, "clean", "q_A"),
                                             predictor.q_inv_angstrom)[:2] for qq, yy in pats])
            p = evaluate.predict_arrays(predictor.model, np.array(xs), np.array(ms))
        else:
            p = pred
        net, rep, raw, acc, secs, why = [], [], [], [], [], []
        for k, (qq, yy) in enumerate(pats):
            start = {"mean_diameter_nm": float(p["mean_diameter_nm"][k]),
                     "mean_diameter_std_nm": float(p["mean_diameter_std_nm"][k]),
                     "size_dispersion_pct": float(max(p["size_dispersion_pct"][k], 0.0)),
                     "size_dispersion_std_pct": float(p["size_dispersion_std_pct"][k])}
            t = time.perf_counter()
            try:
                if args.refine_shape != "matched":  # as `qdsize predict --refine` does
                    r = rf.refine_models(qq, yy, start, models=cli_models, ladders=auto,
                                         name=f"pattern {pick[k]}").refined
                else:
                    r = rf.refine(qq, yy, start, ladder=ladders[shape_of[pick[k]]], name=f"pattern {pick[k]}").refined
                rep.append(r["answer"]["mean_diameter_nm"])
                raw.append(r["mean_diameter_nm"])
                acc.append(r["accepted"])
                why.append(r["verdict"])
            except Exception as exc:  # noqa: BLE001 -- a benchmark counts failures, it does not stop on them
                rep.append(start["mean_diameter_nm"])
                raw.append(np.nan)
                acc.append(False)
                why.append(f"error: {exc}")
            secs.append(time.perf_counter() - t)
            net.append(start["mean_diameter_nm"])
        net, rep, raw, acc = np.array(net), np.array(rep), np.array(raw), np.array(acc)
        table = Table("subset", "n", "network MAE nm", "reported MAE nm", "difference", "raw refined MAE nm",
                      "accepted", "accepted: network / refined MAE", title=f"refinement, {kind} patterns")
        figs = {}
        for g, sel in refine_subsets(d, shape_of[pick]).items():
            e_net, e_rep, e_raw = (np.abs(v[sel] - d[sel]) for v in (net, rep, raw))
            a = acc[sel]
            figs[g] = {"n": int(sel.sum()), "network_mae_nm": float(e_net.mean()),
                       "reported_mae_nm": float(e_rep.mean()),
                       "raw_refined_mae_nm": float(np.nanmean(e_raw)) if np.isfinite(e_raw).any() else None,
                       "accepted": float(a.mean())}
            table.add_row(g, str(sel.sum()), f"{e_net.mean():.3f}", f"{e_rep.mean():.3f}",
                          f"{e_rep.mean() - e_net.mean():+.3f}",
                          f"{np.nanmean(e_raw):.3f}" if np.isfinite(e_raw).any() else "-", f"{a.mean():.2f}",
                          f"{e_net[a].mean():.3f} / {e_rep[a].mean():.3f}" if a.any() else "-")
        console.print(table)
        reasons = {}
        for w in why:
            key = w.split(" (")[0].split(",")[0][:70]
            reasons[key] = reasons.get(key, 0) + 1
        console.print(f"{kind}: {np.median(secs):.2f} s a refinement (median; max {max(secs):.2f} s); verdicts: "
                      + "; ".join(f"{n} x {k}" for k, n in sorted(reasons.items(), key=lambda kv: -kv[1])))
        out[kind] = {"subsets": figs, "seconds_median": float(np.median(secs))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="model URIs or folders (models:/..., runs:/..., a qdsize_model folder)")
    ap.add_argument("--samples", type=int, default=1500, help="patterns in all, shared among the shapes")
    ap.add_argument("--max-diameter", type=float, default=13.0, help="largest cluster of each ladder (nm)")
    ap.add_argument("--step", type=float, default=0.25, help="ladder step in equal-volume diameter (nm)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", metavar="DIR", help="keep the DebyeCalculator ladders in DIR (reused when present)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON (`qdsize model export --figures`)")
    ap.add_argument("--refine", type=int, default=0, metavar="N",
                    help="also refine N of the patterns (spread over the set) from the first model's blind answer "
                         "(`qdsize predict --refine`): network, guarded and raw refined MAE by subset")
    ap.add_argument("--refine-shape", default="auto",
                    help="with --refine: the model's shape as `qdsize predict --refine --shape` takes it ('auto': the "
                         "best of qdsize.sim.refine.AUTO_MODELS; a shape: it with each of AUTO_SURFACES), or 'matched' "
                         "(each pattern's own shape and surface, one family)")
    ap.add_argument("--clean", action="store_true",
                    help="with --refine: also refine the same particles' clean patterns (Q 1-10 1/A, no instrument or "
                         "background, Poisson noise at 10^5 counts)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from qdsize.ml import evaluate
    from qdsize.ml import predict as pr
    from qdsize.sim import measured

    console = Console(width=max(Console().width, 150))
    predictors = {m: pr.load(m) for m in args.models}
    grid = next(iter(predictors.values())).q_inv_angstrom
    if any(not np.array_equal(p.q_inv_angstrom, grid) for p in predictors.values()):
        raise SystemExit("models: all must share one Q grid")
    keep = Path(args.keep) if args.keep else None
    rng = np.random.default_rng(args.seed)
    x, mask, truth, shape_of = [], [], [], []
    for k, shape in enumerate(SHAPES):
        q, d, pair, self_part = ladder_intensities(shape, args.max_diameter, args.step, args.seed + k, keep)
        for _ in range(args.samples // len(SHAPES)):
            qm, y, t = sample(q, d, pair, self_part, rng)
            if args.refine:
                t.update(q=q, q_measured=qm, y_measured=y)
            else:
                t.pop("clean")
            pattern = measured.MeasuredPattern(qm, y, None, f"{shape} sample", "q_A")
            xi, mi, _ = measured.resample(pattern, grid)  # zero where not measured
            x.append(xi)
            mask.append(mi)
            truth.append(t)
            shape_of.append(shape)
    x, mask, shape_of = np.array(x), np.array(mask), np.array(shape_of)
    d = np.array([t["mean_diameter_nm"] for t in truth])
    s = np.array([t["size_dispersion_pct"] for t in truth])
    res = np.array([t["resolution"] for t in truth], dtype=np.float32)

    groups = {"all": np.ones(len(d), bool), **{sh: shape_of == sh for sh in SHAPES},
              "mean < 6 nm": d < 6, "mean >= 6 nm": d >= 6}
    figures = {}
    for name, p in predictors.items():
        figures[name] = {"per_bin": {}}
        table = Table("patterns", "resolution", "MAE nm", "within 0.25 nm", "disp. MAE pts", "joint within",
                      "1 sigma", "2 sigma", "bias nm", "flagged", title=name)
        flagged = np.zeros(len(d), bool)
        if p.physics is not None:
            flagged = p.physics.flags(x, mask)[1]
        for told in (False, True):
            pred = evaluate.predict_arrays(p.model, x, mask,
                                           resolution=res if told and p.takes_resolution else None)
            flagged_all = flagged | (pred["ood_score"] > float(p.model.ood_threshold))
            m = scores(pred, d, s)
            figures[name]["told" if told else "blind"] = {
                "n": int(len(d)), "within_0p25nm": m["within 0.25 nm"], "mae_nm": m["MAE nm"], "bias_nm": m["bias nm"],
                "dispersion_mae_pct": m["disp. MAE pts"], "joint_within": m["joint within"],
                "coverage_1sigma": m["1 sigma"], "coverage_2sigma": m["2 sigma"], "flagged": flagged_all.mean()}
            if not told:
                for lo in range(2, 10):
                    sel = (d >= lo) & (d < lo + 1)
                    if sel.any():
                        e = pred["mean_diameter_nm"][sel] - d[sel]
                        figures[name]["per_bin"][f"{lo}-{lo + 1}"] = {
                            "n": int(sel.sum()), "bias_nm": float(e.mean()), "mae_nm": float(np.abs(e).mean()),
                            "within_0p25nm": float(np.mean(np.abs(e) <= 0.25))}
            for g, sel in groups.items():
                m = scores({k: v[sel] for k, v in pred.items()}, d[sel], s[sel])
                table.add_row(f"{g} ({sel.sum()})", "told" if told else "blind",
                              *[f"{m[k]:.3f}" for k in ("MAE nm", "within 0.25 nm", "disp. MAE pts", "joint within",
                                                        "1 sigma", "2 sigma")],
                              f"{m['bias nm']:+.3f}", f"{flagged_all[sel].mean():.3f}")
        console.print(table)
    console.print(f"{len(d)} patterns: DebyeCalculator ladders of {', '.join(SHAPES)} (2-{args.max_diameter:g} nm, "
                  f"step {args.step:g} nm), mean diameters 2.5-10 nm, dispersion 0-15 %; coverage: the fraction "
                  "whose error lies within 1 and 2 stated standard deviations (0.683 and 0.954 if honest)")
    if args.refine:
        refine_benchmark(args, next(iter(predictors.values())), x, mask, truth, shape_of, console)
    if args.json:
        from external import write_json

        data = (f"{len(d)} experiment-like patterns: ASE clusters ({', '.join(SHAPES)}), DebyeCalculator, recipes "
                "written apart from qdsize's augmentation; mean diameters 2.5-10 nm, dispersion 0-15 %")
        console.print(f"wrote {write_json(args.json, 'independent_sim', data, figures)}")


if __name__ == "__main__":
    main()
