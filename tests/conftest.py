"""Test setup: 8 fake CPU devices (set before JAX is imported) and shared fixtures."""

import os
import pathlib

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """Path to ../shared/data; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real-text data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="module")
def fast_compiles():
    """Tiny programs: XLA's optimisation passes cost more than they save (restored after).

    Use per module with ``pytestmark = pytest.mark.usefixtures("fast_compiles")``.
    """
    previous = bool(jax.config.values.get("jax_disable_most_optimizations", False))
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)
