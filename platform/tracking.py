"""MLflow glue: the tracking URI, experiments with workspace artifact roots, registration and the champion alias."""

from __future__ import annotations

import os
from pathlib import Path

from qdsize.platform.workspace import home
from qdsize.sim.errors import InputError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # runs and models stay on the user's machine

from qdsize.sim.contract import REGISTERED_MODEL  # noqa: E402
CHAMPION = "champion"
# how versions are compared on the frozen benchmark split: (metric, higher is better), in order of precedence
RANKING = (("benchmark_joint_accuracy", True), ("benchmark_mean_diameter_mae_nm", False),
           ("benchmark_dispersion_mae_pct", False))


def tracking_uri(explicit: str | None = None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the workspace SQLite store (absolute path)."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{home(create=False) / 'mlflow.db'}"


def is_local(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def setup(explicit: str | None = None) -> str:
    """Point MLflow at the store; for a remote server check that it answers, with a clear error if not."""
    import mlflow

    uri = tracking_uri(explicit)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    if uri.startswith("http"):
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
                r.read()
        except Exception as exc:
            raise InputError(f"--tracking-uri = {uri!r}: the MLflow server does not answer ({exc})") from None
    return uri


def ensure_experiment(name: str, local_artifacts: bool | None = None, artifact_location: str | None = None) -> str:
    """Create the experiment (artifact root in the workspace when the store is local) and return its id.

    A local server started by qdsize also gets a file artifact root, so that runs stay readable straight from
    the SQLite store after the server is gone. `artifact_location` (a URI) overrides both.
    """
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = artifact_location
    if location is None and (local_artifacts or (local_artifacts is None and is_local(mlflow.get_tracking_uri()))):
        location = (home() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        return client.get_experiment_by_name(name).experiment_id


def better(new: dict, old: dict) -> bool:
    """Is the new score set better than the old one on the ranking metrics (first difference decides)?"""
    for key, higher in RANKING:
        a, b = new.get(key), old.get(key)
        if a is None or b is None:
            continue
        if abs(a - b) > 1e-9:
            return a > b if higher else a < b
    return False


def register(model_uri: str, scores: dict, *, name: str = REGISTERED_MODEL, run_id: str | None = None) -> dict:
    """Register a new version; move `champion` to it only if it beats the current champion on the same split.

    Tags on the version record its scores and the decision. Returns {version, champion, previous, decision}.
    """
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    mv = mlflow.register_model(model_uri, name)
    for k, v in scores.items():
        client.set_model_version_tag(name, mv.version, k, str(v))
    if run_id:
        client.set_model_version_tag(name, mv.version, "run_id", run_id)
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except Exception:
        current = None
    if current is None:
        promote, previous, why = True, None, "first registered version"
    else:
        old = {k: float(v) for k, v in current.tags.items() if k.startswith("benchmark_")}
        promote = better(scores, old)
        previous = current.version
        why = (f"beats champion v{current.version}" if promote else f"does not beat champion v{current.version}")
        why += " on " + ", ".join(f"{k} {scores.get(k, float('nan')):.4g} vs {old.get(k, float('nan')):.4g}"
                                 for k, _ in RANKING)
    if promote:
        client.set_registered_model_alias(name, CHAMPION, mv.version)
    client.set_model_version_tag(name, mv.version, "decision", ("promoted: " if promote else "kept out: ") + why)
    return {"version": mv.version, "champion": promote, "previous": previous, "decision": why}


def champion_uri(name: str = REGISTERED_MODEL) -> str | None:
    """`models:/NAME@champion` if the store has one, else None."""
    from mlflow import MlflowClient

    try:
        MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except Exception:
        return None
    return f"models:/{name}@{CHAMPION}"


def artifacts_dir() -> Path:
    return home() / "mlartifacts"
