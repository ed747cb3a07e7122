"""What the width passes share: uniform target widths from a parameter ratio, per-layer statistics of the inputs of
``o_proj`` and ``down_proj``, and turning kept channels / groups into width ops."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...arch import ArchAdapter
from ...errors import PassError
from ..base import PassParam

WIDTH_RATIO = PassParam("ratio", "float", None,
                        "fraction of the pruned modules' parameters (attention and MLP projections) to remove, in (0, 1)")
#: MLP widths are kept at multiples of this (tensor-core and kernel friendly), where the width allows
ROUND_TO = 8


@dataclass(frozen=True)
class UniformTarget:
    """How many KV groups, query heads per group and MLP channels every layer keeps."""

    groups: int
    heads_per_group: int
    channels: int


def layer_params(w: dict[str, int], hidden: int, groups: int, heads_per_group: int, channels: int) -> int:
    """Parameters of one layer's projections at the given widths (q, k, v, o, gate, up, down; no biases)."""
    hd = w["head_dim"]
    return hidden * hd * (2 * groups * heads_per_group + 2 * groups) + 3 * hidden * channels


def uniform_target(adapter: ArchAdapter, ratio: float, attention: str) -> UniformTarget:
    """Widths that remove about ``ratio`` of each layer's projection parameters, GQA-valid.

    ``attention``: ``groups`` removes whole KV groups (floor(ratio × KV), at least one kept), ``heads`` removes the
    same number of query heads in every group (floor(ratio × n_rep), at least one kept), ``none`` keeps attention;
    the MLP then takes the rest of the budget, rounded to a multiple of 8.
    """
    w = adapter.widths()
    hidden = int(adapter.config.hidden_size)
    kv, rep = w["num_key_value_heads"], w["num_attention_heads"] // w["num_key_value_heads"]
    groups, heads = kv, rep
    if attention == "groups":
        groups = max(1, kv - math.floor(ratio * kv))
    elif attention == "heads":
        heads = max(1, rep - math.floor(ratio * rep))
    full = layer_params(w, hidden, kv, rep, w["intermediate_size"])
    budget = ratio * full - (layer_params(w, hidden, kv, rep, 0) - layer_params(w, hidden, groups, heads, 0))
    remove = max(0.0, budget / (3 * hidden))
    channels = w["intermediate_size"] - remove
    if w["intermediate_size"] >= 4 * ROUND_TO:
        channels = ROUND_TO * round(channels / ROUND_TO)
    channels = int(min(w["intermediate_size"], max(ROUND_TO if w["intermediate_size"] >= ROUND_TO else 1,
                                                    round(channels))))
    return UniformTarget(groups, heads, channels)


def require_removal(name: str, adapter: ArchAdapter, ratio: float, attention: str, target: UniformTarget) -> None:
    """Refuse a ratio too small to remove one KV group, query head or step of MLP channels, naming the smallest ratio
    that removes something (found by bisection: ``uniform_target`` removes more as the ratio grows)."""
    w = adapter.widths()
    kv, rep = w["num_key_value_heads"], w["num_attention_heads"] // w["num_key_value_heads"]
    full = UniformTarget(kv, rep, w["intermediate_size"])
    if target != full:
        return

    def removes(r: float) -> bool:
        return uniform_target(adapter, r, attention) != full

    kept = {"groups": f" and {kv} KV groups", "heads": f" and {rep} query heads per KV group"}.get(attention, "")
    what = f"every layer keeps its {w['intermediate_size']} MLP channels{kept}"
    low, high = ratio, 1 - 1e-9
    if not removes(high):
        raise PassError(f"{name}: no ratio removes anything from this model ({what})")
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (low, mid) if removes(mid) else (mid, high)
    smallest = high
    for significant in range(3, 10):  # the bound rounded up to 3 significant digits (more if that misses it)
        digits = significant - 1 - math.floor(math.log10(high))
        candidate = math.ceil(high * 10**digits) / 10**digits
        if candidate < 1 and removes(candidate):
            smallest = candidate
            break
    step = f" (MLP widths move in steps of {ROUND_TO})" if w["intermediate_size"] >= 4 * ROUND_TO else ""
    raise PassError(f"{name}: ratio {ratio:g} removes nothing: {what}{step}; the smallest ratio that removes "
                    f"something is {smallest:g}")


def check_ratio(name: str, ratio: float | None) -> float:
    if ratio is None:
        raise PassError(f"pass {name!r} needs ratio (the fraction of projection parameters to remove)")
    return ratio


