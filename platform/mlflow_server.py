"""A local `mlflow server` on 127.0.0.1 over the workspace SQLite store, for concurrent writers (sweeps, tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from qdsize.sim.errors import InputError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """Start with `with LocalServer(backend_uri, artifacts_dir) as uri:`; the process is always stopped."""

    def __init__(self, backend_store_uri: str, artifacts_dir: str | Path, port: int | None = None,
                 log_file: str | Path | None = None, timeout_s: float = 90.0):
        self.backend = backend_store_uri
        self.artifacts = Path(artifacts_dir).resolve()
        self.port = port or free_port()
        self.log_file = Path(log_file) if log_file else self.artifacts.parent / "mlflow-server.log"
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> str:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend,
               "--artifacts-destination", self.artifacts.as_uri(), "--serve-artifacts",
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--allowed-hosts", f"127.0.0.1:{self.port},localhost:{self.port}"]
        env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
        env.pop("MLFLOW_TRACKING_URI")
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

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            import signal

            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
