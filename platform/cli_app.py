"""The one `qdsize` Typer app and its root options (--version); the cli* modules add their commands to it."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Size and size dispersion of colloidal quantum dots from X-ray total scattering.",
                  epilog="Workspace: $QDSIZE_HOME if set, else a .qdsize/ folder in the current folder or one above "
                         "it, else the per-user data folder; `qdsize workspace` says which. Bad input ends in one "
                         "line on stderr and exit 2.")


def version_text() -> str:
    """qdsize's version, the released model it ships and the workspace in use."""
    from importlib.metadata import PackageNotFoundError, version

    from qdsize.platform.workspace import locate

    try:
        mine = version("qdsize")
    except PackageNotFoundError:
        mine = "unknown (not installed)"
    try:
        from qdsize.ml.predict import released_card

        card = released_card()
        release = f"builtin:{card['name']}/{card['release']['version']}" if card else "none installed"
    except Exception as exc:  # a damaged bundle must not hide the version
        release = f"unreadable ({exc})"
    where, how = locate()
    return f"qdsize {mine}\nreleased model: {release}\nworkspace: {where}, {how}"


def _version(value: bool) -> None:
    if value:
        typer.echo(version_text())
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                       help="Print the version, the released model and the workspace, and exit.")):
    """Size and size dispersion of colloidal quantum dots from X-ray total scattering."""
