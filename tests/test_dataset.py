"""Datasets end to end with real Ray, Parquet and torch: exactness, round trips, determinism, resume, faults, CLI."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from qdsize.platform import config as cf
from qdsize.platform import dataset as ds
from qdsize.platform import simulate as sm
from qdsize.sim import compose, debye, distribution, ladder, pattern

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "conf" / "dataset" / "smoke.yaml"
TINY = ["dataset.q.step_inv_angstrom=0.02", "dataset.samples=160", "dataset.shard_size=20",
        "dataset.splits={train: 0.75, val: 0.125, test: 0.125, benchmark: 0, seedgrid: 0}"]
FROZEN = ["dataset.q.step_inv_angstrom=0.02", "dataset.samples=40", "dataset.shard_size=20",
          "dataset.splits={train: 0, val: 0, test: 0, benchmark: 0.5, seedgrid: 0.5}"]
def hat_weights_by_quadrature(d, mean_nm, dispersion_pct, n=400_001):
    """The ladder weights by brute force: the lognormal density times each hat function, summed on a dense grid
    (trapezoid), the tails beyond the ladder added to its end sizes; or linear interpolation at zero dispersion."""
    from scipy.stats import lognorm

    d = np.asarray(d, dtype=float)
    if dispersion_pct == 0:
        return np.array([np.interp(mean_nm, d, row) for row in np.eye(d.size)])
    s = np.sqrt(np.log1p((dispersion_pct / 100) ** 2))
    dist = lognorm(s, scale=mean_nm * np.exp(-s * s / 2))
    x = np.linspace(d[0], d[-1], n)
    pdf = dist.pdf(x)
    w = np.array([np.trapezoid(pdf * np.interp(x, d, row), x) for row in np.eye(d.size)])
    w[0] += dist.cdf(d[0])
    w[-1] += dist.sf(d[-1])
    return w / w.sum()


FAST_PATH_RTOL = 1e-4  # fast composition vs the exact pattern.compose, max over Q of |I_fast / I_exact - 1|


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One workspace (family cache) for the module, so families are built once."""
    h = tmp_path_factory.mktemp("qdsize_home")
    old = os.environ.get("QDSIZE_HOME")
    os.environ["QDSIZE_HOME"] = str(h)
    yield h
    if old is None:
        os.environ.pop("QDSIZE_HOME", None)
    else:
        os.environ["QDSIZE_HOME"] = old


def tiny(*extra):
    return cf.load_dataset_config(SMOKE, [*TINY, *extra])


def checksums(root):
    return {p.relative_to(root).as_posix(): ds.sha256_file(p) for p in sorted(Path(root).glob("split=*/*.parquet"))}


