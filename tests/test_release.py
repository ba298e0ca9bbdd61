"""The released model: shipped in the wheel, answers with no tracking store, its card, export, the champion rule."""

import copy
import json
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from qdsize.ml import predict as pr

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p for p in (REPO / "examples").iterdir() if p.suffix in (".xy", ".xye", ".dat", ".chi", ".csv"))
RELEASED = pr.builtin()
needs_release = pytest.mark.skipif(RELEASED is None, reason="no released model in ml/released (run qdsize model "
                                   "export): the release tests need it")


def qdsize(*args, home, uri=None, cwd=None, exe=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "QDSIZE_HOME")}
    env["QDSIZE_HOME"] = str(home)
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    cmd = [str(exe)] if exe else [sys.executable, "-m", "qdsize.platform"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def truth_of(path: Path) -> tuple[float, float]:
    from qdsize.platform.quickstart import true_labels

    return true_labels(path)


def test_the_bundle_loads_without_unpickling_code():
    bundle = pr.RELEASED_DIR
    if RELEASED is None:
        pytest.skip("no released model")
    files = [p for p in bundle.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".pkl", ".pickle", ".cloudpickle")]
    state = torch.load(pr.RELEASED_MODEL_DIR / pr.WEIGHTS, map_location="cpu", weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    import yaml

    flavor = yaml.safe_load((bundle / "MLmodel").read_text())["flavors"]["python_function"]
    # models from code: the class is the bundle's own code file, not a pickle; nothing names this machine's paths
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in flavor
    assert (bundle / flavor["model_code_path"]).is_file() and "/" not in flavor["model_code_path"]
    assert flavor["artifacts"]["qdsize_model"]["uri"] == "artifacts/qdsize_model"
    assert sum(p.stat().st_size for p in files) < 5e6  # a few MB at most


@needs_release
def test_the_card_says_what_the_model_is_and_how_to_make_it_again():
    card = RELEASED.card["release"]
    scores = card["scores"]
    for split, metrics in (("benchmark", ("size_accuracy", "joint_accuracy", "mean_diameter_mae_nm",
                                          "dispersion_mae_pct", "mean_diameter_coverage_1sigma")),
                           ("seedgrid", ("size_within_0p25nm", "dispersion_within_2p5pct", "joint_within"))):
        for metric in metrics:
            assert f"{split}_{metric}" in scores and f"{split}_blind_{metric}" in scores, (split, metric)
    ds = card["dataset"]
    assert len(ds["config_hash"]) == 16 and ds["config"]["dataset"]["name"] == "pbs" and ds["rows"]["train"] > 1e5
    assert card["training"]["seed"] is not None and card["training"]["config"]["epochs"] > 0
    assert card["training"]["how_chosen"]
    assert card["release"]["version"] == RELEASED.model_version and card["release"]["package_versions"]["qdsize"]
    assert {"independent_sim", "measured"} <= set(card["benchmarks"]), sorted(card["benchmarks"])
    for b in card["benchmarks"].values():
        assert 0 <= b["blind"]["within_0p25nm"] <= 1 and b["command"]
    assert card["input"]["q_grid"]["points"] == len(RELEASED.q_inv_angstrom)
    assert card["input"]["coverage_rule"]["required_q_max_inv_angstrom"] > 0
    assert card["input"]["resolution_trained"] and card["limits"]
    assert any("qdsize model export" in c for c in card["reproduce"])
    md = (pr.RELEASED_DIR / pr.CARD_MD).read_text()
    assert card["dataset"]["config_hash"] in md and card["source"]["run_id"] in md
    assert max(len(line) for line in md.splitlines() if line.startswith("|")) <= 120


@needs_release
def test_predict_answers_with_the_released_model_when_nothing_is_trained(tmp_path):
    from qdsize.sim import measured, pattern, scattering

    q = scattering.q_grid(0.8, 12.0, 0.004)
    cdse = pattern.simulate(q, material="cdse", diameter_nm=4.0, size_dispersion_pct=8.0, b_iso=1.0).intensity
    measured.write_pattern_file(tmp_path / "cdse.xy", q, cdse, x_unit="q_A")
    chi = [p for p in EXAMPLES if p.suffix == ".chi"]
    plain = [p for p in EXAMPLES if p.suffix != ".chi"]
    r = qdsize("predict", *plain, tmp_path / "cdse.xy", "--format", "json", home=tmp_path / "home", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = {x["file"]: x for x in json.loads(r.stdout)}
    assert all(x["model_uri"] == RELEASED.model_uri == f"builtin:qdsize-pbs/{x['model_version']}"
               for x in rows.values())
    assert rows.pop(str(tmp_path / "cdse.xy"))["out_of_distribution"]  # the material check travels with the release
    err = [abs(x["mean_diameter_nm"] - truth_of(Path(f))[0]) for f, x in rows.items()]
    assert not any(x["out_of_distribution"] for x in rows.values())
    assert np.mean(err) < 0.4, err  # the examples' truths are in their headers
    from qdsize.platform.quickstart import WAVELENGTH

    lam = WAVELENGTH.search(chi[0].read_text()[:2000]).group(1)  # .chi files carry no wavelength line
    r = qdsize("predict", *chi, "--wavelength", lam, home=tmp_path / "home", cwd=tmp_path)
    assert r.returncode == 0 and "builtin:qdsize-pbs/" in r.stdout, r.stdout + r.stderr
    info = qdsize("model", "info", home=tmp_path / "home", cwd=tmp_path)
    assert info.returncode == 0 and RELEASED.card["release"]["source"]["run_id"] in info.stdout, info.stderr
    listed = qdsize("model", "list", home=tmp_path / "home", cwd=tmp_path)
    assert listed.returncode == 0 and f"answers with {RELEASED.model_uri}" in listed.stdout, listed.stderr


@needs_release
def test_a_worse_champion_is_passed_over_by_name_and_a_good_one_answers(champion_store, tmp_path):
    from qdsize.platform import tracking

    f = EXAMPLES[0]
    worse = qdsize("predict", f, "--format", "json", home=champion_store["home"], uri=champion_store["uri"])
    assert worse.returncode == 0, worse.stderr
    assert json.loads(worse.stdout)[0]["model_uri"] == RELEASED.model_uri
    assert "models:/qdsize-pbs@champion" in worse.stderr and RELEASED.model_uri in worse.stderr
    forced = qdsize("predict", f, "--format", "json", "--model", "models:/qdsize-pbs@champion",
                    home=champion_store["home"], uri=champion_store["uri"])
    row = json.loads(forced.stdout)[0]
    assert row["model_uri"] == "models:/qdsize-pbs@champion" and row["model_version"] == "1"
    assert row["model_run_id"] == champion_store["run_id"]
    # a store whose champion is as good as the release (the release itself, logged and registered): it answers
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("release-as-champion")
    with mlflow.start_run() as run:
        logged = pr.log_pyfunc(pr.builtin(), np.ones((1, len(RELEASED.q_inv_angstrom)), np.float32))
    tracking.register(logged, RELEASED.card["release"]["scores"], run_id=run.info.run_id)
    good = qdsize("predict", f, "--format", "json", home=tmp_path, uri=uri)
    assert good.returncode == 0 and "scores below" not in good.stderr, good.stderr
    g = json.loads(good.stdout)[0]
    assert g["model_uri"] == "models:/qdsize-pbs@champion" and g["model_version"] == "1"
    released = json.loads(qdsize("predict", f, "--format", "json", "--model", "builtin",
                                 home=tmp_path, uri=uri).stdout)[0]
    assert g["mean_diameter_nm"] == pytest.approx(released["mean_diameter_nm"], rel=1e-6)


@needs_release
def test_the_release_scores_a_fresh_seedgrid_within_its_card(tmp_path, monkeypatch):
    """A seedgrid simulated now (other seed, means 2-6 nm): within 0.25 nm no worse than the card's figure allows."""
    from conftest import TINY_DATASET

    from qdsize.ml import data
    from qdsize.platform import config as conf
    from qdsize.platform import simulate

    monkeypatch.setenv("QDSIZE_HOME", str(tmp_path / "home"))
    d = copy.deepcopy(TINY_DATASET)
    d["dataset"].update({
        "name": "fresh-seedgrid", "samples": 400, "seed": 20261203,
        "q": {"min_inv_angstrom": 1.0, "max_inv_angstrom": 10.0, "step_inv_angstrom": 0.005},
        "dispersion": {"class_edges_pct": [0, 5, 10, 15, 20]},
        "variants": {"shapes": ["sphere", "cuboctahedron"], "surfaces": ["stoichiometric", "cation_rich"],
                     "centre_seeds": [0]},
        "splits": {"train": 0.05, "val": 0.05, "test": 0.05, "benchmark": 0.05, "seedgrid": 0.8},
        "seedgrid": {"mean_start_nm": 2.0, "mean_stop_nm": 6.0, "mean_step_nm": 0.5, "dispersions_pct": [5, 10, 15]},
        "nuisance": {"energies_kev": [17.479, 60.0]}})
    simulate.run(conf.load(conf.DatasetFile, None, data=d), tmp_path / "ds", use_ray=False, quiet=True)
    x, lab = data.read_split(tmp_path / "ds", "seedgrid")
    scores = RELEASED.card["release"]["scores"]
    for told, key in ((True, "seedgrid_size_within_0p25nm"), (False, "seedgrid_blind_size_within_0p25nm")):
        rows = RELEASED.predict(x, resolution=data.instrument_of(tmp_path / "ds") if told else None)
        err = np.array([r["mean_diameter_nm"] for r in rows]) - lab["mean_diameter_nm"]
        within, p, n = float(np.mean(np.abs(err) <= 0.25)), scores[key], len(err)
        assert within >= p - 3 * math.sqrt(p * (1 - p) / n) - 0.02, (key, within, p)
        disp = np.abs(np.array([r["size_dispersion_pct"] for r in rows]) - lab["size_dispersion_pct"])
        within, p = float(np.mean(disp <= 2.5)), scores[key.replace("size_within_0p25nm", "dispersion_within_2p5pct")]
        assert within >= p - 3 * math.sqrt(p * (1 - p) / n) - 0.02, (key, within, p)


def test_export_writes_a_servable_bundle_with_the_card(champion_store, tiny_dataset, tmp_path):
    figures = tmp_path / "independent_sim.json"
    figures.write_text(json.dumps({
        "benchmark": "independent_sim", "data": "a test's figures", "command": "benchmarks/independent_sim.py M",
        "models": {"models:/qdsize-pbs@champion": {"blind": {"n": 10, "within_0p25nm": 0.5, "mae_nm": 0.3},
                                                   "told": {"n": 10, "within_0p25nm": 0.6, "mae_nm": 0.25}}}}))
    out = tmp_path / "bundle"
    r = qdsize("model", "export", "models:/qdsize-pbs@champion", "--out", out, "--figures", figures,
               "--version", "9.9.9", home=champion_store["home"], uri=champion_store["uri"])
    assert r.returncode == 0, r.stderr
    card = json.loads((out / pr.CARD_JSON).read_text())
    manifest = json.loads((Path(tiny_dataset) / "manifest.json").read_text())
    assert card["dataset"]["config_hash"] == manifest["config_hash"]
    assert card["source"]["run_id"] == champion_store["run_id"] and card["source"]["registered_version"] == "1"
    assert card["scores"]["benchmark_size_accuracy"] >= 0 and "benchmark_blind_size_accuracy" in card["scores"]
    assert card["benchmarks"]["independent_sim"]["told"]["mae_nm"] == 0.25
    assert (out / "MLmodel").exists() and (out / pr.CARD_MD).read_text().startswith("# Model card: qdsize-pbs 9.9.9")
    # the bundle answers as the registered model does, under its builtin: name, loaded directly or as a pyfunc
    mlflow.set_tracking_uri(champion_store["uri"])
    champ = pr.load("models:/qdsize-pbs@champion")
    bundled = pr.builtin(out)
    assert bundled.model_uri == "builtin:qdsize-pbs/9.9.9"
    x = np.random.default_rng(0).uniform(1, 2, (3, len(champ.q_inv_angstrom))).astype(np.float32)
    a, b = champ.predict(x), bundled.predict(x)
    assert [r["mean_diameter_nm"] for r in a] == [r["mean_diameter_nm"] for r in b]
    served = mlflow.pyfunc.load_model(str(out)).predict(x)
    assert list(served["model_uri"]) == ["builtin:qdsize-pbs/9.9.9"] * 3
    assert np.allclose(served["mean_diameter_nm"], [r["mean_diameter_nm"] for r in a])
    info = qdsize("model", "info", out, home=champion_store["home"], uri=champion_store["uri"])
    assert info.returncode == 0 and "independent_sim" in info.stdout and manifest["config_hash"] in info.stdout
    bad = qdsize("model", "export", "models:/qdsize-pbs@champion", "--out", tmp_path / "b2", "--figures",
                 tmp_path / "missing.json", home=champion_store["home"], uri=champion_store["uri"])
    assert bad.returncode == 2 and "--figures" in bad.stderr and "Traceback" not in bad.stderr


@needs_release
def test_served_release_answers_http_with_the_cli_numbers(tmp_path):
    from qdsize.platform.mlflow_server import free_port
    from qdsize.sim import measured

    port = free_port()
    env = {**os.environ, "QDSIZE_HOME": str(tmp_path),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", str(pr.RELEASED_DIR),
                             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        f = EXAMPLES[0]
        cli = json.loads(qdsize("predict", f, "--format", "json", home=tmp_path, cwd=tmp_path).stdout)[0]
        y, mask, _ = measured.resample(measured.read_pattern(f), RELEASED.q_inv_angstrom)
        body = json.dumps({"inputs": [[float(v) if m else None for v, m in zip(y, mask)]]}).encode()
        answer, deadline = None, time.monotonic() + 180
        while answer is None and time.monotonic() < deadline:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=10) as resp:
                    answer = json.loads(resp.read())["predictions"][0]
            except OSError:
                assert proc.poll() is None, "mlflow models serve exited"
                time.sleep(1)
        assert answer is not None, "the served release never answered"
        assert answer["model_uri"] == RELEASED.model_uri and answer["material_evidence"] is not None
        assert answer["mean_diameter_nm"] == pytest.approx(cli["mean_diameter_nm"], rel=1e-4)
    finally:
        import signal

        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@needs_release
def test_the_wheel_ships_the_release_and_a_fresh_venv_answers_with_it(tmp_path):
    """Build the wheel from a copy of the checkout, install it into a new venv (its dependencies reached through
    this venv's site-packages, so nothing is downloaded), and size an example from a folder with no store."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    src = tmp_path / "src"
    for rel in files:
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("qdsize-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for part in ("MLmodel", pr.CARD_JSON, pr.CARD_MD, f"artifacts/qdsize_model/{pr.WEIGHTS}",
                 "artifacts/qdsize_model/model.json", "artifacts/qdsize_model/physics_check.npz"):
        assert f"qdsize/ml/released/qdsize-pbs/{part}" in names, part
    assert wheel.stat().st_size < 5e6, wheel.stat().st_size
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    import sysconfig

    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # its .pth files (the editable
    # checkout's finder among them) are not read from there: qdsize comes from the wheel alone
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import qdsize.ml.predict as p; print(p.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout.strip()
    assert where.startswith(str(venv)), where
    t = time.perf_counter()
    r = qdsize("predict", EXAMPLES[0], "--format", "json", home=tmp_path / "home", cwd=tmp_path,
               exe=venv / "bin" / "qdsize")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)[0]
    assert row["model_uri"] == RELEASED.model_uri and row["mean_diameter_nm"] > 0
    print(f"wheel {wheel.stat().st_size / 1e6:.2f} MB; first answer from the fresh venv in "
          f"{time.perf_counter() - t:.1f} s")
