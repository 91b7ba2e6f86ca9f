"""Paper recipe (spec §7/§8), DSC FFN: M=1523 atoms, K=4 active, static H=327
(35.01 M total / 28 M active parameters).

    python train.py --config=configs/paper_dsc.py --workdir=runs/paper_dsc

Needs WikiText-103 (local copy via --config.data.wikitext_dir=..., or a download) and the
GPT-2 BPE (tiktoken); see README. The shared recipe, every field commented, is
dsc_jax.train.presets.paper_recipe.
"""

from dsc_jax import paper
from dsc_jax.train.presets import paper_recipe


def get_config():
    """The paper recipe with the dsc FFN."""
    c = paper_recipe("dsc")
    c.model.dsc.num_bases = paper.DSC_NUM_BASES  # M, atoms in the bank
    c.model.dsc.top_k = paper.DSC_TOP_K  # K, active atoms per token
    c.model.dsc.hidden_dim = paper.DSC_HIDDEN  # H, static FFN width
    c.model.dsc.variant = "refined"  # Algorithm 2: router LayerNorm, vector γ
    return c