class InputStats:
    """Running statistics of a linear layer's input channels over all calibration tokens (float64): count, mean,
    sample variance, mean square, and per-sample L2 of the sequence-mean magnitude (Minitron's aggregate)."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: torch.Tensor | None = None
        self.sq: torch.Tensor | None = None
        self.sample_l2: torch.Tensor | None = None

    def hook(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().double()
        flat = x.reshape(-1, x.shape[-1])
        per_sample = x.abs().mean(dim=1) if x.dim() == 3 else flat.abs()  # [batch, channels]
        if self.sum is None:
            self.sum = flat.sum(0)
            self.sq = flat.pow(2).sum(0)
            self.sample_l2 = per_sample.pow(2).sum(0)
        else:
            self.sum += flat.sum(0)
            self.sq += flat.pow(2).sum(0)
            self.sample_l2 += per_sample.pow(2).sum(0)
        self.n += flat.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.n

    @property
    def variance(self) -> torch.Tensor:
        """Sample variance (n − 1), FLAP's fluctuation."""
        return (self.sq - self.n * self.mean.pow(2)) / max(self.n - 1, 1)

    @property
    def mean_square(self) -> torch.Tensor:
        return self.sq / self.n


def collect_input_stats(engine, layer: nn.Module, type_index: int, hidden) -> tuple[InputStats, InputStats, Any]:
    """Run ``layer`` on ``hidden`` (per-batch inputs); the statistics of its ``o_proj`` and ``down_proj`` inputs
    and its outputs (raw residual stream)."""
    from ...engine import Slot

    attn, mlp = InputStats(), InputStats()
    handles = [layer.self_attn.o_proj.register_forward_pre_hook(attn.hook),
               layer.mlp.down_proj.register_forward_pre_hook(mlp.hook)]
    try:
        out = engine.run_layers([Slot(layer, type_index)], hidden, final_norm=False)
    finally:
        for h in handles:
            h.remove()
    return attn, mlp, out


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, increasing (ties: the lower index first)."""
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def group_scores(per_channel: torch.Tensor, adapter: ArchAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head and per-KV-group sums of per-channel scores of the attention output (o_proj input)."""
    w = adapter.widths()
    heads = per_channel.reshape(w["num_attention_heads"], w["head_dim"]).sum(1)
    rep = w["num_attention_heads"] // w["num_key_value_heads"]
    return heads, heads.reshape(w["num_key_value_heads"], rep).sum(1)


def width_ops(layer: int, keep_channels: torch.Tensor | None, groups: list[int] | None,
              heads: list[list[int]] | None, tensors: dict[str, torch.Tensor], mlp_bias: torch.Tensor | None = None,
              attn_bias: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """The narrow ops of one layer (position ``layer`` of the engine's model); tensors go into ``tensors``."""
    ops = []
    if groups is not None:
        op: dict[str, Any] = {"op": "narrow_attn", "layer": layer, "groups": groups}
        if heads is not None:
            op["heads"] = heads
        if attn_bias is not None:
            tensors[f"narrow_attn.{layer}.bias"] = attn_bias.float().contiguous()
            op["bias"] = f"narrow_attn.{layer}.bias"
        ops.append(op)
    if keep_channels is not None:
        tensors[f"narrow_mlp.{layer}.keep"] = keep_channels.to(torch.int64).contiguous()
        op = {"op": "narrow_mlp", "layer": layer, "keep": f"narrow_mlp.{layer}.keep"}
        if mlp_bias is not None:
            tensors[f"narrow_mlp.{layer}.bias"] = mlp_bias.float().contiguous()
            op["bias"] = f"narrow_mlp.{layer}.bias"
        ops.append(op)
    return ops


def params_trace(adapter: ArchAdapter, target: UniformTarget, layers: int | None = None) -> dict[str, Any]:
    """Parameters of the pruned modules (``layers`` of them, default all) before and after, for the plan's trace."""
    w = adapter.widths()
    hidden = int(adapter.config.hidden_size)
    layers = adapter.num_layers if layers is None else layers
    before = layers * layer_params(w, hidden, w["num_key_value_heads"],
                                   w["num_attention_heads"] // w["num_key_value_heads"], w["intermediate_size"])
    after = layers * layer_params(w, hidden, target.groups, target.heads_per_group, target.channels)
    return {"projection_params_before": before, "projection_params_after": after,
            "removed_fraction": round(1 - after / before, 4),
            "widths_after": {"num_key_value_heads": target.groups,
                             "num_attention_heads": target.groups * target.heads_per_group,
                             "intermediate_size": target.channels}}
