"""Which model answers (--model, the registry's champion, the released model), model cards, and the release export."""

from __future__ import annotations

import datetime as _dt
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from qdsize.sim.errors import InputError

# frozen-split scores compared between the champion and the released model (tracking.RANKING's keys) and shown in
# one line: (key, label, format)
HEADLINE = (("benchmark_joint_accuracy", "benchmark joint accuracy", "{:.3f}"),
            ("benchmark_mean_diameter_mae_nm", "MAE", "{:.3f} nm"),
            ("seedgrid_size_within_0p25nm", "seedgrid within 0.25 nm", "{:.3f}"))
SCORE_PREFIXES = ("benchmark_", "seedgrid_", "shifted_", "calibration_")


# ---------------------------------------------------------------------------------------------------------------
# which model answers
# ---------------------------------------------------------------------------------------------------------------

def headline(scores: dict) -> str:
    parts = [f"{label} {fmt.format(float(scores[k]))}" for k, label, fmt in HEADLINE if k in scores]
    return ", ".join(parts) or "no frozen-split scores"


def _registry_scores(version) -> dict:
    out = {}
    for k, v in version.tags.items():
        if k.startswith(SCORE_PREFIXES):
            try:
                out[k] = float(v)
            except ValueError:
                pass
    return out


def resolve_registered(model_uri: str):
    """(registered model version, its name) for models:/NAME@ALIAS or models:/NAME/VERSION; (None, None) for other
    URIs (models:/m-..., runs:/...). Raises InputError if the name or alias does not exist."""
    from mlflow import MlflowClient

    if not model_uri.startswith("models:/"):
        return None, None
    rest = model_uri[len("models:/"):]
    if rest.startswith("m-"):
        return None, None
    client = MlflowClient()
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return client.get_model_version_by_alias(name, alias), name
        name, _, version = rest.rpartition("/")
        if name and version.isdigit():
            return client.get_model_version(name, version), name
    except Exception as exc:
        raise InputError(f"model = {model_uri!r}: not in the registry ({str(exc).splitlines()[0][:160]})") from None
    return None, None


def load_registered(model_uri: str):
    """A Predictor for any MLflow URI, with the resolved registry version and training run filled in."""
    from qdsize.ml import predict as pr

    predictor = pr.load(model_uri)
    version, _ = resolve_registered(model_uri)
    if version is not None:
        predictor.model_version = str(version.version)
        predictor.model_run_id = version.run_id or version.tags.get("run_id", "")
    return predictor, version


def resolve(model_uri: str | None = None, tracking_uri: str | None = None,
            warn: Callable[[str], None] | None = None):
    """The Predictor that answers: `model_uri` if given; else the tracking store's `qdsize-pbs@champion`, unless it
    scores worse on the frozen splits than the released model (then the released model answers, and `warn` is told
    both); else the released model shipped with qdsize.

    Why not always the champion: a champion is the best of what one store has seen (a six-epoch quickstart model,
    say); the released model was trained on the full default dataset. A user who wants the champion all the same
    names it (--model models:/qdsize-pbs@champion)."""
    from qdsize.ml import predict as pr
    from qdsize.platform import tracking

    if model_uri:
        if model_uri.startswith(("models:/", "runs:/")):
            tracking.setup(tracking_uri)
            return load_registered(model_uri)[0]
        return pr.load(model_uri)
    uri = tracking.tracking_uri(tracking_uri)
    released = pr.builtin()
    champion = None
    if not tracking.is_local(uri) or (uri.startswith("sqlite:///") and Path(uri[len("sqlite:///"):]).exists()):
        tracking.setup(tracking_uri)
        champ_uri = tracking.champion_uri()
        if champ_uri:
            champion, version = load_registered(champ_uri)
            if released is not None:
                mine = _registry_scores(version)
                theirs = released.card["release"].get("scores", {})
                if tracking.better(theirs, mine):
                    if warn is not None:
                        warn(f"the champion {champ_uri} (v{version.version}: {headline(mine)}) scores below the "
                             f"released {released.model_uri} ({headline(theirs)}) on the frozen splits; answering "
                             f"with the released model (--model {champ_uri} to use the champion)")
                    return released
            return champion
    if released is not None:
        return released
    from qdsize.platform.workspace import locate

    where, how = locate()
    raise InputError(f"--model: none given, no '{tracking.REGISTERED_MODEL}@champion' in {uri} (workspace {where}: "
                     f"{how}), and no released model installed; expected --model URI, QDSIZE_HOME or "
                     "--tracking-uri naming a store with a champion, or train one first (`make quickstart` or "
                     "`qdsize sweep conf/sweep/acnn.yaml`)")


