"""A tiny real sweep: Optuna through Ray Tune on local Ray, a real local MLflow server, champion rules, resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from qdsize.platform import sweep as sw
from qdsize.platform import tracking

REPO = Path(__file__).resolve().parents[1]


def _write_configs(tmp: Path, dataset: Path, name: str, lr=(0.002, 0.006), epochs=2, trials=4) -> Path:
    train = {"train": {"dataset": str(dataset), "epochs": epochs, "batch_size": 64, "patience": 5, "seed": 0,
                       "model": {"channels": [12, 24, 32], "kernels": [9, 5, 3], "strides": [4, 4, 2],
                                 "dropout": 0.0, "norm": "batch"},
                       "augment": {"preset": "default"}, "max_val_rows": 200}}
    (tmp / "train.yaml").write_text(yaml.safe_dump(train))
    sweep = {"sweep": {"name": name, "train": str(tmp / "train.yaml"), "trials": trials, "max_concurrent": 2,
                       "cpus_per_trial": 1, "max_epochs": epochs, "grace_period": 1, "reduction_factor": 2,
                       "space": {"lr": {"type": "float", "low": lr[0], "high": lr[1], "log": True},
                                 "model.dropout": {"type": "float", "low": 0.0, "high": 0.1}}}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("QDSIZE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "home"


def _children(parent_id):
    client = mlflow.MlflowClient()
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}'")


def test_sweep_registers_a_champion_and_a_worse_sweep_leaves_it(ray_local, tiny_dataset, tmp_path, home):
    first = sw.sweep(sw.load_sweep_config(_write_configs(tmp_path, tiny_dataset, "good", trials=2)))
    mlflow.set_tracking_uri(tracking.tracking_uri())  # the server is gone: read the SQLite store directly
    children = _children(first["parent_run_id"])
    assert len(children) == 2
    assert all("val_loss" in r.data.metrics for r in children)
    client = mlflow.MlflowClient()
    parent_artifacts = {a.path for a in client.list_artifacts(first["parent_run_id"], "sweep")}
    assert {"sweep/trials.csv", "sweep/optuna_history.png"} <= parent_artifacts
    champion = client.get_model_version_by_alias(tracking.REGISTERED_MODEL, tracking.CHAMPION)
    assert str(champion.version) == str(first["registration"]["version"]) and first["registration"]["champion"]
    assert "benchmark_joint_accuracy" in champion.tags

    # a deliberately worse sweep: a learning rate far too small to learn anything in one epoch
    worse_cfg = _write_configs(tmp_path, tiny_dataset, "worse", lr=(1e-7, 2e-7), epochs=1, trials=1)
    worse = sw.sweep(sw.load_sweep_config(worse_cfg))
    mlflow.set_tracking_uri(tracking.tracking_uri())
    assert not worse["registration"]["champion"]
    assert int(worse["registration"]["version"]) == int(champion.version) + 1
    now = client.get_model_version_by_alias(tracking.REGISTERED_MODEL, tracking.CHAMPION)
    assert str(now.version) == str(champion.version)
    assert client.get_model_version(tracking.REGISTERED_MODEL, worse["registration"]["version"]).tags[
        "decision"].startswith("kept out")
    # the champion loads and predicts
    from qdsize.ml import predict

    p = predict.load(f"models:/{tracking.REGISTERED_MODEL}@{tracking.CHAMPION}")
    assert p.size_edges_nm == [2.0, 3.0, 4.0, 5.0, 6.0]


def test_bad_sweeps_fail_clearly(tmp_path, home, tiny_dataset):
    cfg = _write_configs(tmp_path, tiny_dataset, "empty")
    data = yaml.safe_load(cfg.read_text())
    data["sweep"]["space"] = {}
    cfg.write_text(yaml.safe_dump(data))
    r = subprocess.run([sys.executable, "-m", "qdsize.platform", "sweep", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 2 and "sweep.space" in r.stderr and "Traceback" not in r.stderr
    cfg2 = _write_configs(tmp_path, tmp_path / "no-such-dataset", "nodata")
    r = subprocess.run([sys.executable, "-m", "qdsize.platform", "sweep", str(cfg2)], capture_output=True, text=True)
    assert r.returncode == 2 and "no-such-dataset" in r.stderr and "Traceback" not in r.stderr
    good = _write_configs(tmp_path, tiny_dataset, "unreachable")
    r = subprocess.run([sys.executable, "-m", "qdsize.platform", "sweep", str(good), "--tracking-uri",
                        "http://127.0.0.1:9"], capture_output=True, text=True)
    assert r.returncode == 2 and "127.0.0.1:9" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "qdsize.platform", "sweep", str(cfg2), "--resume"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_an_interrupted_sweep_resumes_without_repeating_finished_trials(tiny_dataset, tmp_path, home):
    cfg = _write_configs(tmp_path, tiny_dataset, "resumable", epochs=2, trials=3)
    env = {**os.environ, "QDSIZE_HOME": str(home)}
    cmd = [sys.executable, "-m", "qdsize.platform", "sweep", str(cfg)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    tune_dir = home / "sweeps" / "resumable" / "tune"
    finished_before: set[str] = set()
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            finished_before = {p.parent.name for p in tune_dir.glob("*/result.json")
                               if '"done_training": 1' in p.read_text()}
            if finished_before:
                break
            time.sleep(1)
        if not finished_before:
            gone = proc.poll() is not None
            out = proc.stdout.read().decode(errors="replace")[-4000:] if gone else ""
            raise AssertionError(f"no trial finished {'before the sweep ended' if gone else 'in 600 s'}\n{out}")
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as a user would
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    first_runs = {p.parent.name: p.read_text().count('"done_training": 1') for p in tune_dir.glob("*/result.json")}
    r = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    after = {p.parent.name: p.read_text() for p in tune_dir.glob("*/result.json")}
    for trial in finished_before:  # finished trials were not trained again
        assert after[trial].count('"done_training": 1') == first_runs[trial] == 1
    state = json.loads((home / "sweeps" / "resumable" / "sweep.json").read_text())
    mlflow.set_tracking_uri(tracking.tracking_uri())
    children = _children(state["parent_run_id"])
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len({c.info.run_name for c in finished}) == len(finished)  # no trial trained to the end twice


def test_a_trial_that_finished_before_an_interruption_is_reported_not_retrained(home):
    """Tune can restore a trial as unfinished that MLflow saw finish: the resume finds it and reports it."""
    uri = tracking.tracking_uri()
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("resume-lookup")
    parent = client.create_run(exp, run_name="sweep-x").info.run_id
    tags = {"mlflow.parentRunId": parent}
    done = client.create_run(exp, run_name="trial-a", tags={**tags, "qdsize.model_uri": "models:/m-a"}).info.run_id
    client.log_metric(done, "val_loss", 0.9, step=1)
    client.log_metric(done, "best_val_loss", 0.7)
    client.log_metric(done, "benchmark_size_accuracy", 0.8)
    client.set_terminated(done, "FINISHED")
    killed = client.create_run(exp, run_name="trial-b", tags={**tags, "qdsize.model_uri": "models:/m-b"}).info.run_id
    client.set_terminated(killed, "KILLED")
    client.create_run(exp, run_name="trial-c", tags=tags)  # still running
    other = client.create_run(exp, run_name="sweep-y").info.run_id
    elsewhere = client.create_run(exp, run_name="trial-d", tags={"mlflow.parentRunId": other,
                                                                 "qdsize.model_uri": "models:/m-d"}).info.run_id
    client.set_terminated(elsewhere, "FINISHED")

    found = sw.finished_trial(uri, exp, parent, "trial-a")
    assert found["run_id"] == done and found["model_uri"] == "models:/m-a"
    assert found["val_loss"] == 0.7 and found["benchmark_size_accuracy"] == 0.8  # the best, as a full run reports
    for name in ("trial-b", "trial-c", "trial-d", "trial-e"):
        assert sw.finished_trial(uri, exp, parent, name) is None
