"""The workspace folder (datasets, caches, tracking store, outputs): $QDSIZE_HOME, else a .qdsize/ folder in the
current folder or one above it, else the per-user data folder (platformdirs)."""

from __future__ import annotations

import os
from pathlib import Path

FOLDER = ".qdsize"
ENV = "QDSIZE_HOME"
HELP = (f"Workspace: ${ENV} if set, else a {FOLDER}/ folder in the current folder or one above it, else the "
        "per-user data folder (`qdsize workspace` says which, and where it looked).")


def user_default() -> Path:
    """The per-user workspace (e.g. ~/.local/share/qdsize on Linux)."""
    import platformdirs

    return Path(platformdirs.user_data_dir("qdsize", appauthor=False))


def locate() -> tuple[Path, str]:
    """(workspace path, how it was found), creating nothing."""
    env = os.environ.get(ENV)
    if env:
        return Path(env).expanduser().resolve(), f"${ENV}"
    cwd = Path.cwd().resolve()
    for folder in (cwd, *cwd.parents):
        if (folder / FOLDER).is_dir():
            return folder / FOLDER, f"{FOLDER}/ found in {folder}"
    return user_default(), f"the per-user default (no ${ENV}, no {FOLDER}/ in {cwd} or above)"


def home(create: bool = True) -> Path:
    """Absolute path of the workspace, created on first use unless `create` is false."""
    p, _ = locate()
    if create:
        p.mkdir(parents=True, exist_ok=True)
        os.environ[ENV] = str(p)  # configs may say ${QDSIZE_HOME}/datasets/...; Ray workers inherit it
    return p
