"""Test hosts of the tests' own (netns + veth, Ray nodes, PostgreSQL), on loopback or our veth, always torn down."""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qdsize.platform.mlflow_server import free_port

VENV_BIN = Path(sys.executable).parent


def netns_unavailable() -> str | None:
    """Why a network namespace with a veth pair cannot be made here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root to create a network namespace and a veth pair"
    if shutil.which("ip") is None:
        return "the `ip` tool (iproute2) is not installed"
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns` is unavailable: {r.stderr.strip()}"
    return None


def run(cmd, env=None, check=True, timeout=180) -> subprocess.CompletedProcess:
    """Run a command; on failure raise with the command line, exit code and both streams."""
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def kill_marked(*markers: str, grace_s: float = 3.0) -> None:
    """Stop exactly the processes whose command line holds one of `markers` (and their children), by pid.

    SIGTERM, then SIGKILL for whatever still runs after `grace_s` (a raylet and its GCS drain for longer than a
    throw-away test cluster is worth).
    """
    import psutil

    procs = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(m in " ".join(p.info["cmdline"] or []) for m in markers):
                procs.append(p)
        except psutil.Error:
            continue
    for p in list(procs):
        try:
            procs.extend(p.children(recursive=True))
        except psutil.Error:
            pass
    procs = list({p.pid: p for p in procs if p.pid != os.getpid()}.values())
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)


def ray_env(*extra_hosts: str) -> dict:
    """Environment for Ray nodes and their clients: token authentication with a fresh token, no loopback-only flag.

    `RAY_AUTH_TOKEN` is set explicitly, so nothing reads or writes `~/.ray/auth_token`; the venv's `bin` comes
    first on PATH so that job entrypoints find `qdsize`; usage statistics and telemetry are off; the test hosts
    bypass any HTTP proxy.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")  # no phoning home
    no_proxy = ",".join(filter(None, [env.get("NO_PROXY", ""), "127.0.0.1", "localhost", *extra_hosts]))
    env["NO_PROXY"] = env["no_proxy"] = no_proxy
    return env


@contextlib.contextmanager
def netns(tag: str, root_ip: str, node_ip: str):
    """A network namespace `<tag>ns` joined to this one by a veth pair: `root_ip` here, `node_ip` inside."""
    ns, veth_root, veth_ns = f"{tag}ns", f"{tag}a", f"{tag}b"
    try:
        run(["ip", "netns", "add", ns])
        run(["ip", "link", "add", veth_root, "type", "veth", "peer", "name", veth_ns])
        run(["ip", "link", "set", veth_ns, "netns", ns])
        run(["ip", "addr", "add", f"{root_ip}/24", "dev", veth_root])
        run(["ip", "link", "set", veth_root, "up"])
        run(["ip", "netns", "exec", ns, "ip", "addr", "add", f"{node_ip}/24", "dev", veth_ns])
        run(["ip", "netns", "exec", ns, "ip", "link", "set", veth_ns, "up"])
        run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"])
        yield ns
    finally:
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        subprocess.run(["ip", "link", "delete", veth_root], capture_output=True)


@dataclass
class RayCluster:
    address: str  # GCS address, for --address
    dashboard_url: str | None  # job submission / dashboard, for `ray job submit --address`
    env: dict  # the environment every client of the cluster needs (token, PATH)
    head_ip: str
    node_ip: str


@contextlib.contextmanager
def ray_nodes(tag: str, ns: str, root_ip: str, node_ip: str, env: dict, head_cpus: int = 1, node_cpus: int = 1,
              dashboard: bool = False):
    """A head on `root_ip` in this namespace and a second node inside the namespace `ns` (on `node_ip`), both with
    `env`. The dashboard (job submission), when asked for, listens on 127.0.0.1 only. Every process is stopped and
    every temporary folder removed at the end.
    """
    base = Path("/tmp") / f"qdsize-ray-{tag}"  # short: Ray's socket paths must stay under 108 characters
    ray_bin = VENV_BIN / "ray"
    try:
        # Ray refuses two components on one port, and two free_port() calls may well return the same one
        port, client, agent_http, agent_grpc, runtime_env, metrics, dport = distinct_free_ports(
            root_ip, root_ip, "127.0.0.1", root_ip, root_ip, root_ip, "127.0.0.1")
        address = f"{root_ip}:{port}"
        head = [ray_bin, "start", "--head", f"--node-ip-address={root_ip}", f"--port={port}",
                f"--num-cpus={head_cpus}", f"--ray-client-server-port={client}",
                f"--temp-dir={base}-head", "--disable-usage-stats",
                # a Ray of the test session may already hold the default agent and metrics ports on this host
                f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}"]
        url = None
        if dashboard:
            head += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dport}"]
            url = f"http://127.0.0.1:{dport}"
        else:
            head += ["--include-dashboard=false"]
        ray_start(head, f"{base}-head", env)
        ray_start(["ip", "netns", "exec", ns, ray_bin, "start", f"--address={address}", f"--node-ip-address={node_ip}",
                   f"--num-cpus={node_cpus}", f"--temp-dir={base}-node", "--disable-usage-stats"], f"{base}-node", env)
        wait_for_nodes(address, env, {root_ip: head_cpus, node_ip: node_cpus})
        yield RayCluster(address, url, env, root_ip, node_ip)
    finally:
        kill_marked(f"{base}-node", f"{base}-head")
        shutil.rmtree(f"{base}-head", ignore_errors=True)
        shutil.rmtree(f"{base}-node", ignore_errors=True)


