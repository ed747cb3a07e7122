"""The names of the files optimum-slm writes or reads in a checkpoint folder, in one place: outputs depend on them,
so a change here is a format change."""

from __future__ import annotations

import os

#: the compression plan written beside a compressed checkpoint
PLAN_FILE = "slm_plan.json"
#: the plan's side-car tensors (fitted values), beside it when the plan has any (``sidecar_path(PLAN_FILE)``). A
#: safetensors file, but not named ``*.safetensors``: vLLM and other loaders read every ``*.safetensors`` file of a
#: checkpoint folder as weights, and would stop at it (releases before 0.4 named it ``slm_plan.safetensors``; those
#: still load)
PLAN_TENSORS_FILE = "slm_plan.tensors"
SIDECAR_SUFFIX = ".tensors"
LEGACY_SIDECAR_SUFFIX = ".safetensors"
#: the model card
CARD_FILE = "README.md"
#: the record of the healing runs a checkpoint went through
HEAL_FILE = "slm_heal.json"
#: what a converted (GGUF / pickle) checkpoint in the conversion cache was made from
CONVERSION_MANIFEST = "slm_converted.json"
#: the model's config, as transformers writes it
CONFIG_FILE = "config.json"
#: the ``config.json`` key with per-layer (non-uniform) widths, which ``load_model`` reads to rebuild the model
LAYER_WIDTHS_KEY = "slm_layer_widths"
#: the weights when they fit in one file
WEIGHTS_FILE = "model.safetensors"
#: the shard index (tensor name -> shard file) when they do not
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"


def shard_file(k: int, n: int) -> str:
    """Shard ``k`` of ``n`` (from 1), named as ``save_pretrained`` names it."""
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def sidecar_path(plan_path: str | os.PathLike) -> str:
    """The side-car tensors of the plan at ``plan_path``: ``x/slm_plan.json`` -> ``x/slm_plan.tensors``."""
    root, _ = os.path.splitext(os.fspath(plan_path))
    return root + SIDECAR_SUFFIX


def legacy_sidecar_path(plan_path: str | os.PathLike) -> str:
    """Where releases before 0.4 wrote the side-car: ``x/slm_plan.json`` -> ``x/slm_plan.safetensors``."""
    root, _ = os.path.splitext(os.fspath(plan_path))
    return root + LEGACY_SIDECAR_SUFFIX