def qdsize_cli(*args, env=None, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "qdsize.platform", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def reference(home, tmp_path_factory):
    """The tiny dataset composed without Ray: the byte-level reference for the Ray runs."""
    out = tmp_path_factory.mktemp("reference") / "ds"
    m = sm.run(tiny(), out, use_ray=False, quiet=True)
    return out, m


# ----------------------------------------------------------------------------------------------------------------
def test_fast_path_matches_exact_compose(home):
    """The B-spline / quadrature composition agrees with the exact DSE (pattern.compose) to FAST_PATH_RTOL."""
    loaded = cf.load_dataset_config(SMOKE, ["dataset.ladder.max_nm=8", "dataset.sizes.max_nm=5",
                                            "dataset.dispersion.class_edges_pct=[0, 5, 10, 15, 25]"])
    cfg = loaded.config.dataset
    fine = sm.fine_grid(cfg)
    q = sm.model_q(cfg)
    energies = tuple(cfg.nuisance.energies_kev)
    cases = [  # mean nm, dispersion %, strain, microstrain %, B_Pb, B_S, energy index
        (3.0, 0.0, -0.01, 0.5, 0.3, 3.0, 0), (4.2, 10.0, 0.004, 0.2, 1.1, 0.7, 1),
        (5.0, 25.0, 0.01, 0.5, 2.0, 2.0, 1), (2.0, 24.0, -0.006, 0.0, 3.0, 0.3, 0), (3.7, 4.0, 0.0, 0.05, 1, 1, 1)]
    worst = 0.0
    for spec in sm.family_specs(cfg):
        tab = ladder.get_family(spec, fine, sm.cache_dir())
        tab["fine_q0"], tab["fine_step"] = fine.q0, fine.step
        stats = debye.PairStatistics.load(sm.cache_dir() / "families" / f"{spec['family_id']}.npz")
        assert np.all(np.diff(stats.diameters_nm) > 0)
        for m, c, s, ms, bpb, bs, e in cases:
            w1 = distribution.ladder_weights(stats.diameters_nm, m, c)
            wb = distribution.ladder_weights_batch(stats.diameters_nm, np.array([m, m]), np.array([c, c]))
            np.testing.assert_allclose(wb, np.stack([w1, w1]), rtol=0, atol=1e-13)
            np.testing.assert_allclose(w1, hat_weights_by_quadrature(stats.diameters_nm, m, c), atol=2e-6)
            exact = pattern.compose(stats, q, m, c, strain=s, microstrain_pct=ms, b_iso={"Pb": bpb, "S": bs},
                                    energy_kev=energies[e]).intensity
            fast = compose.compose_family(tab, q, w1[None], np.array([s]), np.array([ms]), np.array([[bpb, bs]]),
                                     np.array([e]), energies, cfg.compose.quadrature_tol)[0]
            err = float(np.max(np.abs(fast / exact - 1.0)))
            worst = max(worst, err)
            assert err <= FAST_PATH_RTOL, (spec["shape"], m, c, s, ms, err)
    print(f"fast path worst relative error {worst:.2e}")


def test_plan_is_balanced_and_splits_are_disjoint():
    cfg = cf.load_dataset_config(SMOKE, ["dataset.samples=1000", "dataset.shard_size=64"]).config.dataset
    plan = sm.plan_shards(cfg)
    counts = sm.split_counts(cfg)
    assert sum(counts.values()) == 1000
    assert {s: sum(p["rows"] for p in plan if p["split"] == s) for s in counts} == counts
    draws = {}
    for split in ("train", "val", "test"):
        sh = [p for p in plan if p["split"] == split]
        d = [sm.draw_samples(cfg, p, 2) for p in sh]
        mean = np.concatenate([x["requested_mean_diameter_nm"] for x in d])
        disp = np.concatenate([x["requested_dispersion_pct"] for x in d])
        cells = sm.class_of(mean, cfg.sizes.edges_nm) * 10 + sm.class_of(disp, cfg.dispersion.class_edges_pct)
        n_cells = (len(cfg.sizes.edges_nm) - 1) * (len(cfg.dispersion.class_edges_pct) - 1)
        _, per_cell = np.unique(cells, return_counts=True)
        assert len(per_cell) == n_cells and per_cell.max() - per_cell.min() <= 1  # every class cell equally often
        draws[split] = set(np.round(mean, 12))
    assert not (draws["train"] & draws["val"]) and not (draws["train"] & draws["test"])
    grid = sm.draw_samples(cfg, [p for p in plan if p["split"] == "seedgrid"][0], 2)
    assert set(grid["requested_mean_diameter_nm"]) <= set(cfg.seedgrid.means_nm)
    assert set(grid["requested_dispersion_pct"]) <= set(cfg.seedgrid.dispersions_pct)


def test_round_trip_pyarrow_ray_data_torch_and_labels(home, reference, ray_local, tmp_path):
    import torch

    ref, _ = reference
    out = tmp_path / "ds"
    m = sm.run(tiny(), out, workers=2, quiet=True)
    assert m["status"] == "complete"
    assert checksums(out) == checksums(ref)
    loaded = tiny()
    cfg = loaded.config.dataset
    q = sm.model_q(cfg)
    np.testing.assert_array_equal(ds.q_grid(out), q)
    files = ds.split_files(out, "train")
    schema = pq.read_schema(files[0])
    assert schema.field("pattern").type.list_size == q.size and str(schema.field("pattern").type.value_type) == "float"
    np.testing.assert_array_equal(ds.q_from_schema(schema), q)
    assert schema.metadata[b"qdsize.config_hash"].decode() == loaded.hash
    for col in ("mean_diameter_nm", "size_dispersion_pct", "size_class", "dispersion_class", "shape", "surface",
                "centre", "a_angstrom", "strain", "microstrain_pct", "b_iso_pb_angstrom2", "b_iso_s_angstrom2",
                "energy_kev", "family_id", "requested_mean_diameter_nm"):
        assert col in schema.names, col

    # pyarrow reader (ours) against the composition itself
    pats, labels = ds.load_split(out, "train", columns=None)
    sh0 = sm.plan_shards(cfg)[0]
    specs = sm.family_specs(cfg)
    fams = [dict(ladder.get_family(s, sm.fine_grid(cfg), sm.cache_dir()), fine_q0=sm.fine_grid(cfg).q0,
                 fine_step=sm.fine_grid(cfg).step) for s in specs]
    cols, direct = sm.compose_shard(cfg, sh0, fams, specs, q)
    np.testing.assert_array_equal(pats[: sh0["rows"]], direct["pattern"])
    assert pats.dtype == np.float32 and pats.shape == (sm.split_counts(cfg)["train"], q.size)
    np.testing.assert_array_equal(labels["sample_index"], np.arange(len(pats)))

    # Ray Data
    rd = ray_local.data.read_parquet([str(f) for f in files]).take_batch(len(pats), batch_format="numpy")
    rp = rd["pattern"]
    rp = np.stack(rp) if rp.dtype == object else rp
    order = np.argsort(rd["sample_index"])
    np.testing.assert_array_equal(rp[order].astype(np.float32), pats)
    np.testing.assert_array_equal(rd["mean_diameter_nm"][order], labels["mean_diameter_nm"])

    # torch
    batches = [torch.from_numpy(p) for p, _ in ds.iter_batches(out, "train", batch_size=32)]
    t = torch.cat(batches)
    assert t.dtype == torch.float32 and tuple(t.shape) == pats.shape
    assert torch.equal(t, torch.from_numpy(pats))

    # labels: realised, classes consistent with the edges, physical and matching the exact DSE for a row
    full = pq.read_table(files[0]).to_pydict()
    for i in range(3):
        spec = next(s for s in specs if s["family_id"] == full["family_id"][i])
        stats = debye.PairStatistics.load(sm.cache_dir() / "families" / f"{spec['family_id']}.npz")
        ex = pattern.compose(stats, q, full["requested_mean_diameter_nm"][i], full["requested_dispersion_pct"][i],
                             strain=full["strain"][i], microstrain_pct=full["microstrain_pct"][i],
                             b_iso={"Pb": full["b_iso_pb_angstrom2"][i], "S": full["b_iso_s_angstrom2"][i]},
                             energy_kev=full["energy_kev"][i])
        assert np.max(np.abs(np.asarray(full["pattern"][i]) / ex.intensity - 1)) < FAST_PATH_RTOL
        assert abs(full["mean_diameter_nm"][i] - ex.params["mean_diameter_nm"]) < 1e-9
        assert abs(full["size_dispersion_pct"][i] - ex.params["size_dispersion_pct"]) < 1e-7
        assert full["shape"][i] == spec["shape"] and full["surface"][i] == spec["surface"]
    np.testing.assert_array_equal(labels["size_class"], sm.class_of(labels["mean_diameter_nm"], cfg.sizes.edges_nm))
    assert set(np.unique(labels["size_class"])) == {0, 1}
    assert np.all(np.abs(np.asarray(full["a_angstrom"]) / 5.936 - 1) <= 0.01 + 1e-12)


def test_frozen_splits_are_augmented_deterministically(home, tmp_path):
    """benchmark / seedgrid hold qdsize.sim.augment's `realistic` preset applied with a fixed seed."""
    ref = tmp_path / "frozen"
    sm.run(cf.load_dataset_config(SMOKE, FROZEN), ref, use_ray=False, quiet=True)
    q = ds.q_grid(ref)
    for split in ("benchmark", "seedgrid"):
        pats, lab = ds.load_split(ref, split, columns=["requested_mean_diameter_nm", "requested_dispersion_pct"])
        clean, _ = ds.load_split(ref, split, columns=[], pattern_column="pattern_clean")
        assert pats.shape == clean.shape and pats.shape[1] == q.size
        assert np.all(np.isfinite(pats)) and not np.allclose(pats, clean)
    grid, lab = ds.load_split(ref, "seedgrid", columns=["requested_mean_diameter_nm", "requested_dispersion_pct"])
    assert set(lab["requested_mean_diameter_nm"]) <= {2.0, 2.5, 3.0, 3.5, 4.0}
    assert set(lab["requested_dispersion_pct"]) == {5.0}
    # composing the same shard again gives the same augmented bytes
    cfg = cf.load_dataset_config(SMOKE, FROZEN).config.dataset
    sh = next(p for p in sm.plan_shards(cfg) if p["split"] == "benchmark")
    specs = sm.family_specs(cfg)
    fine = sm.fine_grid(cfg)
    fams = [dict(ladder.get_family(s, fine, sm.cache_dir()), fine_q0=fine.q0, fine_step=fine.step) for s in specs]
    _, again = sm.compose_shard(cfg, sh, fams, specs, sm.model_q(cfg))
    bench, _ = ds.load_split(ref, "benchmark", columns=[])
    np.testing.assert_array_equal(again["pattern"], bench[: sh["rows"]])


def test_training_shapes_go_to_train_and_val_only_and_leave_the_other_splits_as_they_were(home, reference, tmp_path):
    """`variants.training_shapes` widens what the network learns from without moving the frozen splits or test."""
    every = ["dataset.splits={train: 0.5, val: 0.125, test: 0.125, benchmark: 0.125, seedgrid: 0.125}"]
    base = tmp_path / "base"
    sm.run(tiny(*every), base, use_ray=False, quiet=True)
    wide = tmp_path / "wide"
    m = sm.run(tiny(*every, "dataset.variants.training_shapes=[octahedron, 'polyhedron:1.5']"), wide,
               use_ray=False, quiet=True)
    assert {f["shape"] for f in m["families"]} == {"sphere", "cube", "octahedron", "polyhedron:1.5"}
    for split in ("train", "val"):
        _, lab = ds.load_split(wide, split, columns=["shape"])
        assert {"octahedron", "polyhedron:1.5"} <= set(lab["shape"]), split
    b, w = checksums(base), checksums(wide)
    for split in ("test", "benchmark", "seedgrid"):
        _, lab = ds.load_split(wide, split, columns=["shape"])
        assert set(lab["shape"]) <= {"sphere", "cube"}, split
        pats_b, _ = ds.load_split(base, split, columns=[])
        pats_w, _ = ds.load_split(wide, split, columns=[])
        np.testing.assert_array_equal(pats_b, pats_w)
    assert any(b[k] != w[k] for k in b if k.startswith("split=train"))


def test_same_bytes_with_one_or_two_workers(home, reference, ray_local, tmp_path):
    ref, _ = reference
    sums = checksums(ref)
    assert len(sums) == 8
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        m = sm.run(tiny(), out, workers=workers, quiet=True)
        assert m["status"] == "complete" and m["runs"][-1]["workers"] == workers
        assert checksums(out) == sums


def test_resume_completes_a_partial_dataset_and_rewrites_nothing_complete(home, reference, ray_local, tmp_path):
    ref, _ = reference
    out = tmp_path / "ds"
    shutil.copytree(ref, out)
    sums = checksums(out)
    # an interrupted run: two shards missing, a stale temporary file, manifest still "running" without them
    man = json.loads((out / ds.MANIFEST).read_text())
    gone = ["split=train/part-00002.parquet", "split=val/part-00000.parquet"]
    for g in gone:
        (out / g).unlink()
    man["status"] = "running"
    man["shards"] = [r for r in man["shards"] if r["file"] not in gone]
    (out / ds.MANIFEST).write_text(json.dumps(man))
    (out / "split=train" / ".part-00002.parquet.deadbeef.tmp").write_bytes(b"partial")
    # and one complete shard the manifest never heard of (cut off before the manifest update)
    man["shards"] = [r for r in man["shards"] if r["file"] != "split=test/part-00000.parquet"]
    (out / ds.MANIFEST).write_text(json.dumps(man))
    before = {p: (out / p).stat() for p in sums if p not in gone}
    m = sm.run(tiny(), out, workers=2, quiet=True)
    assert m["status"] == "complete" and m["runs"][-1]["written_shards"] == 2
    assert m["runs"][-1]["kept_shards"] == len(sums) - 2
    assert checksums(out) == sums
    for p, st in before.items():
        now = (out / p).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), f"{p} was rewritten"
    assert not list(out.glob("split=*/.*"))
    _, problems = ds.validate(out)
    assert problems == []
    # a complete dataset: re-running writes nothing
    m = sm.run(tiny(), out, use_ray=False, quiet=True)
    assert m["runs"][-1]["written_shards"] == 0 and checksums(out) == sums


