"""``dsc-train --config=configs/default.py[:KIND]``: :func:`dsc_jax.train.presets.default`;
KIND (dsc, moe, molora, dense) picks the FFN."""

from dsc_jax.train import presets


def get_config(ffn_kind=None):
    return presets.default(ffn_kind)
