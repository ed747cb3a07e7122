"""``SLMCompressor``: the Optimum-style front for running a pass and writing a plain HF checkpoint.

    compressor = SLMCompressor.from_pretrained("path/or/alias")
    plan = compressor.compress("out/", method="slm-plus", calibration="wiki-leads", ratio=0.2)

``out/`` then holds a vanilla checkpoint (safetensors + config + tokenizer) with fewer layers, ``slm_plan.json`` (and
``slm_plan.safetensors`` when the plan has fitted tensors) and a model card ``README.md``. Planning goes through
``optimum_slm.pipeline.compress`` (plan cache included). Writes are atomic: a temp folder beside the target, renamed
into place at the end.
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Any

import torch
from torch import nn

from .arch import ArchAdapter, param_count
from .calibration import CalibrationConfig, unseen_documents
from .errors import SLMError
from .fileio import AtomicDir, check_output_dir, claim_output
from .loading import DTYPES, load_model, resolve_dtype
from .pipeline import DEFAULT_METHOD, CacheSpec, calibration_ids, compress
from .plan import CompressionPlan, apply_plan
from .quality import QualityCheck
from .reports.card import PLAN_FILE, model_card


def save_compressed(
    model: nn.Module,
    tokenizer,
    plan: CompressionPlan,
    save_directory: str | os.PathLike,
    params_before: int,
    overwrite: bool = False,
    save_dtype: str | torch.dtype | None = None,
    command: str | None = None,
    heal_record: dict[str, Any] | None = None,
) -> str:
    """Write checkpoint + tokenizer + plan + model card atomically into ``save_directory``.

    ``save_dtype`` (e.g. ``bfloat16``) converts the model before writing it. ``heal_record`` (the model was healed
    after compression) adds ``slm_heal.json`` and a healing section to the card.
    """
    target = check_output_dir(save_directory, overwrite)
    if heal_record is not None:
        from .healing import save_healed

        card = model_card(plan, params_before, param_count(model), command=command,
                          dtype=str(resolve_save_dtype(save_dtype) if save_dtype else next(model.parameters()).dtype)
                          .replace("torch.", ""))
        return save_healed(model, tokenizer, heal_record, target, plan=plan, card=card, overwrite=overwrite,
                           save_dtype=save_dtype)
    from .engine.lazy import save_model

    dtype_to = resolve_save_dtype(save_dtype) if save_dtype is not None else None
    dtype = str(dtype_to or next(model.parameters()).dtype).replace("torch.", "")
    with AtomicDir(target, overwrite) as tmp:
        save_model(model, tmp, dtype_to)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        plan.save(os.path.join(tmp, PLAN_FILE))  # and slm_plan.safetensors when the plan has tensors
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as fh:
            fh.write(model_card(plan, params_before, param_count(model), dtype=dtype, command=command))
    return target


def resolve_save_dtype(dtype: str | torch.dtype) -> torch.dtype:
    resolved = resolve_dtype(dtype)
    if not isinstance(resolved, torch.dtype):
        raise SLMError(f"--save-dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return resolved


def save_plan_only(plan: CompressionPlan, save_directory: str | os.PathLike, overwrite: bool = False) -> str:
    target = check_output_dir(save_directory, overwrite)
    with AtomicDir(target, overwrite) as tmp:
        plan.save(os.path.join(tmp, PLAN_FILE))
    return target


class SLMCompressor:
    """Runs compression passes on one base model and writes the results (Optimum ``*Quantizer`` style)."""

    def __init__(self, model: nn.Module, tokenizer=None, source: str | None = None, load_kwargs: dict | None = None):
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

    def calibration_ids(self, calibration: Any, n_samples: int = 10, seq_len: int = 128, seed: int = 1234,
                        text_field: str = "text") -> torch.Tensor | None:
        """Token ids for a corpus source (sampled by the other arguments), a ``CalibrationConfig`` or ids."""
        if isinstance(calibration, str):
            calibration = CalibrationConfig(calibration, n_samples, seq_len, seed, text_field)
        return calibration_ids(calibration, self.tokenizer)

    def plan(self, method: str = DEFAULT_METHOD, calibration: Any = None, *, n_samples: int = 10,
             seq_len: int = 128, seed: int = 1234, text_field: str = "text", cache: CacheSpec = True,
             **params: Any) -> CompressionPlan:
        """Run pass ``method`` through the pipeline and return its plan (the model is left unchanged).

        ``calibration``: a corpus source (sampled by ``n_samples``/``seq_len``/``seed``/``text_field``), a
        ``CalibrationConfig``, or token ids. ``cache``: see ``optimum_slm.compress``.
        """
        model = self._fresh_model()
        ids = self.calibration_ids(calibration, n_samples, seq_len, seed, text_field)
        return compress(model, method, ids, tokenizer=self.tokenizer, cache=cache, name_or_path=self._source,
                        **params)

    def apply(self, plan: CompressionPlan, save_directory: str | os.PathLike | None = None, overwrite: bool = False,
              strict: bool = True, save_dtype: str | torch.dtype | None = None) -> nn.Module:
        """Apply ``plan`` to the base (in place) and optionally write the checkpoint; returns the model."""
        if save_dtype is not None:
            resolve_save_dtype(save_dtype)
        claim = claim_output(save_directory, overwrite) if save_directory is not None else contextlib.nullcontext()
        with claim:
            model = self._fresh_model()
            before = param_count(model)
            apply_plan(model, plan, strict=strict)
            self._consumed = True
            if save_directory is not None:
                save_compressed(model, self.tokenizer, plan, save_directory, before, overwrite=overwrite,
                                save_dtype=save_dtype)
        return model

    def compress(self, save_directory: str | os.PathLike, method: str = DEFAULT_METHOD, calibration: Any = None, *,
                 overwrite: bool = False, plan_only: bool = False, n_samples: int = 10, seq_len: int = 128,
                 seed: int = 1234, text_field: str = "text", cache: CacheSpec = True, check: bool = True,
                 save_dtype: str | torch.dtype | None = None, command: str | None = None,
                 heal: Any = None, **params: Any) -> CompressionPlan:
        """Plan with ``method``, check the result's quality, and write ``save_directory`` (checkpoint + plan + card;
        ``plan_only``: the plan).

        ``check``: measure the base's and the result's perplexity and final-state cosine on calibration-corpus text
        the pass did not see; stored as ``plan.quality_check`` (skipped when there is no calibration text).
        ``save_dtype`` converts the written checkpoint (e.g. ``"bfloat16"``); ``command`` goes into the model card.
        ``heal`` (a ``HealConfig``, a recipe's ``heal`` stage) trains the compressed model before it is written
        (after the quality check, which describes the plan); the run's record is ``plan.heal_record``.
        """
        if save_dtype is not None:
            resolve_save_dtype(save_dtype)
        if heal is not None and plan_only:
            raise SLMError("healing changes the weights, so it needs a checkpoint: drop the heal stage or --plan-only")
        with claim_output(save_directory, overwrite):
            return self._compress(save_directory, method, calibration, overwrite, plan_only, n_samples, seq_len,
                                  seed, text_field, cache, check, save_dtype, command, heal, params)

    def _compress(self, save_directory, method, calibration, overwrite, plan_only, n_samples, seq_len, seed,
                  text_field, cache, check, save_dtype, command, heal, params) -> CompressionPlan:
        ids = self.calibration_ids(calibration, n_samples, seq_len, seed, text_field)  # kept: the check reads them
        plan = self.plan(method, ids, cache=cache, **params)
        model = self.model
        before = param_count(model)
        probe = None
        unseen = unseen_documents(ids) if ids is not None and check else []
        if unseen and self.tokenizer is not None:
            source = (getattr(ids, "slm_calibration", None) or {}).get("source", "calibration corpus")
            probe = QualityCheck.prepare(model, self.tokenizer, unseen, source)
        if plan_only:  # the compressor's model stays the base; the check runs on a copy
            if probe is not None:
                from .engine import is_lazy_model

                if is_lazy_model(model):  # a lazy model cannot be copied; its layers are the checkpoint's anyway
                    self._consumed = True
                checked = apply_plan(model if is_lazy_model(model) else copy.deepcopy(model), plan)
                plan.stages[-1].trace["quality_check"] = probe.run(checked)
            save_plan_only(plan, save_directory, overwrite)
        else:
            apply_plan(model, plan)
            self._consumed = True
            if probe is not None:
                plan.stages[-1].trace["quality_check"] = probe.run(model)
            record = None
            if heal is not None:
                from .healing import heal_model

                model, record = heal_model(model, self.tokenizer, heal)
                plan.heal_record = record
            save_compressed(model, self.tokenizer, plan, save_directory, before, overwrite=overwrite,
                            save_dtype=save_dtype, command=command, heal_record=record)
        return plan
