"""Generate text from a checkpoint that ``configs/default.py`` wrote, in your own script.

    python train.py --config=configs/default.py --workdir=runs/default   # once
    python examples/generate_text.py --workdir=runs/default --prompt="def "

With ``--train_steps=N`` the example first trains the default config for ``N`` steps into
``--workdir`` itself (what ``train.py`` does), so it also runs from scratch. Loading needs
neither the trainer nor the optimiser: :func:`dsc_jax.loading.load_model` reads
``config.json`` and the newest checkpoint's parameters, and :func:`dsc_jax.generate.sample_text`
samples with a key/value cache.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
from collections.abc import Sequence

from dsc_jax.generate import SamplingConfig, sample_text
from dsc_jax.loading import load_model

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"


def train_default(workdir: str, steps: int, max_bytes: int | None = None) -> None:
    """Train ``configs/default.py`` for ``steps`` steps into ``workdir`` (resumes if there)."""
    from dsc_jax.train.trainer import train_and_evaluate

    spec = importlib.util.spec_from_file_location("default_config", DEFAULT_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.num_train_steps = steps
    config.optim.warmup_steps = min(config.optim.warmup_steps, steps - 1)
    config.checkpoint_every_steps = 0  # save at the end
    config.eval_batches = 0  # no evaluation: we only want the checkpoint
    if max_bytes:
        config.data.embedded_max_bytes = max_bytes
    train_and_evaluate(config, workdir)


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Print and return ``--num_samples`` continuations of ``--prompt``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/default")
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--train_steps", type=int, default=0, help="train first (0: no)")
    parser.add_argument("--max_bytes", type=int, default=0, help="corpus slice when training")
    parser.add_argument("--max_new_tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument(
        "--top_p", type=float, default=None, help="nucleus mass (default 0.95; greedy: none)"
    )
    parser.add_argument("--num_samples", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.train_steps:
        train_default(args.workdir, args.train_steps, args.max_bytes or None)
    config, params, tokenizer = load_model(args.workdir)
    print(
        f"loaded {args.workdir}: {config.ffn_kind} GPT, d={config.d_model}, L={config.num_layers}"
    )
    top_p = args.top_p if args.top_p is not None else (0.95 if args.temperature > 0 else 1.0)
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, top_p=top_p)
    texts, result = sample_text(
        config,
        params,
        tokenizer,
        args.prompt,
        sampling,
        num_samples=args.num_samples,
        seed=args.seed,
    )
    for text in texts:
        print("---\n" + args.prompt + text)
    print(f"--- {result.tokens_per_s:.0f} tokens/s (compile {result.compile_s:.1f} s)")
    return texts


if __name__ == "__main__":
    main()
