"""Paper recipe (spec §7/§8), MoLoRA FFN: static H=868 plus E=16 LoRA
experts of rank 108, top-2 (iso-active solver, spec §6).

    python train.py --config=configs/paper_molora.py --workdir=runs/paper_molora

Needs WikiText-103 (local copy via --config.data.wikitext_dir=..., or a download) and the
GPT-2 BPE (tiktoken); see README. The shared recipe, every field commented, is
dsc_jax.train.presets.paper_recipe.
"""

from dsc_jax import paper
from dsc_jax.train.presets import paper_recipe


def get_config():
    """The paper recipe with the molora FFN."""
    c = paper_recipe("molora")
    c.model.molora.num_experts = paper.MOLORA_NUM_EXPERTS  # E LoRA experts
    c.model.molora.rank = paper.MOLORA_RANK  # r
    c.model.molora.top_k = paper.MOLORA_TOP_K  # experts per token
    c.model.molora.hidden_dim = paper.MOLORA_HIDDEN  # H of the static FFN
    return c
