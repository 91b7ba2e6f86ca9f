"""docs/API.md covers the public API and is current; public layers document their shapes."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re

import flax.linen as nn
import pytest

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
