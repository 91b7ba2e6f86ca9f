"""``dsc-train --config=configs/tiny.py[:KIND]``: :func:`dsc_jax.train.presets.tiny`;
KIND (dsc, moe, molora, dense) picks the FFN."""

from dsc_jax.train import presets


def get_config(ffn_kind=None):
    return presets.tiny(ffn_kind)
