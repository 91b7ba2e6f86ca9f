"""Command line: ``dsc-sample`` / ``python sample.py``.

    dsc-sample --workdir=runs/default --prompt="def " [--max_new_tokens=100 --temperature=0.8
               --top_k=0 --top_p=1.0 --seed=0 --num_samples=1]

Loads the newest restorable checkpoint of a training run (:func:`dsc_jax.loading.load_model`,
tokeniser from the run's own config) and prints ``num_samples`` continuations of the prompt,
then one line of timings (compile, prefill, decode tokens/s) on stderr. Errors (missing or
foreign workdir, prompt too long, bad sampling values, a flag greedy decoding would ignore:
``--top_k``/``--top_p``/``--seed`` with ``--temperature=0``, a file that cannot be read) are
one clear message, no traceback; falling back from an unreadable newest checkpoint is one
warning line.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import app, flags, logging

from dsc_jax._logging import QuietLibraries
from dsc_jax.console import SAMPLE_INTERRUPT
from dsc_jax.train.preemption import exit_on_stop_signals

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Define the sampling flags (idempotent)."""
    if "prompt" in flag_values:
        return
    fv = {"flag_values": flag_values}
    if "workdir" not in flag_values:
        flags.DEFINE_string(
            "workdir", None, "Run folder written by train.py (config.json, ...).", **fv
        )
    flags.DEFINE_string("prompt", "", "Text to continue.", **fv)
    flags.DEFINE_integer(
        "max_new_tokens",
        None,
        "Tokens to generate (default: the rest of the model's context).",
        **fv,
    )
    flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 = greedy.", **fv)
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).", **fv)
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass, 0 < top_p <= 1 (1: off).", **fv)
    flags.DEFINE_integer("seed", 0, "Random seed; the same seed gives the same text.", **fv)
    flags.DEFINE_integer("num_samples", 1, "Continuations to generate (one batch).", **fv)
    flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the newest).", **fv)


def check_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Refuse flags that would be ignored (``--seed`` with greedy decoding; ``--top_k`` and
    ``--top_p`` are refused by :class:`dsc_jax.generate.SamplingConfig`).

    Raises:
      ValueError: naming the flag.
    """
    if flag_values.temperature == 0 and flag_values["seed"].present:
        raise ValueError(
            f"--seed={flag_values.seed} has no effect with --temperature=0 (greedy decoding "
            "draws nothing); set --temperature > 0 to sample, or drop --seed."
        )


def sample_main(
    workdir: str,
    prompt: str,
    *,
    max_new_tokens: int | None = None,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    num_samples: int = 1,
    step: int | None = None,
) -> list[str]:
    """Load ``workdir``, print and return ``num_samples`` continuations of ``prompt``."""
    from dsc_jax.generate import SamplingConfig, sample_text
    from dsc_jax.loading import load_model

    sampling = SamplingConfig(max_new_tokens, temperature, top_k, top_p)  # validate first
    loaded = load_model(workdir, step=step)
    texts, result = sample_text(
        loaded.config,
        loaded.params,
        loaded.tokenizer,
        prompt,
        sampling,
        num_samples=num_samples,
        seed=seed,
    )
    for i, text in enumerate(texts):
        if num_samples > 1:
            print(f"--- sample {i + 1}/{num_samples} ---")
        print(prompt + text, flush=True)
    print(
        f"[{loaded.workdir} step {loaded.step}: {result.new_tokens.size} tokens in "
        f"{result.decode_s:.3f} s = {result.tokens_per_s:.1f} tokens/s (batch {num_samples}); "
        f"prefill {result.prompt_len} tokens {result.prefill_s * 1e3:.1f} ms; "
        f"compile {result.compile_s:.1f} s]",
        file=sys.stderr,
        flush=True,
    )
    return texts


def main(argv: Sequence[str]) -> None:
    """absl entry point."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required (a run folder written by train.py).")
    from dsc_jax._compat import quiet_closed_event_loop_errors
    from dsc_jax._storage import StorageError, error_line

    quiet_closed_event_loop_errors()  # TensorStore noise after a failed checkpoint read
    try:
        check_flags()
        sample_main(
            FLAGS.workdir,
            FLAGS.prompt,
            max_new_tokens=FLAGS.max_new_tokens,
            temperature=FLAGS.temperature,
            top_k=FLAGS.top_k,
            top_p=FLAGS.top_p,
            seed=FLAGS.seed,
            num_samples=FLAGS.num_samples,
            step=FLAGS.step,
        )
    except (ValueError, StorageError) as err:  # includes loading.RunNotFoundError
        logging.debug("traceback of the error below", exc_info=True)
        sys.exit(f"dsc-sample: error: {err}")
    except OSError as err:  # storage: one line naming the file
        logging.debug("traceback of the error below", exc_info=True)
        sys.exit(f"dsc-sample: error: {error_line(err, 'read')}")


def run() -> None:
    """Console-script entry point (``dsc-sample``)."""
    with exit_on_stop_signals(SAMPLE_INTERRUPT):  # sampling writes nothing: stop at once
        define_flags()
        logging.get_absl_handler().addFilter(QuietLibraries())
        app.run(main)