def distinct_free_ports(*hosts: str) -> list[int]:
    """One free port per host in `hosts`, no two alike (free_port() alone can hand out the same port twice)."""
    ports: list[int] = []
    for host in hosts:
        for _ in range(100):
            port = free_port(host)
            if port not in ports:
                break
        else:
            raise AssertionError(f"no distinct free port on {host} after 100 tries; taken: {ports}")
        ports.append(port)
    return ports


def ray_start(cmd: list, temp_dir: str, env: dict, tries: int = 2) -> None:
    """`ray start`, once more when its raylet did not register in time.

    Ray waits a fixed 30 s for the new raylet to appear in the GCS ("The current node timed out during startup");
    on a busy 2-core machine that can pass while the raylet is still coming up. The half-started node's processes
    (found by their temp dir) are stopped before the next try.
    """
    for attempt in range(tries):
        r = run(cmd, env=env, check=False)
        if r.returncode == 0:
            return
        if "timed out during startup" not in r.stdout + r.stderr or attempt == tries - 1:
            raise AssertionError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        kill_marked(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


WAIT_FOR_NODES = """
import sys, time, ray
pairs = sys.argv[2:-1]
want = dict(zip(pairs[::2], map(float, pairs[1::2])))
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + float(sys.argv[-1])
while True:
    seen = {n["NodeManagerAddress"]: n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]}
    if all(seen.get(ip) == cpus for ip, cpus in want.items()):
        break
    if time.monotonic() > deadline:
        sys.exit(f"nodes alive after {sys.argv[-1]} s: {seen}, wanted {want}")
    time.sleep(0.5)
"""


def wait_for_nodes(address: str, env: dict, cpus_by_ip: dict, timeout_s: float = 120.0) -> None:
    """Return once the cluster's GCS lists every node of `cpus_by_ip` alive with its CPUs.

    `ray start` returns when its raylet runs, which can be seconds before the head's scheduler sees the node; a job
    started in that gap runs on the head alone.
    """
    args = [a for ip, cpus in cpus_by_ip.items() for a in (ip, cpus)]
    run([sys.executable, "-c", WAIT_FOR_NODES, address, *args, timeout_s], env=env, timeout=timeout_s + 60)


# ----------------------------------------------------------------------------------------------------------------
# PostgreSQL from the distribution's packages, on 127.0.0.1, as an unprivileged user
# ----------------------------------------------------------------------------------------------------------------
def postgres_bindir() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres (Debian: /usr/lib/postgresql/<major>/bin), or None."""
    candidates = sorted((p for p in glob.glob("/usr/lib/postgresql/*/bin") if Path(p).parent.name.isdigit()),
                        key=lambda p: int(Path(p).parent.name), reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent))
    for c in candidates:
        if all((Path(c) / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres")):
            return Path(c)
    return None


@dataclass
class Postgres:
    uri: str  # SQLAlchemy URI of the database, for `mlflow server --backend-store-uri`
    host: str
    port: int
    user: str
    password: str
    database: str

    def connect(self):
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                dbname=self.database, connect_timeout=10)


@contextlib.contextmanager
def postgres(database: str = "mlflow", user: str = "qdsize"):
    """A throw-away PostgreSQL cluster on 127.0.0.1 with password authentication and one database; always stopped.

    initdb refuses root: as root the cluster belongs to the `postgres` system user (made by the package).
    """
    bindir = postgres_bindir()
    if bindir is None:
        raise AssertionError("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found under "
                             "/usr/lib/postgresql/*/bin or on PATH: install the distribution's `postgresql` "
                             "package (.ci/run does)")
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:
        import pwd

        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            raise AssertionError("running as root but there is no `postgres` system user to own the cluster: "
                                 "install the distribution's `postgresql` package") from None
        as_user = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="qdsize-pg-"))
    data, password = root / "data", secrets.token_hex(16)
    (root / "pwfile").write_text(password + "\n")
    if owner is not None:
        for p in (root, root / "pwfile"):
            os.chown(p, owner.pw_uid, owner.pw_gid)
    port = free_port("127.0.0.1")
    pg_ctl = [*as_user, bindir / "pg_ctl", "-D", data]
    started = False
    try:
        run([*as_user, bindir / "initdb", "-D", data, "-U", user, f"--pwfile={root / 'pwfile'}",
             "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"], timeout=120)
        opts = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} -c fsync=off"
        started = True
        try:
            run([*pg_ctl, "-l", root / "postgres.log", "-o", opts, "-w", "-t", "60", "start"], timeout=90)
        except AssertionError as exc:
            log = (root / "postgres.log").read_text()[-3000:] if (root / "postgres.log").exists() else ""
            raise AssertionError(f"{exc}\npostgres.log:\n{log}") from None
        pg = Postgres(f"postgresql+psycopg2://{user}:{password}@127.0.0.1:{port}/{database}", "127.0.0.1", port, user,
                      password, database)
        admin = Postgres("", "127.0.0.1", port, user, password, "postgres").connect()
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{database}"')
        admin.close()
        yield pg
    finally:
        if started:
            try:
                stopped = subprocess.run([str(c) for c in [*pg_ctl, "-m", "fast", "-w", "-t", "30", "stop"]],
                                         capture_output=True, text=True, timeout=60).returncode == 0
            except subprocess.TimeoutExpired:
                stopped = False
            if not stopped and (data / "postmaster.pid").exists():
                with contextlib.suppress(ValueError, ProcessLookupError, OSError):
                    os.kill(int((data / "postmaster.pid").read_text().split()[0]), signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
