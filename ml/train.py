"""Train one network on a Parquet dataset, tracked in MLflow: read it top to bottom."""

from __future__ import annotations

import copy
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.nn import functional as F

from qdsize.sim.contract import FROZEN_SPLITS
from qdsize.sim.errors import bad

from . import data, evaluate, ood, shards
from .model import TARGET_SCALE, TARGETS, ModelConfig, QDNet, fuse, fused_nll, pick_device


@dataclass
class LossWeights:
    size: float = 1.0
    dispersion: float = 1.0
    regression: float = 1.0
    # beta-NLL (Seitzer et al., ICLR 2022): each sample's Gaussian NLL weighted by its predicted variance^beta
    # (not differentiated), so that hard samples with a large predicted variance still pull the mean; 0 = plain NLL
    nll_beta: float = 0.5


@dataclass
class Holdout:
    """A shifted split: particle shapes and solvents kept out of training and validation, then scored apart."""

    shapes: list[str] = field(default_factory=list)
    solvents: list[str] = field(default_factory=list)
    test_rows: int = 8000  # rows of the test split scored on each side (in distribution / shifted)


@dataclass
class TrainConfig:
    """Everything one training run needs; the resolved dict is logged as the run's parameters."""

    dataset: str = "${QDSIZE_HOME}/datasets/pbs"
    experiment: str | None = None  # default: qdsize-<dataset folder name>
    seed: int = 0
    device: str = "auto"
    epochs: int = 30
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    ema_decay: float = 0.999  # validate, keep and ship an exponential moving average of the weights (0 = off)
    patience: int = 5
    max_train_rows: int | None = None
    max_val_rows: int | None = 20000
    threads: int | None = None
    score_frozen_every_epoch: bool = False  # also score benchmark/seedgrid after each epoch (learning curves)
    loss: LossWeights = field(default_factory=LossWeights)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: dict[str, Any] = field(default_factory=lambda: {"preset": "default"})
    truncation: data.TruncationConfig = field(default_factory=data.TruncationConfig)
    # curriculum: augmentation grows from `augment_anchor` (a typical laboratory measurement) to the full ranges
    # over this many epochs; 0 = full ranges from the start
    augment_warmup_epochs: int = 0
    augment_anchor: str = "realistic"
    # where training ends between the anchor (0) and the configured full ranges (1): a hyperparameter
    augment_strength: float = 1.0
    holdout: Holdout = field(default_factory=Holdout)
    # fraction of training patterns whose instrument resolution the network is told (the rest: not told, as when a
    # user does not know it); needs model.resolution_input
    resolution_known: float = 0.5

    def __post_init__(self):
        for name in ("epochs", "batch_size", "patience"):
            if int(getattr(self, name)) < 1:
                raise bad(f"train.{name}", getattr(self, name), "a positive integer")
        if not self.lr > 0:
            raise bad("train.lr", self.lr, "a positive learning rate")
        if int(self.augment_warmup_epochs) < 0:
            raise bad("train.augment_warmup_epochs", self.augment_warmup_epochs, "a non-negative number of epochs")
        if not 0 <= self.augment_strength <= 1:
            raise bad("train.augment_strength", self.augment_strength, "a number 0 <= s <= 1")
        if not 0 <= self.ema_decay < 1:
            raise bad("train.ema_decay", self.ema_decay, "a number 0 <= d < 1 (0 turns the average off)")
        if self.weight_decay < 0:
            raise bad("train.weight_decay", self.weight_decay, "a non-negative weight decay")
        if not 0 <= self.resolution_known <= 1:
            raise bad("train.resolution_known", self.resolution_known, "a fraction 0 <= f <= 1")
        if self.resolution_known > 0 and not self.model.resolution_input:
            raise bad("train.resolution_known", self.resolution_known,
                      "0 when train.model.resolution_input is false (the network has no resolution input)")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainFile:
    """Top level of a training config file (`train:`)."""

    train: TrainConfig = field(default_factory=TrainConfig)


