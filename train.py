"""Train a dsc_jax model: ``python train.py --config=configs/default.py --workdir=runs/default``.

Flags (defined in ``dsc_jax/cli.py``, shared with the ``dsc-train`` console script):
``--config`` (an ml_collections config file; override any field with ``--config.key=value``)
and ``--workdir`` (run folder; running again with the same folder resumes).
"""

import signal

# Ctrl-C during the imports below waits for the trainer's handler (see cli.block_stop_signals).
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})

from dsc_jax import cli  # noqa: E402

cli.define_flags()  # --config (config_flags.DEFINE_config_file) and --workdir

if __name__ == "__main__":
    cli.run()
