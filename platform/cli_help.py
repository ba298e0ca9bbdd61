"""Help for the `qdsize` commands: runnable examples under every command's --help, flags shown without a value."""

from __future__ import annotations

Q = "qdsize"
EXAMPLES = {
    "pattern": [f"{Q} pattern --diameter-nm 4.2 --dispersion-pct 8 -o pbs_4p2.xy --plot pbs_4p2.png",
                f"{Q} pattern --xyz cluster.xyz --b-iso Pb=1.2,S=0.8 -o cluster.xy"],
    "augment-gallery": [f"{Q} augment-gallery -o gallery.png"],
    "simulate": [f"{Q} simulate conf/dataset/smoke.yaml",
                 f"{Q} simulate conf/dataset/pbs.yaml --samples 20000 --seed 7 --workers 2"],
    "dataset info": [f"{Q} dataset info $QDSIZE_HOME/datasets/smoke"],
    "dataset show": [f"{Q} dataset show $QDSIZE_HOME/datasets/smoke --split benchmark --index 3 -o sample3.png"],
    "train": [f"{Q} train conf/train/smoke.yaml train.epochs=2",
              f"{Q} train conf/train/acnn.yaml --register"],
    "evaluate": [f"{Q} evaluate models:/qdsize-pbs@champion $QDSIZE_HOME/datasets/pbs --out eval/"],
    "sweep": [f"{Q} sweep conf/sweep/acnn.yaml --trials 8",
              f"{Q} sweep conf/sweep/acnn.yaml --resume"],
    "ui": [f"{Q} ui --port 5000"],
    "predict": [f"{Q} predict my_sample.xy",
                f"{Q} predict examples/  # each pattern in a folder",
                f"{Q} predict s.xye --x-unit 2theta --wavelength 0.5594 --format csv >sizes.csv",
                f"{Q} predict s.xy --resolution 0.0141,0.0012 --refine --plot fit.png",
                f"cat s.xy | {Q} predict -  # from standard input",
                f"{Q} predict run/*.xy --strict  # exit 3 if any is flagged"],
    "resolution": [f"{Q} resolution lab6.xy --standard LaB6 --plot widths.png"],
    "refine": [f"{Q} predict s.xy --format json > pred.json && {Q} refine s.xy --from-json pred.json --plot fit.png"],
    "model list": [f"{Q} model list"],
    "model info": [f"{Q} model info", f"{Q} model info models:/qdsize-pbs@champion --format json"],
    "model export": [f"{Q} model export models:/qdsize-pbs@champion --figures isim.json --out release/"],
    "workspace": [f"{Q} workspace", "export MLFLOW_TRACKING_URI=$(qdsize workspace --tracking-uri)"],
}


def epilog(name: str) -> str:
    lines = EXAMPLES[name]
    return "Examples:\n\n" + "\n\n".join(f"  $ {ln}" for ln in lines)


def _flags_without_value() -> None:
    """Typer shows `--refine <bool>` for a flag; a flag takes no value, so show none."""
    try:
        from typer.core import TyperOption
    except ImportError:  # another typer layout: its own rendering stays
        return
    if getattr(TyperOption, "_qdsize_flags", False):
        return
    original = TyperOption.display_type_rich

    def display_type_rich(self, ctx):
        if getattr(self, "is_flag", False):
            return None
        return original(self, ctx)

    TyperOption.display_type_rich = display_type_rich
    TyperOption._qdsize_flags = True


PIPED_HELP_WIDTH = 120


def wide_when_piped() -> None:
    """Help read in a pager or a file: 120 columns, so option names and env vars are not cut to fit 80."""
    import sys

    try:
        import typer.rich_utils as ru
    except ImportError:
        return
    if not sys.stdout.isatty() and ru.MAX_WIDTH is None:
        ru.MAX_WIDTH = PIPED_HELP_WIDTH


def commands(app, prefix: str = ""):
    """(name, CommandInfo) of every command of a Typer app and its sub-apps, e.g. ('model info', info)."""
    for info in app.registered_commands:
        name = info.name or info.callback.__name__.replace("_", "-")
        yield (prefix + name, info)
    for group in app.registered_groups:
        yield from commands(group.typer_instance, prefix + group.name + " ")


def attach(app) -> None:
    """Put the examples under every command's help (once) and show flags without a value."""
    _flags_without_value()
    for name, info in commands(app):
        if name in EXAMPLES and not info.epilog:
            info.epilog = epilog(name)