def make_augmenter(augment_cfg: dict, q_inv_angstrom: np.ndarray):
    """The physics-informed augmenter for this Q grid, from a preset name plus overrides (`none`: identity)."""
    if augment_cfg.get("preset") == "none":
        return lambda batch, generator, **_: batch
    from qdsize.sim import augment

    return augment.from_config(augment_cfg, q_inv_angstrom)


def warmed_augment(augment_cfg: dict, anchor: str, strength: float) -> dict:
    """The augmentation config at `strength` in [0, 1]: every range and probability moved from the anchor preset's
    value toward the full configured one (ranges drawn log-uniformly, or spanning two decades or more, move in log
    space: the anchor stays their geometric centre when the full range is)."""
    from qdsize.sim import augment

    full = augment.config_from(augment_cfg).to_dict()
    base = augment.config_from({"preset": anchor}).to_dict()
    out: dict = {"preset": augment_cfg.get("preset", "default")}
    for name, section in full.items():
        a, o = base.get(name, {}), dict(section)
        if "probability" in section:
            p0 = a.get("probability", 0.0) if a.get("enabled", False) else 0.0
            o["probability"] = p0 + strength * (section["probability"] - p0)
        for key, v in section.items():
            av = a.get(key)
            numeric = isinstance(v, list) and len(v) == 2 and all(isinstance(t, (int, float)) for t in v)
            if not numeric or not isinstance(av, list) or all(isinstance(t, int) for t in v):
                continue
            lo, hi = float(v[0]), float(v[1])
            c = float(np.clip(np.mean(av), lo, hi))
            if lo > 0 and (hi >= 100 * lo or augment.log_range(name, key, (lo, hi))):
                o[key] = [float(np.exp(np.log(c) + strength * np.log(b / c))) for b in (lo, hi)]
            else:
                o[key] = [c + strength * (b - c) for b in (lo, hi)]
        out[name] = o
    return out


def _augment_at(cfg: TrainConfig, strength: float) -> dict:
    """The training augmentation at a curriculum strength (1 = the configured ranges as they are)."""
    if strength >= 1 or cfg.augment.get("preset") == "none":
        return cfg.augment
    return warmed_augment(cfg.augment, cfg.augment_anchor, strength)


def without_solvents(augment_cfg: dict, solvents: list[str]) -> dict:
    """The augmentation config with some solvents taken out of its solvent list (a shifted split)."""
    if not solvents:
        return augment_cfg
    from qdsize.sim import augment

    names = augment.config_from(augment_cfg).to_dict()["solvent"]["names"]
    unknown = [s for s in solvents if s not in names]
    if unknown:
        raise bad("train.holdout.solvents", solvents, f"solvents of the training augmentation, out of {names}")
    kept = [n for n in names if n not in solvents]
    if not kept:
        raise bad("train.holdout.solvents", solvents, "at least one of the solvents left for training")
    return {**augment_cfg, "solvent": {**dict(augment_cfg.get("solvent") or {}), "names": kept}}


def shifted_split(dataset: str, holdout: Holdout, anchor: str, q: np.ndarray, seed: int,
                  subtracted: bool = False) -> dict:
    """Test rows with the shapes trained on under the anchor augmentation and the training solvents ("in"), and
    rows with the held-out shapes under the same augmentation with the held-out solvents ("out"). The blank is
    left unsubtracted on both sides, so that the solvent shows in full (as in the reference work's augmentation),
    unless `subtracted` (then the anchor's subtraction applies and mostly the shape differs)."""
    from qdsize.sim import augment

    base = augment.config_from({"preset": anchor}).to_dict()
    trained = [n for n in augment.config_from({"preset": "default"}).to_dict()["solvent"]["names"]
               if n not in holdout.solvents]
    shapes = {"shape": holdout.shapes} if holdout.shapes else None
    in_solvents = [n for n in base["solvent"]["names"] if n in trained] or trained
    out_solvents = holdout.solvents or base["solvent"]["names"]
    sides = {"in": (shapes, None, in_solvents), "out": (None, shapes, out_solvents)}  # (exclude, only, solvents)
    out = {}
    for side, (exclude, only, names) in sides.items():
        x, lab = data.read_split(dataset, "test", limit=holdout.test_rows, exclude=exclude, only=only)
        cfg = {**base, "solvent": {**base["solvent"], "names": names}}
        if not subtracted:
            cfg["subtraction"] = {"enabled": False}
        gen = torch.Generator().manual_seed(seed + 7)
        out[side] = (augment.from_config(cfg, q)(torch.as_tensor(x), gen).numpy(), lab)
    return out


