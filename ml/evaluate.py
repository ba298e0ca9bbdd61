"""Metrics and figures for a trained network: accuracies, MAE, NLL, calibration, confusion matrices, CAMs."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .model import TARGET_SCALE, TARGETS, QDNet  # noqa: E402

SIZE_EDGES_NM = [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
DISPERSION_EDGES_PCT = [0, 5, 10, 15, 25]
STD_KEYS = {"mean_diameter_nm": "mean_diameter_std_nm", "size_dispersion_pct": "size_dispersion_std_pct"}  # as answered


def class_of(values, edges) -> np.ndarray:
    """Class index of each value for bins [e0, e1), ..., [e_{n-1}, e_n] (the last bin closed), clipped."""
    v = np.asarray(values, dtype=np.float64)
    return np.clip(np.searchsorted(np.asarray(edges, dtype=np.float64), v, side="right") - 1, 0, len(edges) - 2)


def frozen_protocols(split: str, instrument: np.ndarray | None) -> list[tuple[str, np.ndarray | None]]:
    """The (name, resolution) pairs a frozen split is scored under: told its recorded `instrument` under the split's
    own name and blind under `{split}_blind`; blind alone, under its own name, when there is no instrument to tell."""
    return [(split, None)] if instrument is None else [(split, instrument), (f"{split}_blind", None)]


@torch.no_grad()
def predict_arrays(model: QDNet, intensity: np.ndarray, mask: np.ndarray | None = None,
                   batch_size: int | None = None, device: torch.device | str = "cpu",
                   resolution: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Run the network in eval mode; continuous outputs in physical units with standard deviations. `resolution`:
    the instrument's (fwhm0 1/A, fwhm_relative, lorentz_fraction), one row for all patterns or one per pattern;
    None or NaN where not known. `batch_size` default: 128 on a CPU (the activations of a batch stay in cache:
    3x the patterns/s of 1,024 on 2 cores), 2,048 on a GPU."""
    if batch_size is None:
        batch_size = 2048 if torch.device(device).type == "cuda" else 128
    model.eval()
    told = None if resolution is None else np.asarray(resolution, dtype=np.float32)
    outs: dict[str, list] = {}
    for a in range(0, len(intensity), batch_size):
        x = torch.as_tensor(np.asarray(intensity[a:a + batch_size]), dtype=torch.float32, device=device)
        m = None if mask is None else torch.as_tensor(np.asarray(mask[a:a + batch_size]), device=device)
        r = None if told is None else torch.as_tensor(told if told.ndim == 1 else told[a:a + batch_size],
                                                      device=device)
        o = model(x, m, r)
        for k, v in o.items():
            outs.setdefault(k, []).append(v.float().cpu())
    o = {k: torch.cat(v) for k, v in outs.items()}
    res = {"ood_score": o["ood_score"].numpy()}
    for head in ("size", "dispersion"):  # reported: the continuous estimate's class probabilities, when it has edges
        res[f"{head}_head_probs"] = torch.softmax(o[f"{head}_logits"], -1).numpy()
        res[f"{head}_probs"] = o[f"{head}_probs"].numpy() if f"{head}_probs" in o else res[f"{head}_head_probs"]
    for key in TARGETS:
        centre, scale = TARGET_SCALE[key]
        res[key] = (o[key] * scale + centre).numpy()
        res[STD_KEYS[key]] = (torch.exp(0.5 * o[key + "_logvar"]) * scale).numpy()
    return res


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE of the top-class confidence: sum over confidence bins of |accuracy - confidence| x bin fraction."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = idx == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def gaussian_nll(mean, std, target) -> float:
    var = np.maximum(np.asarray(std) ** 2, 1e-12)
    return float(np.mean(0.5 * (np.log(2 * np.pi * var) + (np.asarray(target) - mean) ** 2 / var)))


