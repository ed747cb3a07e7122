"""Removed sub-layers: what stands in a decoder layer for an attention or an MLP that a plan took out.

A decoder layer adds its attention's output, then its MLP's, to the residual stream. With a branch removed the
layer must compute exactly the other one alone (``h + mlp(norm(h))`` without attention, ``h + attn(norm(h))``
without MLP). The decoder layers of every supported family add a branch's output to the residual stream, directly
or through a post-branch RMSNorm (Gemma-2/3, where norm(0) = 0), so a stand-in that returns zeros of the input's
shape removes the branch exactly, without touching the family's decoder-layer code.

The zeros are an expanded view of one zero row: no activation-sized memory, and the residual add is all the branch
still costs. A removed attention also writes one zero channel per token into the KV cache (see
``RemovedAttention.forward``), a few bytes, so that the cache's length bookkeeping stays right during generation.
Neither stand-in has parameters: nothing of a removed branch is saved, and the parameter count drops by its size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: the residual branch (``attn`` / ``mlp``, as ``families.Branch.name``) -> its sub-module in every supported family
SUBLAYER_MODULES = {"attn": "self_attn", "mlp": "mlp"}


def _zeros_like(hidden: torch.Tensor) -> torch.Tensor:
    """Zeros of ``hidden``'s shape, dtype and device, as an expanded view of one zero row (nothing allocated per
    token)."""
    return hidden.new_zeros((1,) * (hidden.dim() - 1) + (hidden.shape[-1],)).expand_as(hidden)


#: the names a decoder layer passes its KV cache under: ``cache`` (transformers 5), ``past_key_values`` (earlier)
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


class RemovedAttention(nn.Module):
    """An attention sub-layer a plan removed: the layer adds nothing for it.

    transformers derives the position of new tokens (``cache.get_seq_length()``, which reads layer 0) and the
    attention masks (the first full-attention and the first sliding layer's lengths) from the KV cache; a layer that
    never wrote its cache would read as empty, and generation would restart its positions at 0 after the prompt. So
    the stand-in writes one zero key/value channel per token (one head of width 1) into its cache slot: every cache
    layer keeps the length it would have had, at a few bytes per token.
    """

    def __init__(self, layer_idx: int | None = None):
        super().__init__()
        #: the decoder layer's position, renumbered with the others (``ArchAdapter._renumber``); indexes the cache
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        rest = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
        cache = next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
        if cache is not None and self.layer_idx is not None and hasattr(cache, "update"):
            batch, seq = hidden_states.shape[0], hidden_states.shape[1]
            placeholder = hidden_states.new_zeros(batch, 1, seq, 1)
            # called as the family's attention calls it (the extra call kwargs passed on for cache layers that read
            # them)
            cache.update(placeholder, placeholder, self.layer_idx, kwargs=rest)
        return _zeros_like(hidden_states), None

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, removed"


class RemovedMLP(nn.Module):
    """An MLP sub-layer a plan removed: the layer adds nothing for it."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _zeros_like(hidden_states)

    def extra_repr(self) -> str:
        return "removed"


#: the stand-in class of each branch
STAND_INS = {"attn": RemovedAttention, "mlp": RemovedMLP}


def is_removed(module: nn.Module) -> bool:
    """Whether ``module`` is a removed sub-layer's stand-in."""
    return isinstance(module, (RemovedAttention, RemovedMLP))
