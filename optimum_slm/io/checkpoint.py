"""A model written as a checkpoint folder: ``write_checkpoint`` (weights, tokenizer, plan, model card and healing
record, atomically: the one writer of compressed and healed checkpoints), ``write_plan_only``, and the weights
writer under them (``save_model``: ``save_pretrained``, or tensor by tensor for a lazy model)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError, SLMError
from .names import CARD_FILE, HEAL_FILE, PLAN_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE, shard_file
from .output import AtomicDir, check_output_dir
from .shards import _LAZY, is_lazy_model

#: the dtypes a model is loaded (``--dtype``) or written (``--save-dtype``) in, by name
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_save_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The dtype ``--save-dtype``/``save_dtype`` names (a ``torch.dtype`` as it is); ``"auto"`` has no meaning here."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    if dtype is None or dtype == "auto":
        raise SLMError(f"--save-dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    raise ModelLoadError(f"unknown dtype {dtype!r}; use one of: auto, {', '.join(DTYPES)}")


def write_checkpoint(model: nn.Module, tokenizer, save_directory: str | os.PathLike, *, plan=None,
                     card: str | None = None, heal_runs: list[dict[str, Any]] | None = None, overwrite: bool = False,
                     save_dtype: str | torch.dtype | None = None) -> str:
    """Write a checkpoint folder atomically (a temp folder beside it, renamed into place at the end): the model's
    weights and config (converted to ``save_dtype``), the tokenizer, ``plan`` (and its side-car tensors), ``card``
    as the model card and ``heal_runs`` as the healing record, each when given. Returns the folder's absolute path.

    ``card`` is written as it is: compute it before this call, since writing converts an in-memory model to
    ``save_dtype``.
    """
    target = check_output_dir(save_directory, overwrite)
    dtype = resolve_save_dtype(save_dtype) if save_dtype is not None else None
    with AtomicDir(target, overwrite) as tmp:
        save_model(model, tmp, dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if plan is not None:
            plan.save(os.path.join(tmp, PLAN_FILE))  # and its side-car when the plan has tensors
        if heal_runs is not None:
            with open(os.path.join(tmp, HEAL_FILE), "w", encoding="utf-8") as fh:
                json.dump(heal_runs, fh, indent=1)
                fh.write("\n")
        if card is not None:
            with open(os.path.join(tmp, CARD_FILE), "w", encoding="utf-8") as fh:
                fh.write(card)
    return target


def write_plan_only(plan, save_directory: str | os.PathLike, overwrite: bool = False) -> str:
    """Write a folder holding only ``plan`` (and its side-car tensors), atomically; returns its absolute path."""
    target = check_output_dir(save_directory, overwrite)
    with AtomicDir(target, overwrite) as tmp:
        plan.save(os.path.join(tmp, PLAN_FILE))
    return target


def save_model(model: nn.Module, folder: str, dtype: torch.dtype | None = None) -> None:
    """``save_pretrained`` for an ordinary model; config, generation config and streamed weights for a lazy one."""
    if not is_lazy_model(model):
        if dtype is not None:
            for name, value in _persistent(model):  # before the model changes: a float16 cast turns 1e6 into inf
                if value.is_floating_point() and value.dtype != dtype and _all_finite(value):
                    check_finite(name, value.to(dtype), dtype)
            model.to(dtype)
        model.save_pretrained(folder)
        return
    if dtype is not None:
        model.config.dtype = dtype
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    write_weights(model, folder, dtype=dtype)


def _persistent(model: nn.Module):
    """``(name, tensor)`` of the weights a checkpoint holds: parameters and persistent buffers."""
    persistent = set(model.state_dict())
    yield from model.named_parameters()
    yield from ((n, b) for n, b in model.named_buffers() if n in persistent)


def _all_finite(value: torch.Tensor) -> bool:
    return not value.is_floating_point() or value.is_meta or bool(torch.isfinite(value).all())


def check_finite(name: str, value: torch.Tensor, dtype: torch.dtype | None) -> None:
    """Refuse a weight that the cast to ``dtype`` made non-finite (it was finite before), in one line."""
    if dtype is None or _all_finite(value):
        return
    bad = int((~torch.isfinite(value)).sum())
    short = str(dtype).replace("torch.", "")
    top = torch.finfo(dtype).max
    others = " or ".join(n for n, d in DTYPES.items() if d != dtype and torch.finfo(d).max > top)
    fix = f"; write {others} (--save-dtype)" if others else ""
    values = f"{bad:,} values become" if bad != 1 else "1 value becomes"
    raise SLMError(f"{name} overflows {short} (max {top:g}): {values} inf{fix}")


def write_weights(model: nn.Module, folder: str, max_shard_bytes: int = 512 << 20, dtype: torch.dtype | None = None
                  ) -> None:
    """Write ``model``'s weights into ``folder`` as ``save_pretrained`` names them (tied parameters once, under their
    first name; ``model.safetensors`` or shards with ``model.safetensors.index.json``), tensor by tensor: a lazy
    layer's tensors are copied from its checkpoint under the layer's new index, so the whole model never exists
    in memory. At most one shard (``max_shard_bytes``) is held at a time."""
    from safetensors.torch import save_file

    persistent = set(model.state_dict())
    named = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if n in persistent]
    lazy_layers = {name: module for name, module in model.named_modules() if module in _LAZY}

    def tensor(name: str, value: torch.Tensor) -> torch.Tensor:
        owner = name.rpartition(".")[0]
        while value.is_meta and owner:  # the lazy layer holding this tensor, by its place in the model
            if owner in lazy_layers:
                store, lazy_prefix = _LAZY[lazy_layers[owner]]
                value = store.read(lazy_prefix + name[len(owner) + 1 :])
                break
            owner = owner.rpartition(".")[0]
        if value.is_meta:
            raise ModelLoadError(f"cannot write {name}: it has no weights")  # pragma: no cover - a bug
        value = value.detach()
        if dtype is not None and value.is_floating_point():
            finite = _all_finite(value)
            value = value.to(dtype)
            if finite:  # the cast made it non-finite: a float16 write turns 1e6 into inf
                check_finite(name, value, dtype)
        return value.contiguous().cpu()

    shards: list[list[str]] = [[]]
    sizes = [0]
    nbytes = {name: value.numel() * (dtype.itemsize if dtype is not None and value.is_floating_point()
                                     else value.element_size()) for name, value in named}
    for name, _ in named:  # plan the shards by size first, then read and write one shard at a time
        if shards[-1] and sizes[-1] + nbytes[name] > max_shard_bytes:
            shards.append([])
            sizes.append(0)
        shards[-1].append(name)
        sizes[-1] += nbytes[name]
    values = dict(named)
    weight_map = {}
    for k, names in enumerate(shards, 1):
        file = WEIGHTS_FILE if len(shards) == 1 else shard_file(k, len(shards))
        save_file({name: tensor(name, values[name]) for name in names}, os.path.join(folder, file),
                  metadata={"format": "pt"})
        weight_map.update({name: file for name in names})
    if len(shards) > 1:
        with open(os.path.join(folder, WEIGHTS_INDEX_FILE), "w", encoding="utf-8") as fh:
            json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, fh, indent=2, sort_keys=True)
            fh.write("\n")
