"""Lazy models: every decoder layer stays on the meta device and is read from the checkpoint's safetensors shards
only while something needs its weights; the rest of the model (embeddings, final norm, ``lm_head``, rotary tables)
is loaded for real.

The read sites are few and central: ``arch.layer_state`` (what merges, fits and plan ops read), the engines'
``materialized`` (a layer run on calibration data) and ``ApplyContext.writable`` (a layer an op changes in place).
A copy of a lazy layer (``copy.deepcopy``) is an ordinary module, never lazy. The shards and the registry of lazy
layers are ``io.shards``'s; writing a lazy model is ``io.checkpoint.save_model``'s.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..arch import ArchAdapter
from ..errors import ModelLoadError
from ..io.shards import _LAZY, LazyState, TensorStore, is_lazy, is_lazy_model, lazy_state, register_lazy

__all__ = ["LazyState", "check_not_offloaded", "is_lazy", "is_lazy_model", "lazy_copy", "lazy_state",
           "load_lazy_model", "materialized", "materialized_copy", "read_in", "register_lazy"]


def lazy_copy(model: nn.Module) -> nn.Module:
    """A copy of a lazy model sharing its loaded tensors (embeddings, norm, head); its layers read the same files."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers()) if not t.is_meta}
    spill = getattr(model, "slm_spill", None)
    if spill is not None:
        memo[id(spill)] = spill
    store = getattr(model, "slm_store", None)
    if store is not None:
        memo[id(store)] = store
    clone = copy.deepcopy(model, memo)
    for original, copied in zip(ArchAdapter(model).layers, ArchAdapter(clone).layers):
        if original in _LAZY:
            _LAZY[copied] = _LAZY[original]
    return clone


@contextmanager
def materialized(module: nn.Module, device: torch.device | str | None = None) -> Iterator[nn.Module]:
    """The module with real weights for the duration of the block: a lazy layer is read in (on ``device``) and
    released after; any other module is yielded as it is."""
    if module not in _LAZY or not any(p.is_meta for p in module.parameters()):
        yield module
        return
    read_in(module, device)
    try:
        yield module
    finally:
        module.to("meta")


def read_in(module: nn.Module, device: torch.device | str | None = None) -> None:
    """Give a lazy layer its weights from the checkpoint (on ``device``); ``module.to("meta")`` releases them."""
    # ordinary tensors even when read during an inference-mode recording: a layer kept resident may later be
    # back-propagated through (Taylor gradients)
    with torch.inference_mode(False):
        state = {k: (v.to(device) if device is not None else v) for k, v in lazy_state(module).items()}
        module.load_state_dict(state, strict=False, assign=True)


def materialized_copy(module: nn.Module) -> nn.Module:
    """A real (not lazy) copy of ``module``; for a lazy layer its weights are read from the checkpoint."""
    clone = copy.deepcopy(module)
    if module in _LAZY and any(p.is_meta for p in module.parameters()):
        clone.load_state_dict(dict(lazy_state(module)), strict=False, assign=True)
    return clone


def check_not_offloaded(model: nn.Module) -> None:
    """Refuse (one line) a model whose layers accelerate offloaded to the CPU or disk (``device_map`` with
    ``max_memory`` too small): its weights are on the meta device and appear only inside a forward."""
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is not None and getattr(hook, "offload", False) and module not in _LAZY:
            raise ModelLoadError("the model's layers were offloaded by accelerate (device_map with CPU/disk offload); "
                                 "compress it from its checkpoint with --max-memory (layers streamed from the "
                                 "shards), or load it with enough max_memory for every layer")


def layers_prefix(model: nn.Module) -> str:
    """The state-dict prefix of the decoder layer list (``model.layers``)."""
    layers = ArchAdapter(model).layers
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise ModelLoadError("cannot locate the decoder layers in the model")  # pragma: no cover


def load_lazy_model(path: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    trust_remote_code: bool = False) -> nn.Module:
    """The model of checkpoint folder ``path`` with lazy decoder layers (see the module docstring). How much memory
    the planning may hold is the sequential engine's ``MemoryBudget``, not the model's."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    store = TensorStore(path)
    file_dtype = next((store.dtype_of(n) for n in store.names() if "layers." in n), torch.float32)
    store.dtype = dtype or (file_dtype if file_dtype.is_floating_point else torch.float32)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=store.dtype, trust_remote_code=trust_remote_code)
    prefix = layers_prefix(model)
    rest = {name: store.read(name).to(device) for name in store.names() if not name.startswith(prefix + ".")}
    _, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    if unexpected:
        raise ModelLoadError(f"{path}: unexpected tensors {sorted(unexpected)[:3]}")
    model.tie_weights()
    left = [name for name, p in model.named_parameters() if p.is_meta and not name.startswith(prefix + ".")]
    if left:
        raise ModelLoadError(f"{path}: the checkpoint lacks {left[:3]}")
    for j, layer in enumerate(ArchAdapter(model).layers):
        register_lazy(layer, store, f"{prefix}.{j}.")
    model.eval()
    model.slm_store = store
    return model
