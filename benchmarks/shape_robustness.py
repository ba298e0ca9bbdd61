"""Benchmark: how a model does on particle shapes, surfaces and centrings (robustness to the structure variant).

For each variant asked, simulates a small set of experiment-like patterns (the default dataset's config with only
that variant, the `benchmark` and `seedgrid` splits under the frozen splits' realistic preset, families cached in
QDSIZE_HOME) and scores each model on them as the frozen splits are scored, without the resolution (as `qdsize
predict` runs by default) and told it. A variant a model never saw and still gets right is robustness; one it gets
wrong with a small ECE at least says so honestly.

Variants are dataset overrides joined by '+', named by the text before '='; the default set:
    octahedron=dataset.variants.shapes=[octahedron]
    polyhedron:1.3=dataset.variants.shapes=['polyhedron:1.3']
    as_cut=dataset.variants.surfaces=[as_cut]
    atom_centred=dataset.variants.centre=atom

    .venv/bin/python benchmarks/shape_robustness.py MODEL_URI [MODEL_URI ...] [--variant NAME=OVERRIDE[+...]]
        [--samples 4000] [--keep DIR] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"octahedron": ["dataset.variants.shapes=[octahedron]"],
            "polyhedron:1.3": ["dataset.variants.shapes=['polyhedron:1.3']"],
            "as_cut": ["dataset.variants.surfaces=[as_cut]"],
            "atom_centred": ["dataset.variants.centre=atom"]}
KEYS = {"seedgrid_size_within_0p25nm": "seedgrid within 0.25", "benchmark_mean_diameter_mae_nm": "MAE nm",
        "benchmark_dispersion_mae_pct": "disp. MAE pts", "benchmark_size_accuracy": "size acc.",
        "benchmark_ece": "ECE"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="model URIs or folders (models:/..., runs:/..., a qdsize_model folder)")
    ap.add_argument("--variant", action="append", metavar="NAME=OVERRIDE[+OVERRIDE]",
                    help="a variant to score (repeatable; default: octahedron, polyhedron:1.3, as_cut, atom_centred)")
    ap.add_argument("--samples", type=int, default=4000, help="patterns per variant (half benchmark, half seedgrid)")
    ap.add_argument("--keep", metavar="DIR", help="keep the variant datasets in DIR (reused when present)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from qdsize.ml import data
    from qdsize.ml import predict as pr
    from qdsize.ml.train import frozen_split_scores, read_frozen_splits
    from qdsize.platform import config as cf
    from qdsize.platform import simulate as sm

    torch.set_num_threads(args.threads)
    variants = VARIANTS
    if args.variant:
        variants = {v.split("=", 1)[0]: v.split("=", 1)[1].split("+") for v in args.variant}
    common = [f"dataset.samples={args.samples}", "dataset.variants.training_shapes=[]",
              "dataset.splits={train: 0, val: 0, test: 0, benchmark: 0.5, seedgrid: 0.5}"]
    models = {uri: pr.load(uri) for uri in args.models}
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep).resolve() if args.keep else Path(tmp)
        for name, overrides in variants.items():
            out = root / name.replace(":", "_")
            loaded = cf.load_dataset_config(REPO / "conf/dataset/pbs.yaml", [*common, *overrides])
            sm.run(loaded, out, use_ray=False, quiet=True)  # resumes (no-op) when kept and complete
            frozen, inst, edges = read_frozen_splits(out), data.instrument_of(out), data.class_edges(out)
            table = Table(title=escape(f"{name}: {' '.join(overrides)} ({args.samples} patterns, realistic preset)"),
                          title_justify="left")
            table.add_column("model")
            table.add_column("resolution")
            for label in KEYS.values():
                table.add_column(label, justify="right")
            for uri, model in models.items():
                with torch.no_grad():
                    m, _ = frozen_split_scores(model.model.eval(), frozen, "cpu", edges, inst)
                for blind in (True, False):
                    keys = [k.replace("_", "_blind_", 1) if blind else k for k in KEYS]
                    if all(k in m for k in keys):
                        told = not blind and inst is not None and model.takes_resolution
                        table.add_row(uri, "told" if told else "blind", *(f"{m[k]:.3f}" for k in keys))
            console.print(table)


if __name__ == "__main__":
    main()
