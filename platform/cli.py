"""The `qdsize` command line: one Typer app; bad input ends in one clear line and a non-zero exit."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from qdsize.sim.errors import InputError

from qdsize.platform.cli_app import app, version_text  # noqa: F401  (the app every cli_* module adds to)


@app.command()
def workspace(tracking: bool = typer.Option(False, "--tracking-uri", help="Print only the tracking URI.")):
    """Where qdsize keeps datasets, caches and the MLflow store, how it was found, and what it holds."""
    from qdsize.platform import tracking as trk
    from qdsize.platform.workspace import locate

    if tracking:
        typer.echo(trk.tracking_uri())
        return
    where, how = locate()
    typer.echo(f"workspace: {where}\nfound by:  {how}\ntracking:  {trk.tracking_uri()}")
    if where.is_dir():
        held = sorted(p.name for p in where.iterdir())
        typer.echo(f"holds:     {', '.join(held) if held else 'nothing yet'}")
    else:
        typer.echo("holds:     nothing yet (created on first use)")


def pattern_label(params: dict) -> str:
    """A simulated pattern's legend: what it is made of and every parameter that shapes it."""
    if "xyz" in params:
        head = str(params["xyz"])
    else:
        head = (f"{params['material']} {params['shape']}, {params['mean_diameter_nm']:.2f} nm, dispersion "
                f"{float(params.get('size_dispersion_pct', 0.0)):.1f} %, surface {params.get('surface', '-')}")
    b = params.get("b_iso")
    if isinstance(b, dict):
        b_text = ", ".join(f"{el} {float(v):g}" for el, v in b.items())
    else:
        b_text = f"{float(b or 0.0):g}"
    return f"{head}; B ({b_text}) A^2"


def parse_b_iso(text: str):
    """`1.2` (all elements) or `Pb=1.2,S=0.8` (per element), B in Angstrom^2."""
    try:
        if "=" not in text:
            return float(text)
        out = {}
        for part in text.split(","):
            k, v = part.split("=")
            out[k.strip()] = float(v)
        return out
    except ValueError:
        raise InputError(f"--b-iso = {text!r}: expected a number or 'El=B,El=B' in Angstrom^2") from None


