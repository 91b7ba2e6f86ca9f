"""Test setup: 8 fake CPU devices (set before JAX is imported) and shared fixtures."""

import os
import pathlib
from collections.abc import Mapping

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
#: What the shared-data tests read from ../shared/data.
SHARED_DATA_ENTRIES = ("tinyshakespeare.txt", "wiki.valid.raw", "wiki.test.raw", "gpt2")
#: Set to 1 (``.ci/run`` does where ../shared/data exists) to fail the shared-data tests
#: instead of skipping them when the folder or one of its entries is missing.
REQUIRE_SHARED_DATA = "DSC_REQUIRE_SHARED_DATA"


def locate_shared_data(folder: pathlib.Path, environ: Mapping[str, str]) -> pathlib.Path:
    """``folder`` when it holds :data:`SHARED_DATA_ENTRIES`; otherwise skip the test, or fail
    it when ``environ[REQUIRE_SHARED_DATA] == "1"`` (a value other than 0 or 1 fails too)."""
    required = environ.get(REQUIRE_SHARED_DATA, "0")
    if required not in ("0", "1"):
        pytest.fail(f"{REQUIRE_SHARED_DATA}={required!r} is invalid; expected 0 or 1.")
    missing = [name for name in SHARED_DATA_ENTRIES if not (folder / name).exists()]
    if not missing:
        return folder
    message = f"real-text data {folder} lacks {', '.join(missing)}"
    if required == "1":
        pytest.fail(f"{message} ({REQUIRE_SHARED_DATA}=1: the shared-data tests must run)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """Path to ../shared/data; skips the test when it is absent (fails it with
    ``DSC_REQUIRE_SHARED_DATA=1``)."""
    return locate_shared_data(SHARED_DATA, os.environ)


@pytest.fixture(scope="module")
def fast_compiles():
    """Tiny programs: XLA's optimisation passes cost more than they save (restored after).

    Use per module with ``pytestmark = pytest.mark.usefixtures("fast_compiles")``.
    """
    previous = bool(jax.config.values.get("jax_disable_most_optimizations", False))
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)
