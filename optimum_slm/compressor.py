"""``SLMCompressor``: the Optimum-style front for running a pass and writing a plain HF checkpoint.

    compressor = SLMCompressor.from_pretrained("path/or/alias")
    plan = compressor.compress("out/", method="slm", calibration="wiki-leads", ratio=0.2)

``out/`` then holds a vanilla checkpoint (safetensors + config + tokenizer) with fewer layers, ``slm_plan.json`` (and
``slm_plan.safetensors`` when the plan has fitted tensors) and a model card ``README.md``. Planning goes through
``optimum_slm.pipeline.compress`` (plan cache included). Writes are atomic: a temp folder beside the target, renamed
into place at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from torch import nn

from .arch import ArchAdapter, param_count
from .calibration import CalibrationConfig
from .errors import SLMError
from .loading import load_model
from .pipeline import CacheSpec, compress
from .plan import CompressionPlan, apply_plan
from .reports.card import PLAN_FILE, model_card


def check_output_dir(save_directory: str | os.PathLike, overwrite: bool = False) -> str:
    """Refuse a non-empty existing output folder unless ``overwrite``; returns the absolute path."""
    path = os.path.abspath(os.fspath(save_directory))
    if os.path.exists(path) and not os.path.isdir(path):
        raise SLMError(f"output path {path} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise SLMError(f"output directory {path} is not empty (use --overwrite / overwrite=True)")
    return path


class _AtomicDir:
    """A temp folder beside ``target`` that replaces ``target`` on success and vanishes on failure."""

    def __init__(self, target: str):
        self.target = target

    def __enter__(self) -> str:
        parent = os.path.dirname(self.target) or "."
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.target)}.tmp-", dir=parent)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if os.path.exists(self.target):
            old = self.target + ".old-" + os.path.basename(self.tmp)
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def save_compressed(
    model: nn.Module,
    tokenizer,
    plan: CompressionPlan,
    save_directory: str | os.PathLike,
    params_before: int,
    overwrite: bool = False,
) -> str:
    """Write checkpoint + tokenizer + plan + model card atomically into ``save_directory``."""
    target = check_output_dir(save_directory, overwrite)
    with _AtomicDir(target) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        plan.save(os.path.join(tmp, PLAN_FILE))  # and slm_plan.safetensors when the plan has tensors
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as fh:
            fh.write(model_card(plan, params_before, param_count(model)))
    return target


def save_plan_only(plan: CompressionPlan, save_directory: str | os.PathLike, overwrite: bool = False) -> str:
    target = check_output_dir(save_directory, overwrite)
    with _AtomicDir(target) as tmp:
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

    def plan(self, method: str = "slm", calibration: Any = None, *, n_samples: int = 10, seq_len: int = 128,
             seed: int = 1234, text_field: str = "text", cache: CacheSpec = True, **params: Any) -> CompressionPlan:
        """Run pass ``method`` through the pipeline and return its plan (the model is left unchanged).

        ``calibration``: a corpus source (sampled by ``n_samples``/``seq_len``/``seed``/``text_field``), a
        ``CalibrationConfig``, or token ids. ``cache``: see ``optimum_slm.compress``.
        """
        model = self._fresh_model()
        if isinstance(calibration, str):
            calibration = CalibrationConfig(calibration, n_samples, seq_len, seed, text_field)
        return compress(model, method, calibration, tokenizer=self.tokenizer, cache=cache, name_or_path=self._source,
                        **params)

    def apply(self, plan: CompressionPlan, save_directory: str | os.PathLike | None = None, overwrite: bool = False,
              strict: bool = True) -> nn.Module:
        """Apply ``plan`` to the base (in place) and optionally write the checkpoint; returns the model."""
        if save_directory is not None:
            check_output_dir(save_directory, overwrite)
        model = self._fresh_model()
        before = param_count(model)
        apply_plan(model, plan, strict=strict)
        self._consumed = True
        if save_directory is not None:
            save_compressed(model, self.tokenizer, plan, save_directory, before, overwrite=overwrite)
        return model

    def compress(self, save_directory: str | os.PathLike, method: str = "slm", calibration: Any = None, *,
                 overwrite: bool = False, plan_only: bool = False, n_samples: int = 10, seq_len: int = 128,
                 seed: int = 1234, text_field: str = "text", cache: CacheSpec = True,
                 **params: Any) -> CompressionPlan:
        """Plan with ``method`` and write ``save_directory`` (checkpoint + plan + card; ``plan_only``: the plan)."""
        check_output_dir(save_directory, overwrite)
        plan = self.plan(method, calibration, n_samples=n_samples, seq_len=seq_len, seed=seed,
                         text_field=text_field, cache=cache, **params)
        if plan_only:
            save_plan_only(plan, save_directory, overwrite)
        else:
            self.apply(plan, save_directory, overwrite=overwrite)
        return plan