def metrics(pred: dict, mean_diameter_nm, size_dispersion_pct, size_class=None, dispersion_class=None, *,
            size_edges_nm=SIZE_EDGES_NM, dispersion_edges_pct=DISPERSION_EDGES_PCT) -> dict:
    """Every score of one split, keyed without prefix (the caller adds `benchmark_` and so on)."""
    d = np.asarray(mean_diameter_nm, dtype=np.float64)
    s = np.asarray(size_dispersion_pct, dtype=np.float64)
    sc = class_of(d, size_edges_nm) if size_class is None else np.asarray(size_class)
    dc = class_of(s, dispersion_edges_pct) if dispersion_class is None else np.asarray(dispersion_class)
    size_ok = pred["size_probs"].argmax(1) == sc
    disp_ok = pred["dispersion_probs"].argmax(1) == dc
    d_err = np.abs(pred["mean_diameter_nm"] - d)
    s_err = np.abs(pred["size_dispersion_pct"] - s)
    return {
        "mean_diameter_mae_nm": float(d_err.mean()),
        "dispersion_mae_pct": float(s_err.mean()),
        "size_accuracy": float(size_ok.mean()),
        "dispersion_accuracy": float(disp_ok.mean()),
        "joint_accuracy": float((size_ok & disp_ok).mean()),
        "ece": expected_calibration_error(pred["size_probs"], sc),
        "dispersion_ece": expected_calibration_error(pred["dispersion_probs"], dc),
        "mean_diameter_nll": gaussian_nll(pred["mean_diameter_nm"], pred["mean_diameter_std_nm"], d),
        "dispersion_nll": gaussian_nll(pred["size_dispersion_pct"], pred["size_dispersion_std_pct"], s),
        "mean_diameter_coverage_1sigma": float(np.mean(d_err <= pred["mean_diameter_std_nm"])),
        "size_within_0p25nm": float(np.mean(d_err <= 0.25)),
        "dispersion_within_2p5pct": float(np.mean(s_err <= 2.5)),
        "joint_within": float(np.mean((d_err <= 0.25) & (s_err <= 2.5))),
    }


def confusion(true_idx, pred_idx, n: int) -> np.ndarray:
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (np.asarray(true_idx), np.asarray(pred_idx)), 1)
    return cm


def _labels(edges, unit):
    return [f"{edges[i]:g}-{edges[i + 1]:g}" for i in range(len(edges) - 1)], unit


def plot_confusion(cm: np.ndarray, edges, unit: str, title: str, path: str | Path) -> Path:
    names, _ = _labels(edges, unit)
    frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(names), 0.8 + 0.5 * len(names)), dpi=120)
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                ax.text(j, i, f"{100 * frac[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if frac[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel(f"predicted ({unit})")
    ax.set_ylabel(f"true ({unit})")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_learning_curves(history: list[dict], path: str | Path) -> Path:
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=110)
    for key, ax in zip(("loss", "accuracy", "mae"), axes):
        for name in sorted({k for h in history for k in h if key in k}):
            ax.plot(epochs, [h.get(name, np.nan) for h in history], marker=".", label=name)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend(fontsize=7, frameon=False)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_cams(q, intensity, cams, titles, path: str | Path) -> Path:
    """Patterns with the class-activation map of the predicted size class as a colour band underneath."""
    n = len(intensity)
    fig, axes = plt.subplots(n, 1, figsize=(9, 1.9 * n), dpi=110, sharex=True, squeeze=False)
    for ax, i_q, cam, title in zip(axes[:, 0], intensity, cams, titles):
        y = np.asarray(i_q) / np.mean(i_q)
        ax.plot(q, y, color="k", lw=0.8)
        c = (cam - cam.min()) / max(np.ptp(cam), 1e-12)
        ax.imshow(c[None, :], aspect="auto", cmap="magma", alpha=0.45,
                  extent=(q[0], q[-1], y.min(), y.max()), origin="lower")
        ax.set_ylim(y.min(), y.max())
        ax.set_title(title, fontsize=8)
    axes[-1, 0].set_xlabel(r"$Q$ (1/$\AA$)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def per_class_table(true_idx, pred_idx, edges, unit) -> str:
    names, _ = _labels(edges, unit)
    rows = [f"| class ({unit}) | samples | accuracy |", "|---|---|---|"]
    t, p = np.asarray(true_idx), np.asarray(pred_idx)
    for k, name in enumerate(names):
        sel = t == k
        acc = f"{(p[sel] == k).mean():.3f}" if sel.any() else "n/a"
        rows.append(f"| {name} | {int(sel.sum())} | {acc} |")
    return "\n".join(rows) + "\n"
