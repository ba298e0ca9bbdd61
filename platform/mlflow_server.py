"""A local `mlflow server` (127.0.0.1 unless told otherwise) over a backend store, for concurrent writers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from qdsize.sim.errors import InputError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalServer:
    """Start with `with LocalServer(backend_uri, artifacts_dir) as uri:`; the process is always stopped.

    Artifacts are served through the server (`--serve-artifacts`) from `artifacts_dir`; `host` is the one address
    it listens on and the only Host header it accepts (with `localhost` when that address is loopback).
    """

    def __init__(self, backend_store_uri: str, artifacts_dir: str | Path, port: int | None = None,
                 log_file: str | Path | None = None, timeout_s: float = 90.0, host: str = "127.0.0.1"):
        self.backend = backend_store_uri
        self.artifacts = Path(artifacts_dir).resolve()
        self.host = host
        self.port = port or free_port(host)
        self.log_file = Path(log_file) if log_file else self.artifacts.parent / "mlflow-server.log"
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None
        self._stopped = False

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    def allowed_hosts(self) -> str:
        hosts = [self.host] + (["localhost"] if self.host == "127.0.0.1" else [])
        return ",".join(f"{h}:{self.port}" for h in hosts)

    def start(self) -> str:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend,
               "--artifacts-destination", self.artifacts.as_uri(), "--serve-artifacts",
               "--host", self.host, "--port", str(self.port), "--workers", "1",
               "--allowed-hosts", self.allowed_hosts()]
        env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
        env.pop("MLFLOW_TRACKING_URI")
        # no job runners (huey workers for MLflow's GenAI jobs, which nothing here submits): a faster start, fewer
        # processes; a user who wants them sets the variable to true
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        self._log = open(self.log_file, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise InputError(f"mlflow server: exited with code {self.proc.returncode}; see {self.log_file}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self.uri
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise InputError(f"mlflow server: no answer on {self.uri} within {self.timeout_s:.0f} s; see {self.log_file}")

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to the server's process group, then SIGKILL to whatever is left of it (its job runners too)."""
        if self.proc is not None and not self._stopped:
            import signal

            self._stopped = True
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                    self.proc.wait(timeout=grace_s)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
