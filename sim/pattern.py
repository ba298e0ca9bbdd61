"""Pattern composition: size-distribution-weighted DSE over a ladder, with strain, microstrain and thermal motion."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import cluster as clusters
from . import crystal as crystals
from . import debye, distribution
from .errors import InputError, bad


@dataclass
class Pattern:
    """A simulated pattern: I(Q) in electron units per particle and every parameter that made it."""

    q_inv_angstrom: np.ndarray
    intensity: np.ndarray
    params: dict = field(default_factory=dict)


def compose(stats: debye.PairStatistics, q_inv_angstrom, mean_diameter_nm: float, size_dispersion_pct: float, *,
            strain: float = 0.0, microstrain_pct: float = 0.0, b_iso=0.0,
            energy_kev: float | None = None) -> Pattern:
    """Number-weighted lognormal mixture of the ladder in `stats`, as one exact DSE evaluation.

    The intensity is per particle of the mixture (sum_k w_k I_k with sum_k w_k = 1). `strain` is a uniform
    relative change of the lattice parameter; `microstrain_pct` is the rms spread of lattice parameters between
    particles, in percent, averaged exactly. Labels report what was realised on the discrete ladder.
    """
    if not np.isfinite(microstrain_pct) or not 0 <= microstrain_pct < 20:
        raise bad("microstrain_pct", microstrain_pct, "an rms lattice-parameter spread between 0 and 20 %")
    d = stats.diameters_nm
    if np.any(~np.isfinite(d)):
        raise InputError("stats: expected clusters with known equal-volume diameters for a size distribution")
    order = np.argsort(d)
    w = np.zeros(len(d))
    w[order] = distribution.ladder_weights(d[order], mean_diameter_nm, size_dispersion_pct)
    i_q = debye.intensity(stats, q_inv_angstrom, b_iso=b_iso, energy_kev=energy_kev, strain=strain,
                          strain_rms=microstrain_pct / 100.0, cluster_weights=w)[0]
    mean, disp = distribution.realised_labels(d, w)
    n_atoms = float(w @ stats.atom_counts.sum(axis=1))
    return Pattern(np.asarray(q_inv_angstrom, dtype=np.float64), i_q,
                   {"mean_diameter_nm": mean, "size_dispersion_pct": disp,
                    "requested_mean_diameter_nm": float(mean_diameter_nm),
                    "requested_dispersion_pct": float(size_dispersion_pct), "strain": float(strain),
                    "microstrain_pct": float(microstrain_pct), "mean_atoms_per_particle": n_atoms,
                    "n_ladder_sizes": int(np.count_nonzero(w > 1e-12))})


def ladder_for(mean_diameter_nm: float, size_dispersion_pct: float, relative_step: float | None = None) -> np.ndarray:
    """Target diameters covering the distribution (3.5 sigma of ln D) with equal relative steps.

    The default step is a tenth of the dispersion (0.5-3 %): mixing neighbours adds at most half a step to the
    realised dispersion, which the reported labels include.
    """
    if relative_step is None:
        relative_step = float(np.clip(size_dispersion_pct / 1000.0, 0.005, 0.03))
    lo, hi = distribution.quantile_range_nm(mean_diameter_nm, size_dispersion_pct, 3.5)
    lo, hi = min(lo, mean_diameter_nm), max(hi, mean_diameter_nm)
    n = max(2, int(np.ceil(np.log(hi / lo) / relative_step)) + 1)
    return np.geomspace(lo, hi, n)


def bracketing_ladder(xtal: crystals.Crystal, shape: str, mean_diameter_nm: float, size_dispersion_pct: float,
                      **kw) -> list[clusters.Cluster]:
    """The ladder's clusters, widened by whole shells until they bracket the mean: a narrow distribution may
    otherwise fall between two shell closures and meet only one of them."""
    targets = ladder_for(mean_diameter_nm, size_dispersion_pct)
    for widen in range(1, 40):
        ladder = clusters.cut_ladder(xtal, shape, targets, **kw)
        d = [c.diameter_nm for c in ladder]
        if min(d) <= mean_diameter_nm <= max(d):
            return ladder
        step = 1.0 + 0.01 * widen
        targets = np.concatenate([[targets[0] / step], targets, [targets[-1] * step]])
    raise bad("diameter_nm", mean_diameter_nm, "a mean diameter that complete-shell clusters can bracket")


def simulate(q_inv_angstrom, *, material: str = "pbs", shape: str = "sphere", diameter_nm: float,
             size_dispersion_pct: float = 0.0, surface: str = "as_cut", anion_removal: float = 0.5,
             centre: str = "atom", facet_ratio: float | None = None, a_angstrom: float | None = None,
             strain: float = 0.0, microstrain_pct: float = 0.0, b_iso=0.0, energy_kev: float | None = None,
             seed: int = 0, crystal: crystals.Crystal | None = None) -> Pattern:
    """One pattern from a material name (or a Crystal) and shape: a single cluster, or a lognormal sample."""
    if not np.isfinite(diameter_nm) or diameter_nm <= 0:
        raise bad("diameter_nm", diameter_nm, "a positive diameter in nm")
    distribution.check_labels(diameter_nm, size_dispersion_pct)
    xtal = crystal if crystal is not None else crystals.material(material, a_angstrom)
    kw = dict(surface=surface, anion_removal=anion_removal, centre=centre, facet_ratio=facet_ratio, seed=seed)
    if size_dispersion_pct == 0:
        c = clusters.cut(xtal, shape, diameter_nm, **kw)
        stats = debye.statistics(c)
        i_q = debye.intensity(stats, q_inv_angstrom, b_iso=b_iso, energy_kev=energy_kev, strain=strain,
                              strain_rms=microstrain_pct / 100.0)[0]
        params = {"mean_diameter_nm": c.diameter_nm, "size_dispersion_pct": 0.0,
                  "requested_mean_diameter_nm": float(diameter_nm), "requested_dispersion_pct": 0.0,
                  "strain": float(strain), "microstrain_pct": float(microstrain_pct),
                  "mean_atoms_per_particle": float(c.n_atoms), "n_ladder_sizes": 1, "atom_counts": c.counts()}
        pat = Pattern(np.asarray(q_inv_angstrom, dtype=np.float64), i_q, params)
    else:
        ladder = bracketing_ladder(xtal, shape, diameter_nm, size_dispersion_pct, **kw)
        stats = debye.lattice_statistics(ladder)
        pat = compose(stats, q_inv_angstrom, diameter_nm, size_dispersion_pct, strain=strain,
                      microstrain_pct=microstrain_pct, b_iso=b_iso, energy_kev=energy_kev)
    pat.params.update({"material": xtal.name, "shape": shape, "surface": surface, "centre": centre,
                       "a_angstrom": round(float(np.cbrt(xtal.cell_volume_angstrom3)), 6),
                       "b_iso": b_iso, "energy_kev": energy_kev, "seed": seed})
    return pat


def simulate_atoms(q_inv_angstrom, c: clusters.Cluster, *, b_iso=0.0, energy_kev: float | None = None,
                   strain: float = 0.0, microstrain_pct: float = 0.0) -> Pattern:
    """Pattern of one cluster given by coordinates (lattice engine when on a grid, else atomistic)."""
    stats = debye.statistics(c)
    i_q = debye.intensity(stats, q_inv_angstrom, b_iso=b_iso, energy_kev=energy_kev, strain=strain,
                          strain_rms=microstrain_pct / 100.0)[0]
    return Pattern(np.asarray(q_inv_angstrom, dtype=np.float64), i_q,
                   {"n_atoms": c.n_atoms, "atom_counts": c.counts(), "engine": "lattice" if stats.exact else
                    "atomistic", "b_iso": b_iso, "energy_kev": energy_kev, "strain": float(strain),
                    "microstrain_pct": float(microstrain_pct)})
