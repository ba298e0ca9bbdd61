"""`qdsize model list | info | export`: the released and registered models, their cards, and making a release."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from qdsize.platform.cli_app import app
from qdsize.sim.errors import InputError

model_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Released and registered models: list them, print their cards, export a release.")
app.add_typer(model_app, name="model")

TRACKING = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                        help="MLflow server (default: the workspace SQLite store).")


def _store_exists(tracking_uri: str | None) -> bool:
    from qdsize.platform import tracking

    uri = tracking.tracking_uri(tracking_uri)
    return not tracking.is_local(uri) or (uri.startswith("sqlite:///") and Path(uri[len("sqlite:///"):]).exists())


@model_app.command("list")
def list_models(tracking_uri: Optional[str] = TRACKING):
    """The released model shipped with qdsize and every registered version in the tracking store."""
    from qdsize.ml import predict as pr
    from qdsize.platform import models, textout, tracking

    table = []
    released = pr.builtin()
    if released is not None:
        card = released.card["release"]
        table.append([released.model_uri, "-", card["source"]["run_id"][:12], models.headline(card["scores"]),
                      "released with qdsize"])
    uri = tracking.tracking_uri(tracking_uri)
    if _store_exists(tracking_uri):
        from mlflow import MlflowClient

        tracking.setup(tracking_uri)
        client = MlflowClient()
        for rm in client.search_registered_models():
            aliases: dict = {}
            for alias, version in (client.get_registered_model(rm.name).aliases or {}).items():
                aliases.setdefault(str(version), []).append(alias)
            for v in sorted(client.search_model_versions(f"name='{rm.name}'"), key=lambda v: int(v.version)):
                table.append([f"models:/{rm.name}/{v.version}", ", ".join(aliases.get(str(v.version), [])) or "-",
                              (v.run_id or "")[:12] or "-",
                              models.headline(models._registry_scores(v)), v.tags.get("decision", "") or "-"])
    textout.table(["model", "aliases", "run", "frozen splits (told)", "note"], table)
    chosen = models.resolve(None, tracking_uri, warn=lambda m: None) if (released or _store_exists(tracking_uri)) \
        else None
    typer.echo(f"tracking store: {uri}" + ("" if _store_exists(tracking_uri) else " (none yet)"))
    if chosen is not None:
        typer.echo(f"`qdsize predict` without --model answers with {chosen.model_uri}")


@model_app.command("info")
def info(
    model_uri: Optional[str] = typer.Argument(None, help="builtin, models:/NAME@ALIAS, models:/NAME/VERSION or a "
                                              "bundle folder (default: the model `qdsize predict` would use)."),
    fmt: str = typer.Option("markdown", "--format", help="markdown or json."),
    tracking_uri: Optional[str] = TRACKING,
):
    """Print a model's card: training data and config, every frozen-split score, benchmarks, limits."""
    from qdsize.ml import predict as pr
    from qdsize.platform import models, tracking

    if fmt not in ("markdown", "json"):
        raise InputError(f"--format = {fmt!r}: expected markdown or json")
    if model_uri is None:
        model_uri = models.resolve(None, tracking_uri, warn=lambda m: typer.echo(f"qdsize: note: {m}", err=True)) \
            .model_uri
        if model_uri.startswith("builtin:"):
            model_uri = "builtin"
    if model_uri.startswith(("models:/", "runs:/")):
        tracking.setup(tracking_uri)
    card = models.card_of(model_uri)
    if fmt == "json":
        typer.echo(json.dumps(card, indent=1))
        return
    typer.echo(models.card_markdown(card))
    if model_uri == "builtin" or model_uri.startswith("builtin:"):
        typer.echo(f"bundle: {pr.RELEASED_DIR}\nserve:  MLFLOW_TRACKING_URI={tracking.tracking_uri(tracking_uri)} "
                   f"mlflow models serve -m {pr.RELEASED_DIR} --env-manager local --host 127.0.0.1 --port 5001")


@model_app.command("export")
def export(
    model_uri: str = typer.Argument(..., help="Registered model, e.g. models:/qdsize-pbs@champion."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Bundle folder (default: the package's released "
                                       "model, ml/released/qdsize-pbs in a checkout)."),
    figures: Optional[list[Path]] = typer.Option(None, "--figures", help="A benchmark's --json output to put on the "
                                                 "card (repeatable): benchmarks/independent_sim.py, "
                                                 "external_debussy.py, measured.py."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="The training dataset folder, if it moved."),
    version: Optional[str] = typer.Option(None, "--version", help="Release version (default: qdsize's)."),
    tracking_uri: Optional[str] = TRACKING,
):
    """Write a release bundle (weights, material-check data, model card in Markdown and JSON) from a registered model.

    A release is: qdsize simulate conf/dataset/pbs.yaml, qdsize train conf/train/acnn.yaml --register, the
    benchmarks with --json, then qdsize model export models:/qdsize-pbs@champion --figures ... (commit the bundle
    and its card together)."""
    from qdsize.platform import models, tracking

    tracking.setup(tracking_uri)
    for f in figures or []:
        if not f.is_file():
            raise InputError(f"--figures = {str(f)!r}: no such file; expected a benchmark's --json output")
    target, card = models.export(model_uri, out, figures=list(figures or []), dataset=dataset,
                                 release_version=version)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    typer.echo(f"wrote {target} ({size / 1e6:.2f} MB): builtin:{card['name']}/{card['release']['version']} from "
               f"{model_uri} (run {card['source']['run_id']}); card: {target / 'MODEL_CARD.md'}")
