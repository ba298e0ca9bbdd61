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
