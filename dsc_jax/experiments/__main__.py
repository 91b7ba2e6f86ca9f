"""``python -m dsc_jax.experiments`` = ``dsc-compare``."""

from dsc_jax.experiments.cli import run

if __name__ == "__main__":
    run()