def shifted_scores(model: QDNet, shifted: dict, device, edges) -> dict:
    """Benchmark metrics on both sides of a shifted split and the drop from "in" to "out" (positive = worse); the
    network is not told the resolution (the shift is in shape and solvent)."""
    keys = ("mean_diameter_mae_nm", "dispersion_mae_pct", "size_accuracy", "dispersion_accuracy",
            "joint_accuracy", "size_within_0p25nm", "joint_within")
    m = {}
    for side, (x, lab) in shifted.items():
        pred = evaluate.predict_arrays(model, x, device=device)
        r = evaluate.metrics(pred, lab["mean_diameter_nm"], lab["size_dispersion_pct"], lab["size_class"],
                             lab["dispersion_class"], size_edges_nm=edges[0], dispersion_edges_pct=edges[1])
        m.update({f"shifted_{side}_{k}": r[k] for k in keys})
    for k in keys:
        sign = 1.0 if "mae" in k else -1.0  # errors grow, accuracies fall: both reported as a positive drop
        m[f"shifted_drop_{k}"] = sign * (m[f"shifted_out_{k}"] - m[f"shifted_in_{k}"])
    return m


@torch.no_grad()
def ema_update(average: QDNet, net: QDNet, decay: float, step: int) -> None:
    """Move the average's weights and batch-norm statistics toward the network's (decay ramps up from 0.1, so that
    short trainings are averaged over their own length, not over the initial weights)."""
    d = min(decay, (1.0 + step) / (10.0 + step))
    for a, b in zip(average.state_dict().values(), net.state_dict().values()):
        if a.dtype.is_floating_point:
            a.mul_(d).add_(b, alpha=1.0 - d)
        else:
            a.copy_(b)


def resolve_dataset(path: str) -> str:
    """Absolute dataset path; `${QDSIZE_HOME}` (default ./.qdsize) and `~` are expanded."""
    import os

    os.environ.setdefault("QDSIZE_HOME", str(Path(".qdsize").resolve()))
    return str(Path(os.path.expandvars(path)).expanduser().resolve())


def losses(out: dict, y: dict, w: LossWeights) -> dict[str, torch.Tensor]:
    """Cross-entropy for both class heads and a Gaussian NLL for both continuous estimates."""
    ce_size = F.cross_entropy(out["size_logits"], y["size_class"].long())
    ce_disp = F.cross_entropy(out["dispersion_logits"], y["dispersion_class"].long())
    nll = 0.0
    for key in TARGETS:
        centre, scale = TARGET_SCALE[key]
        target = (y[key].float() - centre) / scale
        logvar = out[key + "_logvar"]
        per_sample = 0.5 * (logvar + (out[key] - target) ** 2 * torch.exp(-logvar))
        if w.nll_beta:
            per_sample = per_sample * torch.exp(w.nll_beta * logvar.detach())
        nll = nll + per_sample.mean()
    total = w.size * ce_size + w.dispersion * ce_disp + w.regression * nll
    return {"loss": total, "size_ce": ce_size, "dispersion_ce": ce_disp, "nll": nll}


