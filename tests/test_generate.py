"""Generation with the key/value cache, load_model and the dsc-sample CLI."""

from __future__ import annotations

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dsc_jax.generate import SamplingConfig, generate, sample_logits, sample_text
from dsc_jax.layers.configs import DenseConfig, DSCConfig, MoEConfig, MoLoRAConfig
from dsc_jax.loading import RunNotFoundError, load_model
from dsc_jax.models.gpt import GPT, GPTConfig, init_cache
from dsc_jax.sample_cli import sample_main
from tests._train_utils import load_config

pytestmark = pytest.mark.usefixtures("fast_compiles")

FFNS = {
    "dense": DenseConfig(hidden_dim=32),
    "moe": MoEConfig(num_experts=4, top_k=2, hidden_dim=16),
    "molora": MoLoRAConfig(num_experts=4, rank=4, top_k=2, hidden_dim=32),
    "dsc": DSCConfig(num_bases=16, top_k=2, hidden_dim=32),
}
GREEDY = SamplingConfig(max_new_tokens=6, temperature=0.0)


def tiny(kind: str = "dsc", **overrides) -> GPTConfig:
    fields = dict(vocab_size=64, max_seq_len=16, num_layers=2, num_heads=2, d_model=32)
    return GPTConfig(**{**fields, "ffn": FFNS[kind], **overrides})


@functools.cache
def init_params(cfg: GPTConfig):
    tokens = jnp.zeros((1, cfg.max_seq_len), jnp.int32)
    return jax.jit(lambda: nn.unbox(GPT(cfg).init(jax.random.key(0), tokens)["params"]))()


def greedy_by_recompute(cfg, params, prompt, steps):
    """Greedy continuation recomputing the whole sequence every step (no cache): one
    compiled forward over a padded ``[B, max_seq_len]`` buffer (causal: padding is unseen)."""
    forward = jax.jit(lambda p, t: GPT(cfg).apply({"params": p}, t))
    batch, length = prompt.shape
    buffer = np.zeros((batch, cfg.max_seq_len), np.int32)
    buffer[:, :length] = prompt
    for t in range(length, length + steps):
        buffer[:, t] = np.argmax(np.asarray(forward(params, buffer))[:, t - 1], axis=-1)
    return buffer[:, : length + steps]


@pytest.mark.parametrize(
    "kind, overrides",
    [(k, {}) for k in FFNS]
    + [
        ("dsc", {"scan_layers": True, "remat": "full"}),
        ("dsc", {"attention": "xla", "attention_dropout": False}),  # cache mask, fused path
    ],
)
def test_greedy_with_cache_equals_recompute(kind, overrides):
    cfg = tiny(kind, **overrides)
    params = init_params(cfg)
    prompt = np.asarray(jax.random.randint(jax.random.key(1), (2, 5), 0, 64), np.int32)
    result = generate(cfg, params, prompt, GREEDY)
    assert result.tokens.shape == (2, 11)
    np.testing.assert_array_equal(result.tokens[:, :5], prompt)
    np.testing.assert_array_equal(result.tokens, greedy_by_recompute(cfg, params, prompt, 6))
    assert result.tokens_per_s > 0


def test_cached_logits_match_full_forward():
    """Prefill 4 tokens then 3 single steps: logits equal the full forward's (float32)."""
    cfg = tiny("moe")
    params, model = init_params(cfg), GPT(cfg)
    tokens = jax.random.randint(jax.random.key(2), (2, 7), 0, 64)
    full = jax.jit(model.apply)({"params": params}, tokens)
    step = jax.jit(
        lambda c, t: model.apply({"params": params, "cache": c}, t, decode=True, mutable=["cache"])
    )
    cache = init_cache(cfg, 2)
    outs = []
    for lo, hi in ((0, 4), (4, 5), (5, 6), (6, 7)):
        logits, v = step(cache, tokens[:, lo:hi])
        outs.append(logits)
        cache = v["cache"]
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=0, atol=1e-5)
    assert int(cache["position"]) == 7


def test_sampling_deterministic_per_seed_and_top_k_one_is_greedy():
    cfg = tiny("dense")
    params = init_params(cfg)
    prompt = np.array([[1, 2, 3]] * 3, np.int32)
    hot = SamplingConfig(max_new_tokens=6, temperature=5.0, top_p=0.95)
    a = generate(cfg, params, prompt, hot, seed=3).tokens
    b = generate(cfg, params, prompt, hot, seed=3).tokens
    c = generate(cfg, params, prompt, hot, seed=4).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[0], a[1])  # rows draw independently
    one = SamplingConfig(max_new_tokens=6, temperature=5.0, top_k=1, top_p=0.95)
    np.testing.assert_array_equal(
        generate(cfg, params, prompt, one, seed=9).tokens,
        generate(cfg, params, prompt, GREEDY).tokens,
    )
    assert a[:, 3:].max() >= 10  # hot sampling reaches the whole vocabulary ...
    limited = generate(cfg, params, prompt, hot, seed=3, vocab_limit=10).new_tokens
    assert limited.max() < 10  # ... unless limited


