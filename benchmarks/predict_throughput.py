"""Benchmark: `qdsize predict` on many measured files in one call (target: 1,000 files in <= 30 s on 2 cores).

Writes N experiment-like files (simulated PbS + realistic augmentation, Q in 1/A, .xy) into a temporary folder,
then times one `qdsize predict` call over all of them against the model it is given (default: the workspace
champion, else the released model). The peer is the per-file cost of reading alone, measured in the same run.

    .venv/bin/python benchmarks/predict_throughput.py [--files 1000] [--model URI]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()

    from qdsize.sim import augment, measured, pattern, scattering

    q = scattering.q_grid(0.8, 12.0, 0.004)
    rng = np.random.default_rng(0)
    bases = [pattern.simulate(q, diameter_nm=d, size_dispersion_pct=s, b_iso=1.0).intensity
             for d, s in zip(rng.uniform(2.5, 11.5, 8), rng.uniform(0, 20, 8))]
    aug = augment.from_config({"preset": "realistic"}, q)
    with tempfile.TemporaryDirectory() as tmp:
        batch = torch.as_tensor(np.stack([bases[i % len(bases)] for i in range(args.files)]))
        y = aug(batch, torch.Generator().manual_seed(1)).numpy()
        files = []
        for i in range(args.files):
            files.append(measured.write_pattern_file(Path(tmp) / f"s{i:05d}.xy", q, y[i], x_unit="q_A"))
        t0 = time.perf_counter()
        for f in files:
            measured.read_pattern(f)
        t_read = time.perf_counter() - t0
        cmd = [sys.executable, "-m", "qdsize.platform", "predict", *map(str, files), "--format", "csv"]
        if args.model:
            cmd += ["--model", args.model]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        t_all = time.perf_counter() - t0
        if r.returncode != 0:
            sys.exit(r.stderr[-2000:])
        rows = r.stdout.strip().splitlines()[1:]
    print(f"files                      {args.files}")
    print(f"qdsize predict, one call   {t_all:.1f} s  ({args.files / t_all:.0f} files/s, target <= 30 s)")
    print(f"reading alone (peer)       {t_read:.1f} s  ({t_all / max(t_read, 1e-9):.1f}x of the whole call)")
    print(f"rows answered              {len(rows)}")


if __name__ == "__main__":
    main()