def test_killed_worker_loses_and_duplicates_nothing(home, ray_local, tmp_path):
    import psutil

    loaded = cf.load_dataset_config(SMOKE, ["dataset.samples=2400", "dataset.shard_size=80",
                                            "dataset.splits={train: 1.0, val: 0, test: 0, benchmark: 0, "
                                            "seedgrid: 0}"])
    out = tmp_path / "ds"
    result = {}

    def go():
        try:
            result["manifest"] = sm.run(loaded, out, workers=2, quiet=True)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = exc

    th = threading.Thread(target=go)
    th.start()
    killed = None
    deadline = time.time() + 120
    me = psutil.Process()
    while th.is_alive() and killed is None and time.time() < deadline:
        if list(out.glob("split=train/part-*.parquet")):  # running for real: kill a worker composing a shard
            for p in me.children(recursive=True):
                try:
                    if "ray::shard_task" in " ".join(p.cmdline()):
                        p.kill()
                        killed = p.pid
                        break
                except psutil.Error:
                    continue
        time.sleep(0.01)
    th.join(timeout=300)
    assert killed is not None, "no shard task was running to kill"
    assert "error" not in result, result.get("error")
    m = result["manifest"]
    assert m["status"] == "complete"
    plan = sm.plan_shards(loaded.config.dataset)
    assert sorted(r["file"] for r in m["shards"]) == sorted(ds.shard_relpath(p["split"], p["index"]) for p in plan)
    pats, lab = ds.load_split(out, "train")
    np.testing.assert_array_equal(np.sort(lab["sample_index"]), np.arange(2400))  # none lost, none duplicated
    assert not [p for p in out.rglob("*") if p.is_file() and p.name.startswith(".")]  # nothing partial left
    _, problems = ds.validate(out)
    assert problems == []
    # the retried shard holds exactly what composing it without Ray gives
    specs = sm.family_specs(loaded.config.dataset)
    fine = sm.fine_grid(loaded.config.dataset)
    fams = [dict(ladder.get_family(s, fine, sm.cache_dir()), fine_q0=fine.q0, fine_step=fine.step) for s in specs]
    for sh in plan[:3]:
        _, direct = sm.compose_shard(loaded.config.dataset, sh, fams, specs, sm.model_q(loaded.config.dataset))
        np.testing.assert_array_equal(pats[sh["start"]: sh["start"] + sh["rows"]], direct["pattern"])


