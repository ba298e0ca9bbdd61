"""Throughput of `qdsize simulate` on embedded Ray: patterns/s, time split, bytes per pattern, 1 -> 2 workers."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback-only embedded Ray

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from qdsize.platform import config as cf  # noqa: E402
from qdsize.platform import simulate as sm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def steady_rate(completions: list, skip: int) -> float:
    """Patterns/s between the first `skip` shard completions (worker start-up) and the last one."""
    if len(completions) <= skip:
        return float("nan")
    t0 = completions[skip - 1][0] if skip else 0.0
    rows = sum(r for _, r in completions[skip:])
    return rows / (completions[-1][0] - t0)


def one_run(loaded, out: Path, workers: int) -> dict:
    import ray

    t = time.perf_counter()
    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
    ray_s = time.perf_counter() - t
    try:
        m = sm.run(loaded, out, workers=workers, quiet=True)
    finally:
        ray.shutdown()
    r = m["runs"][-1]
    size = sum(s["bytes"] for s in m["shards"])
    rows = sum(s["rows"] for s in m["shards"])
    return {"workers": workers, "ray_init_s": ray_s, "families_s": r["families_s"], "shards_s": r["shards_s"],
            "compose_cpu_s": r["compose_s"], "write_cpu_s": r["write_s"], "rows": rows,
            "rate": r["written_rows"] / r["shards_s"], "steady": steady_rate(r["completions"], workers),
            "bytes_per_pattern": size / rows, "families_built": r["families_built"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=100_000, help="patterns per run (train split only)")
    ap.add_argument("--config", default=str(REPO / "conf" / "dataset" / "pbs.yaml"))
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    con = Console()
    # frozen, augmented splits are excluded: the figure is about DSE composition and writing
    loaded = cf.load_dataset_config(args.config, [f"dataset.samples={args.samples}",
                                                  "dataset.splits={train: 1, val: 0, test: 0, benchmark: 0, "
                                                  "seedgrid: 0}"])
    cfg = loaded.config.dataset
    con.print(f"config {args.config} ({loaded.hash}); {args.samples:,} patterns x {sm.model_q(cfg).size} Q; "
              f"{len(sm.family_specs(cfg))} families; cache {sm.cache_dir()}")
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="qdsize-bench-"))
    try:
        for w in [int(x) for x in args.workers.split(",")]:
            out = tmp / f"w{w}"
            res = one_run(loaded, out, w)
            results.append(res)
            con.print(res)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t = Table(title="qdsize simulate throughput (embedded Ray, this machine)")
    for c in ("workers", "patterns/s (shards phase)", "steady patterns/s", "families s", "shards s",
              "compose CPU s", "write CPU s", "bytes/pattern", "ray.init s"):
        t.add_column(c, justify="right")
    for r in results:
        t.add_row(str(r["workers"]), f"{r['rate']:,.0f}", f"{r['steady']:,.0f}", f"{r['families_s']:.1f}",
                  f"{r['shards_s']:.1f}", f"{r['compose_cpu_s']:.1f}", f"{r['write_cpu_s']:.1f}",
                  f"{r['bytes_per_pattern']:,.0f}", f"{r['ray_init_s']:.1f}")
    con.print(t)
    if len(results) >= 2:
        con.print(f"speed-up {results[0]['workers']} -> {results[-1]['workers']} workers: "
                  f"{results[-1]['rate'] / results[0]['rate']:.2f}x (shards phase), "
                  f"{results[-1]['steady'] / results[0]['steady']:.2f}x (steady state)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
