"""Console-script entry points (``[project.scripts]`` in ``pyproject.toml``).

Each answers Ctrl-C (and SIGTERM) from its first line, before absl or JAX is imported: a
signal while the command starts prints one line and exits with status 128 + signal number,
never a traceback (:func:`dsc_jax.train.preemption.exit_on_stop_signals`). ``import
dsc_jax`` is lazy, so nothing heavy runs before these functions do.
"""

from __future__ import annotations

from dsc_jax.train.preemption import exit_on_stop_signals

TRAIN_INTERRUPT = (
    "dsc-train: {signal} received during start-up: stopped, nothing was trained (run the same "
    "command to start again)."
)
SAMPLE_INTERRUPT = "dsc-sample: interrupted ({signal})."


def train() -> None:
    """``dsc-train`` (:func:`dsc_jax.cli.run`)."""
    with exit_on_stop_signals(TRAIN_INTERRUPT):
        from dsc_jax import cli

        cli.run()


def sample() -> None:
    """``dsc-sample`` (:func:`dsc_jax.sample_cli.run`)."""
    with exit_on_stop_signals(SAMPLE_INTERRUPT):
        from dsc_jax import sample_cli

        sample_cli.run()
