"""Scale-out: compose, Dockerfiles and KubeRay manifest checked by real tools; the topology run without containers."""

import contextlib
import copy
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import ray
import yaml

from qdsize.platform import dataset as ds
from qdsize.platform.mlflow_server import LocalServer

import clusterkit  # tests/clusterkit.py

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_FILES = [COMPOSE, DOCKER / "compose.gpu.yaml"]
ENV_EXAMPLE = DOCKER / ".env.example"
RAYJOB = DOCKER / "k8s" / "rayjob.yaml"
RAYJOB_SCHEMA = Path(__file__).parent / "schemas" / "rayjob-v1.schema.json"
SMOKE = REPO / "conf" / "dataset" / "smoke.yaml"
THIRD_PARTY_IMAGES = ("postgres:", "chrislusf/seaweedfs:", "amazon/aws-cli:")
SERVICES = {"postgres", "objectstore", "create-bucket", "mlflow", "ray-head", "ray-worker"}


# ----------------------------------------------------------------------------------------------------------------
# Compose: interpolation as compose does it, and the compose-spec schema through check-jsonschema
# ----------------------------------------------------------------------------------------------------------------
VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def env_example() -> dict[str, str]:
    """KEY=VALUE lines of docker/.env.example (comments and blank lines skipped)."""
    out = {}
    for n, line in enumerate(ENV_EXAMPLE.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", key), f"{ENV_EXAMPLE}:{n}: expected KEY=VALUE, got {line!r}"
        out[key] = value
    return out


def filled_env() -> dict[str, str]:
    """.env.example with its empty secrets filled, as a user's docker/.env would be."""
    env = env_example()
    return {k: v or f"{k.lower().replace('_', '')}0123456789abcdef" for k, v in env.items()}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation: ${X}, ${X:-d}, ${X-d}, ${X:?msg}, ${X?msg}, $X, and $$ for a dollar."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1) or m.group(4), m.group(2), m.group(3)
        value = env.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return arg if value is None else value
        if op in (":?", "?") and (value is None or (op == ":?" and not value)):
            raise ValueError(f"${{{name}}}: {arg}")
        if value is None:
            raise ValueError(f"${{{name}}}: not set in {ENV_EXAMPLE.name}")
        return value

    return VARIABLE.sub(sub, text)


def variables_used(text: str) -> set[str]:
    return {m.group(1) or m.group(4) for m in VARIABLE.finditer(text) if m.group(0) != "$$"}


def compose_spec(*paths: Path) -> subprocess.CompletedProcess:
    """check-jsonschema (a real schema validator) with the compose-spec schema it ships, on the files given."""
    exe = clusterkit.VENV_BIN / "check-jsonschema"
    return subprocess.run([str(exe), "--builtin-schema", "vendor.compose-spec", *map(str, paths)],
                          capture_output=True, text=True, timeout=120)


def test_compose_files_follow_the_compose_spec(tmp_path):
    files = []
    for f in COMPOSE_FILES:
        resolved = tmp_path / f.name
        resolved.write_text(interpolate(f.read_text(), filled_env()))  # as compose sees it
        files += [f, resolved]  # and as written, ${...} and all
    r = compose_spec(*files)
    assert r.returncode == 0, r.stdout + r.stderr
    # the validator really checks: a misspelt key and a wrong type are refused, each named
    doc = yaml.safe_load(interpolate(COMPOSE.read_text(), filled_env()))
    bad_key = copy.deepcopy(doc)
    bad_key["services"]["ray-worker"]["shm_sise"] = bad_key["services"]["ray-worker"].pop("shm_size")
    bad_type = copy.deepcopy(doc)
    bad_type["services"]["ray-head"]["volumes"] = "qdsize-data:/data"  # a string where a list belongs
    (tmp_path / "bad-key.yaml").write_text(yaml.safe_dump(bad_key))
    (tmp_path / "bad-type.yaml").write_text(yaml.safe_dump(bad_type))
    r = compose_spec(tmp_path / "bad-key.yaml", tmp_path / "bad-type.yaml")
    assert r.returncode == 1, r.stdout + r.stderr
    errors = r.stdout.splitlines()
    assert any("bad-key.yaml" in e and "'ray-worker'" in e and "shm_sise" in e for e in errors), r.stdout
    assert any("bad-type.yaml" in e and "volumes" in e for e in errors), r.stdout


def test_compose_stack_is_wired_consistently():
    raw = {f: f.read_text() for f in COMPOSE_FILES}
    used = set().union(*(variables_used(t) for t in raw.values()))
    documented = set(env_example())
    assert used <= documented, f"used in compose but not documented in {ENV_EXAMPLE.name}: {used - documented}"
    assert documented <= used, f"documented in {ENV_EXAMPLE.name} but never used: {documented - used}"
    for secret in ("RAY_AUTH_TOKEN", "POSTGRES_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY"):
        assert env_example()[secret] == "", f"{secret}: .env.example must not ship a secret"
        assert f"${{{secret}:?" in raw[COMPOSE], f"{secret}: compose must refuse to start without it"
        with pytest.raises(ValueError, match=secret):
            interpolate(raw[COMPOSE], {**filled_env(), secret: ""})
    env = filled_env()
    doc = yaml.safe_load(interpolate(raw[COMPOSE], env))
    svc = doc["services"]
    assert set(svc) == SERVICES

    # images: the project's own is built here; every other one is a maintained image with a pinned tag
    for name, s in svc.items():
        image = s["image"]
        assert ":" in image and not image.endswith(":latest"), (name, image)
        if "build" in s:
            assert image == env["QDSIZE_IMAGE"] and s["build"]["dockerfile"] == "docker/Dockerfile", name
        else:
            assert image.startswith(THIRD_PARTY_IMAGES) and re.search(r":\d+(\.\d+)+", image), (name, image)
    # health checks on every long-running service; the bucket step runs once and gates the MLflow server
    for name, s in svc.items():
        if name == "create-bucket":
            assert s["restart"] == "no" and "healthcheck" not in s
            assert s["depends_on"]["objectstore"]["condition"] == "service_healthy"
        else:
            assert s["healthcheck"]["test"], name
    assert svc["mlflow"]["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                           "create-bucket": {"condition": "service_completed_successfully"}}
    assert svc["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    # ray-worker scales with --scale: no fixed name, no published port
    assert "container_name" not in svc["ray-worker"] and "ports" not in svc["ray-worker"]

    # MLflow: PostgreSQL backend, artifacts in the bucket served through the server, allowed hosts set
    cmd = svc["mlflow"]["command"]
    opts = dict(a[2:].split("=", 1) for a in cmd if a.startswith("--") and "=" in a)
    assert cmd[:2] == ["mlflow", "server"] and "--serve-artifacts" in cmd
    assert opts["backend-store-uri"].startswith("postgresql") and "@postgres:5432/" in opts["backend-store-uri"]
    assert env["POSTGRES_PASSWORD"] in opts["backend-store-uri"]
    assert opts["artifacts-destination"].startswith(f"s3://{env['S3_BUCKET']}/")
    allowed = opts["allowed-hosts"].split(",")
    assert {"mlflow:5000", f"localhost:{env['MLFLOW_PORT']}", "127.0.0.1:5000"} <= set(allowed)
    assert svc["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://objectstore:8333"
    identities = json.loads(doc["configs"]["s3-identities"]["content"])["identities"]
    assert identities[0]["credentials"] == [{"accessKey": env["S3_ACCESS_KEY"], "secretKey": env["S3_SECRET_KEY"]}]
    for name in ("mlflow", "create-bucket"):
        e = svc[name]["environment"]
        assert (e["AWS_ACCESS_KEY_ID"], e["AWS_SECRET_ACCESS_KEY"]) == (env["S3_ACCESS_KEY"], env["S3_SECRET_KEY"])

    # Ray: one token on every node, shared memory, the shared volume, and a tracking URI the server accepts
    for name in ("ray-head", "ray-worker"):
        s = svc[name]
        assert s["environment"]["RAY_AUTH_MODE"] == "token", name
        assert s["environment"]["RAY_AUTH_TOKEN"] == env["RAY_AUTH_TOKEN"], name
        assert s["shm_size"] == env["RAY_SHM_SIZE"] and "qdsize-data:/data" in s["volumes"], name
        assert s["command"].startswith("ray start") and "--block" in s["command"], name
        tracking = s["environment"]["MLFLOW_TRACKING_URI"]
        assert tracking.split("://", 1)[1] in allowed, (name, tracking)
    assert "--head" in svc["ray-head"]["command"] and "--dashboard-host=0.0.0.0" in svc["ray-head"]["command"]
    assert "--address=ray-head:6379" in svc["ray-worker"]["command"]
    published = [p for s in svc.values() for p in s.get("ports", [])]
    assert published and all(p.startswith(f"{env['BIND_ADDRESS']}:") for p in published), published
    assert f"{env['BIND_ADDRESS']}:{env['RAY_DASHBOARD_PORT']}:8265" in svc["ray-head"]["ports"]

    gpu = yaml.safe_load(interpolate(raw[DOCKER / "compose.gpu.yaml"], env))["services"]["ray-worker"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------
def dockerfile_args(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", path.read_text(), re.M))


def test_images_pin_the_cluster_ray_python_and_torch():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    torch_pin = next(d.split("==")[1] for d in project["dependencies"] if d.startswith("torch=="))
    cluster_extra = " ".join(project["optional-dependencies"]["cluster"])
    assert "psycopg2-binary" in cluster_extra and "boto3" in cluster_extra
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    for name, base, index in (("Dockerfile", "python:${PYTHON_VERSION}-slim", "/whl/cpu"),
                              ("Dockerfile.gpu", "nvidia/cuda:", "/whl/cu")):
        path = DOCKER / name
        text, args = path.read_text(), dockerfile_args(path)
        assert args["RAY_VERSION"] == ray.__version__, (name, args["RAY_VERSION"], ray.__version__)
        assert args["PYTHON_VERSION"] == python, (name, args["PYTHON_VERSION"], python)
        assert args["TORCH_VERSION"] == torch_pin, (name, args["TORCH_VERSION"], torch_pin)
        assert index in args["TORCH_INDEX_URL"], (name, args["TORCH_INDEX_URL"])
        assert base in text or base in args.get("CUDA_IMAGE", ""), (name, base)
        assert 'install ".[cluster]" "ray[default,data,tune]==${RAY_VERSION}"' in text, name
        assert re.search(r"^USER 1000:1000$", text, re.M), f"{name}: the nodes run as uid 1000 (ray), not root"
    assert "runtime" in dockerfile_args(DOCKER / "Dockerfile.gpu")["CUDA_IMAGE"]
    # every COPY source of the images is in the build context that .dockerignore leaves
    allowed = {line[1:] for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    for name in ("Dockerfile", "Dockerfile.gpu"):
        for line in re.findall(r"^COPY (?!--from)(.+)$", (DOCKER / name).read_text(), re.M):
            for src in line.split()[:-1]:
                assert src in allowed, f"{name}: COPY {src} is excluded by .dockerignore"


def hadolint(*paths: Path) -> subprocess.CompletedProcess:
    """hadolint (the Dockerfile linter) on the files given; warnings fail.

    Ignored: DL3008 (apt package versions: Debian security updates replace them) and DL3013 (pip versions: the
    images install the project itself and pin Ray and torch by build argument).
    """
    exe = clusterkit.VENV_BIN / "hadolint"
    return subprocess.run([str(exe), "--no-color", "--failure-threshold", "warning", "--ignore", "DL3008",
                           "--ignore", "DL3013", *map(str, paths)], capture_output=True, text=True, timeout=120)


def test_dockerfiles_pass_hadolint(tmp_path):
    r = hadolint(DOCKER / "Dockerfile", DOCKER / "Dockerfile.gpu")
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /opt && pip install --no-cache-dir .\n")
    r = hadolint(bad)
    assert r.returncode == 1 and "DL3007" in r.stdout and "DL3003" in r.stdout, r.stdout + r.stderr


# ----------------------------------------------------------------------------------------------------------------
# KubeRay RayJob: RayJob fields against tests/schemas/rayjob-v1.schema.json, every Kubernetes core type (pod templates,
# the PVC) against the official Kubernetes OpenAPI schemas of kubernetes-validate, strict (unknown fields refused)
# ----------------------------------------------------------------------------------------------------------------
def k8s_validator():
    """A validator for the RayJob schema whose core-type $refs resolve into kubernetes-validate's definitions."""
    import importlib.resources

    import kubernetes_validate.utils as kv
    from referencing import Registry, Resource

    folder = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    defs = json.loads((folder / f"v{kv.latest_version()}-local-strict" / "_definitions.json").read_text())
    registry = Registry().with_resource(defs["$id"], Resource.from_contents(defs))
    schema = json.loads(RAYJOB_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate_k8s(doc: dict, validator) -> None:
    import kubernetes_validate.utils as kv

    if doc["kind"] == "RayJob":
        validator.validate(doc)
    else:
        kv.validate(doc, kv.latest_version(), strict=True)


def test_kuberay_rayjob_manifest_validates(tmp_path):
    import kubernetes_validate.utils as kv

    docs = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d]
    assert sorted(d["kind"] for d in docs) == ["PersistentVolumeClaim", "RayJob"]
    validator = k8s_validator()
    for d in docs:
        validate_k8s(d, validator)
    job = next(d for d in docs if d["kind"] == "RayJob")
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    spec, cluster = job["spec"], job["spec"]["rayClusterSpec"]
    entry = spec["entrypoint"]
    assert entry.index("qdsize simulate conf/dataset/") < entry.index("qdsize sweep conf/sweep/")
    assert '--tracking-uri "$MLFLOW_TRACKING_URI"' in entry
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert re.fullmatch(r"https?://[^/]+(:\d+)?/?", runtime_env["MLFLOW_TRACKING_URI"])
    assert "localhost" not in runtime_env["MLFLOW_TRACKING_URI"]  # an external server, not one in the pod
    assert cluster["rayVersion"] == ray.__version__ == dockerfile_args(DOCKER / "Dockerfile")["RAY_VERSION"]
    assert cluster["authOptions"] == {"mode": "token"}
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
                  if "persistentVolumeClaim" in v}
        assert claims == {pvc["metadata"]["name"]}
        c = pod["spec"]["containers"][0]
        assert {m["mountPath"] for m in c["volumeMounts"]} == {"/data", "/dev/shm"}
        assert {"name": "QDSIZE_HOME", "value": "/data/qdsize"} in c["env"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]

    # the validation really checks, down to the pod templates: each mistake is refused, naming the field
    def broken(edit):
        d = copy.deepcopy(job)
        edit(d)
        return d

    head_container = lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]  # noqa: E731
    mistakes = {
        "imagePullPolicyy": broken(lambda d: head_container(d).update(imagePullPolicyy="Always")),
        "shutdownAfterJobFinish": broken(lambda d: d["spec"].update(shutdownAfterJobFinish=True)),
        "replicas": broken(lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas="4")),
        "mode": broken(lambda d: d["spec"]["rayClusterSpec"]["authOptions"].update(mode="tokens")),
        "claimName": broken(lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"][0]
                            ["persistentVolumeClaim"].update(claimName=3)),
    }
    for needle, bad in mistakes.items():
        errors = list(validator.iter_errors(bad))
        assert errors, f"{needle}: accepted"
        assert any(needle in (str(e.message) + " ".join(map(str, e.path)) + str(list(e.context))) for e in errors), (
            needle, [e.message for e in errors])
    bad_pvc = copy.deepcopy(pvc)
    bad_pvc["spec"]["acessModes"] = bad_pvc["spec"].pop("accessModes")
    with pytest.raises(kv.ValidationError, match="acessModes"):
        validate_k8s(bad_pvc, validator)


# ----------------------------------------------------------------------------------------------------------------
# The topology without containers: PostgreSQL on 127.0.0.1, `mlflow server` on it (artifacts served through the
# server), a two-node Ray cluster with token authentication (the second node in a network namespace of this test)
# ----------------------------------------------------------------------------------------------------------------
ROOT_IP, NODE_IP = "10.214.0.1", "10.214.0.2"


def write_dataset_config(path: Path) -> None:
    """The smoke dataset, smaller: 240 patterns, 9 shards over every split (frozen benchmark split included)."""
    data = yaml.safe_load(SMOKE.read_text())
    d = data["dataset"]
    d.update(name="scaleout", samples=240, shard_size=40)
    d["q"]["step_inv_angstrom"] = 0.02
    path.write_text(yaml.safe_dump(data))


def write_sweep_config(folder: Path, dataset: Path) -> Path:
    """Two trials of one epoch, one CPU each: one trial per node, both trained to the end.

    grace_period 2 puts ASHA's only rung at max_t (the epoch's report is iteration 1, the final one 2), so neither
    trial can be stopped early and the count of finished trials is deterministic.
    """
    train = {"train": {"dataset": str(dataset), "epochs": 1, "batch_size": 64, "patience": 2, "seed": 0,
                       "model": {"channels": [12, 24, 32], "kernels": [9, 5, 3], "strides": [4, 4, 2],
                                 "dropout": 0.0, "norm": "batch"},
                       "augment": {"preset": "default"}, "max_val_rows": 200}}
    (folder / "train.yaml").write_text(yaml.safe_dump(train))
    sweep = {"sweep": {"name": "scaleout", "train": str(folder / "train.yaml"), "trials": 2, "max_concurrent": 2,
                       "cpus_per_trial": 1, "max_epochs": 1, "grace_period": 2, "reduction_factor": 2,
                       "space": {"lr": {"type": "float", "low": 0.002, "high": 0.006, "log": True}}}}
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def shard_checksums(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): ds.sha256_file(p) for p in sorted(root.glob("split=*/*.parquet"))}


def query(pg: clusterkit.Postgres, sql: str, *args) -> list[tuple]:
    with contextlib.closing(pg.connect()) as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall()


class Laps:
    """Prints the seconds since the previous lap (shown with -s, and with the output of a failing test)."""

    def __init__(self):
        self.last = time.monotonic()

    def __call__(self, label: str) -> None:
        now = time.monotonic()
        print(f"scale-out: {label}: {now - self.last:.1f} s", flush=True)
        self.last = now


def leftovers(tag: str, markers: list[str], groups: list[int]) -> list[str]:
    """Anything this test started that is still there: processes (Ray, MLflow and its job runners, PostgreSQL) by
    command line or process group, and the network namespace."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        with contextlib.suppress(psutil.Error, OSError):
            if p.info["status"] == psutil.STATUS_ZOMBIE or p.pid == os.getpid():
                continue  # killed, waiting for init to reap it
            cmd = " ".join(p.info["cmdline"] or [])
            if any(m in cmd for m in markers) or os.getpgid(p.pid) in groups:
                found.append(f"pid {p.pid}: {cmd[:120]}")
    if f"{tag}ns" in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout:
        found.append(f"network namespace {tag}ns")
    return found


@pytest.mark.skipif(clusterkit.netns_unavailable() is not None, reason=str(clusterkit.netns_unavailable()))
def test_simulate_and_sweep_on_a_cluster_with_mlflow_on_postgresql(tmp_path):
    tag = f"qs{os.getpid() % 100000}"
    home = tmp_path / "home"
    env = {**clusterkit.ray_env(ROOT_IP, NODE_IP), "QDSIZE_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    artifacts = tmp_path / "mlflow-artifacts"
    markers, groups = [f"qdsize-ray-{tag}", str(artifacts)], []
    lap = Laps()
    try:
        # entered in this order, stopped in the reverse one: Ray, MLflow, the namespace, PostgreSQL
        with contextlib.ExitStack() as stack:
            stack.callback(lap, "postgres stopped")
            pg = stack.enter_context(clusterkit.postgres())
            markers.append(f"port={pg.port} ")
            lap("postgres up")
            stack.callback(lap, "namespace deleted")
            ns = stack.enter_context(clusterkit.netns(tag, ROOT_IP, NODE_IP))
            # the server listens on the veth address: the driver here and trials on both nodes reach it there
            server = LocalServer(pg.uri, artifacts, host=ROOT_IP, log_file=tmp_path / "mlflow-server.log",
                                 timeout_s=240)
            stack.callback(lap, "mlflow server stopped")
            uri = server.start()
            groups.append(server.proc.pid)
            stack.callback(server.stop, 5.0)  # its job runners outlast SIGTERM: no use waiting the default 15 s
            lap("mlflow server up")
            stack.callback(lap, "ray stopped")
            cluster = stack.enter_context(clusterkit.ray_nodes(tag, ns, ROOT_IP, NODE_IP, env, dashboard=True))
            lap("two-node ray up")
            run_everything(tmp_path, home, env, cluster, pg, uri, artifacts, lap)
    finally:
        left = leftovers(tag, markers, groups)
    assert not left, f"left running after the test: {left}"


def submit_job(cmd: list, env: dict, agent_wait_s: float = 120.0) -> subprocess.CompletedProcess:
    """`ray job submit`, again while the head's job agent is still starting: Ray answers "No available agent to
    submit job, please try again later" for a while after the head node is up."""
    t0 = time.monotonic()
    while True:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        if r.returncode == 0 or "No available agent" not in r.stdout + r.stderr or time.monotonic() - t0 > agent_wait_s:
            return r
        time.sleep(3)


def run_everything(tmp_path, home, env, cluster, pg, uri, artifacts, lap):
    # ---- token authentication is enforced on the job API: a wrong token is refused
    ray_bin = str(clusterkit.VENV_BIN / "ray")
    r = subprocess.run([ray_bin, "job", "list", "--address", cluster.dashboard_url], capture_output=True, text=True,
                       timeout=120, env={**env, "RAY_AUTH_TOKEN": "0" * 64})
    assert r.returncode != 0 and "Invalid authentication token" in r.stdout + r.stderr, r.stdout + r.stderr
    lap("wrong token refused")

    # ---- `qdsize simulate`, submitted as a Ray job with a working dir, as the README shows
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    write_dataset_config(job_dir / "dataset.yaml")
    out = tmp_path / "ds"
    r = submit_job([ray_bin, "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(job_dir),
                    "--runtime-env-json", json.dumps({"env_vars": {"QDSIZE_HOME": str(home)}}), "--",
                    "qdsize", "simulate", "dataset.yaml", "--out", str(out), "-q"], env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert "succeeded" in r.stdout.lower(), r.stdout[-2000:]
    manifest = json.loads((out / ds.MANIFEST).read_text())
    assert manifest["status"] == "complete" and len(manifest["shards"]) == 9
    assert {s["node_ip"] for s in manifest["shards"]} == {ROOT_IP, NODE_IP}  # both nodes composed shards
    assert len({s["node_id"] for s in manifest["shards"]}) == 2
    # the same bytes as one process composes without Ray
    from qdsize.platform import config as cf
    from qdsize.platform import simulate as sm

    local = tmp_path / "ds-local"
    old_home = os.environ.get("QDSIZE_HOME")
    os.environ["QDSIZE_HOME"] = str(home)  # the family cache the job filled
    try:
        sm.run(cf.load_dataset_config(job_dir / "dataset.yaml"), local, use_ray=False, quiet=True)
    finally:
        os.environ.pop("QDSIZE_HOME") if old_home is None else os.environ.update(QDSIZE_HOME=old_home)
    assert shard_checksums(out) == shard_checksums(local)
    lap("simulate job")

    # ---- a tiny `qdsize sweep` through --address and --tracking-uri
    sweep_cfg = write_sweep_config(tmp_path, out)
    r = subprocess.run([sys.executable, "-m", "qdsize.platform", "sweep", str(sweep_cfg), "--address",
                        cluster.address, "--tracking-uri", uri], capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    trial_nodes = {json.loads(p.read_text().splitlines()[-1])["node_ip"]
                   for p in (home / "sweeps" / "scaleout" / "tune").glob("*/result.json")}
    assert trial_nodes == {ROOT_IP, NODE_IP}  # trials on both nodes logged to the server
    assert not (home / "mlflow.db").exists()  # nothing went to a local SQLite store
    lap("sweep")

    # ---- runs, metrics, the registered version and the champion alias live in PostgreSQL
    (exp_id, location), = query(pg, "SELECT experiment_id, artifact_location FROM experiments WHERE name = %s",
                                "qdsize-ds")
    assert location.startswith("mlflow-artifacts:"), location  # artifacts go through the server
    runs = dict(query(pg, "SELECT run_uuid, status FROM runs WHERE experiment_id = %s", exp_id))
    (parent,), = query(pg, "SELECT run_uuid FROM tags WHERE key = 'qdsize.kind' AND value = 'sweep'")
    children = {c for (c,) in query(pg, "SELECT run_uuid FROM tags WHERE key = 'mlflow.parentRunId' AND value = %s",
                                    parent)}
    assert runs[parent] == "FINISHED" and len(children) == 2 and children <= set(runs)
    assert {runs[c] for c in children} == {"FINISHED"}  # both trials trained to the end
    scored = {c for (c,) in query(pg, "SELECT DISTINCT run_uuid FROM metrics WHERE key = 'val_loss'")}
    assert children <= scored
    (version,), = query(pg, "SELECT version FROM registered_model_aliases WHERE name = %s AND alias = %s",
                        "qdsize-pbs", "champion")
    (run_id, status), = query(pg, "SELECT run_id, status FROM model_versions WHERE name = %s AND version = %s",
                              "qdsize-pbs", version)
    assert run_id in children and status == "READY"
    assert query(pg, "SELECT value FROM tags WHERE run_uuid = %s AND key = 'qdsize.registered_version'",
                 parent) == [(str(version),)]
    lap("postgres checks")

    # ---- artifacts come back through the server; they are stored in the server's destination, nowhere else
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    assert "sweep/trials.csv" in {a.path for a in client.list_artifacts(parent, "sweep")}
    got = Path(client.download_artifacts(parent, "sweep/trials.csv", str(tmp_path)))
    rows = list(csv.DictReader(got.open()))
    assert {row["run_id"] for row in rows} == children
    stored = list(artifacts.rglob("trials.csv"))
    assert len(stored) == 1 and stored[0].read_bytes() == got.read_bytes()
    assert not (home / "mlartifacts").exists()
    # the champion's model files come through the server too: predict one test pattern with it
    q = ds.q_grid(out)
    pats, _ = ds.load_split(out, "test", columns=[])
    sample = tmp_path / "sample.xy"
    np.savetxt(sample, np.column_stack([q, pats[0]]), header="q_A intensity")
    r = subprocess.run([sys.executable, "-m", "qdsize.platform", "predict", str(sample), "--x-unit", "q_A",
                        "--model", "models:/qdsize-pbs@champion", "--tracking-uri", uri, "--format", "json"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    (pred,) = json.loads(r.stdout)
    assert pred["model_uri"] == "models:/qdsize-pbs@champion" and np.isfinite(pred["mean_diameter_nm"])
    lap("artifacts and predict")
