"""Augmentation throughput: patterns/s for batches of 512 on the default 1,801-point grid, every effect on."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time

import numpy as np

TARGET_PATTERNS_PER_S = 10_000  # issue 7: batch 512, 1,801 points, every effect on, 2 CPU cores


def setup(batch: int, threads: int, device: str):
    """The augmenter (default preset, every effect on for every sample), a batch of PbS patterns, a generator."""
    import torch

    from qdsize.sim import augment, cluster, crystal, debye

    torch.set_num_threads(threads)
    q = np.arange(1.0, 10.0 + 1e-9, 0.005)
    rng = np.random.default_rng(0)
    base = [debye.intensity(debye.lattice_statistics(cluster.cut(crystal.pbs(), "sphere", d)), q,
                            b_iso={"Pb": 1.0, "S": 1.0})[0] for d in (3.0, 5.0, 8.0)]
    x = torch.as_tensor(np.array([base[i] for i in rng.integers(0, 3, batch)]), dtype=torch.float32, device=device)
    # the default ranges (pseudo-Voigt included) with every probability at 1 and detector gaps on
    over = {k: {"probability": 1.0} for k in augment.SECTIONS if k != "scale"}
    over["gaps"]["enabled"] = True
    t0 = time.perf_counter()
    aug = augment.from_config({"preset": "default", **over}, q)
    t_init = time.perf_counter() - t0
    gen = torch.Generator(device=device).manual_seed(0)
    aug(x, gen)  # warm-up
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    return aug, x, gen, sync, t_init


def measure(aug, x, gen, sync, repeats: int):
    """Wall and CPU seconds per batch of the whole pipeline, page faults per batch, then per-effect seconds
    (separate runs: the breakdown synchronises after every effect)."""
    import resource

    wall, cpu = [], []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        aug(x, gen)
        sync()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / repeats
    steps = []
    for _ in range(repeats):
        steps.append({})
        aug(x, gen, timings=steps[-1])
    return np.array(wall), np.array(cpu), faults, steps


def verdict(patterns_per_s: float) -> str:
    return "met" if patterns_per_s >= TARGET_PATTERNS_PER_S else "missed"


def report(b: int, wall, cpu, faults, steps):
    from qdsize.sim.augment import STEPS

    best, med = wall.min(), float(np.median(wall))
    print(f"whole pipeline: median {b / med:,.0f} patterns/s ({med * 1e3:.1f} ms/batch), best {b / best:,.0f} "
          f"patterns/s ({best * 1e3:.1f} ms/batch) over {wall.size} batches -> target {verdict(b / best)} (best), "
          f"{verdict(b / med)} (median)")
    print(f"CPU time: median {np.median(cpu) * 1e3:.1f} ms/batch over all threads = {b / np.median(cpu):,.0f} "
          f"patterns per CPU second; {faults:,.0f} page faults per batch")
    print("per effect, wall ms/batch (median, best, share of the summed medians):")
    medians = {k: float(np.median([s[k] for s in steps])) for k in STEPS if k in steps[0]}
    total = sum(medians.values())
    for name, m in medians.items():
        print(f"  {name:<12} {m * 1e3:7.2f} {min(s[name] for s in steps) * 1e3:7.2f} {100 * m / total:5.1f} %")
    print(f"  {'sum':<12} {total * 1e3:7.2f}")


def _worker(job):
    """One single-threaded worker process (as a data-loader worker): set up, wait for the others, run."""
    batch, repeats, barrier = job
    aug, x, gen, sync, _ = setup(batch, 1, "cpu")
    barrier.wait()
    start = time.perf_counter()
    for _ in range(repeats):
        aug(x, gen)
    return start, time.perf_counter()


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the target is for 2 cores)")
    ap.add_argument("--processes", type=int, default=1,
                    help="N > 1: N single-threaded worker processes instead (how a data loader uses N cores); "
                         "their total patterns/s")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"target: >= {TARGET_PATTERNS_PER_S:,} patterns/s on 2 CPU cores (batch 512, 1,801 points, every effect on)")
    how = f"{args.processes} processes x 1 thread" if args.processes > 1 else f"{args.threads} thread(s)"
    print(f"batch {args.batch} x 1801 points, {how}, device {args.device}; load average {load[0]:.1f} {load[1]:.1f} "
          f"{load[2]:.1f} on {os.cpu_count()} cores (a busy machine slows every figure)")
    if args.processes > 1:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Manager() as manager, ctx.Pool(args.processes) as pool:
            barrier = manager.Barrier(args.processes)
            spans = pool.map(_worker, [(args.batch, args.repeats, barrier)] * args.processes)
        wall = max(end for _, end in spans) - min(start for start, _ in spans)
        rate = args.processes * args.repeats * args.batch / wall
        print(f"whole pipeline: {rate:,.0f} patterns/s in total ({args.processes} x {args.repeats} batches in "
              f"{wall:.2f} s) -> target {verdict(rate)}")
        return
    aug, x, gen, sync, t_init = setup(args.batch, args.threads, args.device)
    print(f"constructor (solvent, capillary and Compton curves, resolution plan): {t_init:.2f} s")
    report(args.batch, *measure(aug, x, gen, sync, args.repeats))


if __name__ == "__main__":
    main()
