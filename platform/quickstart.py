"""`make quickstart`: simulate, sweep, register a champion and predict the shipped examples on embedded defaults."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from qdsize.platform.figures import plot_patterns
from qdsize.platform.workspace import home
from qdsize.sim import io, pattern, scattering
from qdsize.sim.errors import InputError

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
GALLERY = [  # (label, mean diameter nm, dispersion %, shape, surface)
    ("3 nm sphere", 3.0, 0.0, "sphere", "as_cut"),
    ("6 nm sphere", 6.0, 0.0, "sphere", "as_cut"),
    ("10 nm sphere", 10.0, 0.0, "sphere", "as_cut"),
    ("6 nm, 15 % lognormal, Pb-rich cuboctahedra", 6.0, 15.0, "cuboctahedron", "cation_rich"),
]
# Experiment-like examples: (file name, x unit, wavelength A, mean nm, dispersion %, shape, surface, solvent)
EXAMPLE_SPECS = [
    ("pbs_A_toluene.xy", "q_A", None, 3.4, 8.0, "truncated_octahedron", "cation_rich", "toluene"),
    ("pbs_B_hexane.xye", "q_A", None, 5.2, 12.0, "cuboctahedron", "cation_rich", "hexane"),
    ("pbs_C_mo_ka.dat", "2theta", 0.7093, 7.6, 6.0, "sphere", "stoichiometric", "octane"),
    ("pbs_D_synchrotron.chi", "2theta", 0.2066, 9.3, 18.0, "cuboctahedron", "cation_rich", "toluene"),
    ("pbs_E_q_nm.csv", "q_nm", None, 4.5, 3.0, "cube", "cation_rich", "chloroform"),
    ("pbs_F_large.xy", "q_A", None, 11.0, 22.0, "truncated_octahedron", "stoichiometric", "hexane"),
]
TRUTH = re.compile(r"true mean_diameter_nm=([\d.]+) size_dispersion_pct=([\d.]+)")
WAVELENGTH = re.compile(r"wavelength_angstrom=([\d.]+)")


def simulate_gallery(out_dir: Path) -> list:
    """The README's pattern gallery: exact DSE of a few PbS samples (Mo K-alpha), written as .xy files."""
    q = scattering.q_grid(1.0, 10.0, 0.005)
    out = []
    for label, d, disp, shape, surface in GALLERY:
        p = pattern.simulate(q, diameter_nm=d, size_dispersion_pct=disp, shape=shape, surface=surface,
                             b_iso={"Pb": 1.0, "S": 1.2}, energy_kev=17.479)
        name = label.split(",")[0].replace(" ", "_") + ("_poly" if disp else "")
        io.write_pattern(out_dir / f"pbs_{name}.xy", q, p.intensity, p.params)
        out.append((label, p))
    return out


def write_examples(folder: Path, seed: int = 7) -> list[Path]:
    """Experiment-like patterns: exact DSE of PbS samples + realistic augmentation, in several formats and units."""
    import torch

    from qdsize.sim import augment, measured

    folder.mkdir(parents=True, exist_ok=True)
    q = scattering.q_grid(0.8, 12.0, 0.004)
    paths = []
    rng = np.random.default_rng(seed)
    for i, (name, unit, lam, d, disp, shape, surface, solvent) in enumerate(EXAMPLE_SPECS):
        b = {"Pb": float(rng.uniform(0.6, 2.0)), "S": float(rng.uniform(0.6, 2.5))}
        energy = scattering.energy_kev(lam) if lam else 17.479
        p = pattern.simulate(q, diameter_nm=d, size_dispersion_pct=disp, shape=shape, surface=surface, b_iso=b,
                             energy_kev=energy, centre="random", seed=i, strain=float(rng.uniform(-0.004, 0.004)),
                             microstrain_pct=float(rng.uniform(0, 0.3)))
        cfg = augment.load_preset("realistic")
        cfg.setdefault("solvent", {})["names"] = [solvent]
        aug = augment.from_config(cfg, q)
        y = aug(torch.as_tensor(p.intensity[None], dtype=torch.float32),
                torch.Generator().manual_seed(seed + i))[0].numpy()
        title = (f"qdsize example {name}: true mean_diameter_nm={p.params['mean_diameter_nm']:.3f} "
                 f"size_dispersion_pct={p.params['size_dispersion_pct']:.2f} shape={shape} surface={surface} "
                 f"solvent={solvent} B_Pb={b['Pb']:.2f} B_S={b['S']:.2f}"
                 + (f" wavelength_angstrom={lam}" if lam else ""))
        if unit == "q_A":
            x = q
        elif unit == "q_nm":
            x = q * 10.0
        else:
            keep = q * lam / (4 * np.pi) < 0.99
            x = scattering.two_theta_from_q(q[keep], lam)
            y = y[keep]
        sigma = np.sqrt(np.maximum(y, 1.0)) if name.endswith(".xye") else None
        path = measured.write_pattern_file(folder / name, x, y, x_unit=unit, wavelength_angstrom=lam,
                                           sigma=sigma, title=title)
        if path.suffix == ".csv":  # a CSV has no title line: the truth goes into a leading comment
            path.write_text(f"# {title}\n" + path.read_text(encoding="utf-8"), encoding="utf-8")
        paths.append(path)
    return paths


