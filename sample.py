"""Generate text from a trained run: ``python sample.py --workdir=runs/default --prompt="def "``.

Flags (defined in ``dsc_jax/sample_cli.py``, shared with the ``dsc-sample`` console script):
``--workdir``, ``--prompt``, ``--max_new_tokens``, ``--temperature``, ``--top_k``, ``--top_p``,
``--seed``, ``--num_samples``, ``--step``.
"""

from dsc_jax import sample_cli

sample_cli.define_flags()

if __name__ == "__main__":
    sample_cli.run()
