"""Size families: a ladder of clusters of one variant, its exact pair statistics and the fine-grid spline tables
that composing reads, cached by content hash in a folder the caller names."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import cluster, crystal, debye
from .io import content_hash

FAMILY_FORMAT = 1  # bump when what a cached family holds changes
TABLE_FORMAT = 1  # bump when what a cached table holds changes


@dataclass(frozen=True)
class FineGrid:
    """Uniform grid on which the unstrained pair sums are tabulated (covers every strained evaluation point)."""

    q0: float
    step: float
    n: int

    @property
    def q(self) -> np.ndarray:
        return self.q0 + self.step * np.arange(self.n)

    def key(self) -> str:
        return content_hash({"format": TABLE_FORMAT, "q0": round(self.q0, 12), "step": self.step,
                                    "n": self.n})


def build_family(spec: dict) -> debye.PairStatistics:
    """Exact pair statistics of one variant's ladder, sorted by diameter, with strictly increasing diameters."""
    xt = crystal.material(spec["material"], spec["a_angstrom"])
    n = max(2, int(np.ceil(np.log(spec["ladder_max_nm"] / spec["ladder_min_nm"]) / spec["ladder_relative_step"])) + 1)
    targets = cluster.ladder_diameters(spec["ladder_min_nm"], spec["ladder_max_nm"], n)
    ladder = cluster.cut_ladder(xt, spec["shape"], targets, surface=spec["surface"],
                                anion_removal=spec["anion_removal"] or 0.5, centre=spec["centre"],
                                seed=spec["centre_seed"])
    st = debye.lattice_statistics(ladder)
    d = st.diameters_nm
    order = np.argsort(d, kind="stable")
    keep, last = [], -np.inf
    for k in order:  # surfaces can make two shells equal in atom count: keep the first of equal diameters
        if d[k] > last * (1 + 1e-9):
            keep.append(k)
            last = d[k]
    keep = np.array(keep)
    return debye.PairStatistics(st.species, st.distances_angstrom, st.pair_counts[keep], st.atom_counts[keep],
                                d[keep], st.exact)


def family_tables(stats: debye.PairStatistics, fine: FineGrid) -> dict:
    """Cubic B-spline coefficients of every cluster's unstrained pair sums on the fine grid, plus what composing
    needs: atom counts, diameters and the largest pair distance of each cluster."""
    from scipy.ndimage import spline_filter1d

    s = debye.sinc_sums(fine.q, stats.distances_angstrom, stats.pair_counts)  # (K, P, F)
    coef = spline_filter1d(s, order=3, axis=-1, mode="mirror").astype(np.float32)
    present = stats.pair_counts.sum(axis=1) > 0  # (K, R)
    rmax = np.array([stats.distances_angstrom[m].max() if m.any() else 0.0 for m in present])
    return {"coef": coef.reshape(stats.n_clusters, -1), "n_pairs": len(stats.pairs), "n_fine": fine.n,
            "atoms": stats.atom_counts.astype(np.float64), "diameters_nm": stats.diameters_nm.astype(np.float64),
            "rmax_angstrom": rmax, "species": list(stats.species)}


def default_cache() -> Path:
    """The family cache when a caller names none: $QDSIZE_HOME/cache (the workspace sets it), else the per-user
    data folder's (as the workspace's default)."""
    home = os.environ.get("QDSIZE_HOME")
    if home:
        return Path(home).expanduser() / "cache"
    import platformdirs

    return Path(platformdirs.user_data_dir("qdsize", appauthor=False)) / "cache"


def get_family(spec: dict, fine: FineGrid, cache: str | Path) -> dict:
    """Tables of one family: from the cache when present, else built (and cached). Safe under concurrency."""
    from threadpoolctl import threadpool_limits

    cache = Path(cache)
    (cache / "families").mkdir(parents=True, exist_ok=True)
    (cache / "tables").mkdir(parents=True, exist_ok=True)
    fid = spec["family_id"]
    tpath = cache / "tables" / f"{fid}-{fine.key()}.npz"
    t0 = time.perf_counter()
    built = "cached"
    if tpath.is_file():
        with np.load(tpath, allow_pickle=False) as z:
            tab = {k: z[k] for k in z.files}
        tab["species"] = [str(x) for x in tab["species"]]
        tab["n_pairs"], tab["n_fine"] = int(tab["n_pairs"]), int(tab["n_fine"])
    else:
        with threadpool_limits(1):  # one thread: identical tables whatever the machine's thread count
            spath = cache / "families" / f"{fid}.npz"
            if spath.is_file():
                stats = debye.PairStatistics.load(spath)
                built = "tables"
            else:
                stats = build_family(spec)
                stats.save(spath)
                (cache / "families" / f"{fid}.json").write_text(json.dumps(spec, indent=1))
                built = "built"
            tab = family_tables(stats, fine)
        tmp = tpath.with_name(f".{tpath.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **{k: np.asarray(v) for k, v in tab.items()})
        os.replace(tmp, tpath)
    tab["family_id"] = fid
    tab["status"] = built
    tab["seconds"] = time.perf_counter() - t0
    return tab