def true_labels(path: Path) -> tuple[float, float] | None:
    m = TRUTH.search(Path(path).read_text(encoding="utf-8", errors="replace")[:4000])
    return (float(m.group(1)), float(m.group(2))) if m else None


def _step(console, title: str):
    console.rule(f"[bold]{title}")
    return time.perf_counter()


def run(profile: str = "quickstart", trials: int | None = None, console: Console | None = None) -> dict:
    """The whole tour through the same code as the commands; re-running reuses what is complete."""
    from qdsize.platform import cli

    console = console or Console()
    ws = home()
    t0 = time.perf_counter()
    out_dir = ws / "quickstart"
    out_dir.mkdir(parents=True, exist_ok=True)

    t = _step(console, "1/4 exact DSE: a gallery of PbS patterns")
    gallery = simulate_gallery(out_dir)
    plot_patterns(out_dir / "pbs_patterns.png",
                  [(p.q_inv_angstrom, p.intensity / p.params["mean_atoms_per_particle"], label)
                   for label, p in gallery],
                  title="PbS nanocrystals, exact DSE (B: Pb 1.0, S 1.2 A^2; 17.48 keV)", log=True,
                  ylabel="I(Q) per atom (electron units)")
    console.print(f"gallery: {out_dir / 'pbs_patterns.png'} ({time.perf_counter() - t:.1f} s)")

    from qdsize.platform.simulate import init_ray

    started_ray = init_ray(None)  # one embedded Ray (loopback only) for the simulation and the sweep
    try:
        _simulate_and_sweep(cli, console, ws, profile, trials)
    finally:
        if started_ray:
            __import__("ray").shutdown()
    sweep_dir = ws / "sweeps" / profile


    t = _step(console, "4/4 qdsize predict examples/*")
    from qdsize.platform.cli_ml import resolve_model

    champion = "models:/qdsize-pbs@champion"
    predictor = resolve_model(champion, None)  # the sweep's own champion, whatever else is installed
    from qdsize.ml.predict import builtin, predict_files

    released = builtin()  # and the released model beside it, when this qdsize ships one
    files = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".xy", ".xye", ".dat", ".chi", ".csv"))
    table = Table("example", "true D (nm)", "predicted D (nm)", "true disp. (%)", "predicted disp. (%)",
                  "size class ok", *(["released model D (nm)"] if released is not None else []))
    rows = []
    for f in files:
        lam = WAVELENGTH.search(f.read_text(encoding="utf-8")[:2000]) if f.suffix == ".chi" else None
        read = {"wavelength_angstrom": float(lam.group(1)) if lam else None}
        res = predict_files([f], predictor, **read)[0]  # the library path of `qdsize predict`
        if "error" in res:
            raise InputError(res["error"])
        truth = true_labels(f)
        ok = truth is not None and res["size_class"][0] <= truth[0] < res["size_class"][1]
        rows.append({**res, "file": f.name, "true": truth})
        extra = []
        if released is not None:
            rel = predict_files([f], released, **read)[0]
            rows[-1]["released"] = rel
            extra = [f"{rel['mean_diameter_nm']:.2f} ± {rel['mean_diameter_std_nm']:.2f}"]
        table.add_row(f.name, f"{truth[0]:.2f}" if truth else "?",
                      f"{res['mean_diameter_nm']:.2f} ± {res['mean_diameter_std_nm']:.2f}",
                      f"{truth[1]:.1f}" if truth else "?",
                      f"{res['size_dispersion_pct']:.1f} ± {res['size_dispersion_std_pct']:.1f}", "yes" if ok else "no",
                      *extra)
    console.print(table)
    console.print(f"model: {predictor.model_uri} (version {predictor.model_version})"
                  + (f"; released model: {released.model_uri}" if released is not None else ""))
    (out_dir / "predictions.json").write_text(json.dumps(rows, indent=1))
    _cli(cli, ["predict", str(files[0]), "--model", champion, "--plot", str(out_dir / "prediction.png")])

    console.rule("[bold]where everything is")
    console.print(f"workspace        {ws}\n"
                  f"tracking store   sqlite:///{ws / 'mlflow.db'} (artifacts in {ws / 'mlartifacts'})\n"
                  f"dataset          {ws / 'datasets' / profile}\n"
                  f"sweep            {sweep_dir}\n"
                  f"figures          {out_dir}\n"
                  f"total time       {time.perf_counter() - t0:.0f} s")
    console.print("next:\n"
                  "  .venv/bin/qdsize ui                                   # browse runs, figures, the registry\n"
                  "  .venv/bin/qdsize predict my_sample.xy --format json   # your own data\n"
                  "  .venv/bin/qdsize simulate conf/dataset/pbs.yaml       # the full-size dataset\n"
                  "  .venv/bin/qdsize sweep conf/sweep/acnn.yaml           # the full sweep\n"
                  "  on a cluster: --address ray://HEAD:10001 (or RAY_ADDRESS) and --tracking-uri http://MLFLOW:5000")
    return {"rows": rows, "model_uri": predictor.model_uri}


