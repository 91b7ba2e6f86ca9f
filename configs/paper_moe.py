"""Paper recipe (spec §7/§8), Standard MoE FFN: E=5 experts of H=545,
top-2, N(0, 0.01) logit jitter (35.54 M total / 28 M active).

    python train.py --config=configs/paper_moe.py --workdir=runs/paper_moe

Needs WikiText-103 (local copy via --config.data.wikitext_dir=..., or a download) and the
GPT-2 BPE (tiktoken); see README. The shared recipe, every field commented, is
dsc_jax.train.presets.paper_recipe.
"""

from dsc_jax import paper
from dsc_jax.train.presets import paper_recipe


def get_config():
    """The paper recipe with the moe FFN."""
    c = paper_recipe("moe")
    c.model.moe.num_experts = paper.MOE_NUM_EXPERTS  # E
    c.model.moe.top_k = paper.MOE_TOP_K  # experts per token
    c.model.moe.hidden_dim = paper.MOE_HIDDEN  # H_e, expert width
    c.model.moe.jitter_std = (
        paper.MOE_JITTER_STD
    )  # N(0, 0.01) noise on the router logits in training
    return c
