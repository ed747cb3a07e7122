"""optimum-slm: depth compression passes for LLMs (Sliding-Window Merging and the depth-pruning baselines).

    plan = optimum_slm.plan_compression(model, "slm-plus", CalibrationConfig("wiki-leads"), tokenizer=tok, ratio=0.2)
    optimum_slm.apply_plan(model, plan)
    optimum_slm.run(Recipe.single("slm-plus", ratio=0.2), "smollm2-135m", "out/")    # what ``slm compress`` does
    optimum_slm.heal("compressed/", "healed/", data="wiki-leads", method="lora")

The public API is imported lazily so that ``import optimum_slm`` (and ``optimum-cli``'s command discovery) stays
cheap; torch and transformers load on first use of a name below.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

_EXPORTS = {
    "plan_compression": "optimum_slm.pipeline",
    "compress": "optimum_slm.pipeline",  # the former name of plan_compression, for one release
    "Recipe": "optimum_slm.recipe",
    "PassStage": "optimum_slm.recipe",
    "OutputOptions": "optimum_slm.recipe",
    "RecipeError": "optimum_slm.recipe",
    "run": "optimum_slm.orchestrate",
    "ModelSource": "optimum_slm.orchestrate",
    "MemoryBudget": "optimum_slm.engine.budget",
    "CalibrationConfig": "optimum_slm.calibration",
    "CalibrationSet": "optimum_slm.calibration",
    "CompressionPlan": "optimum_slm.plan",
    "Stage": "optimum_slm.plan",
    "OpKind": "optimum_slm.plan",
    "apply_plan": "optimum_slm.plan",
    "model_fingerprint": "optimum_slm.plan",
    "fingerprint_files": "optimum_slm.plan",
    "load_calibration": "optimum_slm.calibration",
    "downloads_allowed": "optimum_slm.calibration",
    "load_documents": "optimum_slm.calibration",
    "load_model": "optimum_slm.loading",
    "get_pass": "optimum_slm.registry",
    "get_pass_class": "optimum_slm.registry",
    "list_passes": "optimum_slm.registry",
    "register_plugin": "optimum_slm.registry",
    "CompressionPass": "optimum_slm.passes.base",
    "PassParam": "optimum_slm.passes.base",
    "PassResult": "optimum_slm.passes.base",
    "ForwardEngine": "optimum_slm.engine",
    "ArchAdapter": "optimum_slm.arch",
    "SUPPORTED_MODEL_TYPES": "optimum_slm.arch",
    "MERGE_RULES": "optimum_slm.merge",
    "MergeRule": "optimum_slm.merge",
    "SLMCompressor": "optimum_slm.compressor",
    "heal": "optimum_slm.healing",
    "heal_model": "optimum_slm.healing",
    "HealConfig": "optimum_slm.healing",
    "hookimpl": "optimum_slm.hookspecs",
    "SLMError": "optimum_slm.errors",
    "PlanError": "optimum_slm.errors",
    "PassError": "optimum_slm.errors",
    "CalibrationError": "optimum_slm.errors",
    "UnsupportedArchitectureError": "optimum_slm.errors",
    "ModelLoadError": "optimum_slm.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'optimum_slm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