def test_sample_logits_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    draw = jax.vmap(lambda k, s: sample_logits(logits, k, s)[0], in_axes=(0, None))
    nucleus = np.asarray(draw(keys, SamplingConfig(1, temperature=1.0, top_p=0.7)))
    assert set(nucleus.tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    top2 = np.asarray(draw(keys, SamplingConfig(1, temperature=1.0, top_k=2)))
    assert set(top2.tolist()) == {0, 1}
    every = np.asarray(draw(keys, SamplingConfig(1, temperature=1.0)))
    assert set(every.tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_divides_the_logits(temperature):
    """Draws equal ``categorical(key, logits / T)`` key by key, and their frequencies are
    ``p^(1/T)`` normalised (4,000 draws, ±0.03: about 4 standard errors)."""
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
    keys = jax.random.split(jax.random.key(1), 4000)
    sampling = SamplingConfig(1, temperature=temperature)
    draws = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, sampling)[0])(keys))
    want = np.asarray(jax.vmap(lambda k: jax.random.categorical(k, logits[0] / temperature))(keys))
    np.testing.assert_array_equal(draws, want)
    expected = probs ** (1 / temperature) / np.sum(probs ** (1 / temperature))
    frequencies = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(frequencies, expected, atol=0.03)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": 0, "top_k": 5}, "top_k=5 has no effect with temperature=0"),
        ({"temperature": 0.0, "top_p": 0.9}, "top_p=0.9 has no effect with temperature=0"),
    ],
)
def test_bad_sampling_values_raise(fields, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**fields)


def test_sample_cli_refuses_a_seed_greedy_decoding_ignores():
    from absl import flags

    from dsc_jax import sample_cli

    values = flags.FlagValues()
    sample_cli.define_flags(values)
    values(["dsc-sample", "--workdir=/x", "--temperature=0", "--seed=3"])
    with pytest.raises(ValueError, match="--seed=3 has no effect with --temperature=0"):
        sample_cli.check_flags(values)
    values = flags.FlagValues()
    sample_cli.define_flags(values)
    values(["dsc-sample", "--workdir=/x", "--temperature=0"])
    sample_cli.check_flags(values)  # greedy without a seed
    values = flags.FlagValues()
    sample_cli.define_flags(values)
    values(["dsc-sample", "--workdir=/x", "--seed=3"])
    sample_cli.check_flags(values)  # sampling with a seed


def test_prompt_errors():
    cfg = tiny("dense")
    params = init_params(cfg)
    with pytest.raises(ValueError, match="at most 15"):
        generate(cfg, params, np.zeros((1, 16), np.int32), GREEDY)
    with pytest.raises(ValueError, match="max_new_tokens <= 4"):
        generate(cfg, params, np.zeros((1, 12), np.int32), GREEDY)
    with pytest.raises(ValueError, match="empty"):
        generate(cfg, params, np.zeros((1, 0), np.int32), GREEDY)
    # max_new_tokens=None fills the context
    filled = generate(cfg, params, np.zeros((1, 12), np.int32), SamplingConfig(temperature=0))
    assert filled.tokens.shape == (1, 16)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """configs/tiny.py trained 2 steps by the trainer (one checkpoint at step 2)."""
    from dsc_jax.train.trainer import train_and_evaluate

    workdir = tmp_path_factory.mktemp("tiny_run")
    config = load_config("tiny")
    config.num_train_steps = 2
    config.optim.warmup_steps = 1
    config.eval_batches = 0
    config.checkpoint_every_steps = 0
    config.async_checkpointing = False
    config.data.embedded_max_bytes = 50_000
    train_and_evaluate(config, str(workdir))
    return workdir


@pytest.mark.slow  # trains through the trainer (trained_run)
@pytest.mark.filterwarnings("ignore:Sharding info not provided")
def test_load_model_matches_trainer_params(trained_run):
    loaded = load_model(str(trained_run))
    config, params, tokenizer = loaded
    assert loaded.step == 2 and tokenizer.name == "byte"
    assert config == GPTConfig.from_dict(
        json.loads((trained_run / "config.json").read_text())["model"]
    )
    with ocp.PyTreeCheckpointer() as checkpointer:  # everything the trainer saved
        saved = checkpointer.restore(str(trained_run / "checkpoints" / "2" / "state"))
    assert set(saved) == {"step", "params", "opt_state", "rng"}
    jax.tree.map(np.testing.assert_array_equal, params, saved["params"])
    tokens = jnp.asarray(tokenizer.encode("def f(x):\n    return x"), jnp.int32)[None]
    forward = jax.jit(lambda p: GPT(config).apply({"params": p}, tokens))
    np.testing.assert_array_equal(forward(params), forward(saved["params"]))


@pytest.mark.slow  # trains through the trainer (trained_run)
def test_sample_cli_prints_text(trained_run, capsys):
    texts = sample_main(str(trained_run), "def ", max_new_tokens=8, num_samples=2, seed=1)
    out, err = capsys.readouterr()
    assert len(texts) == 2 and all(t in out for t in texts) and out.count("def ") == 2
    assert "tokens/s" in err
    again = sample_text(
        *load_model(str(trained_run)), "def ", SamplingConfig(8), num_samples=2, seed=1
    )[0]
    assert again == texts


@pytest.mark.slow  # trains through the trainer (trained_run)
def test_bad_workdirs(tmp_path, trained_run):
    with pytest.raises(RunNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(RunNotFoundError, match="not a dsc_jax training run"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text('{"something": "else"}')
    with pytest.raises(RunNotFoundError, match="not a dsc_jax run config"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text((trained_run / "config.json").read_text())
    with pytest.raises(RunNotFoundError, match="no finished checkpoint"):
        load_model(str(tmp_path))
    with pytest.raises(RunNotFoundError, match="no checkpoint 7"):
        load_model(str(trained_run), step=7)
    with pytest.raises(ValueError, match="top_p"):
        sample_main(str(trained_run), "x", top_p=2.0)
