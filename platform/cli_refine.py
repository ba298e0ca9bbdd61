"""`qdsize refine`: exact DSE refinement of measured patterns from the network's estimates (Ray for a batch)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from qdsize.platform.cli_app import app
from qdsize.sim.errors import InputError, bad
from qdsize.sim.refine import START_KEYS

ESTIMATE_KEYS = START_KEYS[:2]  # the network's answer, needed
STD_KEYS = START_KEYS[2:]  # the network's uncertainties: the guard uses them where given

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
    from qdsize.sim import measured

    return measured.read_pattern(f, x_unit=x_unit, wavelength_angstrom=wavelength_angstrom, energy_kev=energy_kev)


def refine_one(f, start: dict, *, x_unit=None, wavelength_angstrom=None, energy_kev=None, options=None):
    """(RefineResult, warnings) for one file, or raises InputError with the file named."""
    from qdsize.sim import refine as rf

    pat = _read(f, x_unit, wavelength_angstrom, energy_kev)
    return rf.refine_pattern(pat, start, options), list(pat.warnings)


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
            pat = _read(f, kw.get("x_unit"), kw.get("wavelength_angstrom"), kw.get("energy_kev"))
        except InputError:
            continue  # reported by the worker
        q = pat.q_inv_angstrom
        try:
            lo, hi = rf.fit_range(q, opts.get("q_range") or (1.0, None))
        except InputError:
            continue  # reported by the worker
        q = q[(q >= lo) & (q <= hi)]
        if q.size < 2:
            continue
        try:  # as refine() loads it
            key = rf.fit_ladder_range(q, resolution=opts.get("resolution", "fit"), q_zero=opts.get("q_zero", True),
                                      refine_microstrain=opts.get("refine_microstrain", False),
                                      microstrain_pct=opts.get("microstrain_pct", 0.0))
            for spec in opts.get("models") or [{}]:
                full = {**(opts.get("ladder_spec") or {}), **spec}
                k = (key, tuple(sorted(full.items())))
                if k not in done:
                    rf.load_ladder(key[0], key[1], spec=full, microstrain_max_pct=key[2])
                    done.add(k)
        except InputError:
            continue


def refine_many(files: list, starts: list[dict], *, x_unit=None, wavelength_angstrom=None, energy_kev=None,
                options: dict | None = None, address: str | None = None, use_ray: bool | None = None,
                progress: bool | None = None) -> list:
    """Refine every file from its start; each entry is (RefineResult, warnings) or an error line.

    Ray runs the batch when there is more than one file and more than one core (or a cluster address);
    otherwise a plain loop in this process.
    """
    from qdsize.platform import textout
    from qdsize.platform.workspace import home

    kw = {"x_unit": x_unit, "wavelength_angstrom": wavelength_angstrom, "energy_kev": energy_kev,
          "options": dict(options or {}), "workspace": str(home())}  # one family cache, here and on workers
    address = address or os.environ.get("RAY_ADDRESS") or None
    if use_ray is None:
        use_ray = len(files) > 1 and ((os.cpu_count() or 1) > 1 or address is not None)
    if not use_ray:
        return [_safe_one(f, s, kw) for f, s in textout.progress(list(zip(files, starts)), "refining", progress)]
    from qdsize.platform.simulate import init_ray
    from qdsize.sim import refine as rf

    # workers get the resolved ladder explicitly: the same model as here
    kw["options"]["ladder_spec"] = {**rf.DEFAULT_LADDER, **(kw["options"].get("ladder_spec") or {})}
    _prebuild(files, kw)
    import ray

    started = init_ray(address)
    try:
        task = ray.remote(num_cpus=1, max_retries=1)(_safe_one)
        kw_ref = ray.put(kw)
        refs = [task.remote(str(f), s, kw_ref) for f, s in zip(files, starts)]
        pending = list(refs)
        for _ in textout.progress(range(len(refs)), "refining", progress):  # one step per finished file
            _, pending = ray.wait(pending, num_returns=1)
        return ray.get(refs)
    finally:
        if started:
            ray.shutdown()


def refine_rows(rows: list[dict], files: list, *, x_unit=None, wavelength_angstrom=None, energy_kev=None,
                plot: Path | None = None, address: str | None = None, use_ray: bool | None = None,
                progress: bool | None = None, **options) -> list[dict]:
    """The network's rows (one per file, in order) with a `refined` object added: the refined values with the
    guard's verdict (`accepted`, `verdict`, and `answer`: what to report, the refinement's or the network's), or
    {"error": "..."} for a file that could not be refined. The network's uncertainties in the rows
    (mean_diameter_std_nm, size_dispersion_std_pct) feed the guard. Options (qdsize.sim.refine.OPTION_KEYS) go to
    `qdsize.sim.refine.refine`; among them shape="sphere" | "cube" | "cuboctahedron" | "truncated_octahedron" |
    "octahedron" | "polyhedron:RHO" | "auto" (default: the best by chi-square of qdsize.sim.refine.AUTO_MODELS, the
    spread between them added to the uncertainty), surface="cation_rich" | "stoichiometric" | "as_cut" (default:
    each model's own), and solvent= a name or a sequence of names (toluene, hexane, octane, chloroform, water),
    each a background curve with a free amplitude; resolution="fit" | "none" | (fwhm0, rel) from a calibrant.
    A shape without a surface is fitted with each of AUTO_SURFACES; a shape and a surface, with that family alone.
    A ladder_spec={"shape": ...} (older callers) is read as shape=."""
    if len(rows) != len(files):
        raise bad("rows", f"{len(rows)} rows for {len(files)} files", "one estimate row per file")
    from qdsize.sim.refine import fit_options

    options = fit_options(options)
    starts = [{**{k: r[k] for k in ESTIMATE_KEYS}, **{k: r[k] for k in STD_KEYS if r.get(k) is not None}}
              for r in rows]
    results = refine_many(list(files), starts, x_unit=x_unit, wavelength_angstrom=wavelength_angstrom,
                          energy_kev=energy_kev, options=options, address=address, use_ray=use_ray,
                          progress=progress)
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
    """Data and fit with its parts, the particles and each background term (top), and the difference data - model
    with its +-2 sigma band (bottom, same units); the guard's verdict in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = result.refined
    q = result.q_inv_angstrom
    fig, (ax, ad) = plt.subplots(2, 1, figsize=(9, 6.5), dpi=110, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot(q, result.data, ".", ms=1.5, color="k", label="data")
    ax.plot(q, result.model, lw=1.0, color="tab:red", label="fit")
    colours = iter(["tab:purple", "tab:blue", "tab:cyan", "tab:olive", "tab:brown", "tab:pink", "tab:gray"])
    for nm, curve in result.components.items():
        ax.plot(q, curve, lw=0.9, ls="-" if nm == "particles" else "--", color=next(colours, "0.5"), label=nm)
    if not result.components:
        ax.plot(q, result.background, lw=1.0, color="tab:blue", label="background")
    ax.set_ylabel("intensity (data units)")
    ax.legend(frameon=False, fontsize=8, ncol=2)
    b = ", ".join(f"B({el}) {v:.2f}" for el, v in r["b_iso"].items())
    res = r.get("resolution") or {}
    inst = f", FWHM0 {res['fwhm0_inv_angstrom']:.4f} 1/A, REL {res['fwhm_rel']:.4f}" if "fwhm0_inv_angstrom" in res \
        else ""
    verdict = r.get("verdict", "")
    ax.set_title(f"{Path(title).name}: {_pm_refined(r, 'mean_diameter_nm', 'mean_diameter_std_nm', 3)} nm, "
                 f"{_pm_refined(r, 'size_dispersion_pct', 'size_dispersion_std_pct', 2)} %, a = "
                 f"{r['lattice_parameter_angstrom']:.4f} A, {b}{inst}\nRwp {r['rwp']:.4f}, reduced chi2 "
                 f"{r['reduced_chi2']:.3g}; refinement {verdict}", fontsize=8.5,
                 color="k" if r.get("accepted", True) else "tab:red")
    ad.plot(q, result.data - result.model, lw=0.7, color="tab:green", label="data - fit")
    ad.fill_between(q, -2 * result.sigma, 2 * result.sigma, color="0.85", lw=0, label="±2 sigma")
    ad.axhline(0, color="k", lw=0.5)
    ad.set_xlabel(r"$Q$ (1/$\AA$)")
    ad.set_ylabel("residual")
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
    """'value ± std', or 'value (at bound)' / 'value ± ?' when the uncertainty is undetermined (a parameter at a
    bound, a singular covariance): never a fake '± 0.000'."""
    if std is None:
        return f"{value:.{digits}f} ± ?"
    return f"{value:.{digits}f} ± {std:.{digits}f}"


def _pm_refined(ref: dict, key: str, std_key: str, digits: int) -> str:
    """A refined label with its uncertainty, or '(at bound)' when its parameter ended on a bound."""
    if key in ref.get("at_bound", []):
        return f"{ref[key]:.{digits}f} (at bound)"
    return _pm(ref[key], ref[std_key], digits)


def emit_refined(rows: list[dict], fmt: str) -> None:
    """Print rows that carry a `refined` object: a table of the network's and the refined values, the guard's
    verdict and the answer to report, or JSON."""
    if fmt == "json":
        typer.echo(json.dumps(rows, indent=1))
        return
    from qdsize.platform import textout

    table = []
    for r in rows:
        ref = r["refined"]
        net = f"{r['mean_diameter_nm']:.2f}, {r['size_dispersion_pct']:.1f}"
        if "error" in ref:
            table.append([Path(r["file"]).name, net, "-", "-", "-", "-", "-", net, "error: see below"])
            continue
        ans = ref.get("answer") or {}
        answer = f"{ans.get('mean_diameter_nm', r['mean_diameter_nm']):.2f}, " \
                 f"{ans.get('size_dispersion_pct', r['size_dispersion_pct']):.1f} ({ans.get('source', 'network')})"
        verdict = ref.get("verdict", "")
        if ref.get("flags"):
            extra = [f for f in ref["flags"] if f not in ("moved_beyond_uncertainty",) and not f.startswith("at_bound")]
            verdict += f" [{', '.join(extra)}]" if extra else ""
        table.append([Path(r["file"]).name, net,
                      _pm_refined(ref, "mean_diameter_nm", "mean_diameter_std_nm", 3),
                      _pm_refined(ref, "size_dispersion_pct", "size_dispersion_std_pct", 2),
                      _pm(ref["lattice_parameter_angstrom"], ref["lattice_parameter_std_angstrom"], 4),
                      f"{ref['rwp']:.4f}", f"{ref['reduced_chi2']:.3g}", answer, verdict or "-"])
    textout.table(["file", "network (nm, %)", "refined mean (nm)", "refined dispersion (%)", "a (A)", "Rwp",
                   "chi2/dof", "answer (nm, %)", "refinement"], table)


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
    shape: str = typer.Option("auto", "--shape", help="Model shape: auto (the best-fitting of sphere, cube, "
                              "octahedron, cuboctahedron; their spread joins the uncertainty), sphere, "
                              "cuboctahedron, truncated_octahedron, cube, octahedron or polyhedron:RHO."),
    surface: Optional[str] = typer.Option(None, "--surface", help="cation_rich (Pb-rich), stoichiometric or "
                                          "as_cut (default: cation_rich, or each auto model's own)."),
    solvent: Optional[list[str]] = typer.Option(None, "--solvent", help="Solvent curve with a free amplitude "
                                                "(repeatable): toluene, hexane, octane, chloroform, water."),
    capillary: Optional[list[str]] = typer.Option(None, "--capillary", help="Capillary curve with a free "
                                                  "amplitude (repeatable): borosilicate, kapton."),
    compton: bool = typer.Option(False, "--compton", help="Add the sample's Compton curve as a background term."),
    background: str = typer.Option("spline", "--background", help="Smooth background: spline (cubic B-splines "
                                   "evenly spaced in sqrt(Q), absorbs unknown liquid, capillary and Compton shapes) "
                                   "or legendre (a polynomial of --background-degree)."),
    background_degree: int = typer.Option(3, "--background-degree", help="Degree of the Legendre background."),
    resolution: str = typer.Option("fit", "--resolution", metavar="fit|none|FWHM0,REL",
                                   help="Instrument resolution FWHM(Q) = sqrt(FWHM0^2 + (REL Q)^2): fitted (default), "
                                   "none, or fixed from a calibrant (`qdsize resolution`)."),
    q_zero: bool = typer.Option(True, "--q-zero/--no-q-zero", help="Fit a Q-axis zero error (the lattice "
                                "parameter absorbs a Q-scale error)."),
    q_min: float = typer.Option(1.0, "--q-min", help="Lowest Q fitted (1/A)."),
    q_max: Optional[float] = typer.Option(None, "--q-max", help="Highest Q fitted (1/A; default: the data's)."),
    refine_microstrain: bool = typer.Option(False, "--refine-microstrain/--no-microstrain",
                                            help="Refine the rms lattice-parameter spread between particles "
                                            "(default: zero; a fitted resolution REL plays its part)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default RAY_ADDRESS; "
                                          "a batch uses an embedded local Ray when there is more than one core)."),
):
    """Refine the network's size and dispersion by a least-squares fit of the exact DSE model to each pattern.

    The refined answer replaces the network's only when the fit is good, the size is off its bounds and the move
    is within two combined uncertainties; otherwise the network's answer stands and one line says why."""
    import sys

    if fmt not in ("table", "json"):
        raise InputError(f"--format = {fmt!r}: expected table or json")
    rows = match_estimates(list(files), load_estimates(from_json))
    out = refine_rows(rows, list(files), x_unit=x_unit, wavelength_angstrom=wavelength_angstrom,
                      energy_kev=energy_kev, plot=plot, address=address, shape=shape, surface=surface,
                      q_range=(q_min, q_max), background=background, background_degree=background_degree,
                      resolution=resolution, q_zero=q_zero, solvent=tuple(solvent or ()),
                      capillary=tuple(capillary or ()), compton=compton, refine_microstrain=refine_microstrain)
    failures = []
    for f, r in zip(files, out):
        for w in r["refined"].get("warnings", []):
            typer.echo(f"qdsize: warning: {w}", err=True)
        for m in r["refined"].get("messages", []):
            typer.echo(f"qdsize: note: {f}: {m}", err=True)
        if "verdict" in r["refined"] and not r["refined"]["accepted"]:
            typer.echo(f"qdsize: warning: {f}: refinement {r['refined']['verdict']}; the network's answer stands",
                       err=True)
        if "error" in r["refined"]:
            failures.append(r["refined"]["error"])
    emit_refined(out, fmt)
    for line in failures:
        typer.echo(f"qdsize: error: {line}", err=True)
    if failures:
        sys.exit(2)
