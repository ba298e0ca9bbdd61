"""Hyperparameter sweeps: Optuna (define-by-run) through Ray Tune with ASHA, nested MLflow runs, the champion."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qdsize.platform import config as conf
from qdsize.platform import tracking
from qdsize.platform.workspace import home
from qdsize.sim.errors import InputError, bad

ARCH_PARAMS = ("arch.depth", "arch.width", "arch.growth", "arch.kernel", "arch.stride")


@dataclass
class ParamSpec:
    """One search dimension: `float`/`int` with low, high (log scale optional) or `categorical` with choices."""

    type: str = "float"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None

    def check(self, path):
        if self.type not in ("float", "int", "categorical"):
            raise bad(conf._sub(path, "type"), self.type, "float, int or categorical")
        if self.type == "categorical":
            if not self.choices:
                raise bad(conf._sub(path, "choices"), self.choices, "a non-empty list of choices")
            return
        if self.low is None or self.high is None or not self.low <= self.high:
            raise bad(conf._sub(path, "high"), self.high, f"low <= high (low = {self.low})")
        if self.log and self.low <= 0:
            raise bad(conf._sub(path, "low"), self.low, "a positive lower bound on a log scale")


@dataclass
class SweepConfig:
    name: str = "acnn"
    train: str = "conf/train/acnn.yaml"  # the base training config; trials override it
    train_overrides: list[str] = field(default_factory=list)
    trials: int = 24
    max_concurrent: int = 0  # 0: as many as the cluster's CPUs allow
    cpus_per_trial: float = 1.0
    max_epochs: int = 20
    grace_period: int = 2
    reduction_factor: float = 3.0
    metric: str = "val_loss"
    mode: str = "min"
    seed: int = 0
    space: dict[str, ParamSpec] = field(default_factory=dict)

    def check(self, path):
        import re

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", self.name):
            raise bad(conf._sub(path, "name"), self.name, "letters, digits, '.', '_' or '-'")
        for key, lo in (("trials", 1), ("max_epochs", 1), ("grace_period", 1)):
            if getattr(self, key) < lo:
                raise bad(conf._sub(path, key), getattr(self, key), f"an integer >= {lo}")
        if self.max_concurrent < 0:
            raise bad(conf._sub(path, "max_concurrent"), self.max_concurrent, "0 (automatic) or a positive integer")
        if not self.cpus_per_trial > 0:
            raise bad(conf._sub(path, "cpus_per_trial"), self.cpus_per_trial, "a positive number of CPUs")
        if self.mode not in ("min", "max"):
            raise bad(conf._sub(path, "mode"), self.mode, "min or max")
        if not self.space:
            raise bad(conf._sub(path, "space"), self.space, "at least one search dimension (the space is empty)")


@dataclass
class SweepFile:
    sweep: SweepConfig = field(default_factory=SweepConfig)


def load_sweep_config(path, overrides=()) -> conf.Loaded:
    return conf.load(SweepFile, path, overrides)


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces: the search space and how a sampled point becomes a training config
# ---------------------------------------------------------------------------------------------------------------
class DefineByRun:
    """The Optuna define-by-run function: only `trial.suggest_*` calls (a class, so Tune can checkpoint it)."""

    def __init__(self, space: dict[str, ParamSpec]):
        self.space = {k: dataclasses.asdict(v) for k, v in space.items()}

    def __call__(self, trial):
        for name, s in self.space.items():
            if s["type"] == "float":
                trial.suggest_float(name, s["low"], s["high"], log=s["log"])
            elif s["type"] == "int":
                trial.suggest_int(name, int(s["low"]), int(s["high"]), log=s["log"])
            else:
                trial.suggest_categorical(name, s["choices"])


def trial_overrides(point: dict) -> dict:
    """Training-config entries (dotted keys) for one sampled point; `arch.*` builds the convolution lists."""
    out = {k: v for k, v in point.items() if not k.startswith("arch.")}
    if any(k in point for k in ARCH_PARAMS):
        depth = int(point.get("arch.depth", 5))
        width = int(point.get("arch.width", 32))
        growth = float(point.get("arch.growth", 1.5))
        kernel = int(point.get("arch.kernel", 7))
        stride = int(point.get("arch.stride", 2))
        out["model.channels"] = [int(round(width * growth**i)) for i in range(depth)]
        out["model.kernels"] = [max(3, kernel - 2 * i) | 1 for i in range(depth)]
        out["model.strides"] = [stride] * depth
    return out


def train_config_dict(base: dict, point: dict) -> dict:
    """The base training config (resolved dict) with a trial's values set."""
    d = json.loads(json.dumps(base))
    for key, value in trial_overrides(point).items():
        node = d
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return d