def _simulate_and_sweep(cli, console, ws: Path, profile: str, trials: int | None) -> None:
    t = _step(console, f"2/4 qdsize simulate conf/dataset/{profile}.yaml (embedded Ray)")
    _cli(cli, ["simulate", str(REPO / f"conf/dataset/{profile}.yaml")])
    console.print(f"dataset ready ({time.perf_counter() - t:.1f} s)")

    t = _step(console, f"3/4 qdsize sweep conf/sweep/{profile}.yaml (Optuna + Ray Tune + MLflow)")
    state = ws / "sweeps" / profile / "sweep.json"
    args = ["sweep", str(REPO / f"conf/sweep/{profile}.yaml"), f"sweep.train={REPO / f'conf/train/{profile}.yaml'}"]
    args += ["--trials", str(trials)] if trials else []
    if state.exists() and json.loads(state.read_text()).get("finished"):
        console.print(f"sweep {profile!r} already finished: reusing its champion")
    else:
        _cli(cli, args + (["--resume"] if state.exists() else []))
        data = json.loads(state.read_text())
        data["finished"] = True
        state.write_text(json.dumps(data))
    console.print(f"sweep done ({time.perf_counter() - t:.1f} s)")


def _cli(cli, argv: list[str]) -> None:
    code = cli.main(argv)
    if code:
        raise SystemExit(code)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profile", default="quickstart", help="conf/{dataset,sweep}/PROFILE.yaml")
    ap.add_argument("--trials", type=int, default=None)
    ap.add_argument("--write-examples", type=Path, default=None,
                    help="write the experiment-like example files to this folder and stop")
    args = ap.parse_args()
    if args.write_examples:
        for p in write_examples(args.write_examples):
            print(p, true_labels(p))
        return
    np.seterr(all="ignore")
    run(args.profile, args.trials)


if __name__ == "__main__":
    sys.exit(main())
