"""The local workspace folder ($QDSIZE_HOME, default ./.qdsize): datasets, caches, tracking store, outputs."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """Absolute path of the workspace, created on first use."""
    p = Path(os.environ.get("QDSIZE_HOME", ".qdsize")).expanduser().resolve()
    p.mkdir(parents=True, exist_ok=True)
    os.environ["QDSIZE_HOME"] = str(p)  # configs may say ${QDSIZE_HOME}/datasets/...; Ray workers inherit it
    return p
