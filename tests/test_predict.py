"""`qdsize predict` end to end: every format and unit, a registered model, bad files, and the served model."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import mlflow
import numpy as np
import pytest

from qdsize.platform.mlflow_server import free_port
from qdsize.sim import measured, pattern, scattering


@pytest.fixture(scope="module")
def store(champion_store):
    """A temporary SQLite store holding one trained, registered champion (conftest)."""
    return champion_store


@pytest.fixture(scope="module")
def sample_files(tmp_path_factory):
    """One realistic 4 nm sample written in every supported format and x unit."""
    import torch

    from qdsize.sim import augment

    folder = tmp_path_factory.mktemp("files")
    q = scattering.q_grid(0.8, 12.0, 0.004)
    p = pattern.simulate(q, diameter_nm=4.0, size_dispersion_pct=8.0, shape="cuboctahedron", surface="cation_rich",
                         b_iso=1.0, energy_kev=17.479)
    y = augment.from_config({"preset": "realistic"}, q)(torch.as_tensor(p.intensity[None]),
                                                        torch.Generator().manual_seed(0))[0].numpy()
    files = {}
    for fmt in ("xy", "xye", "dat", "chi", "csv"):
        for unit in ("q_A", "q_nm", "2theta"):
            lam = 0.5594 if unit == "2theta" else None
            if unit == "q_A":
                x, yy = q, y
            elif unit == "q_nm":
                x, yy = q * 10, y
            else:
                keep = q * lam / (4 * np.pi) < 0.99
                x, yy = scattering.two_theta_from_q(q[keep], lam), y[keep]
            path = folder / f"s_{unit}.{fmt}"
            measured.write_pattern_file(path, x, yy, x_unit=unit, wavelength_angstrom=lam,
                                        sigma=np.sqrt(np.maximum(yy, 1)) if fmt == "xye" else None)
            files[(fmt, unit)] = path
    return files


def qdsize(*args, env_home=None, uri=None, timeout=300, champion=True):
    """`qdsize ARGS` as a subprocess; `predict` is pointed at the store's champion (the tiny champion of these tests
    scores below the released model, which would answer otherwise: tests/test_release.py checks that rule)."""
    if champion and args and args[0] == "predict" and "--model" not in args:
        args = (*args, "--model", "models:/qdsize-pbs@champion")
    env = {**os.environ}
    if env_home:
        env["QDSIZE_HOME"] = str(env_home)
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    return subprocess.run([sys.executable, "-m", "qdsize.platform", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout)


def test_every_format_and_unit_gives_the_same_answer_through_the_champion(store, sample_files):
    args = ["predict", *sample_files.values(), "--format", "json"]
    chi_2theta = [f for (fmt, unit), f in sample_files.items() if fmt == "chi" and unit == "2theta"]
    # chi files carry no wavelength: 2-theta ones need the flag, so run them apart
    files = [f for f in sample_files.values() if f not in chi_2theta]
    r = qdsize("predict", *files, "--format", "json", env_home=store["home"], uri=store["uri"])
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == len(files)
    for row in rows:
        for key in ("file", "mean_diameter_nm", "mean_diameter_std_nm", "size_dispersion_pct",
                    "size_dispersion_std_pct", "size_class", "dispersion_class", "size_class_probs",
                    "dispersion_class_probs", "model_uri"):
            assert key in row, key
        assert row["model_uri"] == "models:/qdsize-pbs@champion"
        assert abs(sum(row["size_class_probs"]) - 1) < 1e-4
    d = np.array([row["mean_diameter_nm"] for row in rows])
    assert np.ptp(d) < 0.1, d  # one sample, whatever the format and unit
    r2 = qdsize("predict", *chi_2theta, "--wavelength-angstrom", "0.5594", "--format", "csv",
                env_home=store["home"], uri=store["uri"])
    assert r2.returncode == 0, r2.stderr
    line = r2.stdout.splitlines()[1].split(",")
    assert abs(float(line[1]) - d.mean()) < 0.1
    assert len(args) > 3


def test_what_is_not_pbs_dots_is_flagged_not_sized(store, sample_files, tmp_path, monkeypatch):
    from qdsize.sim import solvents

    monkeypatch.setenv("COLUMNS", "250")  # the table on a wide terminal, so the flag is not wrapped

    q = scattering.q_grid(0.8, 12.0, 0.004)
    rng = np.random.default_rng(0)
    toluene = solvents.solvent_intensity("toluene", q)
    kapton = solvents.capillary_intensity("kapton", q)
    cdse = pattern.simulate(q, material="cdse", diameter_nm=4.0, size_dispersion_pct=8.0, b_iso=1.0).intensity
    others = {"toluene.xy": rng.poisson(2000 * toluene / toluene.max()), "capillary.xy": kapton,
              "noise.xy": rng.poisson(80.0, len(q)), "cdse.xy": cdse}
    paths = []
    for name, y in others.items():
        measured.write_pattern_file(tmp_path / name, q, np.asarray(y, dtype=float), x_unit="q_A")
        paths.append(tmp_path / name)
    r = qdsize("predict", sample_files[("xy", "q_A")], *paths, "--format", "json", env_home=store["home"],
               uri=store["uri"])
    assert r.returncode == 0, r.stderr
    rows = {os.path.basename(row["file"]): row for row in json.loads(r.stdout)}
    pbs = rows.pop("s_q_A.xy")
    assert not pbs["out_of_distribution"] and pbs["material_evidence"] > 0.9, pbs
    evidence = {k: v["material_evidence"] for k, v in rows.items()}
    assert all(row["out_of_distribution"] for row in rows.values()), evidence
    table = qdsize("predict", *paths[:1], env_home=store["home"], uri=store["uri"])
    assert "OUT OF DISTRIBUTION" in table.stdout


def test_a_batch_reports_good_files_and_one_line_per_bad_file(store, sample_files, tmp_path):
    good = sample_files[("xy", "q_A")]
    bad = {"empty.xy": b"", "binary.xy": bytes(range(256)) * 10, "onecol.xy": b"1\n2\n3\n",
           "nan.xy": b"\n".join(b"%f nan" % (1 + i * 0.01) for i in range(900)),
           "short.xy": b"\n".join(b"%f 5" % (2 + i * 0.005) for i in range(400))}
    paths = []
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
        paths.append(tmp_path / name)
    (tmp_path / "no_patterns").mkdir()
    r = qdsize("predict", good, *paths, tmp_path / "missing.xy", tmp_path / "no_patterns", "--format", "json",
               env_home=store["home"], uri=store["uri"])
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    rows = json.loads(r.stdout)  # one row per input, in order: the answer, or the error
    assert [row["file"] for row in rows if "error" not in row] == [str(good)]
    assert len(rows) == len(bad) + 3 and all(row["error"].startswith(row["file"]) for row in rows[1:])
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("qdsize: error:")]
    assert len(errors) == len(bad) + 2
    for name in [*bad, "missing.xy"]:
        assert any(name in e for e in errors), name


def test_no_model_anywhere_says_how_to_make_one(tmp_path, monkeypatch):
    from qdsize.ml import predict as pr
    from qdsize.platform import models
    from qdsize.sim.errors import InputError

    monkeypatch.setattr(pr, "RELEASED_DIR", tmp_path / "no-release")  # a qdsize installed without its model
    monkeypatch.setenv("QDSIZE_HOME", str(tmp_path / "home"))
    with pytest.raises(InputError, match="no released model installed") as err:
        models.resolve(None, f"sqlite:///{tmp_path / 'm.db'}")
    assert "--model" in str(err.value) and "quickstart" in str(err.value)
    assert f"workspace {tmp_path / 'home'}: $QDSIZE_HOME" in str(err.value) and "QDSIZE_HOME or" in str(err.value)


def test_served_champion_answers_http_with_the_cli_numbers(store, sample_files):
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"], "QDSIZE_HOME": str(store["home"]),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}  # uvicorn
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/qdsize-pbs@champion",
                             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        path = sample_files[("xy", "q_A")]
        cli = json.loads(qdsize("predict", path, "--format", "json", env_home=store["home"],
                                uri=store["uri"]).stdout)[0]
        from qdsize.ml import predict as pr

        mlflow.set_tracking_uri(store["uri"])
        grid = pr.load("models:/qdsize-pbs@champion").q_inv_angstrom
        y, mask, _ = measured.resample(measured.read_pattern(path), grid)
        x = np.where(mask > 0, y, np.nan)
        inputs = [[None if np.isnan(v) else float(v) for v in x]]

        def ask(body: dict, deadline: float) -> dict | None:
            while time.monotonic() < deadline:
                try:
                    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                                 data=json.dumps(body).encode(),
                                                 headers={"Content-Type": "application/json"})
                    with urllib.request.urlopen(req, timeout=10) as resp:
                        return json.loads(resp.read())
                except OSError:
                    if proc.poll() is not None:
                        pytest.fail("mlflow models serve exited")
                    time.sleep(1)
            return None

        answer = ask({"inputs": inputs}, time.monotonic() + 180)
        assert answer is not None, "the served model never answered"
        served = answer["predictions"][0]
        assert served["mean_diameter_nm"] == pytest.approx(cli["mean_diameter_nm"], rel=1e-4)
        assert served["size_dispersion_pct"] == pytest.approx(cli["size_dispersion_pct"], rel=1e-4, abs=1e-4)
        assert list(served["size_class"]) == cli["size_class"]
        # the served model names its training run, as the command line does, never a path on the server
        assert served["model_run_id"] == cli["model_run_id"] and cli["model_version"]
        assert served["model_uri"] == f"runs:/{cli['model_run_id']}/model"
        # the instrument resolution goes in the request's params, as --resolution on the command line
        cli_told = json.loads(qdsize("predict", path, "--format", "json", "--resolution", "0.02,0.002",
                                     env_home=store["home"], uri=store["uri"]).stdout)[0]
        told = ask({"inputs": inputs, "params": {"resolution": "0.02,0.002"}}, time.monotonic() + 30)
        served_told = told["predictions"][0]
        assert served_told["mean_diameter_nm"] == pytest.approx(cli_told["mean_diameter_nm"], rel=1e-4)
        assert list(served_told["resolution_given"]) == [0.02, 0.002, 0.0]
    finally:
        import signal

        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_the_instrument_resolution_is_told_to_the_network_or_refused_by_name(store, sample_files):
    good = sample_files[("xy", "q_A")]
    blind = qdsize("predict", good, "--format", "json", env_home=store["home"], uri=store["uri"])
    told = qdsize("predict", good, "--format", "json", "--resolution", "0.02,0.002", env_home=store["home"],
                  uri=store["uri"])
    assert blind.returncode == told.returncode == 0, told.stderr
    b, t = json.loads(blind.stdout)[0], json.loads(told.stdout)[0]
    assert b["resolution_given"] is None and t["resolution_given"] == [0.02, 0.002, 0.0]
    assert t["mean_diameter_nm"] != b["mean_diameter_nm"]
    wide = qdsize("predict", good, "--resolution", "0.3,0.002,0.1", env_home=store["home"], uri=store["uri"])
    assert wide.returncode == 0 and "outside what the model was trained on" in wide.stderr
    for value, field in (("0.02,abc", "resolution"), ("0.02,-0.002", "fwhm_relative"), ("0.02,0.002,2", "lorentz")):
        r = qdsize("predict", good, "--resolution", value, env_home=store["home"], uri=store["uri"])
        assert r.returncode == 2 and field in r.stderr and "Traceback" not in r.stderr, (value, r.stderr)


def test_large_dots_sized_blind_come_with_a_note_on_the_resolution():
    from types import SimpleNamespace

    from qdsize.platform.cli_ml import resolution_hint

    rows = [{"mean_diameter_nm": 3.1}, {"mean_diameter_nm": 8.4}]
    takes, old = SimpleNamespace(takes_resolution=True), SimpleNamespace(takes_resolution=False)
    assert "1 pattern(s) sized at 7 nm or more" in resolution_hint(rows, takes, None)
    assert "qdsize resolution" in resolution_hint(rows, takes, None)
    assert resolution_hint(rows, takes, (0.02, 0.002, 0.0)) is None  # told
    assert resolution_hint(rows[:1], takes, None) is None  # small dots only
    assert resolution_hint(rows, old, None) is None  # a model that cannot take it


def test_evaluate_scores_the_frozen_splits_with_and_without_their_resolution(store, tiny_dataset):
    r = qdsize("evaluate", "models:/qdsize-pbs@champion", tiny_dataset, env_home=store["home"], uri=store["uri"])
    assert r.returncode == 0, r.stderr
    assert "size_within_0p25nm" in r.stdout and "(blind)" in r.stdout  # the blind columns (headers wrap)
    assert "--resolution 0.02,0.002" in r.stdout  # and which resolution the named ones were told