# ---------------------------------------------------------------------------------------------------------------
# The trainable (runs in a Ray worker)
# ---------------------------------------------------------------------------------------------------------------
def run_trial(point: dict, *, base: dict, tracking_uri: str, experiment_id: str, parent_run_id: str,
              max_epochs: int, threads: int) -> None:
    from ray import tune

    from qdsize.ml.train import TrainConfig, train

    cfg_dict = train_config_dict(base, point)
    cfg_dict["epochs"] = max_epochs
    cfg_dict["threads"] = threads
    cfg = conf.from_dict(TrainConfig, cfg_dict, "train")
    run_name = f"trial-{tune.get_context().get_trial_id()}"
    done = finished_trial(tracking_uri, experiment_id, parent_run_id, run_name)
    if done is not None:  # trained to the end before an interruption that Tune's saved state missed: not again
        tune.report({**done, "done_training": 1})
        return
    result = train(cfg, tracking_uri=tracking_uri, experiment_id=experiment_id, run_name=run_name,
                   parent_run_id=parent_run_id, report=tune.report, progress=False)
    final = {k: v for k, v in result.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    # the last report (iteration max_epochs + 1 at most) carries the frozen-split scores and the logged model
    tune.report({**final, "val_loss": result["best_val_loss"], "model_uri": result["model_uri"] or "",
                 "run_id": result["run_id"], "done_training": 1})


def finished_trial(tracking_uri: str, experiment_id: str, parent_run_id: str, run_name: str) -> dict | None:
    """The final report of a trial whose MLflow run already finished training (with its model), or None.

    Tune saves its experiment state every few seconds: a sweep interrupted just after a trial finished can restore
    that trial as unfinished. Its MLflow run says it is done, so a resume reports it from there instead of
    training it a second time under the same name.
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                              f"attributes.run_name = '{run_name}' and attributes.status = 'FINISHED'",
                              max_results=1)
    if not runs or not runs[0].data.tags.get("qdsize.model_uri"):
        return None
    run = runs[0]
    metrics = {k: v for k, v in run.data.metrics.items() if math.isfinite(v)}
    return {**metrics, "val_loss": metrics.get("best_val_loss", metrics.get("val_loss", math.inf)),
            "model_uri": run.data.tags["qdsize.model_uri"], "run_id": run.info.run_id}


# ---------------------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------------------
def sweep(loaded: conf.Loaded, *, trials: int | None = None, address: str | None = None,
          tracking_uri: str | None = None, resume: bool = False) -> dict:
    """Run (or resume) a sweep; register the best completed trial; move `champion` only when it is better."""
    import mlflow
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from qdsize.ml.train import TrainConfig
    from qdsize.platform.simulate import init_ray
    from qdsize.platform.mlflow_server import LocalServer

    sc: SweepConfig = loaded.config.sweep
    n_trials = trials or sc.trials
    if n_trials < 1:
        raise bad("--trials", n_trials, "a positive number of trials")
    base = conf.load(TrainConfig, None, (), data=_train_base(sc)).resolved
    from qdsize.ml.train import resolve_dataset

    home()
    dataset = Path(resolve_dataset(base["dataset"]))
    base["dataset"] = str(dataset)
    _check_dataset(dataset)
    folder = home() / "sweeps" / sc.name
    state_file = folder / "sweep.json"
    if resume and not state_file.exists():
        raise InputError(f"--resume: no sweep named {sc.name!r} to resume under {folder}")
    if not resume and state_file.exists():
        raise InputError(f"sweep {sc.name!r} exists under {folder}: pass --resume to continue it, or set "
                         "sweep.name=... for a new one")
    folder.mkdir(parents=True, exist_ok=True)

    server, started_ray = None, False
    previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
    uri = tracking_uri or previous_uri
    local = not uri
    if local:  # concurrent trials never write one SQLite file directly: they talk to a local server
        server = LocalServer(tracking.tracking_uri(), tracking.artifacts_dir())
        uri = server.start()
    try:
        tracking.setup(uri)
        experiment_id = tracking.ensure_experiment(f"qdsize-{dataset.name}", local_artifacts=local)
        if resume:
            state = json.loads(state_file.read_text())
            parent_id = state["parent_run_id"]
        else:
            parent = mlflow.MlflowClient().create_run(experiment_id, run_name=f"sweep-{sc.name}",
                                                      tags={"qdsize.kind": "sweep"})
            parent_id = parent.info.run_id
            mlflow.MlflowClient().log_dict(parent_id, loaded.resolved, "sweep_config.json")
            for k, v in conf_flat(loaded.resolved).items():
                mlflow.MlflowClient().log_param(parent_id, k, str(v)[:500])
            state = {"parent_run_id": parent_id, "config_hash": loaded.hash, "trials": n_trials}
            state_file.write_text(json.dumps(state))

        started_ray = init_ray(address)
        total_cpus = float(__import__("ray").cluster_resources().get("CPU", 1))
        concurrent = sc.max_concurrent or max(1, int(total_cpus // sc.cpus_per_trial))
        threads = max(1, int(sc.cpus_per_trial))
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=base, tracking_uri=uri, experiment_id=experiment_id,
                                 parent_run_id=parent_id, max_epochs=sc.max_epochs, threads=threads),
            {"cpu": sc.cpus_per_trial})
        storage = optuna.storages.RDBStorage(f"sqlite:///{folder / 'optuna.db'}")
        if resume:
            tuner = tune.Tuner.restore(str(folder / "tune"), trainable, resume_unfinished=True, resume_errored=True)
        else:
            searcher = OptunaSearch(space=DefineByRun(sc.space), metric=sc.metric, mode=sc.mode, seed=sc.seed,
                                    storage=storage, study_name=sc.name)
            scheduler = ASHAScheduler(time_attr="training_iteration", metric=sc.metric, mode=sc.mode,
                                      max_t=sc.max_epochs + 1, grace_period=sc.grace_period,
                                      reduction_factor=sc.reduction_factor)
            tuner = tune.Tuner(trainable,
                               tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                                           num_samples=n_trials, max_concurrent_trials=concurrent),
                               run_config=tune.RunConfig(name="tune", storage_path=str(folder), verbose=1))
        results = tuner.fit()
        summary = _summarise(results, sc)
        _close_children(experiment_id, parent_id)
        _log_parent(parent_id, summary, storage, sc)
        if not summary["completed"]:
            raise InputError(f"sweep {sc.name!r}: no trial finished training; nothing registered")
        best = summary["best"]
        decision = tracking.register(best["model_uri"], {k: v for k, v in best.items()
                                                          if k.startswith(("benchmark_", "seedgrid_"))},
                                     run_id=best["run_id"])
        client = mlflow.MlflowClient()
        client.set_tag(parent_id, "qdsize.registered_version", decision["version"])
        client.set_tag(parent_id, "qdsize.decision", decision["decision"])
        client.set_terminated(parent_id, "FINISHED")
        return {"parent_run_id": parent_id, "tracking_uri": uri, **summary, "registration": decision}
    finally:
        if started_ray:
            __import__("ray").shutdown()
        if server is not None:
            server.stop()
            # MLflow exported the server's URI to the environment: point back at the store itself
            if previous_uri is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = previous_uri
            mlflow.set_tracking_uri(tracking.tracking_uri(previous_uri))


def _train_base(sc: SweepConfig) -> dict:
    raw = conf.apply_overrides(conf.load_yaml(sc.train), sc.train_overrides)
    return raw.get("train", raw)


def _check_dataset(dataset: Path) -> None:
    from qdsize.ml import data

    q = data.q_grid(dataset)
    for split in ("train", "val"):
        data.split_files(dataset, split)
    if len(q) < 100:
        raise InputError(f"dataset = {str(dataset)!r}: Q grid of {len(q)} points; expected a full model grid")


def conf_flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "space":
            out.update(conf_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _summarise(results, sc: SweepConfig) -> dict:
    rows, completed = [], []
    for r in results:
        m = r.metrics or {}
        row = {"trial_id": m.get("trial_id"), "iterations": m.get("training_iteration"),
               sc.metric: m.get(sc.metric), "run_id": m.get("run_id"), "model_uri": m.get("model_uri"),
               **{k: v for k, v in (r.config or {}).items()}}
        for k, v in m.items():
            if k.startswith(("benchmark_", "seedgrid_")):
                row[k] = v
        rows.append(row)
        if m.get("done_training") and m.get("model_uri"):
            completed.append(row)
    sign = 1 if sc.mode == "min" else -1
    completed.sort(key=lambda r: sign * float(r.get(sc.metric) or math.inf * sign))
    return {"rows": rows, "completed": len(completed), "best": completed[0] if completed else None}


def _close_children(experiment_id: str, parent_id: str) -> None:
    """Child runs of trials that ASHA stopped early are marked KILLED rather than left RUNNING."""
    import mlflow

    client = mlflow.MlflowClient()
    for run in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=5000):
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "KILLED")


def _log_parent(parent_id: str, summary: dict, storage, sc: SweepConfig) -> None:
    """Summary table and Optuna's figures on the parent run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow
    import optuna
    import pandas as pd

    client = mlflow.MlflowClient()
    df = pd.DataFrame(summary["rows"])
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        df.to_csv(t / "trials.csv", index=False)
        (t / "trials.md").write_text(df.to_markdown(index=False) if hasattr(df, "to_markdown") else df.to_string())
        try:
            study = optuna.load_study(study_name=sc.name, storage=storage)
            done = [tr for tr in study.trials if tr.state == optuna.trial.TrialState.COMPLETE]
            plots = {"optuna_history.png": optuna.visualization.matplotlib.plot_optimization_history}
            if len(done) >= 2:
                plots["optuna_parallel_coordinates.png"] = optuna.visualization.matplotlib.plot_parallel_coordinate
            if len(done) >= 3 and len(sc.space) >= 2:
                plots["optuna_importances.png"] = optuna.visualization.matplotlib.plot_param_importances
            for fname, fn in plots.items():
                try:
                    ax = fn(study)
                    fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                    fig.set_size_inches(9, 5)
                    fig.tight_layout()
                    fig.savefig(t / fname, dpi=110)
                    plt.close(fig)
                except (ValueError, RuntimeError) as exc:  # e.g. importances with constant objective
                    (t / (fname + ".txt")).write_text(f"not drawn: {exc}\n")
        except KeyError:
            pass
        client.log_artifacts(parent_id, tmp, "sweep")
    if summary["best"]:
        for k, v in summary["best"].items():
            if isinstance(v, (int, float)) and k.startswith(("benchmark_", "seedgrid_", sc.metric)):
                client.log_metric(parent_id, f"best_{k}", float(v))
        client.log_metric(parent_id, "completed_trials", summary["completed"])
