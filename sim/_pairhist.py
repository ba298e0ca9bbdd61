"""Numba kernel of the atomistic engine: all-pairs distance histogram with per-bin distance sums."""

import numba
import numpy as np


@numba.njit(parallel=True, cache=True)
def pair_histogram(pos, spec, n_species, bin_width, n_bins, n_chunks):
    """Counts and distance sums per (species pair, bin); pairs indexed (s, t), s <= t, row-major."""
    n = pos.shape[0]
    n_pairs = n_species * (n_species + 1) // 2
    cnt = np.zeros((n_chunks, n_pairs, n_bins))
    rsum = np.zeros((n_chunks, n_pairs, n_bins))
    for c in numba.prange(n_chunks):
        for i in range(c, n, n_chunks):
            si = spec[i]
            for j in range(i + 1, n):
                sj = spec[j]
                a = min(si, sj)
                b = max(si, sj)
                p = a * n_species - a * (a - 1) // 2 + (b - a)
                dx = pos[i, 0] - pos[j, 0]
                dy = pos[i, 1] - pos[j, 1]
                dz = pos[i, 2] - pos[j, 2]
                r = np.sqrt(dx * dx + dy * dy + dz * dz)
                k = min(int(r / bin_width), n_bins - 1)
                cnt[c, p, k] += 1.0
                rsum[c, p, k] += r
    return cnt.sum(axis=0), rsum.sum(axis=0)