@torch.no_grad()
def fit_variance(err: torch.Tensor, logvar: torch.Tensor) -> tuple[float, float]:
    """(b, a) of least Gaussian NLL for errors `err` whose predicted variances v = exp(logvar) become a v^b;
    b on a 0.01 grid over [0.5, 2]."""
    err2, logvar = err.double() ** 2, logvar.double()
    powers = torch.arange(0.5, 2.0001, 0.01, dtype=torch.float64, device=logvar.device)
    # for a power b the best scale is the mean of err^2 / v^b, and the NLL then mean(b log v) + log(that) + 1
    log_a = torch.stack([torch.log((err2 * torch.exp(-b * logvar)).mean()) for b in powers])
    best = int(torch.argmin(powers * logvar.mean() + log_a))
    return float(powers[best]), float(torch.exp(log_a[best]))


@torch.no_grad()
def calibrate(model: QDNet, x: torch.Tensor, mask, y: dict, resolution: torch.Tensor | None = None) -> dict[str, float]:
    """Temperature-scale both class heads and recalibrate both predicted variances on held-out data.

    A variance v becomes a v^b, (a, b) of least Gaussian NLL: a alone (b = 1) fits the errors on average, and so
    leaves the sharp predictions too wide when the wide ones are wide for a reason (a blind pattern from an
    instrument unlike most); b lets the two ends scale apart.
    """
    model.eval()
    for buf in ("size_temperature", "dispersion_temperature", "mean_diameter_nm_var_scale",
                "size_dispersion_pct_var_scale", "mean_diameter_nm_var_power", "size_dispersion_pct_var_power",
                "size_fusion_temperature", "dispersion_fusion_temperature", "mean_diameter_nm_fusion_power",
                "size_dispersion_pct_fusion_power"):
        getattr(model, buf).fill_(0.0 if buf.endswith("fusion_power") else 1.0)  # the raw network

    def part(t, a):
        return None if t is None else t[a:a + 1024]

    outs = [model(x[a:a + 1024], part(mask, a), part(resolution, a)) for a in range(0, len(x), 1024)]
    out = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    result = {}
    for head, label in (("size", "size_class"), ("dispersion", "dispersion_class")):
        t = best_temperature(out[f"{head}_logits"], y[label].long())
        getattr(model, f"{head}_temperature").fill_(t)
        result[f"{head}_temperature"] = t
    for key in TARGETS:
        centre, scale = TARGET_SCALE[key]
        power, var_scale = fit_variance(out[key] - (y[key].float() - centre) / scale, out[key + "_logvar"])
        getattr(model, f"{key}_var_power").fill_(power)
        getattr(model, f"{key}_var_scale").fill_(var_scale)
        result[f"{key}_var_power"], result[f"{key}_var_scale"] = power, var_scale
    for head, key, edges in (("size", "mean_diameter_nm", model.config.size_edges_nm),
                             ("dispersion", "size_dispersion_pct", model.config.dispersion_edges_pct)):
        if edges is not None:
            power, t = fit_fusion(out, model, head, key, y[key], y[f"{head}_class"].long(), edges)
            getattr(model, f"{key}_fusion_power").fill_(power)
            getattr(model, f"{head}_fusion_temperature").fill_(t)
            result[f"{key}_fusion_power"], result[f"{head}_fusion_temperature"] = power, t
    pooled = torch.cat([model.pooled(x[a:a + 1024], part(mask, a), part(resolution, a))
                        for a in range(0, len(x), 1024)])
    result["ood_threshold"] = model.fit_ood(pooled)
    return result


@torch.no_grad()
def best_temperature(logits: torch.Tensor, target: torch.Tensor) -> float:
    """The temperature T of least cross-entropy of logits / T, on a log grid over 0.25-8."""
    grid = torch.exp(torch.linspace(math.log(0.25), math.log(8.0), 200, dtype=logits.dtype, device=logits.device))
    return float(grid[int(torch.argmin(torch.stack([F.cross_entropy(logits / t, target) for t in grid])))])


