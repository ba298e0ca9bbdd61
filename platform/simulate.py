"""Dataset simulation: plan the shards and families, draw labels and nuisances, compose them with the physics of
`qdsize.sim` (ladder, compose, distribution), augment the frozen splits, and fan out over Ray."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import numpy as np

from qdsize.platform import config as cfgmod
from qdsize.platform import dataset as ds
from qdsize.sim import scattering
from qdsize.sim.compose import T_MAX_SIGMA, compose_family, quadrature_rules
from qdsize.sim.distribution import ladder_weights_batch, realised_labels_batch
from qdsize.sim.errors import InputError
from qdsize.sim.ladder import FAMILY_FORMAT, FineGrid, get_family

SPLIT_CODE = {s: i for i, s in enumerate(cfgmod.SPLITS)}
FINE_MARGIN_POINTS = 16  # B-spline coefficients near the fine-grid edges feel the boundary; stay clear of them


# ----------------------------------------------------------------------------------------------------------------
# Plan (driver; pure)
# ----------------------------------------------------------------------------------------------------------------
def split_counts(cfg: cfgmod.DatasetConfig) -> dict[str, int]:
    """Samples per split: fractions of `samples`, rounded by largest remainder so that they sum exactly."""
    fr = {s: getattr(cfg.splits, s) for s in cfgmod.SPLITS}
    raw = {s: cfg.samples * f for s, f in fr.items()}
    out = {s: int(np.floor(v)) for s, v in raw.items()}
    rest = cfg.samples - sum(out.values())
    for s in sorted(raw, key=lambda s: (-(raw[s] - out[s]), SPLIT_CODE[s]))[:rest]:
        out[s] += 1
    return out


def plan_shards(cfg: cfgmod.DatasetConfig) -> list[dict]:
    """Every shard of the dataset: split, index, first sample index within the split, rows."""
    shards = []
    for split, n in split_counts(cfg).items():
        for i, start in enumerate(range(0, n, cfg.shard_size)):
            shards.append({"split": split, "index": i, "start": start, "rows": min(cfg.shard_size, n - start)})
    return shards


TRAINING_SPLITS = ("train", "val")  # the splits that also draw `variants.training_shapes`


def family_specs(cfg: cfgmod.DatasetConfig) -> list[dict]:
    """One spec per structure variant (material, shape, surface, centring seed) with its size ladder: those of
    `variants.shapes` first (every split), then those of `variants.training_shapes` (train and val only)."""
    v, lad = cfg.variants, cfg.ladder
    out = []
    for shape in [*v.shapes, *v.training_shapes]:
        for surface in v.surfaces:
            for seed in v.centre_seeds:
                out.append({"format": FAMILY_FORMAT, "material": v.material.lower(), "a_angstrom": v.a_angstrom,
                            "shape": shape, "surface": surface,
                            "anion_removal": v.anion_removal if surface == "cation_rich" else 0.0,
                            "centre": v.centre, "centre_seed": seed if v.centre == "random" else 0,
                            "ladder_min_nm": lad.min_nm, "ladder_max_nm": lad.max_nm,
                            "ladder_relative_step": lad.relative_step})
    # identical specs (e.g. several seeds with centre = atom) build one family
    uniq = {cfgmod.content_hash(s): s for s in out}
    return [dict(s, family_id=k) for k, s in uniq.items()]


def families_of_split(specs: list[dict], cfg: cfgmod.DatasetConfig, split: str) -> int:
    """How many of the leading `specs` a split draws from: all in train and val, those of `variants.shapes` else
    (so that adding training shapes leaves the frozen splits and test as they were)."""
    if split in TRAINING_SPLITS:
        return len(specs)
    return sum(s["shape"] in cfg.variants.shapes for s in specs)


def fine_grid(cfg: cfgmod.DatasetConfig) -> FineGrid:
    """Fine grid covering Q (1 + strain)(1 + t sigma) for every strain, microstrain and quadrature node."""
    h = cfg.compose.fine_step_inv_angstrom
    s = cfg.nuisance.lattice_rel_range
    sig = cfg.nuisance.microstrain_pct[1] / 100.0
    lo = cfg.q.min_inv_angstrom * (1 - s) * (1 - T_MAX_SIGMA * sig) - FINE_MARGIN_POINTS * h
    hi = cfg.q.max_inv_angstrom * (1 + s) * (1 + T_MAX_SIGMA * sig) + FINE_MARGIN_POINTS * h
    lo = max(lo, h)
    lo = np.floor(lo / h) * h
    return FineGrid(float(lo), float(h), int(np.ceil((hi - lo) / h)) + 1)


def model_q(cfg: cfgmod.DatasetConfig) -> np.ndarray:
    return scattering.q_grid(cfg.q.min_inv_angstrom, cfg.q.max_inv_angstrom, cfg.q.step_inv_angstrom)


def cache_dir() -> Path:
    from qdsize.platform.workspace import home

    return home() / "cache"


# ----------------------------------------------------------------------------------------------------------------
# Shards: draw labels and nuisances, compose, augment (frozen splits), write
# ----------------------------------------------------------------------------------------------------------------
def shard_rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(SPLIT_CODE[split], index, stream)))


def class_of(values: np.ndarray, edges: list[float]) -> np.ndarray:
    """Class index of each value for bins [e0, e1), ..., [e_{n-1}, e_n] (values outside go to the end bins)."""
    return np.clip(np.searchsorted(np.asarray(edges), values, side="right") - 1, 0, len(edges) - 2).astype(np.int16)


def draw_samples(cfg: cfgmod.DatasetConfig, shard: dict, n_families: int) -> dict[str, np.ndarray]:
    """Requested labels and nuisance parameters of one shard's samples (deterministic in seed, split, shard).

    Labels: every (size class, dispersion class) cell in turn over the split's sample index, so classes are
    equally represented, uniform inside each class; `seedgrid` cycles through its grid instead.
    """
    rng = shard_rng(cfg.seed, shard["split"], shard["index"])
    n = shard["rows"]
    g = np.arange(shard["start"], shard["start"] + n)
    if shard["split"] == "seedgrid":
        means, disps = cfg.seedgrid.means_nm, cfg.seedgrid.dispersions_pct
        cell = g % (len(means) * len(disps))
        mean = np.asarray(means)[cell % len(means)]
        disp = np.asarray(disps, dtype=np.float64)[cell // len(means)]
    else:
        se, de = cfg.sizes.edges_nm, cfg.dispersion.class_edges_pct
        ns, nd = len(se) - 1, len(de) - 1
        cell = g % (ns * nd)
        sc, dc = cell % ns, cell // ns
        mean = np.asarray(se)[sc] + rng.random(n) * np.diff(se)[sc]
        disp = np.asarray(de)[dc] + rng.random(n) * np.diff(de)[dc]
    order = rng.permutation(n)
    mean, disp = mean[order], disp[order]
    nu = cfg.nuisance
    rel = nu.lattice_rel_range
    a = cfg.variants.a_angstrom * (1.0 + rng.uniform(-rel, rel, n))
    species = cfg.species
    b = np.stack([rng.uniform(*nu.b_iso_angstrom2[s], n) for s in species], axis=1)
    return {"sample_index": g, "requested_mean_diameter_nm": mean, "requested_dispersion_pct": disp,
            "family": rng.integers(0, n_families, n), "a_angstrom": a,
            "strain": a / cfg.variants.a_angstrom - 1.0,
            "microstrain_pct": rng.uniform(nu.microstrain_pct[0], nu.microstrain_pct[1], n),
            "b_iso": b, "energy_idx": rng.integers(0, len(nu.energies_kev), n)}


def compose_shard(cfg: cfgmod.DatasetConfig, shard: dict, families: list[dict], specs: list[dict],
                  q: np.ndarray, rules=None) -> tuple[dict, dict]:
    """Columns and pattern matrices of one shard (pure: same inputs, same bytes on any worker).

    BLAS runs on one thread here: a multi-threaded GEMM may round differently."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return _compose_shard(cfg, shard, families, specs, q, rules)


