"""`qdsize refine`: exact DSE refinement of measured patterns from the network's estimates (Ray for a batch)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from qdsize.platform.cli import app
from qdsize.sim.errors import InputError, bad

ESTIMATE_KEYS = ("mean_diameter_nm", "size_dispersion_pct")
OPTION_KEYS = ("ladder_spec", "q_range", "background_degree", "solvent", "capillary", "compton",
               "refine_microstrain", "microstrain_pct")


# ----------------------------------------------------------------------------------------------------------------
# Estimates from `qdsize predict --format json`
# ----------------------------------------------------------------------------------------------------------------
def load_estimates(path: Path) -> list[dict]:
    """Rows of a `qdsize predict --format json` file (a list of objects, or one object)."""
    name = str(path)
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--from-json = {name!r}: file not found: expected the JSON written by "
                         "`qdsize predict FILE --format json > PRED.json`")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"--from-json = {name!r}: not valid JSON ({exc}): expected the output of "
                         "`qdsize predict --format json`") from None
    rows = [data] if isinstance(data, dict) else data
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise InputError(f"--from-json = {name!r}: expected a JSON list of objects (one per file) as "
                         "`qdsize predict --format json` prints")
    for i, r in enumerate(rows):
        for k in ESTIMATE_KEYS:
            v = r.get(k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                raise InputError(f"--from-json = {name!r}: row {i} ({r.get('file', 'no file')}) has {k} = {v!r}: "
                                 "expected a finite number")
    return rows


def match_estimates(files: list[Path], rows: list[dict]) -> list[dict]:
    """The estimate row of each file: same path, same resolved path, or a unique file name; one row for one file."""
    if len(files) == 1 and len(rows) == 1:
        return [rows[0]]
    out = []
    for f in files:
        hit = [r for r in rows if str(r.get("file")) == str(f)]
        if not hit:
            hit = [r for r in rows if r.get("file") and Path(str(r["file"])).resolve() == Path(f).resolve()]
        if not hit:
            hit = [r for r in rows if r.get("file") and Path(str(r["file"])).name == Path(f).name]
        if len(hit) != 1:
            raise InputError(f"{f}: {'no' if not hit else len(hit)} rows of the estimates match this file: expected "
                             "exactly one row whose 'file' is this path (run `qdsize predict` on the same files)")
        out.append(hit[0])
    return out


# ----------------------------------------------------------------------------------------------------------------
# One file, a batch (Ray when there is more than one core or node)
# ----------------------------------------------------------------------------------------------------------------
def _read(f, x_unit, wavelength_angstrom, energy_kev):
    from qdsize.sim import measured, scattering

    pat = measured.read_pattern(f, x_unit=x_unit, wavelength_angstrom=wavelength_angstrom, energy_kev=energy_kev)
    en = scattering.energy_kev(pat.wavelength_angstrom) if pat.wavelength_angstrom else None
    return pat, en


def refine_one(f, start: dict, *, x_unit=None, wavelength_angstrom=None, energy_kev=None, options=None):
    """(RefineResult, warnings) for one file, or raises InputError with the file named."""
    from qdsize.sim import refine as rf

    pat, en = _read(f, x_unit, wavelength_angstrom, energy_kev)
    try:
        res = rf.refine(pat.q_inv_angstrom, pat.intensity, start, sigma=pat.sigma, energy_kev=en, name=str(f),
                        **(options or {}))
    except InputError as exc:
        msg = str(exc)
        raise InputError(msg if msg.startswith(str(f)) else f"{f}: {msg}") from None
    return res, list(pat.warnings)


def _safe_one(f, start, kw):
    """Result or error text (so that one bad file does not stop a batch). On a Ray worker, `workspace` points
    the family cache at the driver's $QDSIZE_HOME (a worker may have started before it was set)."""
    kw = dict(kw)
    workspace = kw.pop("workspace", None)
    if workspace:
        os.environ["QDSIZE_HOME"] = workspace
    try:
        return refine_one(f, start, **kw)
    except InputError as exc:
        return str(exc)


def _prebuild(files, kw):
    """Build (or load) the ladder tables once in the driver, so parallel workers only read the cache."""
    from qdsize.sim import refine as rf

    opts = kw.get("options") or {}
    done = set()
    for f in files:
        try:
            pat, _ = _read(f, kw.get("x_unit"), kw.get("wavelength_angstrom"), kw.get("energy_kev"))
        except InputError:
            continue  # reported by the worker
        q_range = opts.get("q_range") or (1.0, None)
        q = pat.q_inv_angstrom
        q = q[(q >= (q_range[0] or 1.0)) & (q <= (q_range[1] or np.inf))]
        if q.size < 2:
            continue
        micro = (rf.BOUNDS["microstrain_pct"][1] if opts.get("refine_microstrain", True)
                 else opts.get("microstrain_pct", 0.0))
        key = (float(q[0]), float(q[-1]), micro)  # as refine() loads it
        if key not in done:
            try:
                rf.load_ladder(key[0], key[1], spec=opts.get("ladder_spec"), microstrain_max_pct=micro)
            except InputError:
                continue
            done.add(key)