@torch.no_grad()
def fit_fusion(out: dict, model: QDNet, head: str, key: str, target: torch.Tensor, target_class: torch.Tensor,
               edges) -> tuple[float, float]:
    """The power of the class head in `model.fuse` of least NLL of `target` (0 to 2 in steps of 0.05), then the
    temperature of the fused class masses of least NLL of `target_class`; from raw outputs `out` (variance not
    calibrated) and the model's calibrated variance and head temperature."""
    centre, scale = TARGET_SCALE[key]
    mean = out[key].double() * scale + centre
    std = torch.exp(0.5 * model.calibrated_logvar(key, out[key + "_logvar"].double())) * scale
    probs = torch.softmax(out[f"{head}_logits"].double() / getattr(model, f"{head}_temperature"), -1)
    powers = [0.05 * i for i in range(41)]
    nll = [float(fused_nll(mean, std, probs, edges, p, target.double())) for p in powers]
    power = powers[int(np.argmax(np.asarray(nll) <= min(nll) + 1e-6))]  # the least power that helps: 0 if none
    if power == 0:
        return 0.0, 1.0
    log_mass = torch.log(fuse(mean, std, probs, edges, power)[2].clamp_min(1e-30))
    return power, best_temperature(log_mass, target_class)


def fit_physics_check(dataset: str, q: np.ndarray, x_val: np.ndarray, mask_val: np.ndarray,
                      n_clean: int = 4000, n_val: int = 1500,
                      solvent_dilation: tuple[float, float] = (1.0, 1.0)) -> ood.PhysicsCheck:
    """The material check that travels with the model: templates from clean training patterns, thresholds from
    the augmented validation patterns the network was calibrated on (whose solvents were stretched over
    `solvent_dilation`: the check's background spans them too)."""
    clean, lab = data.read_split(dataset, "train", limit=n_clean)
    check = ood.PhysicsCheck.build(q, clean, lab["mean_diameter_nm"], lab["size_dispersion_pct"],
                                   solvent_dilation=solvent_dilation)
    check.fit_threshold(x_val[:n_val], mask_val[:n_val])
    return check


def read_frozen_splits(dataset: str) -> dict[str, tuple[np.ndarray, dict]]:
    """The frozen, already augmented splits the dataset has, in memory: {split: (patterns, labels)}."""
    return {split: data.read_split(dataset, split) for split in FROZEN_SPLITS
            if shards.split_files(dataset, split)}


def frozen_split_scores(model: QDNet, frozen: dict, device, edges,
                        instrument: np.ndarray | None = None) -> tuple[dict, dict]:
    """Scores on the frozen splits (from `read_frozen_splits`) under the names the registry compares.

    The frozen splits were all measured on one instrument, which the dataset records (`data.instrument_of`). The
    named scores are those of the network told it, as `qdsize predict --resolution` is by a user who calibrated
    the instrument, and as a network trained for one instrument alone (the reference work's) knows it.
    `{split}_blind_*` are the scores without it, as `qdsize predict` runs by default. For a network that takes no
    resolution, or splits whose instrument varies, the named scores are the blind ones (no `_blind_` names).
    The predictions returned for the figures are those of the named scores.
    """
    told = instrument is not None and model.config.resolution_input
    scores, preds = {}, {}
    for split, (x, lab) in frozen.items():
        keys = (("size_within_0p25nm", "dispersion_within_2p5pct", "joint_within") if split == "seedgrid" else
                ("mean_diameter_mae_nm", "dispersion_mae_pct", "size_accuracy", "dispersion_accuracy",
                 "joint_accuracy", "ece", "mean_diameter_nll", "dispersion_nll", "mean_diameter_coverage_1sigma"))
        for prefix, res in evaluate.frozen_protocols(split, instrument if told else None):
            pred = evaluate.predict_arrays(model, x, device=device, resolution=res)
            m = evaluate.metrics(pred, lab["mean_diameter_nm"], lab["size_dispersion_pct"], lab["size_class"],
                                 lab["dispersion_class"], size_edges_nm=edges[0], dispersion_edges_pct=edges[1])
            scores.update({f"{prefix}_{k}": m[k] for k in keys})
            if prefix == split:
                preds[split] = (x, lab, pred, res)
    return scores, preds


