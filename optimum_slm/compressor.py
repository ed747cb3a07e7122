"""``SLMCompressor``: the Optimum-style front for running a pass and writing a plain HF checkpoint.

    compressor = SLMCompressor.from_pretrained("path/or/alias")
    plan = compressor.compress("out/", method="slm-plus", calibration="wiki-leads", ratio=0.2)

``out/`` then holds a vanilla checkpoint (safetensors + config + tokenizer) with fewer layers, ``slm_plan.json`` (and
``slm_plan.tensors`` when the plan has fitted tensors) and a model card ``README.md``. The methods translate
their arguments into a ``Recipe`` and call ``optimum_slm.orchestrate`` (planning, the plan cache, the quality check,
healing and the atomic write all happen there).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .arch import ArchAdapter
from .calibration import CalibrationConfig, CalibrationSet
from .errors import SLMError
from .healing.config import HealConfig
from .io.checkpoint import resolve_save_dtype, write_plan_only
from .io.names import PLAN_FILE
from .io.output import claim_output, local_paths
from .loading import load_model
from .orchestrate import CompressionResult, compress_loaded, write_compressed, write_result
from .pipeline import CacheSpec, calibration_set, plan_compression, resolve_stages, recipe_of
from .plan import CompressionPlan, apply_plan
from .recipe import DEFAULT_METHOD, OutputOptions, Recipe

__all__ = ["PLAN_FILE", "SLMCompressor", "resolve_save_dtype", "save_compressed", "save_plan_only"]


def save_compressed(model: nn.Module, tokenizer, plan: CompressionPlan, save_directory: str | os.PathLike,
                    params_before: int, overwrite: bool = False, save_dtype: str | torch.dtype | None = None,
                    command: str | None = None, heal_record: dict[str, Any] | None = None) -> str:
    """Write checkpoint + tokenizer + plan + model card (+ ``slm_heal.json`` when ``heal_record``) atomically."""
    if heal_record is not None:
        plan.heal_record = heal_record
    return write_result(CompressionResult(plan, model, params_before), tokenizer, save_directory,
                        overwrite=overwrite, save_dtype=save_dtype, command=command)


def save_plan_only(plan: CompressionPlan, save_directory: str | os.PathLike, overwrite: bool = False) -> str:
    return write_plan_only(plan, save_directory, overwrite)


def request(method: Any = DEFAULT_METHOD, calibration: Any = None, *, n_samples: int = 10, seq_len: int = 128,
            seed: int = 1234, text_field: str = "text", heal: HealConfig | None = None,
            output: OutputOptions | None = None, **params: Any) -> tuple[Recipe, CalibrationSet | None]:
    """The ``Recipe`` that Python arguments ask for, and the calibration set when it was given as data (ids, a set,
    documents) rather than as a corpus to draw from."""
    if isinstance(method, Recipe):
        if params:
            raise SLMError("give the parameters inside the recipe's stages")
        recipe = method
    else:
        recipe = recipe_of(resolve_stages(method, params), None)
        if recipe is None:
            raise SLMError("SLMCompressor compresses with registered passes: give a pass name, stages or a Recipe")
    drawn = None
    if isinstance(calibration, str):
        recipe = recipe.replace(calibration=CalibrationConfig(calibration, n_samples, seq_len, seed, text_field))
    elif isinstance(calibration, CalibrationConfig):
        recipe = recipe.replace(calibration=calibration)
    elif calibration is not None:
        drawn = calibration_set(calibration)
    changes: dict = {}
    if heal is not None:
        changes["heal"] = heal
    if output is not None:
        changes["output"] = output
    return (recipe.replace(**changes) if changes else recipe), drawn


class SLMCompressor:
    """Runs compression passes on one base model and writes the results (Optimum ``*Quantizer`` style)."""

    def __init__(self, model: nn.Module, tokenizer=None, source: str | None = None, load_kwargs: dict | None = None):
        if not isinstance(model, nn.Module):
            raise SLMError(f"SLMCompressor takes a loaded model, got {type(model).__name__}; for a path, hub id or "
                           "alias use SLMCompressor.from_pretrained(...)")
        ArchAdapter(model)  # fail early on an unsupported architecture
        self.model = model
        self.tokenizer = tokenizer
        self._source = source
        self._load_kwargs = load_kwargs or {}
        self._consumed = False

    @classmethod
    def from_pretrained(cls, model_or_path: str | nn.Module, tokenizer=None, **load_kwargs: Any) -> "SLMCompressor":
        """From a checkpoint path, hub id (offline cache), alias or GGUF (``gguf_file=``), or a loaded model."""
        if isinstance(model_or_path, nn.Module):
            return cls(model_or_path, tokenizer)
        model, tok = load_model(model_or_path, **load_kwargs)
        return cls(model, tokenizer or tok, source=model_or_path, load_kwargs=load_kwargs)

    def _fresh_model(self) -> nn.Module:
        if self._consumed:
            if self._source is None:
                raise SLMError("this compressor's model was already compressed; create a new SLMCompressor")
            self.model, _ = load_model(self._source, **self._load_kwargs)
            self._consumed = False
        return self.model

    def plan(self, method: Any = DEFAULT_METHOD, calibration: Any = None, *, n_samples: int = 10,
             seq_len: int = 128, seed: int = 1234, text_field: str = "text", cache: CacheSpec = True,
             **params: Any) -> CompressionPlan:
        """The plan of pass ``method`` (or stages, or a ``Recipe``) for the base; the model is left unchanged.

        ``calibration``: a corpus source (sampled by ``n_samples``/``seq_len``/``seed``/``text_field``), a
        ``CalibrationConfig``, a ``CalibrationSet`` or token ids. ``cache``: see ``optimum_slm.plan_compression``.
        """
        model = self._fresh_model()
        if isinstance(calibration, str):
            calibration = CalibrationConfig(calibration, n_samples, seq_len, seed, text_field)
        return plan_compression(model, method, calibration, tokenizer=self.tokenizer, cache=cache,
                                name_or_path=self._source, **params)

    def apply(self, plan: CompressionPlan, save_directory: str | os.PathLike | None = None, overwrite: bool = False,
              strict: bool = True, save_dtype: str | torch.dtype | None = None) -> nn.Module:
        """Apply ``plan`` to the base (in place) and optionally write the checkpoint; returns the model."""
        if save_dtype is not None:
            resolve_save_dtype(save_dtype)
        if save_directory is None:
            model = apply_plan(self._fresh_model(), plan, strict=strict)
            self._consumed = True
            return model
        with claim_output(save_directory, overwrite,
                          protect=local_paths(self._source, getattr(self.model, "name_or_path", None))):
            model = self._fresh_model()
            self._consumed = True
            write_compressed(plan, model, self.tokenizer, save_directory, overwrite=overwrite, save_dtype=save_dtype,
                             strict=strict)
        return model

    def compress(self, save_directory: str | os.PathLike, method: Any = DEFAULT_METHOD, calibration: Any = None, *,
                 overwrite: bool = False, plan_only: bool = False, n_samples: int = 10, seq_len: int = 128,
                 seed: int = 1234, text_field: str = "text", cache: CacheSpec = True, check: bool = True,
                 save_dtype: str | torch.dtype | None = None, command: str | None = None,
                 heal: HealConfig | None = None, **params: Any) -> CompressionPlan:
        """Plan with ``method`` (a pass name with ``params``, stages, or a ``Recipe``), check the result's quality,
        and write ``save_directory`` (checkpoint + plan + card; ``plan_only``: the plan).

        ``check``: measure the base's and the result's perplexity and final-state cosine on calibration-corpus text
        the pass did not see; stored as ``plan.quality_check`` (skipped when there is no calibration text).
        ``save_dtype`` converts the written checkpoint (e.g. ``"bfloat16"``); ``command`` goes into the model card.
        ``heal`` (a ``HealConfig``, a recipe's ``heal`` stage) trains the compressed model before it is written
        (after the quality check, which describes the plan); the run's record is ``plan.heal_record``.
        """
        if save_dtype is not None:
            resolve_save_dtype(save_dtype)
        dtype_name = save_dtype if save_dtype is None or isinstance(save_dtype, str) else \
            str(save_dtype).replace("torch.", "")
        recipe, drawn = request(method, calibration, n_samples=n_samples, seq_len=seq_len, seed=seed,
                                text_field=text_field, heal=heal,
                                output=OutputOptions(plan_only=plan_only, check=check, save_dtype=dtype_name),
                                **params)
        with claim_output(save_directory, overwrite, protect=local_paths(
                self._source, getattr(self.model, "name_or_path", None), recipe.calibration.source)):
            model = self._fresh_model()
            result = compress_loaded(recipe, model, self.tokenizer, save_directory, calibration=drawn,
                                     overwrite=overwrite, cache=cache, command=command, name_or_path=self._source)
        # the model changed unless only the plan was written (and the check ran on a copy)
        self._consumed = result.model is not None
        return result.plan
