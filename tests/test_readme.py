"""The README's "Use DSC in your own Flax model" examples (Linen and NNX) run and train, and
every test the README and docs/ cite exists."""

from __future__ import annotations

import pathlib
import re

import jax
import numpy as np

import dsc_jax

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"
#: The pages that cite tests as covering something.
DOCS = [README, *sorted((REPO / "docs").glob("*.md")), REPO / "results" / "README.md"]


def _example_code(heading: str = "## Use DSC in your own Flax model") -> str:
    """The first Python block after ``heading`` in the README."""
    text = README.read_text()
    section = text.split(f"\n{heading}\n", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert match, f"README example block under {heading!r} missing"
    return match.group(1)


def test_readme_example_trains_one_step():
    namespace: dict = {}
    exec(compile(_example_code(), str(README), "exec"), namespace)
    params, new_params, grads = namespace["params"], namespace["new_params"], namespace["grads"]
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    # The step moved every parameter of the DSC layer (its router, bank, static FFN, gamma) ...
    before, after = params["DSCLayer_0"], new_params["DSCLayer_0"]
    for path, old in jax.tree_util.tree_leaves_with_path(before):
        moved = not np.array_equal(np.asarray(old), np.asarray(_at(after, path)))
        assert moved, jax.tree_util.keystr(path)
    # ... kept the bank rows at norm bank_radius (bank_retraction), and lowered the loss.
    for name in ("basis_u", "basis_v"):
        norms = np.linalg.norm(np.asarray(after[name], np.float64), axis=-1)
        np.testing.assert_allclose(norms, dsc_jax.bank.DEFAULT_BANK_RADIUS, rtol=1e-6)
    assert float(namespace["loss_fn"](new_params)) < float(namespace["loss_fn"](params))


def test_readme_nnx_example_trains():
    namespace: dict = {}
    exec(compile(_example_code("### Flax NNX"), str(README), "exec"), namespace)
    first, second = float(namespace["first"]), float(namespace["second"])
    assert np.isfinite(first) and second < first  # the two steps lowered the loss
    bank = np.asarray(namespace["model"].ffn.basis_u[...], np.float64)
    norms = np.linalg.norm(bank, axis=-1)  # bank_retraction kept the rows at bank_radius
    np.testing.assert_allclose(norms, dsc_jax.bank.DEFAULT_BANK_RADIUS, rtol=1e-6)


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_every_test_the_docs_name_exists():
    """Each ``tests/<file>.py::<test>`` (and the ``::<test>`` after it in the same line) that
    the README or a page of docs/ cites as covering something is a test function in that file."""
    import ast

    missing = []
    cited = 0
    lines = [line for page in DOCS for line in page.read_text().splitlines()]
    for line in lines:
        current = None
        for file, name in re.findall(r"`(tests/\w+\.py)?(?:::(\w+))?[^`]*`", line):
            if file:
                current = file
            if not name or current is None:
                continue
            cited += 1
            tree = ast.parse((REPO / current).read_text())
            names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
            if name not in names:
                missing.append(f"{current}::{name}")
    assert not missing, missing
    assert cited >= 20  # the coverage tables of docs/layers.md and docs/sharding.md