def log_figures(model: QDNet, history: list[dict], preds: dict, q: np.ndarray, device, out_dir: Path,
                edges: tuple[list, list]) -> None:
    """Learning curves, confusion matrices, per-class tables and class-activation maps, as files."""
    evaluate.plot_learning_curves(history, out_dir / "learning_curves.png")
    for split, (x, lab, pred, resolution) in preds.items():
        for head, edge, unit, label in (("size", edges[0], "nm", "size_class"),
                                        ("dispersion", edges[1], "%", "dispersion_class")):
            pidx = pred[f"{head}_probs"].argmax(1)
            cm = evaluate.confusion(lab[label], pidx, len(edge) - 1)
            evaluate.plot_confusion(cm, edge, unit, f"{split}: {head} class", out_dir / f"confusion_{split}_{head}.png")
            (out_dir / f"per_class_{split}_{head}.md").write_text(
                evaluate.per_class_table(lab[label], pidx, edge, unit))
        pick = np.linspace(0, len(x) - 1, min(6, len(x))).astype(int)
        xt = torch.as_tensor(x[pick], device=device)
        model.eval()
        told = None if resolution is None else torch.as_tensor(resolution, device=device).expand(len(pick), -1)
        cams = model.class_activation_map(xt, resolution=told).detach().cpu().numpy()
        titles = [f"true {lab['mean_diameter_nm'][i]:.2f} nm, {lab['size_dispersion_pct'][i]:.1f} %; predicted "
                  f"{pred['mean_diameter_nm'][i]:.2f} +- {pred['mean_diameter_std_nm'][i]:.2f} nm, "
                  f"{pred['size_dispersion_pct'][i]:.1f} +- {pred['size_dispersion_std_pct'][i]:.1f} %" for i in pick]
        evaluate.plot_cams(q, x[pick], cams, titles, out_dir / f"cam_{split}.png")


