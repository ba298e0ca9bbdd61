"""Benchmark: sweep trials per hour on this machine, and the best benchmark-split accuracy against trials run.

Runs `qdsize sweep` (default conf/sweep/acnn.yaml: its space, trial budget and ASHA settings) for a wall-clock
budget with the frozen splits scored after every epoch, stops it as a user would (Ctrl-C; `--resume` continues
it), and reads the Ray Tune results: trials ended (finished or stopped early by ASHA) per hour, epochs per hour,
and the best benchmark size accuracy and seedgrid size-within-0.25-nm after each ended trial, in order.

    .venv/bin/python benchmarks/sweep_throughput.py [--config conf/sweep/acnn.yaml] [--dataset DIR]
        [--budget-min 20] [override ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def trial_rows(tune_dir: Path) -> list[dict]:
    """One dict per trial: its reported rows, whether it ended, and when its last row came."""
    out = []
    for f in tune_dir.glob("*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if rows:
            out.append({"trial": f.parent.name, "rows": rows, "mtime": f.stat().st_mtime})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "conf/sweep/acnn.yaml"))
    ap.add_argument("--dataset", default=None, help="dataset folder (default: the training config's)")
    ap.add_argument("--budget-min", type=float, default=20.0)
    ap.add_argument("overrides", nargs="*", help="sweep config overrides key=value")
    args = ap.parse_args()

    home = Path(os.environ.get("QDSIZE_HOME", REPO / ".qdsize")).resolve()
    name = f"bench-{int(time.time())}"
    train_over = ["train.score_frozen_every_epoch=true"] + ([f"train.dataset={args.dataset}"] if args.dataset else [])
    overrides = [f"sweep.name={name}", f"sweep.train_overrides={json.dumps(train_over)}", *args.overrides]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "QDSIZE_HOME": str(home)}
        env.pop("MLFLOW_TRACKING_URI", None)  # the sweep starts its own local server over the workspace store
        cmd = [sys.executable, "-m", "qdsize.platform", "sweep", args.config, *overrides]
        log = open(Path(tmp) / "sweep.log", "w")
        t0 = time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=args.budget_min * 60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=180)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        elapsed_h = (time.time() - t0) / 3600
        log.close()
        text = (Path(tmp) / "sweep.log").read_text()
    if not (home / "sweeps" / name / "tune").exists():
        sys.exit(text[-3000:])
    # Tune says "Trial <id> completed after N iterations" for trials that finished and for those ASHA stopped
    done_ids = set(re.findall(r"Trial (\S+) completed after", text))
    trials = trial_rows(home / "sweeps" / name / "tune")
    ended = sorted((t for t in trials if any(t["trial"].startswith(i) for i in done_ids)), key=lambda t: t["mtime"])
    epochs = sum(len(t["rows"]) for t in trials)
    print(f"sweep {args.config} ({' '.join(args.overrides)}), workspace {home}, stopped after "
          f"{elapsed_h * 60:.1f} min")
    print(f"trials started {len(trials)}, ended {len(ended)} (finished or stopped early by ASHA)")
    print(f"trials per hour {len(ended) / elapsed_h:.1f}; epochs per hour {epochs / elapsed_h:.1f}")
    print("best so far after each ended trial (benchmark size accuracy, seedgrid size within 0.25 nm):")
    best_acc, best_within = 0.0, 0.0
    for i, t in enumerate(ended, 1):
        best_acc = max(best_acc, max(r.get("benchmark_size_accuracy", 0.0) for r in t["rows"]))
        best_within = max(best_within, max(r.get("seedgrid_size_within_0p25nm", 0.0) for r in t["rows"]))
        trial = "_".join(t["trial"].split("_")[:3])
        print(f"  {i:>3} trials  {best_acc:.3f}  {best_within:.3f}  ({trial}, {len(t['rows'])} epochs)")
    print(f"resume with: qdsize sweep {args.config} sweep.name={name} --resume")


if __name__ == "__main__":
    main()
