"""Benchmark: how much a model loses on a particle shape and a solvent it never saw (a shifted split).

Trains the default config (conf/train/acnn.yaml) with one shape and one solvent held out of training and
validation (`train.holdout`), into a throw-away or kept MLflow store, then prints the model's scores on test rows
of the shapes and solvents it was trained on ("in") against test rows of the held-out shape in the held-out
solvent ("out"), both under the realistic augmentation of the frozen splits, and the drop. With --reference, a
model trained on everything is scored on the same two sets: the drop it shows is what the test sets differ by in
difficulty, the rest is what not having seen the shape and solvent costs.

    .venv/bin/python benchmarks/shifted_split.py [CONFIG] [key=value ...] [--shape cube] [--solvent water]
        [--reference MODEL_URI] [--keep DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
KEYS = ("mean_diameter_mae_nm", "dispersion_mae_pct", "size_accuracy", "dispersion_accuracy", "joint_accuracy",
        "size_within_0p25nm", "joint_within")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default=str(REPO / "conf/train/acnn.yaml"))
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=10")
    ap.add_argument("--shape", default="cube", help="particle shape kept out of training")
    ap.add_argument("--solvent", default="water", help="solvent kept out of training")
    ap.add_argument("--reference", metavar="MODEL_URI", help="a model trained on everything, scored alike")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", metavar="DIR", help="keep the MLflow store (run, figures, model) in DIR")
    args = ap.parse_args()

    import mlflow

    from qdsize.ml import data
    from qdsize.ml import predict as pr
    from qdsize.ml.train import resolve_dataset, shifted_scores, shifted_split, train
    from qdsize.platform import tracking
    from qdsize.platform.cli_ml import load_train_config

    torch.set_num_threads(args.threads)
    holdout = [f"train.holdout.shapes=[{args.shape}]", f"train.holdout.solvents=[{args.solvent}]"]
    cfg = load_train_config(Path(args.config), [*args.overrides, *holdout]).config.train
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(args.keep).resolve() if args.keep else Path(tmp)
        store.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
        exp = tracking.ensure_experiment("shifted-split", artifact_location=(store / "mlartifacts").as_uri())
        result = train(cfg, experiment_id=exp, progress=True,
                       report=lambda r: console.print(f"epoch {r['epoch']}: val loss {r['val_loss']:.4f}"))

        # the logged scores (blank unsubtracted), then the same with the blank subtracted (then mostly the shape
        # differs), for the held-out model and, if given, a model that saw everything
        dataset = resolve_dataset(cfg.dataset)
        q, edges = data.q_grid(dataset), data.class_edges(dataset)
        models = {"held-out model": pr.load(result["model_uri"]).model}
        if args.reference:
            models["reference (saw everything)"] = pr.load(args.reference).model
        rows = {}
        for blank in ("unsubtracted", "subtracted"):
            split = shifted_split(dataset, cfg.holdout, cfg.augment_anchor, q, cfg.seed, blank == "subtracted")
            for name, net in models.items():
                m = shifted_scores(net, split, "cpu", edges)
                rows[f"{name}, blank {blank}"] = {(side, k): m[f"shifted_{side}_{k}"]
                                                  for side in ("in", "out", "drop") for k in KEYS}

        table = Table("model", "metric", "in (trained shapes, solvents)",
                      f"out ({args.shape} in {args.solvent})", "drop")
        for name, r in rows.items():
            for k in KEYS:
                table.add_row(name, k, *[f"{r[(side, k)]:.4f}" for side in ("in", "out", "drop")])
        console.print(table)
        console.print(f"held-out run {result['run_id']}, model {result['model_uri']}; drop = out - in for errors, "
                      "in - out for accuracies (positive = worse on the unseen shape and solvent)")


if __name__ == "__main__":
    main()
