"""Golden one-step tests, one per FFN kind (DSC also on its gather path, flat and product-key
router): the loss, the weighted regulariser terms and
parameter checksums after one optimiser step at a fixed seed (the trainer's own step, optimiser
and bank projection). Any change in the math shows here; a deliberate change regenerates them:

    python -m tests.test_golden --update

and the diff of ``tests/golden/one_step.json`` goes into the commit that changed the math.
Tolerance: rtol 1e-4 (float32 on CPU; a reordered reduction moves the last bits only).

Also trains the MoE, MoLoRA and Dense GPTs through the trainer (the other trainer tests use
DSC): the loss falls and every kind's metrics are written.
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsc_jax import GPT, DenseConfig, DSCConfig, GPTConfig, LossWeights, MoEConfig, MoLoRAConfig
from dsc_jax.train.optim import default_optim_config, make_optimizer
from dsc_jax.train.state import TrainState
from dsc_jax.train.steps import train_step

GOLDEN = pathlib.Path(__file__).with_name("golden") / "one_step.json"
FFNS = {
    # M > d so the frame loss is non-zero; μ = 2 > mean S so the budget loss is too.
    "dsc": DSCConfig(num_bases=48, top_k=2, hidden_dim=32, budget_target=2.0),
    # The gather path (custom JVPs, what compute="auto" picks for M > 32·K) inside the step:
    # M=48 <= N·K normalises the whole bank; the product-key bank M=256 > N·K = 128 only the
    # gathered rows (N = 64 tokens per micro-batch).
    "dsc_gather": DSCConfig(
        num_bases=48, top_k=2, hidden_dim=32, budget_target=2.0, compute="gather"
    ),
    "dsc_product_key_gather": DSCConfig(
        num_bases=256,
        top_k=2,
        hidden_dim=32,
        budget_target=2.0,
        compute="gather",
        router="product_key",
    ),
    "moe": MoEConfig(num_experts=4, top_k=2, hidden_dim=16),
    "molora": MoLoRAConfig(num_experts=4, rank=4, top_k=2, hidden_dim=32),
    "dense": DenseConfig(hidden_dim=64),
}
RTOL = 1e-4


def one_step(kind: str) -> dict[str, float]:
    """Init, one train step (dropout on, micro-batches 2), and summary numbers."""
    cfg = GPTConfig(
        vocab_size=64, max_seq_len=16, num_layers=2, num_heads=2, d_model=32, ffn=FFNS[kind]
    )
    model = GPT(cfg)
    batch = jax.random.randint(jax.random.key(0), (4, 17), 0, 64, jnp.int32)
    params = nn.unbox(model.init(jax.random.key(1), batch[:, :-1])["params"])
    optim = default_optim_config()
    optim.warmup_steps = 0
    optim.learning_rate = 1e-2
    tx, schedule = make_optimizer(optim, num_train_steps=10, router_lr_multiplier=5.0)
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    step = jax.jit(
        functools.partial(
            train_step, loss_weights=LossWeights(), micro_batches=2, lr_schedule=schedule
        )
    )
    state, metrics = step(state, batch, jax.random.key(2))
    out = {key: float(value) for key, value in metrics.items() if key != "lr"}
    leaves = jax.tree_util.tree_leaves_with_path(state.params)
    for path, leaf in leaves:
        name = "/".join(str(k.key) for k in path)
        if "block_1" in name or name.startswith(("wte", "ln_f")):
            out[f"abs_sum/{name}"] = float(np.sum(np.abs(np.asarray(leaf, np.float64))))
    return out


@pytest.mark.parametrize("kind", list(FFNS))
def test_one_step_matches_golden(kind):
    golden = json.loads(GOLDEN.read_text())[kind]
    got = one_step(kind)
    assert sorted(got) == sorted(golden), set(got) ^ set(golden)
    bad = {
        key: (got[key], want)
        for key, want in golden.items()
        if not np.isclose(got[key], want, rtol=RTOL, atol=1e-7)
    }
    assert not bad, f"{kind}: values moved from the golden ones: {bad}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["moe", "molora", "dense"])
def test_trainer_trains_every_ffn_kind(kind, tmp_path):
    from dsc_jax.train.metrics import read_metrics
    from dsc_jax.train.trainer import train_and_evaluate
    from tests._train_utils import load_config

    config = load_config("tiny", kind)  # moe 4/2/16, molora 4/4/2/32, dense 64
    config.num_train_steps = 16
    config.eval_every_steps = 16
    config.log_every_steps = 1
    config.checkpoint_every_steps = 0
    config.compilation_cache_dir = str(tmp_path / "cache")
    result = train_and_evaluate(config, str(tmp_path / "run"))
    assert result["status"] == "completed"
    records = read_metrics(str(tmp_path / "run"))
    assert records[-1]["train_loss"] < records[0]["train_loss"] - 0.3
    assert "eval_loss" in records[-1]
    routed = [k for k in records[-1] if k.startswith("diag/") and k.endswith("/used_frac")]
    assert bool(routed) == (kind != "dense"), records[-1].keys()
    if kind != "dense":
        assert records[0]["reg_aux"] > 0 and records[0]["reg_z"] > 0


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({kind: one_step(kind) for kind in FFNS}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
