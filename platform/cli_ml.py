"""Commands of the learning half: `qdsize train`, `evaluate`, `sweep`, `ui` (registered on the main Typer app)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from qdsize.platform.cli import app
from qdsize.sim.errors import InputError


# options of every command that reads measured files
X_UNIT = typer.Option(None, "--x-unit", help="q_A (1/A), q_nm (1/nm) or 2theta (degrees).")
WAVELENGTH = typer.Option(None, "--wavelength-angstrom", "--wavelength", help="Wavelength for 2-theta data (A).")
ENERGY = typer.Option(None, "--energy-kev", help="Photon energy for 2-theta data (keV).")


def load_train_config(path: Path, overrides: list[str]):
    from qdsize.ml.train import TrainFile
    from qdsize.platform import config as conf

    return conf.load(TrainFile, path, overrides)


@app.command()
def train(
    config: Path = typer.Argument(..., help="Training config (conf/train/acnn.yaml)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. train.epochs=5"),
    register: bool = typer.Option(False, "--register", help="Register the model; champion only if better."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                                               help="MLflow server (default: the workspace SQLite store)."),
):
    """Train one network on a simulated dataset, tracked in MLflow."""
    from qdsize.ml.train import train as run_train
    from qdsize.platform import tracking

    loaded = load_train_config(config, overrides or [])
    cfg = loaded.config.train
    from qdsize.ml.train import resolve_dataset

    uri = tracking.setup(tracking_uri)
    experiment = cfg.experiment or f"qdsize-{Path(resolve_dataset(cfg.dataset)).name}"
    exp_id = tracking.ensure_experiment(experiment)
    result = run_train(cfg, tracking_uri=uri, experiment_id=exp_id)
    _print_scores(result)
    if register:
        scores = {k: v for k, v in result.items() if k.startswith(("benchmark_", "seedgrid_"))}
        decision = tracking.register(result["model_uri"], scores, run_id=result["run_id"])
        typer.echo(f"registered {tracking.REGISTERED_MODEL} v{decision['version']}: "
                   f"{'now champion' if decision['champion'] else 'champion unchanged'} ({decision['decision']})")
    typer.echo(f"run {result['run_id']} in {uri}; model {result['model_uri']}")


LARGE_DOT_NM = 7.0  # above this the unknown instrument width moves the blind sizes most (size bias by fwhm0)


def resolution_hint(rows: list[dict], predictor, told) -> str | None:
    """A note when large dots were sized without the instrument resolution a model could have taken."""
    large = [r for r in rows if r["mean_diameter_nm"] >= LARGE_DOT_NM]
    if told is not None or not large or not predictor.takes_resolution:
        return None
    return (f"{len(large)} pattern(s) sized at {LARGE_DOT_NM:g} nm or more without the instrument resolution, "
            "which limits large sizes most: measure a calibrant (`qdsize resolution FILE --standard LaB6`) and "
            "pass --resolution")


def resolution_warnings(predictor, told) -> list[str]:
    """What a user should know about the resolution they gave: ignored by an older model, or outside training."""
    if not predictor.takes_resolution:
        return [f"--resolution: model {predictor.model_uri} was trained without a resolution input; ignored"]
    from qdsize.ml.model import RESOLUTION_KEYS

    trained = predictor.card.get("resolution_trained") or {}
    out = []
    for name, v in zip(RESOLUTION_KEYS, told):
        lo, hi = trained.get(name, (0.0, float("inf")))
        if not lo - 1e-12 <= v <= hi + 1e-12:
            out.append(f"--resolution {name} = {v:g} lies outside what the model was trained on [{lo:g}, {hi:g}]; "
                       "the estimates may be biased")
    return out


@app.command()
def evaluate(
    model_uri: str = typer.Argument(..., help="models:/qdsize-pbs@champion, models:/m-..., or a model folder."),
    dataset: Path = typer.Argument(..., help="Dataset folder."),
    split: list[str] = typer.Option(["benchmark", "seedgrid"], "--split", help="Splits to score."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI"),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for figures (confusion matrices, CAMs)."),
):
    """Score a model on dataset splits (the frozen ones by default) with the training metrics and figures."""
    from qdsize.ml import data, evaluate as ev, predict
    from qdsize.platform import tracking
    from qdsize.platform.config import FROZEN_SPLITS

    tracking.setup(tracking_uri)
    pred_model = predict.load(model_uri)
    # the frozen splits' instrument, told to a network that takes it (as for the named scores of a training run);
    # scored without it too, as `qdsize predict` runs by default
    instrument = data.instrument_of(dataset) if pred_model.takes_resolution else None
    q = data.q_grid(dataset)
    if len(q) != len(pred_model.q_inv_angstrom) or abs(q - pred_model.q_inv_angstrom).max() > 1e-9:
        raise InputError(f"dataset = {str(dataset)!r}: its Q grid differs from the model's")
    rows = {}
    for s in split:
        x, lab = data.read_split(dataset, s)
        for name, res in ev.frozen_protocols(s, instrument if s in FROZEN_SPLITS else None):
            p = ev.predict_arrays(pred_model.model, x, resolution=res)
            rows[name.replace("_blind", " (blind)")] = ev.metrics(
                p, lab["mean_diameter_nm"], lab["size_dispersion_pct"], lab["size_class"], lab["dispersion_class"])
            if out is not None and name == s:
                out.mkdir(parents=True, exist_ok=True)
                for head, edges, unit, label in (("size", ev.SIZE_EDGES_NM, "nm", "size_class"),
                                                 ("dispersion", ev.DISPERSION_EDGES_PCT, "%", "dispersion_class")):
                    cm = ev.confusion(lab[label], p[f"{head}_probs"].argmax(1), len(edges) - 1)
                    ev.plot_confusion(cm, edges, unit, f"{s}: {head}", out / f"confusion_{s}_{head}.png")
    from rich.console import Console
    from rich.table import Table

    keys = sorted({k for m in rows.values() for k in m})
    table = Table("metric", *rows)
    for k in keys:
        table.add_row(k, *[f"{rows[s].get(k, float('nan')):.4f}" for s in rows])
    Console(width=None if sys.stdout.isatty() else 160).print(table)  # piped or saved: not cut to 80 columns
    if instrument is not None:
        f0, rel, eta = (float(v) for v in instrument)
        typer.echo(f"benchmark and seedgrid: the network was told the splits' instrument resolution (FWHM0 {f0:g} "
                   f"1/A, relative {rel:g}, eta {eta:g}), as `qdsize predict --resolution {f0:g},{rel:g}` does; "
                   f"'(blind)': not told, as `qdsize predict` runs by default")


@app.command()
def sweep(
    config: Path = typer.Argument(..., help="Sweep config (conf/sweep/acnn.yaml)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. sweep.max_epochs=5"),
    trials: Optional[int] = typer.Option(None, "--trials", help="Number of trials (default: from the config)."),
    address: Optional[str] = typer.Option(None, "--address", envvar="RAY_ADDRESS", help="Ray cluster address."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                                               help="MLflow server; default: a local server over the workspace."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted sweep of the same name."),
):
    """Search architectures and augmentation strengths; register the winner, champion only if it is better."""
    from qdsize.platform import sweep as sw

    loaded = sw.load_sweep_config(config, overrides or [])
    res = sw.sweep(loaded, trials=trials, address=address, tracking_uri=tracking_uri, resume=resume)
    best = res["best"]
    reg = res["registration"]
    typer.echo(f"{res['completed']} trials finished training; best {loaded.config.sweep.metric} = "
               f"{best[loaded.config.sweep.metric]:.4f} (run {best['run_id']})")
    typer.echo(f"registered {reg['version']}: {'champion' if reg['champion'] else 'not champion'} "
               f"({reg['decision']})")


@app.command()
def ui(
    port: int = typer.Option(5000, help="Port on 127.0.0.1."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI"),
):
    """Open the MLflow UI on the configured tracking store (Ctrl-C to stop)."""
    import subprocess

    from qdsize.platform import tracking

    uri = tracking.tracking_uri(tracking_uri)
    typer.echo(f"MLflow UI for {uri} on http://127.0.0.1:{port}")
    subprocess.run([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                    "--port", str(port)], check=False)


def _print_scores(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("score", "value")
    for k, v in result.items():
        if isinstance(v, float):
            table.add_row(k, f"{v:.4f}")
    Console().print(table)


def resolve_model(model_uri: str | None, tracking_uri: str | None):
    """--model, else the tracking store's champion unless the released model scores better, else the released model
    (platform.models.resolve); a passed-over champion is named on stderr."""
    from qdsize.platform import models

    return models.resolve(model_uri, tracking_uri, warn=lambda m: typer.echo(f"qdsize: warning: {m}", err=True))


@app.command()
def predict(
    files: list[Path] = typer.Argument(..., help="Measured patterns (.xy .xye .dat .chi .csv ...)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model URI or folder (default: champion, then "
                                        "the released model)."),
    x_unit: Optional[str] = X_UNIT,
    wavelength_angstrom: Optional[float] = WAVELENGTH,
    energy_kev: Optional[float] = ENERGY,
    fmt: str = typer.Option("table", "--format", help="table, json or csv."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG (one file) or folder (several files)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI"),
    refine: bool = typer.Option(False, "--refine", help="Then refine each estimate by an exact DSE least-squares fit."),
    resolution: Optional[str] = typer.Option(
        None, "--resolution", metavar="FWHM0,REL[,ETA]",
        help="Instrument resolution from a calibrant (`qdsize resolution`): FWHM(Q) = sqrt(FWHM0^2 + (REL Q)^2) in "
             "1/A, pseudo-Voigt with Lorentzian fraction ETA (default 0). Sharper sizes for large dots."),
):
    """Mean size and size dispersion, with uncertainties, of each measured pattern."""
    import numpy as np

    from qdsize.ml.predict import check_resolution
    from qdsize.sim import measured

    if fmt not in ("table", "json", "csv"):
        raise InputError(f"--format = {fmt!r}: expected table, json or csv")
    told = None
    if resolution is not None:
        told = check_resolution(resolution)
    predictor = resolve_model(model, tracking_uri)
    if told is not None:
        for line in resolution_warnings(predictor, told):
            typer.echo(f"qdsize: warning: {line}", err=True)
    q = predictor.q_inv_angstrom
    rows, failures, inputs = [], [], []
    for f in files:
        try:
            pat = measured.read_pattern(f, x_unit=x_unit, wavelength_angstrom=wavelength_angstrom,
                                        energy_kev=energy_kev)
            y, mask, warns = measured.resample(pat, q)
        except InputError as exc:
            failures.append(str(exc))
            continue
        for w in [*pat.warnings, *warns]:
            typer.echo(f"qdsize: warning: {f}: {w}", err=True)
        inputs.append((f, y, mask))
    if inputs:
        x = np.stack([y for _, y, _ in inputs])
        m = np.stack([mk for _, _, mk in inputs])
        for (f, _, _), res in zip(inputs, predictor.predict(x, m, resolution=told)):
            rows.append({"file": str(f), **res})
    if refine and rows:
        from qdsize.platform.cli_refine import emit_refined, refine_rows

        rows = refine_rows(rows, [f for f, _, _ in inputs], x_unit=x_unit,
                           wavelength_angstrom=wavelength_angstrom, energy_kev=energy_kev)
    _emit(rows, fmt)
    hint = resolution_hint(rows, predictor, told)
    if hint:
        typer.echo(f"qdsize: note: {hint}", err=True)
    if refine and rows and fmt == "table":
        emit_refined(rows, "table")
    if plot is not None and inputs:
        from qdsize.platform.figures import plot_prediction

        for i, ((f, y, mk), res) in enumerate(zip(inputs, rows)):
            target = plot if len(inputs) == 1 and plot.suffix == ".png" else Path(plot) / f"{Path(f).stem}.png"
            cam = predictor.model.class_activation_map(
                __import__("torch").as_tensor(y[None]), __import__("torch").as_tensor(mk[None]))[0]
            plot_prediction(target, q, y, mk, cam.detach().numpy(), res, predictor.size_edges_nm,
                            predictor.dispersion_edges_pct)
    for line in failures:
        typer.echo(f"qdsize: error: {line}", err=True)
    if failures:
        sys.exit(2)


@app.command()
def resolution(
    file: Path = typer.Argument(..., help="Pattern of a line-position standard measured like the samples."),
    standard: str = typer.Option(..., "--standard", help="Si, LaB6 or CeO2 (NIST SRM 640f, 660c, 674b)."),
    x_unit: Optional[str] = X_UNIT,
    wavelength_angstrom: Optional[float] = WAVELENGTH,
    energy_kev: Optional[float] = ENERGY,
    fmt: str = typer.Option("table", "--format", help="table or json."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of the line widths and the fitted law."),
):
    """The instrument resolution from a calibrant pattern, as `qdsize predict --resolution` takes it."""
    import json

    from qdsize.sim import calibrant, measured

    if fmt not in ("table", "json"):
        raise InputError(f"--format = {fmt!r}: expected table or json")
    std = calibrant.check_standard(standard)
    pat = measured.read_pattern(file, x_unit=x_unit, wavelength_angstrom=wavelength_angstrom, energy_kev=energy_kev)
    for w in pat.warnings:
        typer.echo(f"qdsize: warning: {file}: {w}", err=True)
    fit = calibrant.fit_resolution(pat.q_inv_angstrom, pat.intensity, std, name=str(file))
    if fmt == "json":
        from dataclasses import asdict

        typer.echo(json.dumps({"file": str(file), **asdict(fit), "resolution_argument": fit.argument}, indent=1))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table("hkl", "Q expected (1/A)", "Q fitted (1/A)", "FWHM (1/A)", "law (1/A)", "eta", "S/N", "used")
        for ln in fit.lines:
            table.add_row("".join(map(str, ln.hkl)), f"{ln.q_expected_inv_angstrom:.4f}",
                          f"{ln.q_fitted_inv_angstrom:.4f}", f"{ln.fwhm_inv_angstrom:.4f}",
                          f"{float(fit.fwhm_at(ln.q_fitted_inv_angstrom)):.4f}", f"{ln.lorentz_fraction:.2f}",
                          f"{ln.snr:.0f}", "yes" if ln.used else "no")
        console = Console()
        console.print(table)
        console.print(f"{std}: FWHM(Q) = sqrt({fit.fwhm0_inv_angstrom:.4f}^2 + ({fit.fwhm_relative:.5f} Q)^2) 1/A, "
                      f"Lorentzian fraction {fit.lorentz_fraction:.2f}; rms misfit of the widths "
                      f"{fit.rms_fwhm_misfit_inv_angstrom:.4f} 1/A; Q axis: zero shift "
                      f"{fit.zero_shift_inv_angstrom:+.4f} 1/A, scale error {fit.scale_error:+.4%}")
        console.print(f"use: qdsize predict SAMPLES --resolution {fit.argument}", highlight=False)
    if plot is not None:
        from qdsize.platform.figures import plot_resolution

        plot_resolution(plot, fit, Path(file).name)


def _flag(row: dict) -> str:
    """The table's flag: why a pattern should not be trusted, if it should not."""
    if not row["out_of_distribution"]:
        return ""
    ev = row.get("material_evidence")
    return "OUT OF DISTRIBUTION" + ("" if ev is None else f" (material evidence {ev:.2f})")