def _compose_shard(cfg, shard, families, specs, q, rules):
    d = draw_samples(cfg, shard, families_of_split(specs, cfg, shard["split"]))
    n = shard["rows"]
    species = cfg.species
    energies = tuple(cfg.nuisance.energies_kev)
    pat = np.zeros((n, q.size))
    mean_r, disp_r, atoms, n_used = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n, dtype=np.int32)
    for f, tab in enumerate(families):
        idx = np.flatnonzero(d["family"] == f)
        if idx.size == 0:
            continue
        dk = tab["diameters_nm"]
        w = ladder_weights_batch(dk, d["requested_mean_diameter_nm"][idx], d["requested_dispersion_pct"][idx])
        mean_r[idx], disp_r[idx] = realised_labels_batch(dk, w)
        atoms[idx] = w @ tab["atoms"].sum(axis=1)
        n_used[idx] = np.count_nonzero(w > 1e-12, axis=1)
        pat[idx] = compose_family(tab, q, w, d["strain"][idx], d["microstrain_pct"][idx], d["b_iso"][idx],
                                  d["energy_idx"][idx], energies, cfg.compose.quadrature_tol, cfg.compose.batch,
                                  rules)
    fam = d["family"]
    en = np.asarray(energies)[d["energy_idx"]]
    cols = {"sample_index": d["sample_index"].astype(np.int64),
            "mean_diameter_nm": mean_r, "size_dispersion_pct": disp_r,
            "size_class": class_of(mean_r, cfg.sizes.edges_nm),
            "dispersion_class": class_of(disp_r, cfg.dispersion.class_edges_pct),
            "requested_mean_diameter_nm": d["requested_mean_diameter_nm"],
            "requested_dispersion_pct": d["requested_dispersion_pct"],
            "family_id": np.array([specs[i]["family_id"] for i in fam], dtype=object),
            "material": np.array([specs[i]["material"] for i in fam], dtype=object),
            "shape": np.array([specs[i]["shape"] for i in fam], dtype=object),
            "surface": np.array([specs[i]["surface"] for i in fam], dtype=object),
            "anion_removal": np.array([specs[i]["anion_removal"] for i in fam], dtype=np.float64),
            "centre": np.array([specs[i]["centre"] for i in fam], dtype=object),
            "centre_seed": np.array([specs[i]["centre_seed"] for i in fam], dtype=np.int64),
            "a_angstrom": d["a_angstrom"], "strain": d["strain"], "microstrain_pct": d["microstrain_pct"]}
    for s, el in enumerate(species):
        cols[f"b_iso_{el.lower()}_angstrom2"] = d["b_iso"][:, s]
    cols.update({"energy_kev": en, "wavelength_angstrom": scattering.HC_KEV_ANGSTROM / en,
                 "mean_atoms_per_particle": atoms, "n_ladder_sizes": n_used})
    patterns = {"pattern": pat.astype(np.float32)}
    if shard["split"] in cfgmod.FROZEN_SPLITS:
        patterns = {"pattern": augment_frozen(cfg, shard, q, patterns["pattern"]),
                    "pattern_clean": patterns["pattern"]}
        cols["augment_preset"] = np.array([cfg.augment.preset] * n, dtype=object)
    return cols, patterns


