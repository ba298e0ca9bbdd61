"""Training end to end on a small simulated dataset: accuracy well above chance, MLflow contents, determinism."""

import json
import math

import mlflow
import numpy as np
import pytest
import torch

from qdsize.ml import predict
from qdsize.ml.train import TrainConfig, train
from qdsize.platform import config as conf
from qdsize.platform import tracking


def _cfg(dataset, **kw):
    base = {"dataset": str(dataset), "epochs": 6, "batch_size": 64, "lr": 3e-3, "patience": 6, "seed": 0,
            "threads": 2, "model": {"channels": [16, 32, 48], "kernels": [9, 5, 3], "strides": [4, 4, 2],
                                    "dropout": 0.0, "norm": "batch"},
            "augment": {"preset": "none"}, "truncation": {"probability": 0.0}}
    base.update(kw)
    return conf.from_dict(TrainConfig, base, "train")


def test_short_training_beats_chance_and_is_fully_tracked(tiny_dataset, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = tracking.ensure_experiment("qdsize-tiny", local_artifacts=True)
    res = train(_cfg(tiny_dataset, score_frozen_every_epoch=True), tracking_uri=uri, experiment_id=exp,
                progress=False)
    # 4 size classes and 3 dispersion classes: chance is 0.25 and 0.33
    assert res["val_size_accuracy"] > 0.6, res
    assert res["val_mean_diameter_mae_nm"] < 0.6, res
    assert "benchmark_size_accuracy" in res and "seedgrid_size_within_0p25nm" in res

    client = mlflow.MlflowClient()
    run = client.get_run(res["run_id"])
    assert run.data.params["epochs"] == "6" and run.data.params["model.channels"] == "[16, 32, 48]"
    for key in ("train_loss", "val_loss", "val_size_accuracy", "val_ece", "benchmark_mean_diameter_mae_nm",
                "benchmark_joint_accuracy", "benchmark_ece", "seedgrid_joint_within"):
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(res["run_id"], "val_loss")) == 6
    # scored after every epoch, then the shipped model: the run's value is the shipped model's
    assert len(client.get_metric_history(res["run_id"], "benchmark_size_accuracy")) == 7
    for key in ("benchmark_size_accuracy", "benchmark_mean_diameter_mae_nm", "seedgrid_size_within_0p25nm"):
        assert run.data.metrics[key] == pytest.approx(res[key]), key
    arts = {a.path for a in client.list_artifacts(res["run_id"], "figures")}
    for name in ("learning_curves.png", "confusion_benchmark_size.png", "cam_benchmark.png",
                 "per_class_benchmark_size.md", "history.json"):
        assert f"figures/{name}" in arts, arts

    # the logged model reproduces the in-process predictions
    from qdsize.ml import data
    x, _ = data.read_split(tiny_dataset, "test")
    loaded = predict.load(res["model_uri"])
    direct = loaded.predict(x[:8])
    pyfunc = mlflow.pyfunc.load_model(res["model_uri"]).predict(x[:8])
    np.testing.assert_allclose(pyfunc["mean_diameter_nm"].to_numpy(), [d["mean_diameter_nm"] for d in direct],
                               rtol=1e-5)
    # the instrument resolution goes through the pyfunc's params (so a served model takes it too)
    told = loaded.predict(x[:8], resolution=(0.02, 0.002, 0.0))
    pyfunc_told = mlflow.pyfunc.load_model(res["model_uri"]).predict(x[:8], params={"resolution": "0.02,0.002"})
    np.testing.assert_allclose(pyfunc_told["mean_diameter_nm"].to_numpy(), [d["mean_diameter_nm"] for d in told],
                               rtol=1e-5)
    assert list(pyfunc_told["resolution_given"][0]) == [0.02, 0.002, 0.0]
    assert not np.allclose([d["mean_diameter_nm"] for d in told], [d["mean_diameter_nm"] for d in direct])
    assert loaded.size_edges_nm == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert json.loads(json.dumps(direct))[0]["size_class"][1] - direct[0]["size_class"][0] == 1.0

    # registration: first version becomes champion; a worse one does not take the alias
    scores = {k: v for k, v in res.items() if k.startswith("benchmark_")}
    first = tracking.register(res["model_uri"], scores)
    assert first["champion"]
    worse = dict(scores, benchmark_joint_accuracy=scores["benchmark_joint_accuracy"] - 0.2)
    second = tracking.register(res["model_uri"], worse)
    assert not second["champion"]
    assert client.get_model_version_by_alias("qdsize-pbs", "champion").version == first["version"]
    assert "kept out" in client.get_model_version("qdsize-pbs", second["version"]).tags["decision"]


