"""The README's "use DSC in your own Flax model" example runs and trains one step."""

from __future__ import annotations

import pathlib
import re

import jax
import numpy as np

import dsc_jax

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _example_code() -> str:
    text = README.read_text()
    section = text.split("## Use DSC in your own Flax model", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert match, "README example block missing"
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


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_every_test_the_readme_names_exists():
    """Each ``tests/<file>.py::<test>`` (and the ``::<test>`` after it in the same line) that
    the README cites as covering something is a test function in that file."""
    import ast

    missing = []
    for line in README.read_text().splitlines():
        current = None
        for file, name in re.findall(r"`(tests/\w+\.py)?(?:::(\w+))?[^`]*`", line):
            if file:
                current = file
            if not name or current is None:
                continue
            tree = ast.parse((README.parent / current).read_text())
            names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
            if name not in names:
                missing.append(f"{current}::{name}")
    assert not missing, missing
