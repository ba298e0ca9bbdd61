"""Shared fixtures: one embedded, loopback-only Ray for the whole test session."""

import os

import pytest

# Ray reads this when it is imported: the embedded instance then binds to 127.0.0.1 only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# and neither MLflow nor Ray reports usage to anyone (tests talk to 127.0.0.1 only)
for _name in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
    os.environ.setdefault(_name, "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs, no dashboard, bound to loopback; always shut down at the end of the session."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as exc:  # Ray waits 30 s (fixed) for its raylet: one retry on a busy 2-core machine
        if "timed out during startup" not in str(exc):
            raise
        ray.shutdown()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


TINY_DATASET = {
    "dataset": {
        "name": "tiny", "samples": 1400, "seed": 3, "shard_size": 200,
        "q": {"min_inv_angstrom": 1.0, "max_inv_angstrom": 10.0, "step_inv_angstrom": 0.01},
        "sizes": {"min_nm": 2.0, "max_nm": 6.0, "class_width_nm": 1.0},
        "dispersion": {"class_edges_pct": [0, 5, 10, 20]},
        "variants": {"shapes": ["sphere", "cuboctahedron"], "surfaces": ["cation_rich"], "centre_seeds": [0]},
        "ladder": {"min_nm": 1.2, "max_nm": 9.5, "relative_step": 0.03},
        "nuisance": {"energies_kev": [17.479]},
        "splits": {"train": 0.75, "val": 0.1, "test": 0.05, "benchmark": 0.05, "seedgrid": 0.05},
        "seedgrid": {"mean_start_nm": 2.0, "mean_stop_nm": 6.0, "mean_step_nm": 0.5, "dispersions_pct": [5, 10]},
    }
}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A small real dataset (4 size classes, 3 dispersion classes, frozen splits augmented), made without Ray."""
    from qdsize.platform import config as conf
    from qdsize.platform import simulate

    root = tmp_path_factory.mktemp("tiny")
    old = os.environ.get("QDSIZE_HOME")
    os.environ["QDSIZE_HOME"] = str(root / "home")  # the family cache of this session
    try:
        simulate.run(conf.load(conf.DatasetFile, None, data=TINY_DATASET), root / "ds", use_ray=False, quiet=True)
    finally:
        if old is None:
            os.environ.pop("QDSIZE_HOME", None)
        else:
            os.environ["QDSIZE_HOME"] = old
    return root / "ds"


@pytest.fixture(scope="session")
def champion_store(tiny_dataset, tmp_path_factory):
    """A temporary SQLite store holding one trained (3 epochs on the tiny dataset), registered champion."""
    import mlflow

    from qdsize.ml.train import TrainConfig, train
    from qdsize.platform import config as conf
    from qdsize.platform import tracking

    home = tmp_path_factory.mktemp("predict-home")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    old = os.environ.get("QDSIZE_HOME")
    os.environ["QDSIZE_HOME"] = str(home)
    try:
        mlflow.set_tracking_uri(uri)
        exp = tracking.ensure_experiment("qdsize-tiny")
        cfg = conf.from_dict(TrainConfig, {
            "dataset": str(tiny_dataset), "epochs": 3, "batch_size": 64, "threads": 2,
            "model": {"channels": [16, 32, 48], "kernels": [9, 5, 3], "strides": [4, 4, 2], "dropout": 0.0},
            "augment": {"preset": "default"}}, "train")
        res = train(cfg, tracking_uri=uri, experiment_id=exp, progress=False)
        tracking.register(res["model_uri"], {k: v for k, v in res.items() if k.startswith("benchmark_")},
                          run_id=res["run_id"])
    finally:
        if old is None:
            os.environ.pop("QDSIZE_HOME", None)
        else:
            os.environ["QDSIZE_HOME"] = old
    return {"home": home, "uri": uri, "run_id": res["run_id"]}