def train(cfg: TrainConfig, *, tracking_uri: str | None = None, experiment_id: str | None = None,
          run_name: str | None = None,
          parent_run_id: str | None = None, report: Callable[[dict], None] | None = None,
          progress: bool = True, log_model: bool = True) -> dict:
    """Train, early-stop on validation loss, calibrate, score the frozen splits, log everything to MLflow.

    `report(metrics)` is called after every epoch (Ray Tune passes `tune.report`). Returns the final scores, the
    MLflow run id and the logged model's URI.
    """
    import mlflow

    # ---- reproducibility and device
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    dataset = resolve_dataset(cfg.dataset)

    # ---- data: streamed training split with augmentation; a fixed, augmented validation set in memory
    q = data.q_grid(dataset, "train")
    edges = data.class_edges(dataset)  # the classes are the dataset's: the heads follow them
    cfg.model.n_size_classes, cfg.model.n_dispersion_classes = len(edges[0]) - 1, len(edges[1]) - 1
    cfg.model.size_edges_nm, cfg.model.dispersion_edges_pct = list(edges[0]), list(edges[1])
    held = {"shape": list(cfg.holdout.shapes)} if cfg.holdout.shapes else None  # a shifted split, if asked
    cfg.augment = without_solvents(cfg.augment, list(cfg.holdout.solvents))
    final_augment = _augment_at(cfg, cfg.augment_strength)  # where the warm-up ends: validation, card, check
    augmenter = make_augmenter(final_augment, q)
    train_stream = data.ShardStream(dataset, "train", cfg.batch_size, seed=cfg.seed, augment=augmenter,
                                    truncation=cfg.truncation, device=device, limit=cfg.max_train_rows,
                                    exclude=held, resolution_known=cfg.resolution_known)
    xv, lv = data.read_split(dataset, "val", limit=cfg.max_val_rows, exclude=held)
    gen_val = torch.Generator().manual_seed(cfg.seed + 1)
    xv_t, res_v = data.augment_batch(augmenter, torch.as_tensor(xv), gen_val, cfg.resolution_known)
    xv_t, res_v = xv_t.to(device), res_v.to(device)
    yv = {k: torch.as_tensor(v, device=device) for k, v in lv.items()}
    mask_v = data.truncation_mask(torch.as_tensor(q, dtype=torch.float32), len(xv), cfg.truncation,
                                  gen_val).to(device)
    frozen = read_frozen_splits(dataset)  # scored at the end (and after every epoch, if asked)
    instrument = data.instrument_of(dataset)  # the frozen splits' resolution, when their preset fixes it

    # ---- model and optimiser
    net = QDNet(cfg.model).to(device)  # the weights the optimiser moves
    model = copy.deepcopy(net) if cfg.ema_decay else net  # their moving average: validated, kept and shipped
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_rows = _count_rows(dataset, held)
    if cfg.max_train_rows:
        n_rows = min(n_rows, cfg.max_train_rows)
    steps_per_epoch = max(1, math.ceil(n_rows / cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, epochs=cfg.epochs,
                                                steps_per_epoch=steps_per_epoch, pct_start=0.15)

    # ---- tracking
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    experiment = cfg.experiment or f"qdsize-{Path(dataset).name}"
    if experiment_id is not None:
        mlflow.set_experiment(experiment_id=experiment_id)
    else:
        mlflow.set_experiment(experiment)
    tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
    history: list[dict] = []
    with mlflow.start_run(run_name=run_name, tags=tags) as run:
        flat = _flatten(cfg.to_dict())
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
        mlflow.log_dict(cfg.to_dict(), "config.json")
        mlflow.log_param("n_parameters", sum(p.numel() for p in model.parameters()))
        mlflow.log_param("resolved_device", str(device))

        best, best_state, bad_epochs = float("inf"), None, 0
        for epoch in range(cfg.epochs):
            # ---- one pass over the training split (augmentation warming up to its full ranges, if asked)
            if cfg.augment_warmup_epochs and epoch <= cfg.augment_warmup_epochs:
                strength = cfg.augment_strength * epoch / cfg.augment_warmup_epochs
                train_stream.augment = make_augmenter(_augment_at(cfg, strength), q)
                mlflow.log_metric("augment_strength", strength, step=epoch + 1)
            net.train()
            t0, sums, n = time.perf_counter(), {}, 0
            bar = _progress(progress, steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}")
            for step, (x, mask, y, res) in enumerate(train_stream):
                if step >= steps_per_epoch:
                    break
                out = net(x, mask, res)
                ls = losses(out, y, cfg.loss)
                opt.zero_grad(set_to_none=True)
                ls["loss"].backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
                opt.step()
                sched.step()
                if model is not net:
                    ema_update(model, net, cfg.ema_decay, epoch * steps_per_epoch + step)
                for k, v in ls.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(x)
                n += len(x)
                bar.advance(1)
            bar.close()
            # ---- validation
            model.eval()
            with torch.no_grad():
                outs = [model(xv_t[a:a + 1024], mask_v[a:a + 1024], res_v[a:a + 1024])
                        for a in range(0, len(xv_t), 1024)]
                out = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
                vl = {k: float(v) for k, v in losses(out, yv, cfg.loss).items()}
            pred = evaluate.predict_arrays(model, xv_t.cpu().numpy(), mask_v.cpu().numpy(), device=device,
                                           resolution=res_v.cpu().numpy())
            vm = evaluate.metrics(pred, lv["mean_diameter_nm"], lv["size_dispersion_pct"], lv["size_class"],
                                  lv["dispersion_class"], size_edges_nm=edges[0], dispersion_edges_pct=edges[1])
            row = {"epoch": epoch + 1, **{f"train_{k}": v / max(n, 1) for k, v in sums.items()},
                   **{f"val_{k}": v for k, v in vl.items()},
                   "val_size_accuracy": vm["size_accuracy"], "val_dispersion_accuracy": vm["dispersion_accuracy"],
                   "val_joint_accuracy": vm["joint_accuracy"], "val_mean_diameter_mae": vm["mean_diameter_mae_nm"],
                   "val_dispersion_mae": vm["dispersion_mae_pct"], "val_ece": vm["ece"],
                   "patterns_per_s": n / (time.perf_counter() - t0)}
            if cfg.score_frozen_every_epoch:
                row.update(frozen_split_scores(model, frozen, device, edges, instrument)[0])
            history.append(row)
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            if report is not None:
                report(dict(row))
            if progress:
                print(f"epoch {epoch + 1}: val loss {vl['loss']:.4f}, size acc {vm['size_accuracy']:.3f}, "
                      f"disp acc {vm['dispersion_accuracy']:.3f}, MAE {vm['mean_diameter_mae_nm']:.3f} nm / "
                      f"{vm['dispersion_mae_pct']:.2f} %", flush=True)
            # ---- early stopping on the validation loss
            if vl["loss"] < best - 1e-4:
                best, bad_epochs = vl["loss"], 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad_epochs += 1
                if bad_epochs >= cfg.patience:
                    break
        model.load_state_dict(best_state)

        # ---- calibration on validation, then the frozen splits
        cal = calibrate(model, xv_t, mask_v, yv, res_v)
        mlflow.log_metrics({f"calibration_{k}": v for k, v in cal.items()})
        physics = fit_physics_check(dataset, q, xv_t.cpu().numpy(), mask_v.cpu().numpy(),
                                    solvent_dilation=data.solvent_dilation(final_augment))
        scores, preds = frozen_split_scores(model, frozen, device, edges, instrument)
        if held or cfg.holdout.solvents:
            shifted = shifted_split(dataset, cfg.holdout, cfg.augment_anchor, q, cfg.seed)
            scores.update(shifted_scores(model, shifted, device, edges))
        # one step after the last epoch: with frozen-split scores logged per epoch (`score_frozen_every_epoch`)
        # under the same names, the run's latest value is then the shipped, calibrated model's
        mlflow.log_metrics(scores, step=len(history) + 1)
        mlflow.log_metric("best_val_loss", best)
        with tempfile.TemporaryDirectory() as tmp:
            log_figures(model, history, preds, q, device, Path(tmp), edges)
            (Path(tmp) / "history.json").write_text(json.dumps(history, indent=1))
            mlflow.log_artifacts(tmp, artifact_path="figures")
        model_uri = None
        if log_model:
            from .predict import Predictor, log_pyfunc

            model = model.cpu()
            card = {"dataset": dataset, "scores": scores, "config": cfg.to_dict(), "run_id": run.info.run_id,
                    "resolution_trained": data.resolution_range(final_augment)}
            model_uri = log_pyfunc(Predictor(model, q, list(edges[0]), list(edges[1]), card=card, physics=physics),
                                   xv[:2])
            mlflow.set_tag("qdsize.model_uri", model_uri)
        result = {"run_id": run.info.run_id, "experiment": experiment, "model_uri": model_uri,
                  "best_val_loss": best, **scores, **{f"val_{k}": v for k, v in vm.items()}}
    return result


def _count_rows(dataset: str, exclude: dict | None) -> int:
    """Rows of the training split, without the shapes a shifted split keeps out ({"shape": [...]} or None)."""
    import pyarrow.parquet as pq

    files = data.split_files(dataset, "train")
    if not exclude:
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    shapes, n = set(), 0
    for f in files:
        col = {"shape": pq.read_table(f, columns=["shape"]).column("shape").to_numpy(zero_copy_only=False)}
        shapes.update(np.unique(col["shape"]).tolist())
        n += int(data.keep_rows(col, exclude).sum())
    if any(s not in shapes for s in exclude["shape"]):
        raise bad("train.holdout.shapes", exclude["shape"], f"shapes of the dataset, out of {sorted(shapes)}")
    if n == 0:
        raise bad("train.holdout.shapes", exclude["shape"], "at least one shape left for training")
    return n


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class _progress:
    """A rich progress bar when wanted, nothing otherwise."""

    def __init__(self, enabled: bool, total: int, label: str):
        self.p = None
        if enabled:
            from rich.progress import Progress

            self.p = Progress(transient=True)
            self.task = self.p.add_task(label, total=total)
            self.p.start()

    def advance(self, n: int) -> None:
        if self.p is not None:
            self.p.advance(self.task, n)

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()
