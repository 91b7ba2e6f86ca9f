"""``dsc-train --config=configs/paper_dsc.py``: the paper's recipe with the dsc FFN
(:func:`dsc_jax.train.presets.paper_recipe`; needs WikiText-103 and the GPT-2 BPE, see README)."""

from dsc_jax.train import presets


def get_config():
    return presets.paper_recipe("dsc")
