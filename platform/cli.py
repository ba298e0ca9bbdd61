"""The `qdsize` command line: one Typer app; bad input ends in one clear line and a non-zero exit."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from qdsize.sim.errors import InputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Size and size dispersion of colloidal quantum dots from X-ray total scattering.")


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
    shape: str = typer.Option("sphere", help="sphere, cube, cuboctahedron, truncated_octahedron, octahedron."),
    diameter_nm: Optional[float] = typer.Option(None, "--diameter-nm", help="Equal-volume (mean) diameter in nm."),
    dispersion_pct: float = typer.Option(0.0, "--dispersion-pct", help="Lognormal std/mean in percent."),
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
                                dispersion_pct=dispersion_pct, surface=surface, anion_removal=anion_removal,
                                centre=centre, facet_ratio=facet_ratio, a_angstrom=a_angstrom, strain=strain,
                                microstrain_pct=microstrain_pct, b_iso=b, energy_kev=energy_kev, seed=seed,
                                crystal=xtal)
    params = {**pat.params, "q_min": q_min, "q_max": q_max, "q_step": q_step}
    out.parent.mkdir(parents=True, exist_ok=True)
    io.write_pattern(out, q, pat.intensity, params)
    if plot is not None:
        from qdsize.platform.figures import plot_patterns

        label = str(xyz) if xyz else f"{params['material']} {params['shape']} {params['mean_diameter_nm']:.2f} nm"
        plot_patterns(plot, [(q, pat.intensity, label)], title="qdsize pattern")
    typer.echo(f"wrote {out} ({q.size} points, {params.get('mean_atoms_per_particle', params.get('n_atoms'))} atoms)")


@app.command("augment-gallery")
def augment_gallery(out: Path = typer.Option(Path("augment_gallery.png"), "-o", "--out", help="Output PNG.")):
    """One clean PbS pattern and the same pattern under each augmentation effect, typical and strong."""
    from qdsize.sim.augment import augment_gallery as make

    make(out)
    typer.echo(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning input errors into one line on stderr and exit code 2."""
    try:
        app(args=argv, standalone_mode=False)
    except InputError as exc:
        typer.echo(f"qdsize: error: {exc}", err=True)
        return 2
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("qdsize: aborted", err=True)
        return 130
    except SystemExit as exc:  # click's own exits (help, version)
        return int(exc.code or 0)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