def refine_many(files: list, starts: list[dict], *, x_unit=None, wavelength_angstrom=None, energy_kev=None,
                options: dict | None = None, address: str | None = None, use_ray: bool | None = None) -> list:
    """Refine every file from its start; each entry is (RefineResult, warnings) or an error line.

    Ray runs the batch when there is more than one file and more than one core (or a cluster address);
    otherwise a plain loop in this process.
    """
    kw = {"x_unit": x_unit, "wavelength_angstrom": wavelength_angstrom, "energy_kev": energy_kev,
          "options": dict(options or {})}
    address = address or os.environ.get("RAY_ADDRESS") or None
    if use_ray is None:
        use_ray = len(files) > 1 and ((os.cpu_count() or 1) > 1 or address is not None)
    if not use_ray:
        return [_safe_one(f, s, kw) for f, s in zip(files, starts)]
    from qdsize.platform.simulate import init_ray
    from qdsize.platform.workspace import home
    from qdsize.sim import refine as rf

    # workers get the resolved ladder and the workspace explicitly: same family cache, same model
    kw["options"]["ladder_spec"] = {**rf.DEFAULT_LADDER, **(kw["options"].get("ladder_spec") or {})}
    kw["workspace"] = str(home())
    _prebuild(files, kw)
    import ray

    started = init_ray(address)
    try:
        task = ray.remote(num_cpus=1, max_retries=1)(_safe_one)
        kw_ref = ray.put(kw)
        return ray.get([task.remote(str(f), s, kw_ref) for f, s in zip(files, starts)])
    finally:
        if started:
            ray.shutdown()


def refine_rows(rows: list[dict], files: list, *, x_unit=None, wavelength_angstrom=None, energy_kev=None,
                plot: Path | None = None, address: str | None = None, use_ray: bool | None = None,
                **options) -> list[dict]:
    """The network's rows (one per file, in order) with a `refined` object added: the refined values, or
    {"error": "..."} for a file that could not be refined. Options go to `qdsize.sim.refine.refine`."""
    if len(rows) != len(files):
        raise bad("rows", f"{len(rows)} rows for {len(files)} files", "one estimate row per file")
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise bad("options", unknown, f"refinement options among {list(OPTION_KEYS)}")
    starts = [{k: r[k] for k in ESTIMATE_KEYS} for r in rows]
    results = refine_many(list(files), starts, x_unit=x_unit, wavelength_angstrom=wavelength_angstrom,
                          energy_kev=energy_kev, options=options, address=address, use_ray=use_ray)
    out = []
    for f, r, res in zip(files, rows, results):
        row = dict(r)
        if isinstance(res, str):
            row["refined"] = {"error": res}
        else:
            result, warns = res
            row["refined"] = result.refined
            row["refined"]["warnings"] = warns
            if plot is not None:
                target = Path(plot) if len(files) == 1 and Path(plot).suffix == ".png" else \
                    Path(plot) / f"{Path(f).stem}_refine.png"
                plot_refinement(target, result, title=str(f))
                row["refined"]["plot"] = str(target)
        out.append(row)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Figure
