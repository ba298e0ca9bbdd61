"""Benchmark: how a model's sizes depend on the instrument's width, blind and told (robustness to resolution).

Test patterns of the default dataset under the realistic augmentation of the frozen splits, with the instrument's
constant width fwhm0 (and its relative term, fwhm0 / 10) set to each value asked, from none to a broad
area-detector setup; each model scores them without the resolution (as `qdsize predict` runs by default) and told
it (`--resolution`). A size that the instrument's width moves is what a blind model cannot tell from the line
shapes; a told model that goes wrong at a width is outside what it was trained on.

    .venv/bin/python benchmarks/instrument_width.py MODEL_URI [MODEL_URI ...] [--rows 3000]
        [--widths 0,0.01,0.02,0.03,0.04,0.06,0.08] [--dataset DIR] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

LARGE_NM = 8.0  # the bias is shown for dots this large and larger, where the width matters most


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="model URIs or folders (models:/..., runs:/..., a qdsize_model folder)")
    ap.add_argument("--dataset", default="${QDSIZE_HOME}/datasets/pbs", help="dataset folder (default: the default "
                    "dataset of conf/dataset/pbs.yaml; QDSIZE_HOME defaults to ./.qdsize)")
    ap.add_argument("--rows", type=int, default=3000, help="test patterns scored per width")
    ap.add_argument("--widths", default="0,0.01,0.02,0.03,0.04,0.06,0.08", help="fwhm0 values in 1/A")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()

    from qdsize.ml import data
    from qdsize.ml import evaluate as ev
    from qdsize.ml import predict as pr
    from qdsize.ml.train import resolve_dataset
    from qdsize.sim import augment

    torch.set_num_threads(args.threads)
    widths = [float(w) for w in args.widths.split(",")]
    dataset = resolve_dataset(args.dataset)
    x, lab = data.read_split(dataset, "test", limit=args.rows)
    q = data.q_grid(dataset)
    truth = lab["mean_diameter_nm"]
    large = truth >= LARGE_NM
    base = augment.config_from({"preset": "realistic"}).to_dict()
    patterns = {}
    for w in widths:
        cfg = copy.deepcopy(base)
        cfg["resolution"].update(enabled=w > 0, fwhm0_inv_angstrom=w, fwhm_relative=w / 10)
        patterns[w] = augment.from_config(cfg, q)(torch.as_tensor(x), torch.Generator().manual_seed(args.seed))

    console = Console()
    for uri in args.models:
        model = pr.load(uri)
        trained = (model.card.get("resolution_trained") or {}).get("fwhm0_inv_angstrom")
        table = Table(title=f"{uri}\nfwhm0 trained on {trained} 1/A; {len(x)} test patterns, realistic preset",
                      title_justify="left")
        for col in ("fwhm0 1/A", "blind MAE nm", "blind within 0.25", f"blind bias >= {LARGE_NM:g} nm",
                    "told MAE nm", "told within 0.25", f"told bias >= {LARGE_NM:g} nm"):
            table.add_column(col, justify="right")

        def scores(w, resolution):
            err = ev.predict_arrays(model.model, patterns[w].numpy(), resolution=resolution)["mean_diameter_nm"] - truth
            return [f"{np.abs(err).mean():.3f}", f"{np.mean(np.abs(err) < 0.25):.3f}", f"{err[large].mean():+.3f}"]

        for w in widths:
            told = np.tile(np.float32([[w, w / 10, 0.0]]), (len(x), 1))
            table.add_row(f"{w:g}", *scores(w, None), *(scores(w, told) if model.takes_resolution else ["-"] * 3))
        console.print(table)


if __name__ == "__main__":
    main()