@functools.lru_cache(maxsize=4)
def _augmenter(preset: str, q_key: tuple):
    """The colleague's augmenter (qdsize.sim.augment) for a preset name or YAML path, on this Q grid."""
    try:
        from qdsize.sim import augment
    except ImportError as exc:
        raise InputError(f"augment.preset = {preset!r}: qdsize.sim.augment is not available ({exc}); "
                         "expected the augmentation module for the frozen splits") from None
    return augment.from_config({"preset": preset}, np.asarray(q_key))


def augment_frozen(cfg: cfgmod.DatasetConfig, shard: dict, q: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """Realistic augmentation of a frozen split's shard with a torch generator seeded per (split, shard)."""
    import torch

    torch.set_num_threads(1)
    aug = _augmenter(cfg.augment.preset, tuple(np.asarray(q).tolist()))
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence(
        entropy=cfg.augment.seed, spawn_key=(SPLIT_CODE[shard["split"]], shard["index"])).generate_state(1)[0]))
    with torch.no_grad():
        out = aug(torch.from_numpy(np.array(clean, dtype=np.float32)), gen)
    return np.ascontiguousarray(out.detach().cpu().numpy(), dtype=np.float32)


def make_shard(cfg: cfgmod.DatasetConfig, config_hash: str, shard: dict, families: list[dict], specs: list[dict],
               out: str | Path, rules=None) -> dict:
    """Compose one shard and write it atomically; return its manifest record (with timings and node)."""
    q = model_q(cfg)
    t0 = time.perf_counter()
    cols, pats = compose_shard(cfg, shard, families, specs, q, rules)
    t1 = time.perf_counter()
    table = ds.shard_table(cols, pats, q, config_hash, shard["split"], shard["index"])
    rec = ds.write_shard(table, out, shard["split"], shard["index"])
    t2 = time.perf_counter()
    rec.update({"compose_s": t1 - t0, "write_s": t2 - t1, "pid": os.getpid()})
    return rec


