"""Figures people look at: simulated patterns (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_patterns(out_png: str | Path, curves: list[tuple[np.ndarray, np.ndarray, str]], title: str = "",
                  normalise: bool = False, log: bool = False, ylabel: str | None = None) -> Path:
    """One panel of I(Q) curves (q, intensity, label); optionally each divided by its mean."""
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for q, i_q, label in curves:
        y = np.asarray(i_q) / np.mean(i_q) if normalise else np.asarray(i_q)
        ax.plot(q, y, lw=1.0, label=label)
    ax.set_xlabel(r"$Q$ (1/$\AA$)")
    ax.set_ylabel(ylabel or ("I(Q) / mean" if normalise else "I(Q) (electron units per particle)"))
    if log:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.legend(frameon=False, fontsize=9)
    ax.grid(alpha=0.25)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_prediction(out_png, q, intensity, mask, cam, result: dict, size_edges, dispersion_edges) -> Path:
    """Write `prediction_figure` as a PNG."""
    fig = prediction_figure(q, intensity, mask, cam, result, size_edges, dispersion_edges)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def prediction_figure(q, intensity, mask, cam, result: dict, size_edges, dispersion_edges):
    """The pattern as the model saw it over its class-activation map (with a colour bar), both heads' class
    probabilities, and, for a flagged answer, a red banner with the reasons."""
    flags = list(result.get("flags") or (["out of distribution"] if result.get("out_of_distribution") else []))
    fig = plt.figure(figsize=(11.5, 4.4), dpi=110)
    gs = fig.add_gridspec(2, 3, width_ratios=[2.6, 0.06, 1])
    ax = fig.add_subplot(gs[:, 0])
    sel = np.asarray(mask) > 0
    y = np.where(sel, intensity, np.nan)
    y = y / np.nanmean(y)
    c = np.asarray(cam, dtype=float)
    c = (c - c[sel].min()) / max(np.ptp(c[sel]), 1e-12)
    lo, hi = np.nanmin(y), np.nanmax(y)
    pad = 0.05 * (hi - lo)
    bottom, top = lo - pad, hi + 4 * pad  # the strongest peak below the frame, room for the legend above it
    im = ax.imshow(np.where(sel, c, np.nan)[None, :], aspect="auto", cmap="magma", alpha=0.45,
                   extent=(q[0], q[-1], bottom, top), origin="lower", vmin=0.0, vmax=1.0)
    ax.plot(q, y, color="k", lw=0.8, label="pattern (resampled onto the model grid)")
    ax.set_xlim(q[0], q[-1])
    ax.set_ylim(bottom, top)
    ax.set_xlabel(r"$Q$ (1/$\AA$)")
    ax.set_ylabel("I / mean")
    evidence = "" if result.get("material_evidence") is None else \
        f"; material evidence {result['material_evidence']:.2f}"
    ax.set_title(f"{Path(result.get('file', '')).name}: {result['mean_diameter_nm']:.2f} ± "
                 f"{result['mean_diameter_std_nm']:.2f} nm, {result['size_dispersion_pct']:.1f} ± "
                 f"{result['size_dispersion_std_pct']:.1f} %{evidence}", fontsize=9,
                 color="tab:red" if flags else "k")
    ax.legend(fontsize=8, frameon=False, loc="upper right")
    if flags:
        ax.text(0.01, 0.97, "FLAGGED, do not trust: " + "; ".join(flags), transform=ax.transAxes, va="top",
                fontsize=8, color="white", wrap=True,
                bbox=dict(boxstyle="round", facecolor="tab:red", edgecolor="none", alpha=0.9))
    bar = fig.colorbar(im, cax=fig.add_subplot(gs[:, 1]))
    bar.set_label("class-activation map: weight the network gave each Q (0-1)", fontsize=8)
    for row, (probs, edges, unit) in enumerate(((result["size_class_probs"], size_edges, "nm"),
                                                (result["dispersion_class_probs"], dispersion_edges, "%"))):
        a = fig.add_subplot(gs[row, 2])
        names = [f"{edges[i]:g}-{edges[i + 1]:g}" for i in range(len(edges) - 1)]
        a.bar(range(len(probs)), probs, color="tab:gray" if flags else "tab:blue", hatch="//" if flags else None)
        a.set_xticks(range(len(probs)), names, rotation=45, ha="right", fontsize=7)
        a.set_ylim(0, 1)
        a.set_ylabel(f"p (class, {unit})", fontsize=8)
    fig.tight_layout()
    return fig


def plot_resolution(out_png, fit, title: str = "") -> Path:
    """Line widths of a calibrant against Q, the fitted law FWHM(Q) = sqrt(fwhm0^2 + (rel Q)^2), lines left out."""
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    for used, style, label in ((True, "o", "lines used"), (False, "x", "lines left out (weak, blended)")):
        pts = [(ln.q_fitted_inv_angstrom, ln.fwhm_inv_angstrom) for ln in fit.lines if ln.used == used]
        if pts:
            ax.plot(*np.array(pts).T, style, color="k" if used else "tab:red", label=label)
    q = np.linspace(0.0, max(ln.q_fitted_inv_angstrom for ln in fit.lines) * 1.05, 200)
    ax.plot(q, fit.fwhm_at(q), color="tab:blue",
            label=f"fwhm0 {fit.fwhm0_inv_angstrom:.4f}, relative {fit.fwhm_relative:.5f}, "
                  f"eta {fit.lorentz_fraction:.2f}")
    used = [ln.fwhm_inv_angstrom for ln in fit.lines if ln.used]
    ax.set_ylim(0, 1.6 * max(used))
    ax.set_xlabel(r"$Q$ (1/$\AA$)")
    ax.set_ylabel(r"FWHM (1/$\AA$)")
    ax.set_title(f"{title}: {fit.standard} line widths", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
