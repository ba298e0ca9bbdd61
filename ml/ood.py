"""Physics check for out-of-distribution patterns: how much of a pattern the material's own clean patterns explain."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

FILE = "physics_check.npz"


def pick_templates(patterns: np.ndarray, mean_diameter_nm: np.ndarray, size_dispersion_pct: np.ndarray,
                   n_bins: int = 24, per_bin: int = 2) -> np.ndarray:
    """The narrowest-dispersion clean patterns in each of `n_bins` size quantiles: a non-negative mix of them is a
    size distribution, so together they span the material's polydisperse patterns too."""
    order = np.argsort(mean_diameter_nm)
    picks = []
    for chunk in np.array_split(order, n_bins):
        if len(chunk):
            picks.extend(chunk[np.argsort(size_dispersion_pct[chunk])[:per_bin]])
    t = np.asarray(patterns[np.array(picks)], dtype=float)
    return t / np.abs(t).mean(axis=1, keepdims=True)


def miscalibrated(templates: np.ndarray, q_inv_angstrom: np.ndarray, scale_errors=(-0.01, 0.0, 0.01),
                  zero_shifts_inv_angstrom=(-0.02, 0.0, 0.02)) -> np.ndarray:
    """Each template as an instrument with a wavelength-scale error s and zero shift z would report it: a true Q0
    appears at Q0 (1 + s) + z. These span the calibration errors that training tolerates."""
    q = np.asarray(q_inv_angstrom, dtype=float)
    out = [np.array([np.interp((q - z) / (1 + s), q, t) for t in templates])
           for s in scale_errors for z in zero_shifts_inv_angstrom]
    return np.concatenate(out)


def noise_variance(intensity: np.ndarray, measured: np.ndarray) -> float:
    """Point-to-point noise variance of one pattern from second differences of neighbouring measured points
    (robust: median absolute deviation), on the pattern's own grid."""
    ok = measured[:-2] & measured[1:-1] & measured[2:]
    d2 = (intensity[:-2] - 2 * intensity[1:-1] + intensity[2:])[ok]
    if len(d2) < 10:
        return 0.0
    return float((1.4826 * np.median(np.abs(d2 - np.median(d2)))) ** 2 / 6.0)