# ----------------------------------------------------------------------------------------------------------------
# Ray glue (thin): family actors, shard tasks, embedded or cluster Ray
# ----------------------------------------------------------------------------------------------------------------
def init_ray(address: str | None = None, workers: int | None = None) -> bool:
    """Connect to `address` / RAY_ADDRESS, or start an embedded single-node Ray bound to loopback.

    Returns True when this call started Ray (the caller shuts it down)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        # loopback only, nothing listens on other interfaces; Ray reads this when it is imported
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return False
    import logging

    quiet = logging.INFO if os.environ.get("QDSIZE_DEBUG") else logging.ERROR  # Ray's startup lines are not ours
    if address:
        ray.init(address=address, log_to_driver=False, logging_level=quiet)
    else:
        kw = dict(address="local", num_cpus=workers or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                  logging_level=quiet)
        try:
            ray.init(**kw)
        except Exception as exc:  # Ray waits a fixed 30 s for its raylet; retry once on a busy machine
            if "timed out during startup" not in str(exc):
                raise
            ray.shutdown()
            ray.init(**kw)
    return True


@functools.lru_cache(maxsize=1)
def _ray_remotes():
    import ray

    @ray.remote(num_cpus=1, max_restarts=2, max_task_retries=2)
    class FamilyActor:
        """Builds (or loads from the cache) size families; one family per call."""

        def get(self, spec: dict, fine: FineGrid, cache: str) -> dict:
            tab = get_family(spec, fine, cache)
            tab["fine_q0"], tab["fine_step"] = fine.q0, fine.step
            tab["node_ip"] = ray.util.get_node_ip_address()
            return tab

    @ray.remote(num_cpus=1, max_retries=4, retry_exceptions=False)
    def shard_task(cfg, config_hash, shard, specs, out, rules, *families):
        rec = make_shard(cfg, config_hash, shard, list(families), specs, out, rules)
        ctx = ray.get_runtime_context()
        rec.update({"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address()})
        return rec

    return FamilyActor, shard_task


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------
def _progress(console, disable: bool):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            sp = task.finished_speed or task.speed
            return Text(f"{sp:,.0f} {task.fields.get('unit', 'patterns')}/s" if sp else "-", style="cyan")

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=disable)


def _frozen_instrument(cfg: cfgmod.DatasetConfig) -> dict | None:
    """The resolution every frozen-split pattern is broadened with (their preset fixes it), as data for readers."""
    from dataclasses import asdict

    from qdsize.sim.augment import fixed_resolution

    inst = fixed_resolution({"preset": cfg.augment.preset})  # the preset as augment_frozen applies it
    return None if inst is None else asdict(inst)


def new_manifest(loaded: cfgmod.Loaded, specs: list[dict], fine: FineGrid, q: np.ndarray, plan: list[dict]) -> dict:
    cfg = loaded.config.dataset
    per_split = {}
    for sh in plan:
        p = per_split.setdefault(sh["split"], {"rows": 0, "shards": 0})
        p["rows"] += sh["rows"]
        p["shards"] += 1
    return {"format": ds.FORMAT, "name": cfg.name, "status": "running", "config_hash": loaded.hash,
            "config": loaded.resolved, "config_source": loaded.source, "seed": cfg.seed,
            "versions": ds.package_versions(),
            "q_inv_angstrom": [float(x) for x in q],
            "labels": {"size_class_edges_nm": cfg.sizes.edges_nm,
                       "dispersion_class_edges_pct": cfg.dispersion.class_edges_pct,
                       "seedgrid_means_nm": cfg.seedgrid.means_nm,
                       "seedgrid_dispersions_pct": cfg.seedgrid.dispersions_pct},
            "columns_units": {"pattern": "I(Q), electron units per particle, float32 on the Q grid",
                              "mean_diameter_nm": "realised number-weighted mean equal-volume diameter",
                              "size_dispersion_pct": "realised std / mean of diameters, %"},
            "families": [{"family_id": s["family_id"], "shape": s["shape"], "surface": s["surface"],
                          "centre": s["centre"], "centre_seed": s["centre_seed"], "material": s["material"]}
                         for s in specs],
            "fine_grid": {"q0": fine.q0, "step": fine.step, "n": fine.n},
            "frozen_instrument": _frozen_instrument(cfg),
            "plan": per_split, "shards": [], "runs": []}


def run(loaded: cfgmod.Loaded, out: str | Path, *, address: str | None = None, workers: int | None = None,
        overwrite: bool = False, use_ray: bool = True, console=None, quiet: bool = False) -> dict:
    """Simulate (or complete) the dataset of a validated config into `out`; return the final manifest.

    Shards already complete on disk are kept as they are; the rest are composed by Ray tasks (or in this
    process with use_ray=False), at most `workers` at a time when given.
    """
    from rich.console import Console

    console = console or Console(stderr=True, quiet=quiet)
    cfg = loaded.config.dataset
    out = Path(out).expanduser().resolve()
    cache = cache_dir()
    plan = plan_shards(cfg)
    specs = family_specs(cfg)
    fine = fine_grid(cfg)
    q = model_q(cfg)
    t_start = time.perf_counter()

    old = ds.prepare_output(out, loaded.hash, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    ds.remove_temporaries(out)
    done = ds.verify_existing(out, plan, loaded.hash, old)
    manifest = new_manifest(loaded, specs, fine, q, plan)
    if old is not None:
        manifest["runs"] = old.get("runs", [])
    records = dict(done)
    todo = [sh for sh in plan if (sh["split"], sh["index"]) not in done]

    def save(status):
        manifest["status"] = status
        manifest["shards"] = [records[k] for k in sorted(records, key=lambda k: (SPLIT_CODE[k[0]], k[1]))]
        ds.write_manifest(out, manifest)

    save("running" if todo else "complete")
    run_info = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kept_shards": len(done),
                "written_shards": 0, "written_rows": 0, "families_s": 0.0, "shards_s": 0.0,
                "compose_s": 0.0, "write_s": 0.0, "workers": workers, "ray": use_ray}
    started_ray = False
    try:
        if todo:
            if use_ray:
                import ray

                started_ray = init_ray(address, workers)
                run_info["ray_nodes"] = len([n for n in ray.nodes() if n.get("Alive")])
            with _progress(console, quiet) as prog:
                t0 = time.perf_counter()
                families, status = _families(specs, fine, cache, use_ray, workers, prog)
                run_info["families_s"] = time.perf_counter() - t0
                run_info["families_built"] = sum(s != "cached" for s in status)
                t0 = time.perf_counter()
                last_save = 0.0
                run_info["completions"] = []
                for rec in _shards(cfg, loaded.hash, todo, families, specs, out, use_ray, workers, prog):
                    records[(rec["split"], rec["index"])] = rec
                    run_info["written_shards"] += 1
                    run_info["written_rows"] += rec["rows"]
                    run_info["completions"].append([round(time.perf_counter() - t0, 4), rec["rows"]])
                    run_info["compose_s"] += rec.pop("compose_s")
                    run_info["write_s"] += rec.pop("write_s")
                    rec.pop("pid", None)
                    if time.perf_counter() - last_save > 2.0:
                        save("running")
                        last_save = time.perf_counter()
                run_info["shards_s"] = time.perf_counter() - t0
    except BaseException:
        save("running")  # record what is complete; a re-run finishes the rest
        raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    ds.remove_temporaries(out)
    run_info["total_s"] = time.perf_counter() - t_start
    manifest["runs"].append(run_info)
    save("complete" if len(records) == len(plan) else "running")
    _summary(console, manifest, run_info)
    return manifest


def _families(specs, fine, cache, use_ray, workers, prog):
    """Family tables in spec order: Ray actors build/load them (as object refs), or this process does."""
    task = prog.add_task("size families", total=len(specs), unit="families")
    if not use_ray:
        out = []
        for s in specs:
            tab = get_family(s, fine, cache)
            tab["fine_q0"], tab["fine_step"] = fine.q0, fine.step
            out.append(tab)
            prog.advance(task)
        return out, [t["status"] for t in out]
    import ray

    refs, status, missing = [None] * len(specs), [None] * len(specs), []
    for i, s in enumerate(specs):  # cached tables go to the object store from here, without starting actors
        if (Path(cache) / "tables" / f"{s['family_id']}-{fine.key()}.npz").is_file():
            tab = get_family(s, fine, cache)
            tab["fine_q0"], tab["fine_step"] = fine.q0, fine.step
            refs[i], status[i] = ray.put(tab), "cached"
            prog.advance(task)
        else:
            missing.append(i)
    if missing:
        actor_cls, _ = _ray_remotes()
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n_act = max(1, min(len(missing), workers or cpus, cpus))
        actors = [actor_cls.remote() for _ in range(n_act)]
        for j, i in enumerate(missing):
            refs[i] = actors[j % n_act].get.remote(specs[i], fine, str(cache))
        pending = [refs[i] for i in missing]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            prog.advance(task, len(ready))
        for i in missing:
            status[i] = ray.get(refs[i])["status"]  # surfaces build errors here
        for a in actors:
            ray.kill(a)
    return refs, status


def node_strategies(nodes: list[dict]) -> list:
    """Soft node-affinity strategies, one per CPU of each alive node, interleaved; [] on a single node.

    Ray hands a leased worker the next queued task of the same kind, so with "SPREAD" alone the node whose worker
    starts first can write every shard while another node's worker is still starting. One strategy per node makes
    one queue per node: each node writes its share, in proportion to its CPUs. Soft: a node that dies takes no
    more shards, its shards go elsewhere.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cpus = [(n["NodeID"], int(n.get("Resources", {}).get("CPU", 0))) for n in nodes if n.get("Alive")]
    cpus = [(node, c) for node, c in cpus if c > 0]
    if len(cpus) < 2:
        return []
    slots = [node for k in range(max(c for _, c in cpus)) for node, c in cpus if k < c]
    return [NodeAffinitySchedulingStrategy(node, soft=True) for node in slots]


