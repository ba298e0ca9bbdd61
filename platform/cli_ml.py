"""Commands of the learning half: `qdsize train`, `evaluate`, `sweep`, `ui` (registered on the main Typer app)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from qdsize.platform.cli_app import app
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
    return [f"--resolution {name} = {v:g} lies outside what the model was trained on [{lo:g}, {hi:g}]; the "
            "estimates may be biased" for name, v, lo, hi in predictor.resolution_missed(told)]


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
    from qdsize.sim.contract import FROZEN_SPLITS

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
    from qdsize.platform import textout

    keys = sorted({k for m in rows.values() for k in m})
    textout.table(["metric", *rows], [[k, *[f"{rows[s].get(k, float('nan')):.4f}" for s in rows]] for k in keys])
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
    from qdsize.platform import textout

    textout.table(["score", "value"], [[k, f"{v:.4f}"] for k, v in result.items() if isinstance(v, float)])


def resolve_model(model_uri: str | None, tracking_uri: str | None):
    """--model, else the tracking store's champion unless the released model scores better, else the released model
    (platform.models.resolve); a passed-over champion is named on stderr."""
    from qdsize.platform import models

    return models.resolve(model_uri, tracking_uri, warn=lambda m: typer.echo(f"qdsize: warning: {m}", err=True))


STRICT_EXIT = 3  # `predict --strict`: some answer is flagged (unreadable files exit 2, which wins)


@app.command()
def predict(
    files: list[str] = typer.Argument(..., help="Measured patterns (.xy .xye .dat .chi .csv ...), folders of them, "
                                      "or - for standard input."),
    model: Optional[str] = typer.Option(None, "--model", help="Model URI or folder (default: champion, then "
                                        "the released model)."),
    x_unit: Optional[str] = X_UNIT,
    wavelength_angstrom: Optional[float] = WAVELENGTH,
    energy_kev: Optional[float] = ENERGY,
    force_wavelength: bool = typer.Option(False, "--force-wavelength",
                                          help="Use --wavelength even where a file's header names its own "
                                               "(by default the header wins, with a warning)."),
    fmt: str = typer.Option("table", "--format", help="table, json or csv."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG (one file) or folder (several files)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI"),
    refine: bool = typer.Option(False, "--refine", help="Then refine each estimate by an exact DSE least-squares fit."),
    shape: str = typer.Option("auto", "--shape", help="With --refine: the model shape (auto: the best fitting of "
                              "sphere, cube, octahedron and cuboctahedron; or sphere, cuboctahedron, "
                              "truncated_octahedron, cube, octahedron, polyhedron:RHO)."),
    solvent: Optional[list[str]] = typer.Option(None, "--solvent", help="With --refine: a solvent curve with a free "
                                                "amplitude (repeatable): toluene, hexane, octane, chloroform, water."),
    resolution: Optional[str] = typer.Option(
        None, "--resolution", metavar="FWHM0,REL[,ETA]",
        help="Instrument resolution from a calibrant (`qdsize resolution`): FWHM(Q) = sqrt(FWHM0^2 + (REL Q)^2) in "
             "1/A, pseudo-Voigt with Lorentzian fraction ETA (default 0). Sharper sizes for large dots."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress",
                                            help="Progress on stderr (default: a bar on a terminal for several "
                                                 "files; --progress also prints plain lines into a log)."),
    strict: bool = typer.Option(False, "--strict", help=f"Exit {STRICT_EXIT} if any answer is flagged (out of "
                                "distribution, outside the trained range), for scripts."),
):
    """Mean size and size dispersion, with uncertainties, of each measured pattern."""
    from qdsize.ml.predict import STDIN, check_resolution, expand_inputs, predict_files
    from qdsize.platform import textout

    if fmt not in ("table", "json", "csv"):
        raise InputError(f"--format = {fmt!r}: expected table, json or csv")
    told = None if resolution is None else check_resolution(resolution)
    paths = expand_inputs(files)
    if paths.count(STDIN) > 1:
        raise InputError("files: '-' (standard input) given more than once; expected it at most once")
    stdin_text = sys.stdin.read() if STDIN in paths else None
    predictor = resolve_model(model, tracking_uri)
    if told is not None:
        for line in resolution_warnings(predictor, told):
            typer.echo(f"qdsize: warning: {line}", err=True)
    read = dict(x_unit=x_unit, wavelength_angstrom=wavelength_angstrom, energy_kev=energy_kev,
                force_wavelength=force_wavelength)
    patterns: dict = {}  # what each answered file holds on the model grid, for the figures
    rows = predict_files(paths, predictor, told, stdin_text=stdin_text, inputs=patterns,
                         progress=lambda xs: textout.progress(xs, "reading and sizing", progress), **read)
    for r in rows:
        for w in r["warnings"]:
            typer.echo(f"qdsize: warning: {w if w.startswith(r['file']) else r['file'] + ': ' + w}", err=True)
    answered = [r for r in rows if "error" not in r]
    if refine and answered:
        from qdsize.platform.cli_refine import emit_refined, refine_rows

        if STDIN in [r["file"] for r in answered]:
            raise InputError("--refine: standard input cannot be refined (the fit reads the file again); "
                             "expected pattern files")
        # the told instrument is fixed in the fit (its Gaussian part), else the fit finds it
        refined = iter(refine_rows(answered, [r["file"] for r in answered], plot=plot, progress=progress,
                                   shape=shape, solvent=tuple(solvent or ()) or None,
                                   resolution=(told[0], told[1]) if told is not None else "fit",
                                   x_unit=x_unit, wavelength_angstrom=wavelength_angstrom, energy_kev=energy_kev))
        rows = [r if "error" in r else next(refined) for r in rows]
        answered = [r for r in rows if "error" not in r]
    _emit(rows, fmt, predictor)
    hint = resolution_hint(answered, predictor, told)
    if hint:
        typer.echo(f"qdsize: note: {hint}", err=True)
    if refine and answered and fmt == "table":
        emit_refined(answered, "table")
    if plot is not None and answered and not refine:
        import torch

        from qdsize.platform.figures import plot_prediction

        for r in answered:
            _, y, mk = patterns[r["file"]]
            name = "stdin" if r["file"] == STDIN else Path(r["file"]).stem
            target = plot if len(answered) == 1 and plot.suffix == ".png" else Path(plot) / f"{name}.png"
            cam = predictor.model.class_activation_map(torch.as_tensor(y[None]), torch.as_tensor(mk[None]))[0]
            plot_prediction(target, predictor.q_inv_angstrom, y, mk, cam.detach().numpy(), r,
                            predictor.size_edges_nm, predictor.dispersion_edges_pct)
    failures = [r["error"] for r in rows if "error" in r]
    for line in failures:
        typer.echo(f"qdsize: error: {line}", err=True)
    if failures:
        sys.exit(2)
    flagged = [r for r in answered if r["out_of_distribution"]]
    if strict and flagged:
        typer.echo(f"qdsize: error: --strict: {len(flagged)} of {len(answered)} answers flagged", err=True)
        sys.exit(STRICT_EXIT)


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
        from qdsize.platform import textout

        textout.table(["hkl", "Q expected (1/A)", "Q fitted (1/A)", "FWHM (1/A)", "law (1/A)", "eta", "S/N", "used"],
                      [["".join(map(str, ln.hkl)), f"{ln.q_expected_inv_angstrom:.4f}",
                        f"{ln.q_fitted_inv_angstrom:.4f}", f"{ln.fwhm_inv_angstrom:.4f}",
                        f"{float(fit.fwhm_at(ln.q_fitted_inv_angstrom)):.4f}", f"{ln.lorentz_fraction:.2f}",
                        f"{ln.snr:.0f}", "yes" if ln.used else "no"] for ln in fit.lines])
        console = textout.console()
        console.print(f"{std}: FWHM(Q) = sqrt({fit.fwhm0_inv_angstrom:.4f}^2 + ({fit.fwhm_relative:.5f} Q)^2) 1/A, "
                      f"Lorentzian fraction {fit.lorentz_fraction:.2f}; rms misfit of the widths "
                      f"{fit.rms_fwhm_misfit_inv_angstrom:.4f} 1/A; Q axis: zero shift "
                      f"{fit.zero_shift_inv_angstrom:+.4f} 1/A, scale error {fit.scale_error:+.4%}")
        console.print(f"use: qdsize predict SAMPLES --resolution {fit.argument}", highlight=False)
    if plot is not None:
        from qdsize.platform.figures import plot_resolution

        plot_resolution(plot, fit, Path(file).name)


def _flag(row: dict) -> str:
    """The table's flag: why a pattern should not be trusted, if it should not; or why it has no answer."""
    if "error" in row:
        return "ERROR: " + row["error"]
    if not row.get("out_of_distribution"):
        return ""
    return "; ".join(["OUT OF DISTRIBUTION", *(row.get("flags") or [])])