def test_same_seed_gives_the_same_metrics(tiny_dataset, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = tracking.ensure_experiment("qdsize-tiny", local_artifacts=True)
    a = train(_cfg(tiny_dataset, epochs=2), tracking_uri=uri, experiment_id=exp, progress=False, log_model=False)
    b = train(_cfg(tiny_dataset, epochs=2), tracking_uri=uri, experiment_id=exp, progress=False, log_model=False)
    for k in ("best_val_loss", "val_size_accuracy", "benchmark_mean_diameter_mae_nm"):
        assert a[k] == b[k], k


def test_augmentation_warm_up_runs_from_the_anchor_to_the_full_ranges():
    from qdsize.ml.train import warmed_augment
    from qdsize.sim import augment

    full = augment.config_from({"preset": "default"}).to_dict()
    anchor = augment.config_from({"preset": "realistic"}).to_dict()
    start, half, end = (warmed_augment({"preset": "default"}, "realistic", s) for s in (0.0, 0.5, 1.0))
    for cfg in (start, half, end):
        augment.config_from(cfg)  # every step is a valid configuration
    assert start["solvent"]["ratio"] == pytest.approx(anchor["solvent"]["ratio"])
    assert start["gaps"]["probability"] == 0.0  # off in the anchor
    assert end["solvent"]["ratio"] == pytest.approx(full["solvent"]["ratio"])
    assert end["counts"]["max_counts"] == pytest.approx(full["counts"]["max_counts"])
    lo, hi = half["counts"]["max_counts"]  # two decades or more: geometric
    assert lo == pytest.approx(10 ** 3.5) and hi == pytest.approx(10 ** 5.5)
    # the instrument width is drawn log-uniformly, so it moves geometrically too: the anchor's width stays the
    # geometric centre of the training range at every strength when it is that of the full range
    w0 = anchor["resolution"]["fwhm0_inv_angstrom"][0]
    full_lo, full_hi = full["resolution"]["fwhm0_inv_angstrom"]
    assert full_lo * full_hi == pytest.approx(w0 ** 2)
    for cfg in (start, half, end):
        lo, hi = cfg["resolution"]["fwhm0_inv_angstrom"]
        assert lo * hi == pytest.approx(w0 ** 2)
    assert half["resolution"]["fwhm0_inv_angstrom"] == pytest.approx([(w0 * full_lo) ** 0.5, (w0 * full_hi) ** 0.5])


def test_shifted_split_keeps_a_shape_and_a_solvent_out_and_scores_the_drop(tiny_dataset, tmp_path):
    from qdsize.ml import data
    from qdsize.ml.train import without_solvents
    from qdsize.sim import augment
    from qdsize.sim.errors import InputError

    held = {"shape": ["cuboctahedron"]}
    stream = data.ShardStream(tiny_dataset, "train", 64, exclude=held)
    shapes = data.layout.load_split(tiny_dataset, "train", columns=["shape"])[1]["shape"]
    assert sum(len(x) for x, *_ in stream) == int((shapes != "cuboctahedron").sum()) < len(shapes)
    names = augment.config_from(without_solvents({"preset": "default"}, ["water"])).to_dict()["solvent"]["names"]
    assert "water" not in names and "toluene" in names

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = tracking.ensure_experiment("qdsize-tiny", local_artifacts=True)
    cfg = _cfg(tiny_dataset, epochs=2, holdout={"shapes": ["cuboctahedron"], "solvents": ["water"]},
               augment={"preset": "default"})
    res = train(cfg, tracking_uri=uri, experiment_id=exp, progress=False, log_model=False)
    for side in ("in", "out", "drop"):
        assert np.isfinite(res[f"shifted_{side}_mean_diameter_mae_nm"]), res
    assert res["shifted_drop_size_accuracy"] == pytest.approx(
        res["shifted_in_size_accuracy"] - res["shifted_out_size_accuracy"])
    from qdsize.ml.train import Holdout, shifted_split

    sides = shifted_split(str(tiny_dataset), Holdout(["cuboctahedron"], ["water"]), "realistic",
                          data.q_grid(tiny_dataset), 0, subtracted=True)
    assert set(sides["out"][1]["size_class"]) and len(sides["in"][0]) + len(sides["out"][0]) == len(
        data.read_split(tiny_dataset, "test")[0])
    run = mlflow.MlflowClient().get_run(res["run_id"])
    assert "shifted_out_joint_within" in run.data.metrics and run.data.params["holdout.solvents"] == "['water']"

    for bad_holdout, field in (({"shapes": ["tetrahedron"]}, "train.holdout.shapes"),
                               ({"solvents": ["benzene"]}, "train.holdout.solvents")):
        with pytest.raises(InputError, match=field.replace(".", r"\.")):
            train(_cfg(tiny_dataset, epochs=1, holdout=bad_holdout, augment={"preset": "default"}),
                  tracking_uri=uri, experiment_id=exp, progress=False, log_model=False)


def test_stream_ends_cleanly_when_the_rows_end_at_a_buffer_boundary(tiny_dataset):
    from qdsize.ml import data

    stream = data.ShardStream(tiny_dataset, "train", 64, buffer_rows=128, limit=512)
    assert sum(len(x) for x, *_ in stream) == 512


def test_weight_average_follows_the_network_and_ramps_its_decay():

    from qdsize.ml.model import ModelConfig, QDNet
    from qdsize.ml.train import ema_update

    torch.manual_seed(0)
    net = QDNet(ModelConfig(channels=[4], kernels=[3], strides=[2]))
    avg = QDNet(ModelConfig(channels=[4], kernels=[3], strides=[2]))
    a0 = avg.size_head.weight.detach().clone()
    ema_update(avg, net, 0.999, step=0)  # first step: decay 0.1, mostly the network
    expected = 0.1 * a0 + 0.9 * net.size_head.weight
    torch.testing.assert_close(avg.size_head.weight, expected)
    for step in range(1000, 1200):  # decay capped at 0.9 from here: 0.9 ** 200 of the gap is left
        ema_update(avg, net, 0.9, step)
    torch.testing.assert_close(avg.size_head.weight, net.size_head.weight, rtol=0, atol=1e-6)


def test_resolution_known_to_a_fraction_of_the_stream_and_the_frozen_splits_instrument(tiny_dataset):
    from qdsize.ml import data
    from qdsize.ml.train import make_augmenter

    aug = make_augmenter({"preset": "default"}, data.q_grid(tiny_dataset))
    stream = data.ShardStream(tiny_dataset, "train", 64, augment=aug, resolution_known=0.5)
    res = torch.cat([r for *_, r in stream])
    known = torch.isfinite(res).all(1)
    assert 0.35 < known.float().mean() < 0.65
    assert torch.isnan(res[~known]).all() and (res[known] >= 0).all() and (res[known, 0] <= 0.2).all()
    clean = torch.cat([r for *_, r in data.ShardStream(tiny_dataset, "train", 64, resolution_known=1.0)])
    assert (clean == 0).all()  # not augmented: no instrument broadening, and said so
    np.testing.assert_allclose(data.instrument_of(tiny_dataset), [0.02, 0.002, 0.0])  # the realistic preset


def test_named_scores_told_the_splits_resolution_blind_apart_and_the_card_says_what_was_trained(tiny_dataset, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = tracking.ensure_experiment("qdsize-tiny", local_artifacts=True)
    cfg = _cfg(tiny_dataset, epochs=2, augment={"preset": "default"}, augment_strength=0.5, resolution_known=0.5)
    res = train(cfg, tracking_uri=uri, experiment_id=exp, progress=False)
    for key in ("seedgrid_size_within_0p25nm", "seedgrid_blind_size_within_0p25nm", "benchmark_mean_diameter_mae_nm",
                "benchmark_blind_mean_diameter_mae_nm"):
        assert np.isfinite(res[key]), key
    assert res["benchmark_mean_diameter_mae_nm"] != res["benchmark_blind_mean_diameter_mae_nm"]
    loaded = predict.load(res["model_uri"])
    assert loaded.takes_resolution
    assert loaded.card["resolution_trained"]["fwhm0_inv_angstrom"] == [0.0, pytest.approx(0.2 ** 0.5 * 0.02 ** 0.5)]
    from qdsize.ml import data, evaluate
    # the named scores are those with the splits' recorded instrument told; `_blind_` without it
    xb, lab = data.read_split(tiny_dataset, "benchmark")
    for name, res_told in (("benchmark_mean_diameter_mae_nm", data.instrument_of(tiny_dataset)),
                           ("benchmark_blind_mean_diameter_mae_nm", None)):
        pred = evaluate.predict_arrays(loaded.model, xb, resolution=res_told)
        assert np.abs(pred["mean_diameter_nm"] - lab["mean_diameter_nm"]).mean() == pytest.approx(res[name], rel=1e-4)
    x, _ = data.read_split(tiny_dataset, "benchmark", limit=4)
    told, blind = loaded.predict(x, resolution=(0.02, 0.002)), loaded.predict(x)
    assert told[0]["resolution_given"] == [0.02, 0.002, 0.0] and blind[0]["resolution_given"] is None
    assert told[0]["mean_diameter_nm"] != blind[0]["mean_diameter_nm"]
    from qdsize.sim.errors import InputError
    with pytest.raises(InputError, match="fwhm_relative"):
        loaded.predict(x, resolution=(0.02, -0.1))
    with pytest.raises(InputError, match="resolution"):
        loaded.predict(x, resolution=(0.02,))
    with pytest.raises(InputError, match="train.resolution_known"):
        _cfg(tiny_dataset, resolution_known=0.5, model={"resolution_input": False})


def test_variance_calibration_recovers_a_power_law_miscalibration():
    """Errors drawn with variance 0.5 v^1.3 from predicted variances v: the fit gives back (1.3, 0.5); errors drawn
    with v itself give (1, 1)."""
    from qdsize.ml.train import fit_variance

    g = torch.Generator().manual_seed(0)
    logvar = torch.rand(200_000, generator=g) * 6 - 5
    noise = torch.randn(200_000, generator=g)
    power, scale = fit_variance(noise * torch.exp(0.5 * (1.3 * logvar + math.log(0.5))), logvar)
    assert power == pytest.approx(1.3, abs=0.02) and scale == pytest.approx(0.5, rel=0.05)
    power, scale = fit_variance(noise * torch.exp(0.5 * logvar), logvar)
    assert power == pytest.approx(1.0, abs=0.02) and scale == pytest.approx(1.0, rel=0.05)


def test_calibration_builds_no_autograd_graph():
    """Calibration runs the network over the whole validation set: with gradients on, every chunk's activations
    would be kept (9.7 GB for 4,000 patterns)."""
    from qdsize.ml.model import ModelConfig, QDNet
    from qdsize.ml.train import calibrate

    net = QDNet(ModelConfig(channels=[8, 8], kernels=[5, 3], strides=[2, 2]))
    seen = []
    forward = net.forward
    net.forward = lambda *a, **k: (seen.append(torch.is_grad_enabled()), forward(*a, **k))[1]
    x = torch.rand(64, 300) + 0.1
    y = {"size_class": torch.randint(0, 10, (64,)), "dispersion_class": torch.randint(0, 4, (64,)),
         "mean_diameter_nm": torch.rand(64) * 10 + 2, "size_dispersion_pct": torch.rand(64) * 25}
    cal = calibrate(net, x, torch.ones_like(x), y)
    assert seen and not any(seen)
    assert 0.5 <= cal["mean_diameter_nm_var_power"] <= 2.0 and cal["mean_diameter_nm_var_scale"] > 0


def test_fusion_fit_uses_an_informative_class_head_and_ignores_a_flat_one():
    """Diameters whose Gaussian estimate is 0.8 nm off but whose class head names the true class 90 % of the time:
    the fitted power is well above 0 and the fused estimate's MAE is lower; a flat head gets power 0."""
    from qdsize.ml.model import TARGET_SCALE, ModelConfig, QDNet, fuse
    from qdsize.ml.train import fit_fusion

    edges = [2.0, 3.0, 4.0, 5.0, 6.0]
    net = QDNet(ModelConfig(channels=[8], kernels=[3], strides=[2], n_size_classes=4, size_edges_nm=edges))
    g = torch.Generator().manual_seed(0)
    n = 20_000
    truth = 2 + 4 * torch.rand(n, generator=g)
    cls = torch.clamp(truth.long() - 2, 0, 3)
    centre, scale = TARGET_SCALE["mean_diameter_nm"]
    wrong = torch.randint(0, 4, (n,), generator=g)
    named = torch.where(torch.rand(n, generator=g) < 0.9, cls, wrong)
    out = {"mean_diameter_nm": (truth + 0.8 * torch.randn(n, generator=g) - centre) / scale,
           "mean_diameter_nm_logvar": torch.full((n,), 2 * math.log(0.8 / scale)),
           "size_logits": 4.0 * torch.nn.functional.one_hot(named, 4).float()}
    power, t = fit_fusion(out, net, "size", "mean_diameter_nm", truth, cls, edges)
    assert power >= 0.5 and t > 0
    gauss = out["mean_diameter_nm"].double() * scale + centre
    fused, _, mass = fuse(gauss, torch.full((n,), 0.8, dtype=torch.float64),
                          torch.softmax(out["size_logits"].double(), -1), edges, power)
    assert (fused - truth).abs().mean() < 0.8 * (gauss - truth).abs().mean()
    assert (mass.argmax(1) == cls).float().mean() > 0.85
    out["size_logits"] = torch.zeros(n, 4)
    assert fit_fusion(out, net, "size", "mean_diameter_nm", truth, cls, edges) == (0.0, 1.0)
