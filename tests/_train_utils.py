"""Helpers for the trainer tests: config files from configs/, metric comparison."""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMING_KEYS = ("step_time", "tokens_per_sec")


def load_config(name: str) -> ml_collections.ConfigDict:
    """``configs/<name>.py``'s ``get_config()`` (what ``--config=configs/<name>.py`` loads)."""
    path = REPO / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def without_timing(records: list[dict]) -> list[dict]:
    """Metric records minus wall-clock measurements (the only values allowed to differ)."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]