def _num(v, digits: int):
    """A number for CSV: rounded to what is meaningful, empty when absent."""
    return "" if v is None else round(float(v), digits)


CSV_KEYS = ["file", "mean_diameter_nm", "mean_diameter_std_nm", "size_dispersion_pct", "size_dispersion_std_pct",
            "size_class_min_nm", "size_class_max_nm", "size_class_p", "dispersion_class_min_pct",
            "dispersion_class_max_pct", "dispersion_class_p", "ood_score", "material_evidence", "out_of_distribution",
            "flags", "error", "model_uri", "model_version", "model_run_id"]


def _csv(rows: list[dict], size_edges_nm, dispersion_edges_pct) -> str:
    """One row per file (failed files too, with their error); numbers rounded; class bounds as two numeric columns
    (a cell such as "3-4" becomes a date in a spreadsheet); one probability column per class."""
    import csv
    import io

    def cols(edges, unit):
        return [f"p_{edges[i]:g}_{edges[i + 1]:g}_{unit}" for i in range(len(edges) - 1)]

    size_cols, disp_cols = cols(size_edges_nm, "nm"), cols(dispersion_edges_pct, "pct")
    buf = io.StringIO()
    w = csv.DictWriter(buf, [*CSV_KEYS, *size_cols, *disp_cols], extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        if "error" in r:
            w.writerow({"file": r["file"], "error": r["error"]})
            continue
        w.writerow({
            **{k: r.get(k) for k in ("file", "model_uri", "model_version", "model_run_id")},
            "mean_diameter_nm": _num(r["mean_diameter_nm"], 3),
            "mean_diameter_std_nm": _num(r["mean_diameter_std_nm"], 3),
            "size_dispersion_pct": _num(r["size_dispersion_pct"], 2),
            "size_dispersion_std_pct": _num(r["size_dispersion_std_pct"], 2),
            "size_class_min_nm": r["size_class"][0], "size_class_max_nm": r["size_class"][1],
            "size_class_p": _num(max(r["size_class_probs"]), 3),
            "dispersion_class_min_pct": r["dispersion_class"][0], "dispersion_class_max_pct": r["dispersion_class"][1],
            "dispersion_class_p": _num(max(r["dispersion_class_probs"]), 3),
            "ood_score": _num(r["ood_score"], 3), "material_evidence": _num(r.get("material_evidence"), 3),
            "out_of_distribution": r["out_of_distribution"], "flags": "; ".join(r.get("flags") or []),
            **{c: _num(p, 4) for c, p in zip(size_cols, r["size_class_probs"])},
            **{c: _num(p, 4) for c, p in zip(disp_cols, r["dispersion_class_probs"])},
        })
    return buf.getvalue().rstrip("\n")


def _model_line(rows: list[dict]) -> str | None:
    """Which model answered: its URI, registry version or release, and training run."""
    r = next((r for r in rows if "error" not in r), None)
    if r is None:
        return None
    extra = ", ".join(x for x in (f"version {r['model_version']}" if r.get("model_version") else "",
                                  f"run {r['model_run_id']}" if r.get("model_run_id") else "") if x)
    return f"model: {r['model_uri']}" + (f" ({extra})" if extra else "")


def _emit(rows: list[dict], fmt: str, predictor) -> None:
    import json

    from qdsize.platform import textout

    if fmt == "json":
        typer.echo(json.dumps(rows, indent=1))
        return
    if fmt == "csv":
        typer.echo(_csv(rows, predictor.size_edges_nm, predictor.dispersion_edges_pct))
        return
    body = []
    for r in rows:
        name = "stdin" if r["file"] == "-" else Path(r["file"]).name
        if "error" in r:
            body.append([name, "-", "-", "-", "-", "-", "-", _flag(r)])
            continue
        body.append([name, f"{r['mean_diameter_nm']:.2f} ± {r['mean_diameter_std_nm']:.2f}",
                     f"{r['size_dispersion_pct']:.1f} ± {r['size_dispersion_std_pct']:.1f}",
                     "{:g}-{:g} nm".format(*r["size_class"]), f"{max(r['size_class_probs']):.2f}",
                     "{:g}-{:g} %".format(*r["dispersion_class"]), f"{max(r['dispersion_class_probs']):.2f}",
                     _flag(r)])
    textout.table(["file", "mean diameter (nm)", "dispersion (%)", "size class", "p", "dispersion class", "p",
                   "flag"], body)
    line = _model_line(rows)
    if line:
        typer.echo(line)