@app.command()
def pattern(
    out: Path = typer.Option(..., "-o", "--out", help="Output two-column file (Q in 1/A, I in e.u. per particle)."),
    xyz: Optional[Path] = typer.Option(None, "--xyz", help="Cluster coordinates (.xyz, Angstrom)."),
    material: str = typer.Option("pbs", help="Built-in material: pbs (rock salt) or cdse (zinc blende)."),
    cif: Optional[Path] = typer.Option(None, "--cif", help="Crystal structure from a CIF file instead of --material."),
    shape: str = typer.Option("sphere", help="sphere, cube, cuboctahedron, truncated_octahedron, octahedron, "
                              "or polyhedron:RHO (facet ratio d111/d100 = RHO >= 0.577)."),
    diameter_nm: Optional[float] = typer.Option(None, "--diameter-nm", help="Equal-volume (mean) diameter in nm."),
    size_dispersion_pct: float = typer.Option(0.0, "--dispersion-pct", help="Lognormal std/mean in percent."),
    surface: str = typer.Option("as_cut", help="as_cut, stoichiometric or cation_rich (Pb-rich)."),
    anion_removal: float = typer.Option(0.5, help="Fraction of under-coordinated anions removed (cation_rich)."),
    centre: str = typer.Option("atom", help="Cut centred on an atom or at a random offset ('random')."),
    facet_ratio: Optional[float] = typer.Option(None, help="d111/d100 for shape 'polyhedron'."),
    a_angstrom: Optional[float] = typer.Option(None, "--a-angstrom", help="Lattice parameter (default: bulk)."),
    strain: float = typer.Option(0.0, help="Uniform relative lattice strain (0.01 = +1 %)."),
    microstrain_pct: float = typer.Option(0.0, "--microstrain-pct", help="Rms lattice-parameter spread, %."),
    q_min: float = typer.Option(0.5, "--q-min", help="First Q in 1/A."),
    q_max: float = typer.Option(10.0, "--q-max", help="Last Q in 1/A."),
    q_step: float = typer.Option(0.005, "--q-step", help="Q step in 1/A."),
    b_iso: str = typer.Option("0", "--b-iso", help="Isotropic B in A^2: '1.2' or 'Pb=1.2,S=0.8'."),
    energy_kev: Optional[float] = typer.Option(None, "--energy-kev", help="Photon energy for f', f'' (keV)."),
    seed: int = typer.Option(0, help="Seed for random centring and surface vacancies."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also write a PNG plot of the pattern."),
):
    """Simulate one Debye-scattering pattern and write it as two columns with a parameter header."""
    from qdsize.sim import crystal as crystals
    from qdsize.sim import io, pattern as patterns, scattering

    q = scattering.q_grid(q_min, q_max, q_step)
    b = parse_b_iso(b_iso)
    if xyz is not None:
        if diameter_nm is not None or cif is not None:
            raise InputError("--xyz: expected either --xyz or --material/--cif with --diameter-nm, not both")
        c = io.read_xyz(xyz)
        pat = patterns.simulate_atoms(q, c, b_iso=b, energy_kev=energy_kev, strain=strain,
                                      microstrain_pct=microstrain_pct)
        pat.params = {"xyz": str(xyz), **pat.params}
    else:
        if diameter_nm is None:
            raise InputError("--diameter-nm: missing; expected a diameter in nm (or --xyz FILE)")
        xtal = crystals.from_cif(cif) if cif is not None else None
        pat = patterns.simulate(q, material=material, shape=shape, diameter_nm=diameter_nm,
                                size_dispersion_pct=size_dispersion_pct, surface=surface, anion_removal=anion_removal,
                                centre=centre, facet_ratio=facet_ratio, a_angstrom=a_angstrom, strain=strain,
                                microstrain_pct=microstrain_pct, b_iso=b, energy_kev=energy_kev, seed=seed,
                                crystal=xtal)
    params = {**pat.params, "q_min": q_min, "q_max": q_max, "q_step": q_step}
    out.parent.mkdir(parents=True, exist_ok=True)
    io.write_pattern(out, q, pat.intensity, params)
    if plot is not None:
        from qdsize.platform.figures import plot_patterns

        plot_patterns(plot, [(q, pat.intensity, pattern_label(params))], title="qdsize pattern")
    typer.echo(f"wrote {out} ({q.size} points, {params.get('mean_atoms_per_particle', params.get('n_atoms'))} atoms)")


@app.command("augment-gallery")
def augment_gallery(out: Path = typer.Option(Path("augment_gallery.png"), "-o", "--out", help="Output PNG.")):
    """One clean PbS pattern and the same pattern under each augmentation effect, typical and strong."""
    from qdsize.sim.augment import augment_gallery as make

    make(out)
    typer.echo(f"wrote {out}")


@app.command(context_settings={"allow_extra_args": False})
def simulate(
    config: Path = typer.Argument(..., help="Dataset config (YAML), e.g. conf/dataset/pbs.yaml."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Config overrides key=value (dotted keys)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Dataset folder (default $QDSIZE_HOME/datasets/NAME)."),
    samples: Optional[int] = typer.Option(None, "--samples", help="Total samples over all splits."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Dataset seed."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default RAY_ADDRESS, "
                                          "else an embedded local Ray on loopback)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Shard tasks in flight (embedded Ray: its CPUs)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a dataset of another config in --out."),
    no_ray: bool = typer.Option(False, "--no-ray", help="Compose in this process, without Ray."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
):
    """Simulate a Parquet dataset of DSE patterns (resumable: re-run the same command to complete it)."""
    from qdsize.platform import config as cfgmod
    from qdsize.platform import simulate as sim
    from qdsize.platform.workspace import home

    ov = list(overrides or [])
    if samples is not None:
        ov.append(f"dataset.samples={samples}")
    if seed is not None:
        ov.append(f"dataset.seed={seed}")
    if workers is not None and workers < 1:
        raise InputError(f"--workers = {workers}: expected at least 1")
    loaded = cfgmod.load_dataset_config(config, ov)
    target = out if out is not None else home() / "datasets" / loaded.config.dataset.name
    m = sim.run(loaded, target, address=address, workers=workers, overwrite=overwrite, use_ray=not no_ray,
                quiet=quiet)
    typer.echo(f"{m['status']}: {Path(target).resolve()} ({sum(r['rows'] for r in m['shards']):,} patterns, "
               f"config hash {m['config_hash']})")


dataset_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Inspect simulated datasets.")
app.add_typer(dataset_app, name="dataset")


@dataset_app.command("info")
def dataset_info(path: Path = typer.Argument(..., help="Dataset folder (holds manifest.json).")):
    """Validate every shard's checksum and row count, and print the dataset summary."""
    from qdsize.platform import dataset as ds
    from qdsize.platform import textout

    manifest, problems = ds.validate(path)
    textout.table(["split", "shards", "rows", "MB", "bytes/pattern", "nodes"],
                  [[r["split"], str(r["shards"]), f"{r['rows']:,}", f"{r['bytes'] / 1e6:.2f}",
                    f"{r['bytes_per_pattern']:,.0f}", ", ".join(r["nodes"]) or "-"] for r in ds.summary_rows(manifest)],
                  title=f"{manifest['name']}  config {manifest['config_hash']}  status {manifest['status']}")
    q = manifest["q_inv_angstrom"]
    typer.echo(f"Q grid: {q[0]:g}-{q[-1]:g} 1/A, {len(q)} points; families: {len(manifest['families'])}; "
               f"size classes (nm): {manifest['labels']['size_class_edges_nm']}; dispersion classes (%): "
               f"{manifest['labels']['dispersion_class_edges_pct']}")
    if problems:
        for p in problems:
            typer.echo(f"qdsize: invalid: {p}", err=True)
        raise SystemExit(1)  # main() maps SystemExit codes through
    typer.echo(f"ok: {len(manifest['shards'])} shards, checksums verified")


@dataset_app.command("show")
def dataset_show(
    path: Path = typer.Argument(..., help="Dataset folder."),
    index: int = typer.Option(0, "--index", "-i", help="Row within the split (over shards in order)."),
    split: str = typer.Option("train", "--split", help="train, val, test, benchmark or seedgrid."),
    out: Path = typer.Option(Path("sample.png"), "-o", "--out", help="Output PNG."),
):
    """Plot one sample with its labels and parameters."""
    from qdsize.platform import dataset as ds
    from qdsize.platform.figures import plot_patterns

    if split not in ("train", "val", "test", "benchmark", "seedgrid"):
        raise InputError(f"--split = {split!r}: expected one of train, val, test, benchmark, seedgrid")
    q = ds.q_grid(path)
    row = ds.read_row(path, split, index)
    label = sample_label(row, ds.read_manifest(path)["labels"])
    curves = [(q, row["pattern"], label)]
    if "pattern_clean" in row:
        curves = [(q, row["pattern_clean"], "clean"), (q, row["pattern"], f"augmented ({row['augment_preset']})")]
    title = (f"{split}[{index}]: {label}\na = {row['a_angstrom']:.4f} A, microstrain {row['microstrain_pct']:.2f} %, "
             f"{row['energy_kev']:g} keV")
    plot_patterns(out, curves, title=title, log=True)
    typer.echo(f"wrote {out}")


NO_PHONING_HOME = {"MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0", "DO_NOT_TRACK": "true"}


def sample_label(row: dict, labels: dict) -> str:
    """A dataset sample's legend: its labels, its classes as ranges (not indices), shape and surface."""
    s_lo, s_hi = labels["size_class_edges_nm"][row["size_class"]:row["size_class"] + 2]
    d_lo, d_hi = labels["dispersion_class_edges_pct"][row["dispersion_class"]:row["dispersion_class"] + 2]
    return (f"{row['mean_diameter_nm']:.2f} nm, {row['size_dispersion_pct']:.1f} % (classes {s_lo:g}-{s_hi:g} nm, "
            f"{d_lo:g}-{d_hi:g} %); {row['shape']}, {row['surface']}")


def _quiet_showwarning(message, category, filename, lineno, file=None, line=None):
    """Warnings as one plain line on stderr; the libraries' own (MLflow, Ray, Optuna, torch) are not ours to show."""
    import re

    if re.search(r"[/\\](mlflow|ray|optuna|torch|pydantic|alembic|sqlalchemy)[/\\]", str(filename)):
        return
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(message)).strip().replace("\n", " ")
    typer.echo(f"qdsize: warning: {text}", err=True)


def _usage_error(exc) -> int:
    """A click/typer usage error in one line, naming the command and where to read its options."""
    ctx = getattr(exc, "ctx", None)
    path = ctx.command_path if ctx is not None and ctx.command_path else "qdsize"
    typer.echo(f"qdsize: error: {exc.format_message()} (see `{path} --help`)", err=True)
    return 2 if getattr(exc, "exit_code", 1) in (1, 2) else int(exc.exit_code)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning input and usage errors into one line on stderr and exit code 2."""
    import os
    import warnings

    import click

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no download bars around answers
    for name, value in NO_PHONING_HOME.items():  # a user's data and runs stay on their machine
        os.environ.setdefault(name, value)
    if not os.environ.get("QDSIZE_DEBUG"):  # the libraries' info lines (and warnings, above) are not ours
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        import logging

        logging.getLogger("alembic").setLevel(logging.WARNING)
    if not os.environ.get("RAY_ADDRESS"):  # an embedded Ray listens on loopback only (Ray reads it on import)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if not os.environ.get("QDSIZE_DEBUG"):
        warnings.showwarning = _quiet_showwarning
    import qdsize.platform.cli_ml  # noqa: F401  (registers train, evaluate, sweep, predict, resolution, ui)
    import qdsize.platform.cli_refine  # noqa: F401  (registers refine)
    import qdsize.platform.cli_model  # noqa: F401  (registers model list, info, export)
    from qdsize.platform import cli_help

    cli_help.attach(app)
    cli_help.wide_when_piped()
    click_errors = (click.exceptions.ClickException, typer.TyperException)  # typer bundles its own click
    try:
        app(args=argv, standalone_mode=False, prog_name="qdsize")
    except InputError as exc:
        typer.echo(f"qdsize: error: {exc}", err=True)
        return 2
    except (typer.Abort, click.exceptions.Abort, KeyboardInterrupt):
        typer.echo("qdsize: aborted", err=True)
        return 130
    except SystemExit as exc:  # our own exit codes (dataset info, --strict) and click's (help, version)
        return int(exc.code or 0)
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except click_errors as exc:  # usage errors: typer raises its bundled click's classes, not click's
        if hasattr(exc, "format_message"):
            return _usage_error(exc)
        raise
    except BrokenPipeError:  # `qdsize ... | head`
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
