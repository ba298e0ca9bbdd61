"""Time of one refinement as `qdsize predict --refine` runs it (target <= 2 s a pattern), as a ratio to the network.

Each pattern (1,801 points, Q 1-10 1/A; qdsize's simulator, a Gaussian resolution, a polynomial background, toluene
and Poisson noise) is sized by the network, then refined from that answer with the default options: every
candidate family of `qdsize.sim.refine.AUTO_MODELS`, fitted resolution, Q zero and spline background, the guard;
`--solvent toluene` named, as a user who knows the solvent does.
BLAS runs on one thread per refinement; a batch of files runs one refinement per core (Ray), so on 2 cores a batch
takes about half the single-pattern time per pattern.

    .venv/bin/python benchmarks/refine_speed.py [--model builtin] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from qdsize.sim import pattern, refine as rf, scattering, solvents

ENERGY_KEV = 17.479  # Mo K-alpha


def observed(q: np.ndarray, mean_nm: float, disp_pct: float, seed: int) -> tuple[np.ndarray, dict]:
    """Counts of a simulated pattern (own fine ladder) smoothed by a Gaussian resolution, with a polynomial
    background, toluene and Poisson noise."""
    pat = pattern.simulate(q, diameter_nm=mean_nm, size_dispersion_pct=disp_pct, surface="cation_rich", centre="random",
                           seed=seed, strain=0.002, b_iso={"Pb": 1.4, "S": 0.9}, energy_kev=ENERGY_KEV)
    i = pat.intensity / pat.params["mean_atoms_per_particle"]
    i = rf.Broadening.on(q, 0.02).apply(i, 0.015, 0.001)[0]
    x = 2.0 * (q - q[0]) / (q[-1] - q[0]) - 1.0
    s = solvents.solvent_intensity("toluene", q)
    total = i + 0.25 * i.mean() * (1 + 0.4 * x) + 0.5 * i.mean() * s / s.mean()
    y = np.random.default_rng(seed).poisson(total * 2e4 / total.max()).astype(np.float64)
    return y, pat.params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin", help="the network whose answer starts the refinement")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import torch

    from qdsize.ml import predict as pr
    from qdsize.sim import measured

    torch.set_num_threads(1)
    predictor = pr.load(args.model)
    q = scattering.q_grid(1.0, 10.0, 0.005)
    t = time.perf_counter()
    lo, hi, _ = rf.fit_ladder_range(q)
    ladders = {(m["shape"], m["surface"]): rf.load_ladder(lo, hi, spec=m) for m in rf.AUTO_MODELS}
    print(f"ladder tables of {len(ladders)} families: {time.perf_counter() - t:.2f} s (built once, then cached in "
          "$QDSIZE_HOME/cache)")
    cases = [(3.0, 6.0, 1), (6.0, 12.0, 2), (10.0, 8.0, 3)]
    worst, med_all, net_all = 0.0, [], []
    for mean_nm, disp_pct, seed in cases:
        y, truth = observed(q, mean_nm, disp_pct, seed)
        x, mask, _ = measured.resample(measured.MeasuredPattern(q, y, None, "speed", "q_A"), predictor.q_inv_angstrom)
        predictor.predict(x[None, :], mask[None, :])  # warm-up: the first call pays for torch's set-up
        net_times = []
        for _ in range(10):
            t = time.perf_counter()
            net = predictor.predict(x[None, :], mask[None, :])[0]
            net_times.append(time.perf_counter() - t)
        start = {k: net[k] for k in ("mean_diameter_nm", "mean_diameter_std_nm", "size_dispersion_pct",
                                     "size_dispersion_std_pct")}
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            r = rf.refine_models(q, y, start, energy_kev=ENERGY_KEV, ladders=ladders, solvent=["toluene"]).refined
            times.append(time.perf_counter() - t)
        worst = max(worst, max(times))
        med_all.append(float(np.median(times)))
        net_all.append(float(np.median(net_times)))
        print(f"truth {truth['mean_diameter_nm']:.3f} nm {truth['size_dispersion_pct']:.2f} %: network "
              f"{start['mean_diameter_nm']:.3f} ± {start['mean_diameter_std_nm']:.3f} nm; refined "
              f"{r['mean_diameter_nm']:.3f} nm ({r['ladder'].get('shape')}, {r['ladder'].get('surface')}), "
              f"{r['size_dispersion_pct']:.2f} %, chi2/dof {r['reduced_chi2']:.3f}, {r['verdict']}; time median "
              f"{np.median(times):.2f} s, max {max(times):.2f} s; network {np.median(net_times) * 1e3:.1f} ms")
    ratio = np.median(med_all) / np.median(net_all)
    print(f"refinement: median {np.median(med_all):.2f} s, worst {worst:.2f} s a pattern on one core (target <= 2 s); "
          f"{ratio:.0f} x the network's {np.median(net_all) * 1e3:.1f} ms for one pattern")


if __name__ == "__main__":
    main()