def _shards(cfg, config_hash, todo, families, specs, out, use_ray, workers, prog):
    """Yield shard records as shards complete (at most `workers` in flight with Ray)."""
    task = prog.add_task("patterns", total=sum(s["rows"] for s in todo), unit="patterns")
    if not use_ray:
        rules = quadrature_rules(cfg.compose.quadrature_tol)
        for sh in todo:
            rec = make_shard(cfg, config_hash, sh, families, specs, out, rules)
            prog.advance(task, sh["rows"])
            yield rec
        return
    import ray

    _, shard_task = _ray_remotes()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    limit = max(1, workers if workers else 2 * cpus)
    strategies, submitted = node_strategies(ray.nodes()), 0
    cfg_ref, specs_ref = ray.put(cfg), ray.put(specs)
    rules_ref = ray.put(quadrature_rules(cfg.compose.quadrature_tol))  # once on the driver, not per worker
    queue = list(todo)
    running = {}
    while queue or running:
        while queue and len(running) < limit:
            sh = queue.pop(0)
            strategy = strategies[submitted % len(strategies)] if strategies else None
            submitted += 1
            task_fn = shard_task.options(scheduling_strategy=strategy) if strategy else shard_task
            running[task_fn.remote(cfg_ref, config_hash, sh, specs_ref, str(out), rules_ref, *families)] = sh
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            sh = running.pop(ref)
            rec = ray.get(ref)
            prog.advance(task, sh["rows"])
            yield rec


def _summary(console, manifest: dict, run_info: dict) -> None:
    from rich.table import Table

    t = Table(title=f"dataset {manifest['name']} ({manifest['config_hash']}): {manifest['status']}")
    for c in ("split", "shards", "rows", "MB", "bytes/pattern", "nodes"):
        t.add_column(c, justify="right" if c not in ("split", "nodes") else "left")
    for r in ds.summary_rows(manifest):
        t.add_row(r["split"], str(r["shards"]), f"{r['rows']:,}", f"{r['bytes'] / 1e6:.1f}",
                  f"{r['bytes_per_pattern']:,.0f}", ", ".join(r["nodes"]) or "-")
    console.print(t)
    rate = run_info["written_rows"] / run_info["shards_s"] if run_info.get("shards_s") else 0.0
    console.print(f"written {run_info['written_shards']} shards ({run_info['written_rows']:,} patterns), kept "
                  f"{run_info['kept_shards']}; families {run_info['families_s']:.1f} s, shards "
                  f"{run_info['shards_s']:.1f} s ({rate:,.0f} patterns/s), total {run_info['total_s']:.1f} s")
