"""Debye scattering engines: exact lattice pair counting by FFT, a numba atomistic histogram, a brute-force oracle."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.fft

from .cluster import Cluster
from .errors import InputError
from .scattering import check_q, debye_waller, form_factors, per_element

ATOMISTIC_BIN_ANGSTROM = 1e-3


@dataclass
class PairStatistics:
    """Pair-distance statistics of a family of clusters that share species and a list of distances.

    `pair_counts[k, p, r]` is the number of unordered atom pairs of species pair p = (s, t), s <= t (ordered as
    `pairs`), in cluster k, separated by `distances_angstrom[r]`; `atom_counts[k, s]` counts atoms per species.
    The DSE of cluster k is then sum_s N_s |f_s|^2 + 2 sum_p Re(f_s f_t*) T_s T_t sum_r n_pr sinc(Q r).
    """

    species: tuple[str, ...]
    distances_angstrom: np.ndarray  # (n_r,)
    pair_counts: np.ndarray  # (n_clusters, n_pairs, n_r), float64 (integers for the lattice engine)
    atom_counts: np.ndarray  # (n_clusters, n_species)
    diameters_nm: np.ndarray  # (n_clusters,) equal-volume diameters (NaN when unknown)
    exact: bool = True

    @property
    def pairs(self) -> list[tuple[int, int]]:
        n = len(self.species)
        return [(s, t) for s in range(n) for t in range(s, n)]

    @property
    def n_clusters(self) -> int:
        return self.pair_counts.shape[0]

    def save(self, path: str | Path) -> None:
        """Write to a compressed .npz file (the family cache format)."""
        tmp = Path(str(path) + ".tmp.npz")
        np.savez_compressed(tmp, species=np.array(self.species), distances_angstrom=self.distances_angstrom,
                            pair_counts=self.pair_counts, atom_counts=self.atom_counts,
                            diameters_nm=self.diameters_nm, exact=self.exact)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "PairStatistics":
        with np.load(path, allow_pickle=False) as z:
            return cls(tuple(str(s) for s in z["species"]), z["distances_angstrom"], z["pair_counts"],
                       z["atom_counts"], z["diameters_nm"], bool(z["exact"]))


def _pair_index(n_species: int) -> dict[tuple[int, int], int]:
    return {p: i for i, p in enumerate((s, t) for s in range(n_species) for t in range(s, n_species))}


# ----------------------------------------------------------------------------------------------------------------
# Lattice engine: pair-vector counts as autocorrelations of site-occupancy grids
# ----------------------------------------------------------------------------------------------------------------
def _integer_metric(grid_vectors: np.ndarray):
    """If the grid metric is h^2 times a small integer matrix, return (h^2, matrix); else None."""
    g = grid_vectors @ grid_vectors.T
    h2 = float(np.min(np.diag(g)))
    for mult in (1, 2, 3, 4, 6, 12):
        m = g / h2 * mult
        if np.allclose(m, np.rint(m), atol=1e-9, rtol=0):
            return h2 / mult, np.rint(m).astype(np.int64)
    return None


def _displacements(padded: tuple[int, int, int], extent: tuple[int, int, int]):
    """Signed displacement along each axis for every index of a padded FFT grid."""
    out = []
    for p, l in zip(padded, extent):
        u = np.arange(p, dtype=np.int64)
        out.append(np.where(u < l, u, u - p))
    return out


def _lattice_keys(cluster: Cluster, padded, extent):
    """Distance key (integer) per padded-grid displacement, plus a function turning keys into distances."""
    du, dv, dw = _displacements(padded, extent)
    metric = _integer_metric(cluster.grid_vectors_angstrom)
    if metric is not None:
        h2, m = metric
        key = (m[0, 0] * du[:, None, None] ** 2 + m[1, 1] * dv[None, :, None] ** 2 + m[2, 2] * dw[None, None, :] ** 2
               + 2 * m[0, 1] * du[:, None, None] * dv[None, :, None]
               + 2 * m[0, 2] * du[:, None, None] * dw[None, None, :]
               + 2 * m[1, 2] * dv[None, :, None] * dw[None, None, :])
        return key, (lambda k: np.sqrt(h2 * k.astype(np.float64))), True
    v = cluster.grid_vectors_angstrom
    vec = du[:, None, None, None] * v[0] + dv[None, :, None, None] * v[1] + dw[None, None, :, None] * v[2]
    d2 = np.einsum("...i,...i->...", vec, vec)
    key = np.rint(d2 * 1e6).astype(np.int64)  # distances equal to 1e-6 A^2 share a key
    return key, (lambda k: np.sqrt(k.astype(np.float64) * 1e-6)), False


def _lattice_counts(cluster: Cluster, species: tuple[str, ...]):
    """Ordered-pair counts per species pair and distance key for one on-grid cluster."""
    if not cluster.on_grid:
        raise InputError("engine = 'lattice': the cluster has no lattice-site coordinates "
                         "(it was read from coordinates); expected engine = 'atomistic'")
    gi = np.asarray(cluster.grid_index, dtype=np.int64)
    gi = gi - gi.min(axis=0)
    extent = tuple(int(x) + 1 for x in gi.max(axis=0))
    padded = tuple(scipy.fft.next_fast_len(2 * l - 1, real=True) for l in extent)
    spectra = []
    for e in species:
        occ = np.zeros(extent, dtype=np.float64)
        sel = gi[cluster.elements == e]
        occ[sel[:, 0], sel[:, 1], sel[:, 2]] = 1.0
        if np.count_nonzero(occ) != len(sel):
            raise InputError(f"cluster: two atoms share one lattice site (element {e})")
        spectra.append(scipy.fft.rfftn(occ, s=padded, workers=-1))
    key, to_distance, integer = _lattice_keys(cluster, padded, extent)
    flat_key = key.ravel()
    if integer:
        uniq = None
    else:
        uniq, flat_key = np.unique(flat_key, return_inverse=True)
    out = {}
    for s in range(len(species)):
        for t in range(s, len(species)):
            corr = scipy.fft.irfftn(np.conj(spectra[s]) * spectra[t], s=padded, workers=-1)
            counts = np.rint(corr).ravel()
            bc = np.bincount(flat_key, weights=counts)
            keys = np.flatnonzero(bc > 0.5)
            vals = np.rint(bc[keys])
            if uniq is not None:
                keys = uniq[keys]
            if s == t:  # drop the self term and count each unordered pair once
                nz = keys != 0
                keys, vals = keys[nz], vals[nz] / 2.0
            out[(s, t)] = (keys, vals)
    return out, to_distance


def lattice_statistics(clusters: list[Cluster] | Cluster) -> PairStatistics:
    """Exact pair statistics of clusters cut from one lattice, via FFT autocorrelation of occupancy grids."""
    clusters = [clusters] if isinstance(clusters, Cluster) else list(clusters)
    if not clusters:
        raise InputError("clusters: expected at least one cluster")
    species = tuple(dict.fromkeys(e for c in clusters for e in c.species))
    per = []
    to_distance = None
    for c in clusters:
        counts, to_distance = _lattice_counts(c, species)
        per.append(counts)
    all_keys = np.unique(np.concatenate([k for counts in per for k, _ in counts.values()] or [np.zeros(0, int)]))
    pidx = _pair_index(len(species))
    pc = np.zeros((len(clusters), len(pidx), len(all_keys)))
    for k, counts in enumerate(per):
        for pair, (keys, vals) in counts.items():
            pc[k, pidx[pair], np.searchsorted(all_keys, keys)] = vals
    atoms = np.array([[int(np.sum(c.elements == e)) for e in species] for c in clusters], dtype=np.float64)
    diam = np.array([c.diameter_nm for c in clusters])
    return PairStatistics(species, to_distance(all_keys), pc, atoms, diam, exact=True)


# ----------------------------------------------------------------------------------------------------------------
# Atomistic engine: numba pair loop into a fine distance histogram that keeps each bin's mean distance
# ----------------------------------------------------------------------------------------------------------------
def _kernel():
    from ._pairhist import pair_histogram  # numba compiles on first use; cached on disk afterwards

    return pair_histogram


def atomistic_statistics(cluster: Cluster, bin_width_angstrom: float = ATOMISTIC_BIN_ANGSTROM) -> PairStatistics:
    """Pair statistics of arbitrary coordinates: each bin of width `bin_width` sits at its pairs' mean distance.

    Placing a bin at the mean of its distances cancels the first-order binning error; what remains is below
    (Q w)^2 / 24 relative for bin width w (6e-6 at Q = 12 1/A and w = 1e-3 A).
    """
    species = cluster.species
    spec = np.array([species.index(e) for e in cluster.elements], dtype=np.int64)
    pos = np.ascontiguousarray(cluster.positions_angstrom, dtype=np.float64)
    ext = np.ptp(pos, axis=0) if len(pos) else np.zeros(3)
    n_bins = int(np.sqrt(np.sum(ext**2)) / bin_width_angstrom) + 2
    import numba

    cnt, rsum = _kernel()(pos, spec, len(species), float(bin_width_angstrom), n_bins, 4 * numba.get_num_threads())
    used = np.flatnonzero(cnt.sum(axis=0) > 0)
    if used.size and used[0] == 0 and np.any(rsum[:, 0] < 1e-6 * np.maximum(cnt[:, 0], 1)):
        raise InputError("positions_angstrom: two atoms at the same position")
    # one distance per (pair, bin): flatten so every species pair keeps its own mean distances
    n_pairs = cnt.shape[0]
    rows, bins = np.nonzero(cnt)
    dist = rsum[rows, bins] / cnt[rows, bins]
    pc = np.zeros((1, n_pairs, len(dist)))
    pc[0, rows, np.arange(len(dist))] = cnt[rows, bins]
    atoms = np.array([[np.sum(spec == s) for s in range(len(species))]], dtype=np.float64)
    return PairStatistics(species, dist, pc, atoms, np.array([cluster.diameter_nm]), exact=False)


# ----------------------------------------------------------------------------------------------------------------
# Intensities
# ----------------------------------------------------------------------------------------------------------------
def mean_sinc(x: np.ndarray, strain_rms: float = 0.0) -> np.ndarray:
    """sin(x)/x, or its exact average over u = 1 + eps with eps ~ N(0, strain_rms^2): E[sin(x u)/(x u)].

    E[sin(xu)/(xu)] = g(x)/x with g(x) = int_0^x exp(-s^2 t^2 / 2) cos t dt, written with the Faddeeva function
    w as g = sqrt(pi/2)/s * [exp(-1/2s^2) - Re(exp(-s^2 x^2/2 + i x) w((1/s + i s x)/sqrt 2))]. For small s it
    tends to sinc(x) exp(-s^2 x^2 / 2): a population of particles with a Gaussian spread of lattice parameters.
    """
    x = np.asarray(x, dtype=np.float64)
    if strain_rms == 0:
        return np.sinc(x / np.pi)  # numpy's sinc is sin(pi x)/(pi x)
    from scipy.special import wofz

    s = float(strain_rms)
    z = (1.0 / s + 1j * s * x) / np.sqrt(2.0)
    with np.errstate(under="ignore", over="ignore"):
        g = np.sqrt(np.pi / 2.0) / s * (np.exp(-0.5 / s**2)
                                        - np.real(np.exp(-0.5 * (s * x) ** 2 + 1j * x) * wofz(z)))
        out = np.where(np.abs(x) > 1e-8, g / np.where(x == 0, 1.0, x), 1.0)
    return out


def sinc_sums(q_inv_angstrom: np.ndarray, distances_angstrom: np.ndarray, weights: np.ndarray,
              strain_rms: float = 0.0, chunk: int = 4096) -> np.ndarray:
    """sum_r weights[..., r] sinc(Q r) for every Q (averaged over a Gaussian lattice-parameter spread when
    strain_rms > 0): shape weights.shape[:-1] + (n_Q,)."""
    q = np.asarray(q_inv_angstrom, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    lead = w.shape[:-1]
    w2 = w.reshape(int(np.prod(lead)), w.shape[-1])  # explicit: a cluster with no pairs has zero distances
    out = np.zeros((w2.shape[0], q.size))
    for a in range(0, len(distances_angstrom), chunk):
        r = distances_angstrom[a:a + chunk]
        sk = mean_sinc(q[:, None] * r[None, :], strain_rms)
        out += w2[:, a:a + chunk] @ sk.T
    return out.reshape(lead + (q.size,))


def intensity(stats: PairStatistics, q_inv_angstrom, *, b_iso=0.0, energy_kev: float | None = None,
              strain: float = 0.0, strain_rms: float = 0.0, cluster_weights=None) -> np.ndarray:
    """DSE intensity in electron units per particle, shape (n_clusters, n_Q).

    `b_iso` is one B (A^2) for all elements, or {element: B}; pair terms are damped by T_s T_t with
    T = exp(-B Q^2 / 16 pi^2), self terms are not. `strain` scales every distance by (1 + strain);
    `strain_rms` averages exactly over a Gaussian spread of lattice parameters (microstrain between particles).
    With `cluster_weights` (n_clusters,), returns the number-weighted mixture, shape (1, n_Q): the DSE is linear
    in the pair counts, so the mixture costs one evaluation.
    """
    q = check_q(q_inv_angstrom)
    if not np.isfinite(strain) or strain <= -1:
        raise InputError(f"strain = {strain!r}: expected a finite relative strain > -1")
    if not np.isfinite(strain_rms) or not 0 <= strain_rms < 0.2:
        raise InputError(f"strain_rms = {strain_rms!r}: expected a relative rms strain between 0 and 0.2")
    ff = form_factors(stats.species, q, energy_kev)
    t = debye_waller(per_element(b_iso, stats.species, "b_iso"), q)
    counts, atoms = stats.pair_counts, stats.atom_counts
    if cluster_weights is not None:
        wk = np.asarray(cluster_weights, dtype=np.float64)
        if wk.shape != (stats.n_clusters,):
            raise InputError(f"cluster_weights: expected shape ({stats.n_clusters},), got {wk.shape}")
        counts = np.einsum("k,kpr->pr", wk, counts)[None]
        atoms = (wk @ atoms)[None]
    sums = sinc_sums(q, stats.distances_angstrom * (1.0 + strain), counts, strain_rms)  # (k, p, Q)
    out = np.einsum("ks,sq->kq", atoms, np.abs(ff) ** 2)
    for p, (s, u) in enumerate(stats.pairs):
        out += 2.0 * np.real(ff[s] * np.conj(ff[u])) * t[s] * t[u] * sums[:, p, :]
    return out


def brute_force_intensity(elements, positions_angstrom, q_inv_angstrom, *, b_iso=0.0,
                          energy_kev: float | None = None) -> np.ndarray:
    """Reference DSE as a float64 double sum over all atom pairs (tests only: O(N^2 n_Q))."""
    q = check_q(q_inv_angstrom)
    els = list(elements)
    species = tuple(dict.fromkeys(els))
    spec = np.array([species.index(e) for e in els])
    pos = np.asarray(positions_angstrom, dtype=np.float64)
    ff = form_factors(species, q, energy_kev)
    amp = ff * debye_waller(per_element(b_iso, species, "b_iso"), q)  # damped amplitudes f_s T_s
    out = np.sum(np.abs(ff[spec]) ** 2, axis=0)
    i, j = np.triu_indices(len(pos), k=1)
    r = np.linalg.norm(pos[i] - pos[j], axis=1)
    for s in range(len(species)):
        for u in range(len(species)):
            sel = (spec[i] == s) & (spec[j] == u)
            if not np.any(sel):
                continue
            acc = np.zeros(q.size)
            for a in range(0, q.size, 64):
                qq = q[a:a + 64, None]
                acc[a:a + 64] = np.sum(np.sinc(qq * r[sel][None, :] / np.pi), axis=1)
            out = out + 2.0 * np.real(amp[s] * np.conj(amp[u])) * acc
    return out


def statistics(clusters, engine: str = "auto") -> PairStatistics:
    """Pair statistics with the lattice engine when every cluster is on a lattice grid, else atomistic."""
    clusters = [clusters] if isinstance(clusters, Cluster) else list(clusters)
    if engine not in ("auto", "lattice", "atomistic"):
        raise InputError(f"engine = {engine!r}: expected 'auto', 'lattice' or 'atomistic'")
    if engine == "lattice" or (engine == "auto" and all(c.on_grid for c in clusters)):
        return lattice_statistics(clusters)
    if len(clusters) != 1:
        raise InputError("engine = 'atomistic': expected one cluster at a time")
    return atomistic_statistics(clusters[0])
