"""The layout of a training run's folder (``--workdir``), shared by the trainer that writes
it and the loader and sampler that read it.

``WORKDIR/config.json`` holds ``{"config": the training config, "model":
GPTConfig.to_dict()}``; ``WORKDIR/checkpoints/<step>/`` the orbax checkpoints;
``metrics.jsonl`` one JSON record per logged step; ``tensorboard/`` the event files.
"""

from __future__ import annotations

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"  # WORKDIR/checkpoints/<step>/ (orbax)
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