@dataclass
class PhysicsCheck:
    """Evidence in [0, 1] that a pattern is this material's nanocrystal scattering, and the threshold below which
    it is flagged.

    The pattern minus the best free-sign mix of background profiles leaves its structure; a non-negative mix of
    the material's clean patterns (with the calibration errors training tolerates) is then fitted to it. Evidence
    is the fraction of the structure beyond counting noise that the mix explains: close to 1 for the material's
    dots under any background, 0 for pure solvent, an empty capillary or noise, and low for another material whose
    peaks sit elsewhere. How much a pattern can be explained depends on its signal-to-noise ratio, so the
    threshold is a low quantile of in-distribution evidence in bins of signal-to-noise, less a margin.
    """

    q_inv_angstrom: np.ndarray
    templates: np.ndarray  # (k, n_q) clean patterns, unit mean
    background: np.ndarray  # (p, n_q) free-sign profiles, unit mean
    log_snr_edges: np.ndarray = field(default_factory=lambda: np.zeros(0))  # inner bin edges, log10 SNR
    thresholds: np.ndarray = field(default_factory=lambda: np.zeros(1))  # one per bin, non-decreasing
    stride: int = 2

    @classmethod
    def build(cls, q_inv_angstrom, patterns, mean_diameter_nm, size_dispersion_pct, stride: int = 2,
              solvent_dilation: tuple[float, float] = (1.0, 1.0), n_dilations: int = 2) -> "PhysicsCheck":
        """`solvent_dilation`: the range of k over which training stretched solvents, I(Q / k) (augment's
        solvent.dilation); each solvent then also enters the background stretched at `n_dilations` values of k
        across it (2: both ends; a free-sign mix of those and the tabulated curve spans the stretches between, and
        more of them would explain the faint structure of noisy patterns away)."""
        from qdsize.sim import refine, solvents

        q = np.asarray(q_inv_angstrom, dtype=float)
        templates = pick_templates(patterns, np.asarray(mean_diameter_nm), np.asarray(size_dispersion_pct))
        # free-sign profiles besides the dots: the refinement's Legendre terms, every solvent and capillary
        background = refine.background_basis(q, 6, solvents.SOLVENTS, solvents.CAPILLARIES)[0]
        lo, hi = (float(v) for v in solvent_dilation)
        if hi > lo or lo != 1.0:  # liquids not tabulated, as training drew them: stretched solvents
            ks = sorted({round(float(k), 6) for k in np.geomspace(lo, hi, n_dilations)} - {1.0})
            stretched = [solvents.solvent_intensity(nm, q / k) for nm in solvents.SOLVENTS for k in ks]
            background = np.concatenate([background, [c / c.mean() for c in stretched]])
        return cls(q, miscalibrated(templates, q), background, stride=stride)

    def evidence(self, intensity: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Evidence (n,) and signal-to-noise ratio (n,) for patterns on the model grid (mask 0 or NaN: unmeasured).
        The ratio is the structure beyond the background over the noise expected in it (inf for noise-free)."""
        x = np.atleast_2d(np.asarray(intensity, dtype=float))
        m = np.isfinite(x) if mask is None else (np.asarray(mask) > 0) & np.isfinite(x)
        x = np.where(m, x, 0.0)
        sub = np.zeros(x.shape[1], dtype=bool)
        sub[:: self.stride] = True
        ev, snr = np.zeros(len(x)), np.zeros(len(x))
        cache: dict[bytes, tuple] = {}
        for i in range(len(x)):
            keep = m[i] & sub
            if keep.sum() < 3 * (len(self.background) + 1):
                continue  # too little measured to say anything: no evidence
            key = np.packbits(keep).tobytes()
            if key not in cache:  # patterns with the same coverage share the projection
                if len(cache) > 64:
                    cache.clear()
                qb, _ = np.linalg.qr(self.background[:, keep].T)
                a = self.templates[:, keep].T
                cache[key] = (qb, a - qb @ (qb.T @ a))
            qb, a_r = cache[key]
            scale = max(np.abs(x[i, keep]).mean(), 1e-30)
            y = x[i, keep] / scale
            r0 = y - qb @ (qb.T @ y)
            _, r1 = nnls(a_r, r0, maxiter=20 * a_r.shape[1])
            # counting noise is structure no model explains: take its expected share out of both residuals
            noise = noise_variance(x[i], m[i]) / scale**2 * (len(y) - qb.shape[1])
            structure = float(r0 @ r0) - noise
            if structure <= 1e-12 * float(y @ y):
                continue
            ev[i] = min(1.0, max(0.0, 1.0 - max(r1 * r1 - noise, 0.0) / structure))
            snr[i] = structure / noise if noise > 0 else np.inf
        return ev, snr

    def threshold_for(self, snr: np.ndarray) -> np.ndarray:
        """The evidence threshold at each signal-to-noise ratio."""
        log_snr = np.log10(np.clip(np.asarray(snr, dtype=float), 1e-12, 1e12))
        return self.thresholds[np.searchsorted(self.log_snr_edges, log_snr)]

    def flags(self, intensity: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Evidence and out-of-distribution flags (n,) for patterns on the model grid."""
        ev, snr = self.evidence(intensity, mask)
        return ev, ev < self.threshold_for(snr)

    def fit_threshold(self, intensity: np.ndarray, mask: np.ndarray | None = None, n_bins: int = 6,
                      quantile: float = 0.01, margin: float = 0.15, floor: float = 0.05) -> np.ndarray:
        """Per signal-to-noise bin (equal counts of in-distribution patterns): the `quantile` of their evidence
        less `margin`, at least `floor`, never lower at higher signal-to-noise."""
        ev, snr = self.evidence(intensity, mask)
        log_snr = np.log10(np.clip(snr, 1e-12, 1e12))
        self.log_snr_edges = np.quantile(log_snr, np.linspace(0, 1, n_bins + 1)[1:-1])
        which = np.searchsorted(self.log_snr_edges, log_snr)
        thr = [np.quantile(ev[which == b], quantile) if np.any(which == b) else 0.0 for b in range(n_bins)]
        self.thresholds = np.maximum.accumulate(np.maximum(np.array(thr) - margin, floor))
        return self.thresholds

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / FILE
        np.savez_compressed(path, q_inv_angstrom=self.q_inv_angstrom, templates=self.templates.astype(np.float32),
                            background=self.background.astype(np.float32), log_snr_edges=self.log_snr_edges,
                            thresholds=self.thresholds, stride=self.stride)
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "PhysicsCheck | None":
        """The check saved with a model, or None for models saved without one."""
        path = Path(folder) / FILE
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as z:
            return cls(z["q_inv_angstrom"], z["templates"].astype(float), z["background"].astype(float),
                       z["log_snr_edges"], z["thresholds"], int(z["stride"]))