def test_cli_refuses_a_foreign_dataset_unless_overwrite_and_info_show(home, reference, tmp_path):
    ref, m = reference
    out = tmp_path / "ds"
    shutil.copytree(ref, out)
    sums = checksums(out)
    r = qdsize_cli("simulate", SMOKE, *TINY, "--seed", 5, "--out", out, "--no-ray", "-q")
    assert r.returncode == 2, r.stderr
    assert "--out = " in r.stderr and "--overwrite" in r.stderr and m["config_hash"] in r.stderr
    assert checksums(out) == sums
    r = qdsize_cli("dataset", "info", out)
    assert r.returncode == 0, r.stderr
    assert "checksums verified" in r.stdout and "train" in r.stdout
    png = tmp_path / "fig.png"
    r = qdsize_cli("dataset", "show", out, "--index", 3, "--split", "val", "-o", png)
    assert r.returncode == 0, r.stderr
    assert png.stat().st_size > 10_000
    r = qdsize_cli("dataset", "show", out, "--index", 10_000, "-o", png)
    assert r.returncode == 2 and "--index = 10000: expected a row index below" in r.stderr
    # a flipped byte is caught
    victim = out / "split=val/part-00000.parquet"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    r = qdsize_cli("dataset", "info", out)
    assert r.returncode == 1 and "split=val/part-00000.parquet: checksum mismatch" in r.stderr
    # --overwrite replaces it with the other config's dataset
    r = qdsize_cli("simulate", SMOKE, *TINY, "--seed", 5, "--out", out, "--no-ray", "-q", "--overwrite")
    assert r.returncode == 0, r.stderr
    new = json.loads((out / ds.MANIFEST).read_text())
    assert new["config_hash"] != m["config_hash"] and new["seed"] == 5 and new["status"] == "complete"
    assert set(checksums(out)) == set(sums) and checksums(out) != sums


def test_shards_are_shared_over_the_nodes_by_their_cpus():
    """One soft node-affinity strategy per CPU of each alive node, interleaved; none on a single node."""
    a, b, dead, nocpu = ("%056x" % k for k in (1, 2, 3, 4))  # Ray node ids: 28 bytes, in hex
    nodes = [{"NodeID": a, "Alive": True, "Resources": {"CPU": 2.0}},
             {"NodeID": b, "Alive": True, "Resources": {"CPU": 1.0}},
             {"NodeID": dead, "Alive": False, "Resources": {"CPU": 4.0}},
             {"NodeID": nocpu, "Alive": True, "Resources": {"memory": 1e9}}]
    got = sm.node_strategies(nodes)
    assert [s.node_id for s in got] == [a, b, a] and all(s.soft for s in got)
    assert sm.node_strategies(nodes[:1] + nodes[2:]) == []
