"""``SLMCompressor``: the Optimum-style front for running a pass and writing a plain HF checkpoint.

    compressor = SLMCompressor.from_pretrained("path/or/alias")
    plan = compressor.compress("out/", method="slm", calibration="wiki-leads", ratio=0.2)

``out/`` then holds a vanilla checkpoint (safetensors + config + tokenizer) with fewer layers, ``slm_plan.json`` and a
model card ``README.md``. Writes are atomic: a temp folder beside the target, renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import torch
from torch import nn

from .arch import ArchAdapter, param_count
from .calibration import load_calibration
from .errors import SLMError
from .loading import load_model
from .plan import CompressionPlan, apply_plan
from .registry import get_pass

PLAN_FILE = "slm_plan.json"


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


def model_card(plan: CompressionPlan, params_before: int, params_after: int) -> str:
    """A generated README.md for a compressed checkpoint."""
    windows = ", ".join(f"{a}–{b}" for a, b in plan.windows) or "none"
    dropped = [i for op in plan.ops if op["op"] == "drop" for i in op["layers"]]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [optimum-slm, depth-pruning, layer-merging]",
        f"base_model: {plan.base.get('name_or_path')}",
        "---",
        "",
        f"# {plan.method} compression of {plan.base.get('name_or_path')}",
        "",
        "Made with [optimum-slm](https://pypi.org/project/optimum-slm/). A plain transformers checkpoint: load it with",
        "`AutoModelForCausalLM.from_pretrained(<this folder>)`.",
        "",
        "| | |",
        "|---|---|",
        f"| base | `{plan.base.get('name_or_path')}` ({plan.base['model_type']}) |",
        f"| method | `{plan.method}` |",
        f"| params | `{json.dumps(plan.params, sort_keys=True)}` |",
        f"| merged windows (base layer numbering) | {windows} |",
        f"| dropped layers | {dropped or 'none'} |",
        f"| layers | {plan.num_layers} → {plan.num_layers_after} |",
        f"| parameters | {params_before:,} → {params_after:,} ({100.0 * params_after / params_before:.1f}%) |",
        f"| base fingerprint | `{plan.base['fingerprint']}` |",
        "",
        f"`{PLAN_FILE}` rebuilds this model from the base: `slm apply --model <base> --plan {PLAN_FILE} --output DIR`.",
        "",
    ]
    if plan.calibration:
        c = plan.calibration
        lines.insert(-2, f"Calibration: `{c.get('source')}`, {c.get('n_samples')} × {c.get('seq_len')} tokens, "
                         f"seed {c.get('seed')}.")
        lines.insert(-2, "")
    return "\n".join(lines)


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
        plan.save(os.path.join(tmp, PLAN_FILE))
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

    def calibration_ids(self, calibration: Any, n_samples: int = 10, seq_len: int = 128, seed: int = 1234,
                        text_field: str = "text") -> torch.Tensor:
        if isinstance(calibration, torch.Tensor):
            return calibration
        if calibration is None:
            raise SLMError("calibration data is required (a token-id tensor or a corpus source)")
        if self.tokenizer is None:
            raise SLMError("a tokenizer is needed to build calibration data from text")
        return load_calibration(self.tokenizer, calibration, n_samples, seq_len, seed, text_field)

    def plan(self, method: str = "slm", calibration: Any = None, *, n_samples: int = 10, seq_len: int = 128,
             seed: int = 1234, text_field: str = "text", **params: Any) -> CompressionPlan:
        """Run pass ``method`` and return its plan (the model is left unchanged)."""
        compression_pass = get_pass(method, **params)
        model = self._fresh_model()
        ids = None
        if calibration is not None or method != "drop":
            ids = self.calibration_ids(calibration, n_samples, seq_len, seed, text_field)
        plan = compression_pass.plan(model, ids)
        if self._source:
            plan.base["name_or_path"] = self._source
        return plan

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
                 seed: int = 1234, text_field: str = "text", **params: Any) -> CompressionPlan:
        """Plan with ``method`` and write ``save_directory`` (checkpoint + plan + card; ``plan_only``: the plan)."""
        check_output_dir(save_directory, overwrite)
        plan = self.plan(method, calibration, n_samples=n_samples, seq_len=seq_len, seed=seed,
                         text_field=text_field, **params)
        if plan_only:
            save_plan_only(plan, save_directory, overwrite)
        else:
            self.apply(plan, save_directory, overwrite=overwrite)
        return plan
