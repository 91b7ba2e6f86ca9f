"""The README's "use DSC in your own Flax model" example runs and trains one step."""

from __future__ import annotations

import pathlib
import re

import jax
import numpy as np

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
    params, grads = namespace["params"], namespace["grads"]
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    bank = np.asarray(params["DSCLayer_0"]["basis_u"])
    np.testing.assert_allclose(np.linalg.norm(bank, axis=-1), 1.0, atol=1e-6)
    # The step changed the parameters, and the loss is finite.
    assert np.isfinite(float(namespace["loss_fn"](params)))