# ----------------------------------------------------------------------------------------------------------------
def plot_refinement(out_png, result, title: str = "") -> Path:
    """Data, model and background (top), and the difference data - model (bottom, same units)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = result.refined
    q = result.q_inv_angstrom
    fig, (ax, ad) = plt.subplots(2, 1, figsize=(9, 6), dpi=110, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot(q, result.data, ".", ms=1.5, color="k", label="data")
    ax.plot(q, result.model, lw=1.0, color="tab:red", label="model")
    ax.plot(q, result.background, lw=1.0, color="tab:blue", label="background")
    ax.set_ylabel("intensity (data units)")
    ax.legend(frameon=False, fontsize=8)
    b = ", ".join(f"B({el}) {v:.2f}" for el, v in r["b_iso"].items())
    flag = f"  [{', '.join(r['flags'])}]" if r["flags"] else ""
    ax.set_title(f"{Path(title).name}: {r['mean_diameter_nm']:.3f} ± {r['mean_diameter_std_nm']:.3f} nm, "
                 f"{r['size_dispersion_pct']:.2f} ± {r['size_dispersion_std_pct']:.2f} %, a = "
                 f"{r['lattice_parameter_angstrom']:.4f} A, {b}\nRwp {r['rwp']:.4f}, reduced chi2 "
                 f"{r['reduced_chi2']:.3g}{flag}", fontsize=9)
    ad.plot(q, result.data - result.model, lw=0.7, color="tab:green")
    ad.fill_between(q, -2 * result.sigma, 2 * result.sigma, color="0.85", lw=0, label="±2 sigma")
    ad.axhline(0, color="k", lw=0.5)
    ad.set_xlabel(r"$Q$ (1/$\AA$)")
    ad.set_ylabel("data - model")
    ad.legend(frameon=False, fontsize=8, loc="upper right")
    for a in (ax, ad):
        a.grid(alpha=0.25)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Command
# ----------------------------------------------------------------------------------------------------------------
def _pm(value, std, digits: int) -> str:
    """'value ± std', or 'value ± ?' when the uncertainty is undetermined (singular covariance)."""
    return f"{value:.{digits}f} ± " + ("?" if std is None else f"{std:.{digits}f}")


def emit_refined(rows: list[dict], fmt: str) -> None:
    """Print rows that carry a `refined` object: a table of network vs refined values, or JSON."""
    if fmt == "json":
        typer.echo(json.dumps(rows, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("file", "network (nm, %)", "refined mean (nm)", "refined dispersion (%)", "a (A)", "B (A^2)",
                  "Rwp", "chi2/dof", "flags")
    for r in rows:
        ref = r["refined"]
        net = f"{r['mean_diameter_nm']:.2f}, {r['size_dispersion_pct']:.1f}"
        if "error" in ref:
            table.add_row(Path(r["file"]).name, net, "-", "-", "-", "-", "-", "-", "error")
            continue
        table.add_row(Path(r["file"]).name, net,
                      _pm(ref["mean_diameter_nm"], ref["mean_diameter_std_nm"], 3),
                      _pm(ref["size_dispersion_pct"], ref["size_dispersion_std_pct"], 2),
                      _pm(ref["lattice_parameter_angstrom"], ref["lattice_parameter_std_angstrom"], 4),
                      ", ".join(f"{el} {v:.2f}" for el, v in ref["b_iso"].items()),
                      f"{ref['rwp']:.4f}", f"{ref['reduced_chi2']:.3g}", ", ".join(ref["flags"]) or "")
    Console().print(table)


@app.command("refine")
def refine_command(
    files: list[Path] = typer.Argument(..., help="Measured patterns (.xy .xye .dat .chi .csv ...)."),
    from_json: Path = typer.Option(..., "--from-json", help="Estimates from `qdsize predict FILE --format json`."),
    x_unit: Optional[str] = typer.Option(None, "--x-unit", help="q_A (1/A), q_nm (1/nm) or 2theta (degrees)."),
    wavelength_angstrom: Optional[float] = typer.Option(None, "--wavelength-angstrom", "--wavelength",
                                                        help="Wavelength (A): 2-theta data, anomalous terms."),
    energy_kev: Optional[float] = typer.Option(None, "--energy-kev", help="Photon energy (keV), as above."),
    fmt: str = typer.Option("table", "--format", help="table or json."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG (one file) or folder (several files)."),
    shape: str = typer.Option("sphere", "--shape", help="Model shape: sphere, cuboctahedron, "
                              "truncated_octahedron, cube, octahedron or polyhedron:RHO."),
    surface: str = typer.Option("cation_rich", "--surface", help="cation_rich (Pb-rich) or stoichiometric."),
    solvent: Optional[list[str]] = typer.Option(None, "--solvent", help="Solvent curve with a free amplitude "
                                                "(repeatable): toluene, hexane, octane, chloroform, water."),
    capillary: Optional[list[str]] = typer.Option(None, "--capillary", help="Capillary curve with a free "
                                                  "amplitude (repeatable): borosilicate, kapton."),
    compton: bool = typer.Option(False, "--compton", help="Add the sample's Compton curve as a background term."),
    background_degree: int = typer.Option(3, "--background-degree", help="Degree of the Legendre background."),
    q_min: float = typer.Option(1.0, "--q-min", help="Lowest Q fitted (1/A)."),
    q_max: Optional[float] = typer.Option(None, "--q-max", help="Highest Q fitted (1/A; default: the data's)."),
    refine_microstrain: bool = typer.Option(True, "--refine-microstrain/--no-microstrain",
                                            help="Refine the rms lattice-parameter spread between particles "
                                            "(or keep it at zero)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default RAY_ADDRESS; "
                                          "a batch uses an embedded local Ray when there is more than one core)."),
):
    """Refine the network's size and dispersion by a least-squares fit of the exact DSE model to each pattern."""
    import sys

    if fmt not in ("table", "json"):
        raise InputError(f"--format = {fmt!r}: expected table or json")
    rows = match_estimates(list(files), load_estimates(from_json))
    out = refine_rows(rows, list(files), x_unit=x_unit, wavelength_angstrom=wavelength_angstrom,
                      energy_kev=energy_kev, plot=plot, address=address,
                      ladder_spec={"shape": shape, "surface": surface}, q_range=(q_min, q_max),
                      background_degree=background_degree, solvent=tuple(solvent or ()),
                      capillary=tuple(capillary or ()), compton=compton, refine_microstrain=refine_microstrain)
    failures = []
    for f, r in zip(files, out):
        for w in r["refined"].get("warnings", []):
            typer.echo(f"qdsize: warning: {w}", err=True)
        for m in r["refined"].get("messages", []):
            typer.echo(f"qdsize: note: {f}: {m}", err=True)
        if "error" in r["refined"]:
            failures.append(r["refined"]["error"])
    emit_refined(out, fmt)
    for line in failures:
        typer.echo(f"qdsize: error: {line}", err=True)
    if failures:
        sys.exit(2)