# ---------------------------------------------------------------------------------------------------------------
# model cards
# ---------------------------------------------------------------------------------------------------------------

def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("qdsize", "torch", "numpy", "mlflow", "ray"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _q_summary(q: np.ndarray) -> dict:
    q = np.asarray(q, dtype=float)
    return {"min_inv_angstrom": round(float(q[0]), 6), "max_inv_angstrom": round(float(q[-1]), 6),
            "step_inv_angstrom": round(float(np.median(np.diff(q))), 6), "points": int(len(q))}


def _dataset_section(path: str | None) -> dict:
    from qdsize.platform import dataset as ds

    if not path:
        raise InputError("model: its card names no training dataset; expected a model trained by `qdsize train`")
    manifest = ds.read_manifest(path)
    if manifest is None:
        raise InputError(f"dataset = {path!r}: the model's training dataset is not here (no manifest.json); "
                         "expected the dataset folder the model was trained on (--dataset PATH)")
    rows = {}
    for shard in manifest["shards"]:
        rows[shard["split"]] = rows.get(shard["split"], 0) + int(shard["rows"])
    return {"name": manifest["name"], "path": str(Path(path).resolve()), "config_hash": manifest["config_hash"],
            "seed": manifest.get("seed"), "rows": rows, "config": manifest["config"],
            "config_source": manifest.get("config_source"), "versions": manifest.get("versions")}


def _limits(card: dict) -> list[str]:
    """What the model is not for, from its own data: the label and input ranges it was trained on, what the input
    must cover, and the figures on data nobody here simulated."""
    from qdsize.sim import measured

    d = card["dataset"]["config"]["dataset"]
    v = d.get("variants", {})
    q = card["input"]["q_grid"]
    res = card["input"].get("resolution_trained") or {}
    out = [
        f"Material: {v.get('material', 'pbs')} (rock salt, a = {v.get('a_angstrom', 5.936)} A); another material is "
        "flagged by the material check, not sized.",
        f"Mean diameters {d['sizes']['min_nm']:g}-{d['sizes']['max_nm']:g} nm and dispersions "
        f"{d['dispersion']['class_edges_pct'][0]:g}-{d['dispersion']['class_edges_pct'][-1]:g} % (number-weighted "
        "lognormal) only; estimates near the ends of these ranges are pulled inwards.",
        f"Shapes seen in training: {', '.join(v.get('shapes', []) + v.get('training_shapes', []))}; surfaces: "
        f"{', '.join(v.get('surfaces', []))}.",
        f"Input: Q {q['min_inv_angstrom']:g}-{q['max_inv_angstrom']:g} 1/A; a pattern must cover at least "
        f"{measured.REQUIRED_Q_MIN_INV_ANGSTROM:g}-{measured.REQUIRED_Q_MAX_INV_ANGSTROM:g} 1/A (shorter laboratory "
        "patterns are refused).",
    ]
    if res:
        out.append("Instrument resolution trained: " + ", ".join(f"{k} {lo:g}-{hi:g}" for k, (lo, hi) in res.items())
                   + "; blind (no --resolution), large dots carry the instrument's width as size uncertainty.")
    for name, figs in card.get("benchmarks", {}).items():
        blind = (figs.get("blind") or {})
        if "within_0p25nm" in blind and "mae_nm" in blind:
            out.append(f"{name}: {blind['within_0p25nm']:.0%} within 0.25 nm, MAE {blind['mae_nm']:.3f} nm, mean "
                       f"error {blind.get('bias_nm', float('nan')):+.3f} nm (blind).")
    return out


def _benchmark_entry(path: Path, model_uri: str, aliases: set[str]) -> tuple[str, dict]:
    """(benchmark name, this model's figures) from a benchmark's --json output."""
    try:
        data = json.loads(Path(path).read_text())
        models = data["models"]
        name = data["benchmark"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"--figures = {str(path)!r}: not a benchmark JSON (--json output of a benchmarks/ script: "
                         f"{exc})") from None
    hits = [k for k in models if k in aliases or k == model_uri]
    if not hits and len(models) == 1:
        hits = list(models)
    if len(hits) != 1:
        raise InputError(f"--figures = {str(path)!r}: holds figures of {sorted(models)}; expected exactly one of "
                         f"{sorted(aliases | {model_uri})}")
    entry = dict(models[hits[0]])
    entry.update({"data": data.get("data"), "command": data.get("command"), "scored_as": hits[0]})
    return name, entry


def build_card(model_uri: str, *, figures: list[Path] = (), dataset: str | None = None,
               release_version: str | None = None, how_chosen: str | None = None) -> tuple[dict, object]:
    """(card, predictor) of a registered or logged model: its training run, dataset, every frozen-split score told
    and blind, the benchmark figures given, input rules, limits and the commands that reproduce it."""
    from mlflow import MlflowClient

    from qdsize.platform import tracking

    predictor, version = load_registered(model_uri)
    client = MlflowClient()
    run_id = predictor.model_run_id
    if not run_id:
        raise InputError(f"model = {model_uri!r}: no training run recorded; expected a registered model "
                         "(models:/NAME@ALIAS or models:/NAME/VERSION)")
    run = client.get_run(run_id)
    metrics = run.data.metrics
    scores = {k: round(float(v), 6) for k, v in sorted(metrics.items()) if k.startswith(SCORE_PREFIXES)}
    config = predictor.card.get("config") or {}
    ds_path = dataset or predictor.card.get("dataset")
    ds = _dataset_section(ds_path)
    vers = _versions()
    parent = run.data.tags.get("mlflow.parentRunId")
    if how_chosen is None:
        how_chosen = (f"best trial of the sweep run {parent} (qdsize sweep), registered as champion" if parent else
                      "one training of the default config conf/train/acnn.yaml, whose values were chosen by hand "
                      "from full default trainings compared on validation and the frozen splits (no dropout, "
                      "regression weight 1, lr 0.004, weight moving average, augmentation warm-up, half the patterns "
                      "told their resolution); no full sweep was run for this release")
    aliases = {model_uri}
    if version is not None:
        aliases |= {f"models:/{version.name}/{version.version}"}
        aliases |= {f"models:/{version.name}@{a}" for a in (version.aliases or [])}
    benchmarks = dict(_benchmark_entry(Path(f), model_uri, aliases) for f in figures)
    from qdsize.sim import measured

    train_cmd = "qdsize train conf/train/acnn.yaml --register"
    card = {
        "card_format": 1,
        "name": predictor.card.get("name", tracking.REGISTERED_MODEL),
        "release": {"version": release_version or vers.get("qdsize", "0"),
                    "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "package_versions": vers},
        "source": {"model_uri": model_uri, "registered_model": getattr(version, "name", None),
                   "registered_version": None if version is None else str(version.version), "run_id": run_id,
                   "experiment_id": run.info.experiment_id, "run_name": run.info.run_name,
                   "git_commit": run.data.tags.get("mlflow.source.git.commit"),
                   "training_minutes": round((run.info.end_time - run.info.start_time) / 60000, 1)
                   if run.info.end_time else None,
                   "device": run.data.params.get("resolved_device"),
                   "n_parameters": int(run.data.params.get("n_parameters", 0)) or None},
        "dataset": ds,
        "training": {"config": config, "seed": config.get("seed"), "how_chosen": how_chosen},
        "scores": scores,
        "benchmarks": benchmarks,
        "input": {"q_grid": _q_summary(predictor.q_inv_angstrom),
                  "coverage_rule": {"required_q_min_inv_angstrom": measured.REQUIRED_Q_MIN_INV_ANGSTROM,
                                    "required_q_max_inv_angstrom": measured.REQUIRED_Q_MAX_INV_ANGSTROM,
                                    "uncovered_grid_points": "masked (zero intensity, mask channel 0)"},
                  "resolution_trained": predictor.card.get("resolution_trained"),
                  "takes_resolution": predictor.takes_resolution},
        "labels": {"size_class_edges_nm": list(predictor.size_edges_nm),
                   "dispersion_class_edges_pct": list(predictor.dispersion_edges_pct),
                   "diameter": "equal-volume sphere diameter; mean = number-weighted mean of a lognormal",
                   "dispersion": "standard deviation / mean, %"},
        "reproduce": [f"qdsize simulate {ds.get('config_source') or 'conf/dataset/pbs.yaml'}",
                      train_cmd + (f"  # training seed {config.get('seed')}" if config.get("seed") is not None
                                   else ""),
                      *[e["command"] for e in benchmarks.values() if e.get("command")],
                      f"qdsize model export models:/{tracking.REGISTERED_MODEL}@champion "
                      + " ".join(f"--figures {Path(f).name}" for f in figures)],
    }
    card["limits"] = _limits(card)
    return card, predictor


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def card_markdown(card: dict) -> str:
    """The model card as Markdown (tables no wider than a laptop screen)."""
    rel, src, ds = card["release"], card["source"], card["dataset"]
    q = card["input"]["q_grid"]
    lines = [f"# Model card: {card['name']} {rel['version']}", "",
             f"`builtin:{card['name']}/{rel['version']}`, exported {rel['exported_at']} from `{src['model_uri']}`"
             f" (registered version {src['registered_version']}, run `{src['run_id']}`).", "",
             "## Training", "",
             f"- Dataset `{ds['name']}`, config hash `{ds['config_hash']}`, seed {ds['seed']}; rows: "
             + ", ".join(f"{k} {v:,}" for k, v in ds["rows"].items()) + ".",
             f"- Training seed {card['training']['seed']}; {src.get('n_parameters') or '?'} parameters; "
             f"{src.get('training_minutes') or '?'} min on {src.get('device') or '?'}; "
             f"git commit {src.get('git_commit') or 'not recorded'}.",
             f"- How the config was chosen: {card['training']['how_chosen']}.",
             "- Package versions: " + ", ".join(f"{k} {v}" for k, v in rel["package_versions"].items()) + ".", "",
             "## Frozen splits (in-house)", "",
             "Told: the network is given the splits' instrument resolution (as `--resolution`); blind: not "
             "(as `qdsize predict` runs by default).", "",
             "| split: metric | told | blind |", "|---|---|---|"]
    scores = card["scores"]
    for k in sorted(scores):
        if "_blind_" in k or not k.startswith(("benchmark_", "seedgrid_")):
            continue
        split, metric = k.split("_", 1)
        blind = scores.get(f"{split}_blind_{metric}")
        lines.append(f"| {split}: {metric} | {_fmt(scores[k])} | {'' if blind is None else _fmt(blind)} |")
    other = [k for k in sorted(scores) if not k.startswith(("benchmark_", "seedgrid_"))]
    if other:
        lines += ["", "Other: " + ", ".join(f"{k} {_fmt(scores[k])}" for k in other) + "."]
    lines += ["", "## Data nobody here simulated the same way", ""]
    if not card["benchmarks"]:
        lines.append("No benchmark figures were given to the export.")
    for name, b in card["benchmarks"].items():
        lines += [f"### {name}", "", f"{b.get('data') or ''}", ""]
        rows = [(mode, b.get(mode)) for mode in ("blind", "told") if b.get(mode)]
        keys = [k for k in ("n", "within_0p25nm", "mae_nm", "bias_nm", "dispersion_mae_pct", "coverage_1sigma",
                            "coverage_2sigma", "flagged", "refused") if any(k in r for _, r in rows)]
        if rows:
            short = {"within_0p25nm": "within 0.25 nm", "mae_nm": "MAE nm", "bias_nm": "bias nm",
                     "dispersion_mae_pct": "disp. MAE", "coverage_1sigma": "1 sigma", "coverage_2sigma": "2 sigma"}
            lines += ["| | " + " | ".join(short.get(k, k) for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
            lines += [f"| {mode} | " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for mode, r in rows]
        per_bin = b.get("per_bin") or {}
        if per_bin:
            lines += ["", "Mean error by true size (blind): " + ", ".join(
                f"{k} nm {_fmt(v.get('bias_nm', v) if isinstance(v, dict) else v)}" for k, v in per_bin.items())]
        if b.get("command"):
            lines += ["", f"`{b['command']}`"]
        lines.append("")
    res = card["input"].get("resolution_trained") or {}
    lines += ["## Input", "",
              f"- Q grid {q['min_inv_angstrom']:g}-{q['max_inv_angstrom']:g} 1/A by {q['step_inv_angstrom']:g} "
              f"({q['points']} points); measured patterns are resampled onto it by cubic splines.",
              f"- Coverage rule: at least Q {card['input']['coverage_rule']['required_q_min_inv_angstrom']:g}-"
              f"{card['input']['coverage_rule']['required_q_max_inv_angstrom']:g} 1/A; the rest of the grid is masked.",
              "- Instrument resolution trained: " + (", ".join(f"{k} {lo:g}-{hi:g}" for k, (lo, hi) in res.items())
                                                     or "not recorded") + ".",
              f"- Size classes (nm) {card['labels']['size_class_edges_nm']}; dispersion classes (%) "
              f"{card['labels']['dispersion_class_edges_pct']}.", "",
              "## Known limits", "", *[f"- {x}" for x in card["limits"]], "",
              "## Reproduce", "", "```bash", *card["reproduce"], "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------------

def export(model_uri: str, out: str | Path | None = None, *, figures: list[Path] = (), dataset: str | None = None,
           release_version: str | None = None, how_chosen: str | None = None) -> tuple[Path, dict]:
    """Write the release bundle of a registered model: an MLflow pyfunc folder (the qdsize model under
    artifacts/qdsize_model: weights as a plain state dict, model.json, the material-check data) with MODEL_CARD.md
    and model_card.json beside it. Replaces `out` (default: the package's released model) only when complete."""
    from qdsize.ml import predict as pr

    card, predictor = build_card(model_uri, figures=figures, dataset=dataset, release_version=release_version,
                                 how_chosen=how_chosen)
    target = Path(out) if out is not None else pr.RELEASED_DIR
    target.parent.mkdir(parents=True, exist_ok=True)
    predictor.model_uri = f"builtin:{card['name']}/{card['release']['version']}"
    example = np.where(np.isfinite(np.zeros((1, len(predictor.q_inv_angstrom)))), 1.0, np.nan)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        bundle = pr.save_pyfunc(predictor, example.astype(np.float32), Path(tmp) / "bundle")
        _portable_mlmodel(bundle / "MLmodel")
        (bundle / pr.CARD_JSON).write_text(json.dumps(card, indent=1) + "\n")
        (bundle / pr.CARD_MD).write_text(card_markdown(card))
        if target.exists():
            shutil.rmtree(target)
        bundle.rename(target)
    return target, card


def _portable_mlmodel(path: Path) -> None:
    """MLmodel records where the code file and the artifacts came from (paths of this machine); MLflow loads both
    from the bundle itself, so the bundle names them by their place in it."""
    import re

    text = path.read_text()
    text = re.sub(r"(?m)^(\s*model_code_path:) .*/([^/\n]+)$", r"\1 \2", text)
    text = re.sub(r"(?m)^(\s*uri:) .*/(qdsize_model)$", r"\1 artifacts/\2", text)
    path.write_text(text)


def card_of(model_uri: str) -> dict:
    """The card of any model: a release bundle's own, or one built from the registry and the training run."""
    from qdsize.ml import predict as pr

    if model_uri == "builtin" or model_uri.startswith("builtin:"):
        return pr.builtin_or_error(model_uri).card["release"]
    p = Path(model_uri)
    if p.is_dir() and pr.released_card(p) is not None:
        return pr.released_card(p)
    return build_card(model_uri)[0]
