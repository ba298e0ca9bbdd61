"""Composing patterns from family tables: the Gaussian microstrain quadrature, the numba kernel (B-spline tables,
strain, Debye-Waller, anomalous form factors) and a batch of samples of one family."""

from __future__ import annotations

import functools

import numba
import numpy as np

from . import scattering

T_MAX_SIGMA = 9.0  # microstrain quadrature nodes lie within +-9 standard deviations


# Gaussian microstrain quadrature: the cheapest rule that integrates cos(x t), t ~ N(0, 1), to `tol` for each x
@functools.lru_cache(maxsize=8)
def quadrature_rules(tol: float = 1e-5) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pareto set of symmetric rules (nodes t, weights) for E[g(t)], t ~ N(0,1): Gauss-Hermite for small x = Q r
    sigma, Gaussian-weighted uniform (trapezoid) rules for large x, whose aliasing error falls fastest.

    Returns (nodes (R, M), weights (R, M), counts (R,), x_ok (R,)): rule r integrates cos(x t) to `tol` for every
    x <= x_ok[r]; rule 0 is the single node t = 0 (no microstrain).
    """
    xs = np.linspace(0.0, 60.0, 1201)
    target = np.exp(-xs**2 / 2)

    def x_ok(t, w):
        err = np.abs(np.cos(np.outer(xs, t)) @ w - target)
        badx = np.flatnonzero(err > tol)
        return xs[badx[0] - 1] if len(badx) else xs[-1]

    cands = [(np.zeros(1), np.ones(1))]
    for n in range(2, 41):
        x, w = np.polynomial.hermite.hermgauss(n)
        t, w = np.sqrt(2.0) * x, w / np.sqrt(np.pi)
        keep = w > 1e-15
        cands.append((t[keep], w[keep] / w[keep].sum()))
    for n in range(5, 121, 2):
        best = None
        for half in np.linspace(4.5, 8.5, 9):
            t = np.linspace(-half, half, n)
            w = np.exp(-t**2 / 2)
            w /= w.sum()
            xo = x_ok(t, w)
            if best is None or xo > best[0]:
                best = (xo, t, w)
        cands.append((best[1], best[2]))
    rules = []
    for t, w in cands:
        if np.max(np.abs(t)) > T_MAX_SIGMA + 1e-9:
            continue
        rules.append((len(t), x_ok(t, w) if len(t) > 1 else np.sqrt(2 * tol), t, w))
    rules.sort(key=lambda r: (r[0], -r[1]))
    pareto, best_x = [], -1.0
    for r in rules:
        if r[1] > best_x + 1e-12:
            pareto.append(r)
            best_x = r[1]
    m = max(r[0] for r in pareto)
    nodes = np.zeros((len(pareto), m))
    weights = np.zeros((len(pareto), m))
    for i, (n, _, t, w) in enumerate(pareto):
        nodes[i, :n], weights[i, :n] = t, w
    return nodes, weights, np.array([r[0] for r in pareto], dtype=np.int64), np.array([r[1] for r in pareto])


@numba.njit(cache=True, fastmath=True)
def _compose_kernel(coef, n_pairs, q, scale, sigma, rmax, energy_idx, b_iso, atoms, ff_self, ff_pair, pair_s,
                    pair_t, rule_t, rule_w, rule_n, rule_x, q0, h, out):
    """I(Q) per sample: self terms + sum_p c_p(Q) T_s T_t <S_p(Q (1+strain)(1+eps))>_eps from B-spline tables.

    `coef` (n, P * F) holds each sample's weighted B-spline coefficients, pair-major. For every Q the cheapest
    quadrature rule that resolves x = Q r_max sigma is used (rules are ordered by cost and reach).
    """
    n_b = coef.shape[0]
    n_f = coef.shape[1] // n_pairs
    n_q = q.shape[0]
    n_s = atoms.shape[1]
    n_rules = rule_n.shape[0]
    acc = np.zeros(8)
    tdw = np.zeros(n_s)
    inv16pi2 = 1.0 / (16.0 * np.pi * np.pi)
    inv_h = 1.0 / h
    for b in range(n_b):
        e = energy_idx[b]
        r = 0
        sig = sigma[b]
        reach = scale[b] * rmax[b] * sig
        for i in range(n_q):
            qi = q[i]
            qs = qi * scale[b]
            if sig > 0.0:
                while r < n_rules - 1 and rule_x[r] < qi * reach:
                    r += 1
            a0 = 0.0
            a1 = 0.0
            a2 = 0.0
            for p in range(3, n_pairs):
                acc[p] = 0.0
            for j in range(rule_n[r]):
                tq = (qs * (1.0 + sig * rule_t[r, j]) - q0) * inv_h
                i0 = int(tq)
                if i0 < 1:
                    i0 = 1
                if i0 > n_f - 3:
                    i0 = n_f - 3
                u = tq - i0
                um = 1.0 - u
                u2 = u * u
                u3 = u2 * u
                wj = rule_w[r, j] * (1.0 / 6.0)
                w0 = wj * um * um * um
                w1 = wj * (3.0 * u3 - 6.0 * u2 + 4.0)
                w2 = wj * (-3.0 * u3 + 3.0 * u2 + 3.0 * u + 1.0)
                w3 = wj * u3
                o = i0
                a0 += w0 * coef[b, o - 1] + w1 * coef[b, o] + w2 * coef[b, o + 1] + w3 * coef[b, o + 2]
                if n_pairs > 1:
                    o += n_f
                    a1 += w0 * coef[b, o - 1] + w1 * coef[b, o] + w2 * coef[b, o + 1] + w3 * coef[b, o + 2]
                if n_pairs > 2:
                    o += n_f
                    a2 += w0 * coef[b, o - 1] + w1 * coef[b, o] + w2 * coef[b, o + 1] + w3 * coef[b, o + 2]
                for p in range(3, n_pairs):
                    o += n_f
                    acc[p] += w0 * coef[b, o - 1] + w1 * coef[b, o] + w2 * coef[b, o + 1] + w3 * coef[b, o + 2]
            acc[0] = a0
            acc[1] = a1
            acc[2] = a2
            q2 = qi * qi * inv16pi2
            total = 0.0
            for s in range(n_s):
                total += atoms[b, s] * ff_self[e, s, i]
                tdw[s] = np.exp(-b_iso[b, s] * q2)
            for p in range(n_pairs):
                total += ff_pair[e, p, i] * tdw[pair_s[p]] * tdw[pair_t[p]] * acc[p]
            out[b, i] = total


@functools.lru_cache(maxsize=16)
def _form_factor_tables(species: tuple[str, ...], q_key: tuple, energies: tuple[float, ...]):
    """|f_s|^2 (E, S, Q) and 2 Re(f_s f_t*) (E, P, Q) per energy."""
    q = np.asarray(q_key)
    n = len(species)
    pairs = [(s, t) for s in range(n) for t in range(s, n)]
    ff_self = np.zeros((len(energies), n, q.size))
    ff_pair = np.zeros((len(energies), len(pairs), q.size))
    for e, kev in enumerate(energies):
        f = scattering.form_factors(species, q, kev)
        ff_self[e] = np.abs(f) ** 2
        for p, (s, t) in enumerate(pairs):
            ff_pair[e, p] = 2.0 * np.real(f[s] * np.conj(f[t]))
    return ff_self, ff_pair, np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def compose_family(tab: dict, q: np.ndarray, weights: np.ndarray, strain: np.ndarray, microstrain_pct: np.ndarray,
                   b_iso: np.ndarray, energy_idx: np.ndarray, energies: tuple[float, ...], tol: float = 1e-5,
                   batch: int = 512, rules=None) -> np.ndarray:
    """Patterns (n, n_Q) float64 of n samples of one family: ladder weights (n, K), strain, microstrain (%),
    B per species (n, S) and energy index per sample; electron units per particle (weights sum to one)."""
    q = np.ascontiguousarray(q, dtype=np.float64)
    species = tuple(tab["species"])
    ff_self, ff_pair, ps, pt = _form_factor_tables(species, tuple(q.tolist()), tuple(energies))
    nodes, wts, counts, xok = rules if rules is not None else quadrature_rules(tol)
    n = weights.shape[0]
    out = np.zeros((n, q.size))
    fine_q0 = float(tab["fine_q0"])
    fine_h = float(tab["fine_step"])
    atoms_k = tab["atoms"]
    rmax_k = tab["rmax_angstrom"]
    big = atoms_k.sum(axis=1) ** 2
    for a in range(0, n, batch):
        sl = slice(a, min(n, a + batch))
        w = weights[sl]
        coef = w.astype(np.float32) @ tab["coef"]  # (b, P*F)
        # the quadrature must resolve every cluster that carries intensity: largest pair distance among them
        inten = w * big[None, :]
        sig_k = inten >= 1e-7 * inten.max(axis=1, keepdims=True)
        rmax = np.where(sig_k, rmax_k[None, :], 0.0).max(axis=1)
        _compose_kernel(coef, int(tab["n_pairs"]), q, 1.0 + strain[sl], microstrain_pct[sl] / 100.0, rmax,
                        energy_idx[sl].astype(np.int64), np.ascontiguousarray(b_iso[sl], dtype=np.float64),
                        w @ atoms_k, ff_self, ff_pair, ps, pt, nodes, wts, counts, xok, fine_q0, fine_h, out[sl])
    return out
