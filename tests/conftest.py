"""Shared fixtures: one embedded, loopback-only Ray for the whole test session."""

import os

import pytest

# Ray reads this when it is imported: the embedded instance then binds to 127.0.0.1 only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs, no dashboard, bound to loopback; always shut down at the end of the session."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as exc:  # Ray waits 30 s (fixed) for its raylet: one retry on a busy 2-core machine
        if "timed out during startup" not in str(exc):
            raise
        ray.shutdown()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
