"""Augmentation throughput: patterns/s for batches of 512 on the default 1,801-point grid, every effect on."""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from qdsize.sim import augment, cluster, crystal, debye


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    q = np.arange(1.0, 10.0 + 1e-9, 0.005)
    rng = np.random.default_rng(0)
    base = [debye.intensity(debye.lattice_statistics(cluster.cut(crystal.pbs(), "sphere", d)), q,
                            b_iso={"Pb": 1.0, "S": 1.0})[0] for d in (3.0, 5.0, 8.0)]
    x = torch.as_tensor(np.array([base[i] for i in rng.integers(0, 3, args.batch)]), dtype=torch.float32,
                        device=args.device)
    # every effect on, every sample: the default ranges with all probabilities at 1 and gaps enabled
    over = {k: {"probability": 1.0} for k in augment.SECTIONS if k != "scale"}
    over["gaps"]["enabled"] = True
    t0 = time.perf_counter()
    aug = augment.from_config({"preset": "default", **over}, q)
    t_init = time.perf_counter() - t0
    gen = torch.Generator(device=args.device).manual_seed(0)
    aug(x, gen)  # warm-up
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        y = aug(x, gen)
        if args.device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    assert torch.isfinite(y).all()
    best, med = min(times), float(np.median(times))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"constructor (solvent, capillary, Compton curves on the grid): {t_init:.2f} s")
    print(f"batch {args.batch} x {q.size} points, {args.threads} threads, device {args.device}, load avg {load:.1f}")
    print(f"median {args.batch / med:,.0f} patterns/s ({med * 1e3:.1f} ms/batch); best {args.batch / best:,.0f} patterns/s")


if __name__ == "__main__":
    main()
