"""Paper recipe (spec §7/§8), Dense FFN: H=2611 (35.00 M parameters).

    python train.py --config=configs/paper_dense.py --workdir=runs/paper_dense

Needs WikiText-103 (local copy via --config.data.wikitext_dir=..., or a download) and the
GPT-2 BPE (tiktoken); see README. The shared recipe, every field commented, is
dsc_jax.train.presets.paper_recipe.
"""

from dsc_jax import paper
from dsc_jax.train.presets import paper_recipe


def get_config():
    """The paper recipe with the dense FFN."""
    c = paper_recipe("dense")
    c.model.dense.hidden_dim = paper.DENSE_HIDDEN  # H
    return c