def _emit(rows: list[dict], fmt: str) -> None:
    import csv
    import io
    import json

    if fmt == "json":
        typer.echo(json.dumps(rows, indent=1))
        return
    if fmt == "csv":
        buf = io.StringIO()
        keys = ["file", "mean_diameter_nm", "mean_diameter_std_nm", "size_dispersion_pct", "size_dispersion_std_pct",
                "size_class", "dispersion_class", "ood_score", "material_evidence", "out_of_distribution", "model_uri"]
        w = csv.DictWriter(buf, keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "size_class": "-".join(f"{v:g}" for v in r["size_class"]),
                        "dispersion_class": "-".join(f"{v:g}" for v in r["dispersion_class"])})
        typer.echo(buf.getvalue().rstrip("\n"))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("file", "mean diameter (nm)", "dispersion (%)", "size class", "p", "dispersion class", "p",
                  "flag")
    for r in rows:
        table.add_row(Path(r["file"]).name, f"{r['mean_diameter_nm']:.2f} ± {r['mean_diameter_std_nm']:.2f}",
                      f"{r['size_dispersion_pct']:.1f} ± {r['size_dispersion_std_pct']:.1f}",
                      "{:g}-{:g} nm".format(*r["size_class"]), f"{max(r['size_class_probs']):.2f}",
                      "{:g}-{:g} %".format(*r["dispersion_class"]), f"{max(r['dispersion_class_probs']):.2f}",
                      _flag(r))
    Console().print(table)
    if rows:
        r = rows[0]
        extra = ", ".join(x for x in (f"version {r['model_version']}" if r.get("model_version") else "",
                                      f"run {r['model_run_id']}" if r.get("model_run_id") else "") if x)
        Console().print(f"model: {r['model_uri']}" + (f" ({extra})" if extra else ""))
