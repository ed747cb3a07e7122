"""Healing: train a compressed model a little to restore quality, measured on held-out validation text.

    from optimum_slm import heal
    record = heal("out/", "healed/", data="wiki-leads", method="lora", max_steps=200)

``heal`` loads a checkpoint, trains it (``heal_model``: LoRA merged into the weights, or the network's tail), and
writes a plain checkpoint atomically, with the input's ``slm_plan.json`` carried over, ``slm_heal.json`` recording
the run and the model card extended. ``HealConfig`` holds every setting; its defaults are the published recipes.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import DATA_FORMATS, HEAL_FILE, HEAL_METHODS, PRECISIONS, HealConfig, HealError

#: the torch-heavy names, imported on first use (the command line reads the config without torch)
_LAZY = {"heal": "run", "save_healed": "run", "carried_plan": "run", "heal_model": "train",
         "validation_loss": "train", "HealData": "data", "load_heal_data": "data"}

__all__ = ["DATA_FORMATS", "HEAL_FILE", "HEAL_METHODS", "PRECISIONS", "HealConfig", "HealError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'optimum_slm.healing' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value
