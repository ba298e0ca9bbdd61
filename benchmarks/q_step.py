"""Benchmark: a model's sizes on patterns measured at a coarser Q step than its grid (robustness to Q grids).

The frozen benchmark split (realistic preset) is taken every k-th point of the model grid, as a detector
integrated at that step would deliver it, and brought back onto the grid by `qdsize predict`'s resampling
(`qdsize.sim.measured.resample`: cubic splines) and, as the peer, by linear interpolation. Each model scores both,
told the split's instrument resolution and blind. Linear interpolation flattens peaks sampled a few times per
width, which a network reads as smaller dots; the bias of large dots shows it.

    .venv/bin/python benchmarks/q_step.py MODEL_URI [MODEL_URI ...] [--steps 1,2,3,4] [--rows 4000]
        [--dataset DIR] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

LARGE_NM = 8.0  # the bias is shown for dots this large and larger, whose peaks are the narrowest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="model URIs or folders (models:/..., runs:/..., a qdsize_model folder)")
    ap.add_argument("--dataset", default="${QDSIZE_HOME}/datasets/pbs", help="dataset folder (default: the default "
                    "dataset of conf/dataset/pbs.yaml; QDSIZE_HOME defaults to ./.qdsize)")
    ap.add_argument("--steps", default="1,2,3,4", help="measured step as multiples of the grid step")
    ap.add_argument("--rows", type=int, default=4000, help="benchmark patterns scored per step")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from qdsize.ml import data
    from qdsize.ml import evaluate as ev
    from qdsize.ml import predict as pr
    from qdsize.ml.train import resolve_dataset
    from qdsize.sim import measured

    torch.set_num_threads(args.threads)
    dataset = resolve_dataset(args.dataset)
    x, lab = data.read_split(dataset, "benchmark", limit=args.rows)
    q = data.q_grid(dataset)
    instrument = data.instrument_of(dataset)
    truth, disp = lab["mean_diameter_nm"], lab["size_dispersion_pct"]
    large = truth >= LARGE_NM
    steps = [int(k) for k in args.steps.split(",")]
    inputs = {}
    for k in steps:
        idx = np.r_[0:len(q):k, len(q) - 1] if (len(q) - 1) % k else np.arange(0, len(q), k)
        spline = np.stack([measured.resample(measured.MeasuredPattern(q[idx], row[idx], None, "benchmark", "q_A"),
                                             q)[0] for row in x])
        linear = np.stack([np.interp(q, q[idx], row[idx]) for row in x]).astype(np.float32)
        inputs[k] = {"qdsize (spline)": spline, "linear (peer)": linear}

    console = Console(width=None if sys.stdout.isatty() else 160)  # piped or saved: not cut to 80 columns
    for uri in args.models:
        model = pr.load(uri)
        told_ok = instrument is not None and model.takes_resolution
        table = Table(title=f"{uri}: {len(x)} benchmark patterns, measured every k-th grid point "
                            f"(grid step {q[1] - q[0]:.4f} 1/A)", title_justify="left")
        for col in ("step 1/A", "resampling", "resolution", "MAE nm", f"bias >= {LARGE_NM:g} nm",
                    f"MAE >= {LARGE_NM:g} nm", "disp. MAE pts", "peer MAE / qdsize MAE"):
            table.add_column(col, justify="right")
        for k in steps:
            for told in ([True, False] if told_ok else [False]):
                res = instrument if told else None
                maes = {}
                for name, xs in inputs[k].items():
                    with torch.no_grad():
                        p = ev.predict_arrays(model.model, xs, resolution=res)
                    e = p["mean_diameter_nm"] - truth
                    maes[name] = float(np.abs(e).mean())
                    ratio = maes[name] / maes["qdsize (spline)"] if name != "qdsize (spline)" else float("nan")
                    table.add_row(f"{k * (q[1] - q[0]):.3f}", name, "told" if told else "blind",
                                  f"{maes[name]:.3f}", f"{e[large].mean():+.3f}", f"{np.abs(e[large]).mean():.3f}",
                                  f"{np.abs(p['size_dispersion_pct'] - disp).mean():.2f}",
                                  "" if np.isnan(ratio) else f"{ratio:.2f}x")
        console.print(table)


if __name__ == "__main__":
    main()
