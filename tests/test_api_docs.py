"""docs/API.md covers the public API and is current; public layers document their shapes."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import tomllib

import flax.linen as nn
import pytest

import dsc_jax
from tests._train_utils import REPO

SHAPE = re.compile(r"\[(\.\.\.|B)[^\]]*\]")  # an input/output shape like [..., d] or [B, T]


def gen_api():
    spec = importlib.util.spec_from_file_location("gen_api", REPO / "docs" / "gen_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def public_names():
    for module_name in gen_api().MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            yield module_name, name, getattr(module, name)


def test_api_md_is_current():
    text = (REPO / "docs" / "API.md").read_text()
    assert text == gen_api().render(), "docs/API.md is stale: run python docs/gen_api.py"


@pytest.mark.parametrize("module_name", ["dsc_jax", "dsc_jax.layers", "dsc_jax.models"])
def test_every_public_name_is_documented(module_name):
    text = (REPO / "docs" / "API.md").read_text()
    module = importlib.import_module(module_name)
    missing = [n for n in module.__all__ if f"### `{module_name}.{n}`" not in text]
    assert not missing, f"not in docs/API.md: {missing}"


def test_every_public_name_has_a_docstring():
    api = gen_api()
    undocumented = []
    for module_name, name, obj in public_names():
        kind = api.kind_of(obj)
        doc = api.constant_doc(name) if kind == "constant" else inspect.getdoc(obj)
        if not (doc or "").strip():
            undocumented.append(f"{module_name}.{name}")
    assert not undocumented


def test_layers_and_models_document_shapes_and_an_example():
    bad = []
    for module_name, name, obj in public_names():
        if inspect.isclass(obj) and issubclass(obj, nn.Module):
            doc = inspect.getdoc(obj) or ""
            if not (SHAPE.search(doc) and "Example" in doc):
                bad.append(f"{module_name}.{name}")
    assert not bad, f"class docstrings without an input/output shape and an example: {bad}"


def test_package_version_has_one_source():
    """``pyproject.toml`` reads its version from ``dsc_jax.__version__`` (no second copy)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"], "pyproject.toml repeats the version"
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "dsc_jax.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", dsc_jax.__version__)


@pytest.mark.slow  # spawns a process
def test_import_does_not_load_orbax():
    """``import dsc_jax`` leaves orbax (checkpoint loading only) unimported."""
    code = "import sys, dsc_jax; print(sorted(m for m in sys.modules if m.startswith('orbax')))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert result.stdout.strip() == "[]", result.stdout
