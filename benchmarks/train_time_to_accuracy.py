"""Benchmark: wall time to reach the seedgrid floor (size within 0.25 nm >= 97 %) and inference patterns/s.

Trains one network with a training config (default conf/train/acnn.yaml on the default dataset) into a throw-away
MLflow store, scoring the frozen `benchmark` and `seedgrid` splits after every epoch, and prints the learning
curve against wall time, the time at which each floor of the classifier issue was first met (or that it was not),
then the trained model's inference throughput on the benchmark split with the network alone and with the
material check that `qdsize predict` adds. Targets: floor within 30 min on 2 CPU cores; >= 2,000 patterns/s.

    .venv/bin/python benchmarks/train_time_to_accuracy.py [CONFIG] [key=value ...] [--threads 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
FLOORS = {"seedgrid_size_within_0p25nm": 0.97, "seedgrid_joint_within": 0.95,
          "benchmark_size_accuracy": 0.93, "benchmark_dispersion_accuracy": 0.80}
CEILINGS = {"benchmark_mean_diameter_mae_nm": 0.10, "benchmark_dispersion_mae_pct": 1.5, "benchmark_ece": 0.03}


def met(row: dict) -> dict[str, bool]:
    out = {k: row.get(k, -1) >= v for k, v in FLOORS.items()}
    out.update({k: row.get(k, np.inf) <= v for k, v in CEILINGS.items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default=str(REPO / "conf/train/acnn.yaml"))
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=20")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", metavar="DIR", help="keep the MLflow store (run, figures, model) in DIR")
    args = ap.parse_args()

    from qdsize.ml import data
    from qdsize.ml import predict as pr
    from qdsize.ml.train import resolve_dataset, train
    from qdsize.platform import tracking
    from qdsize.platform.cli_ml import load_train_config

    torch.set_num_threads(args.threads)
    cfg = load_train_config(Path(args.config), [*args.overrides, "train.score_frozen_every_epoch=true"]).config.train
    console = Console()
    curve: list[dict] = []
    t0 = time.perf_counter()

    def report(row: dict) -> None:
        curve.append({"wall_s": time.perf_counter() - t0, **row})
        r = curve[-1]
        console.print(f"epoch {r['epoch']:>3}  {r['wall_s']:7.0f} s  seedgrid size within 0.25 nm "
                      f"{r.get('seedgrid_size_within_0p25nm', float('nan')):.3f}  joint "
                      f"{r.get('seedgrid_joint_within', float('nan')):.3f}  benchmark MAE "
                      f"{r.get('benchmark_mean_diameter_mae_nm', float('nan')):.3f} nm / "
                      f"{r.get('benchmark_dispersion_mae_pct', float('nan')):.2f} %"
                      + (f"  | blind: seedgrid {r['seedgrid_blind_size_within_0p25nm']:.3f}, "
                         f"MAE {r['benchmark_blind_mean_diameter_mae_nm']:.3f} nm"
                         if "seedgrid_blind_size_within_0p25nm" in r else ""))

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(args.keep).resolve() if args.keep else Path(tmp)
        store.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{store / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        import mlflow

        mlflow.set_tracking_uri(uri)  # runs and artifacts both in the store folder, nothing in the working folder
        exp = tracking.ensure_experiment("train-time-to-accuracy", artifact_location=(store / "mlartifacts").as_uri())
        result = train(cfg, tracking_uri=uri, experiment_id=exp, report=report, progress=False)
        total_s = time.perf_counter() - t0

        # named scores: with the frozen splits' instrument resolution told (as by a user who measured a calibrant);
        # blind: without it, as `qdsize predict` runs by default
        table = Table("target", "floor", "first met at (s)", "epoch", "final", "final, blind")
        for key in [*FLOORS, *CEILINGS]:
            hit = next((r for r in curve if met(r)[key]), None)
            bound = f">= {FLOORS[key]}" if key in FLOORS else f"<= {CEILINGS[key]}"
            blind = result.get(key.replace("_", "_blind_", 1), float("nan"))
            table.add_row(key, bound, f"{hit['wall_s']:.0f}" if hit else "not met",
                          str(hit["epoch"]) if hit else "-", f"{result.get(key, float('nan')):.4f}", f"{blind:.4f}")
        console.print(table)
        console.print(f"dataset {resolve_dataset(cfg.dataset)}; {len(curve)} epochs in {total_s:.0f} s "
                      f"on {args.threads} threads (target: seedgrid floor within 1800 s)")

        # inference throughput of the trained model, as `qdsize predict` runs it
        predictor = pr.load(result["model_uri"])
        x, _ = data.read_split(resolve_dataset(cfg.dataset), "benchmark", limit=4096)
        rates = {}
        for label, check in (("network alone", None), ("network + material check", predictor.physics)):
            predictor.physics = check
            predictor.predict(x[:64])
            t = time.perf_counter()
            predictor.predict(x)
            rates[label] = len(x) / (time.perf_counter() - t)
        for label, rate in rates.items():
            console.print(f"inference, {label:<26} {rate:8.0f} patterns/s (target >= 2,000)")


if __name__ == "__main__":
    main()
