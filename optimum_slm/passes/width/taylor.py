"""``taylor-width``: LLM-Pruner's first-order Taylor importance (Ma et al., NeurIPS 2023), whole channel groups.

Official code (horseee/LLM-Pruner ``hf_prune.py`` / ``llama3.py`` with Torch-Pruning's ``TaylorImportance``,
``taylor='param_first'``): one backward pass of the causal-LM loss on the calibration set; a weight's salience is
|W ⊙ ∇W|; a group's importance is the sum over its coupled weights (``grouping_strategy='sum'``): an MLP channel =
its gate row, up row and down column; a KV group (GQA, ``llama3.py``: root ``k_proj`` with consecutive groups of
head_dim) = the q rows of its query heads, its k and v rows, and the o columns of its query heads.

Differences: by default every layer is pruned to the same widths, a standard checkpoint (the official block-wise
mode prunes only layers 4..30 of a 32-layer model and saves with ``torch.save``); ``layer_start`` / ``layer_end``
restrict pruning to that range as the official code does, giving per-layer widths that ``optimum_slm.load_model``
reloads. ``ratio`` is the fraction of the pruned layers' projection parameters removed (the official
``--pruning_ratio`` is a fraction of groups per layer); MLP widths are multiples of 8.
"""

from __future__ import annotations

import torch

from ...engine import ForwardEngine
from ...errors import PassError
from ..base import CompressionPass, PassParam, PassResult
from .common import (WIDTH_RATIO, check_ratio, params_trace, require_removal, top_k, uniform_target,
                     width_ops)


def _salience(linear) -> torch.Tensor:
    return (linear.weight.detach().double() * linear.weight.grad.double()).abs()


def group_importance(adapter, layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(per MLP channel, per KV group) Σ|W ⊙ ∇W| over each group's coupled weights (gradients must be present)."""
    w = adapter.widths()
    mlp, attn = layer.mlp, layer.self_attn
    size, hd = w["intermediate_size"], w["head_dim"]
    kv, heads = w["num_key_value_heads"], w["num_attention_heads"]
    rep = heads // kv
    down = _salience(mlp.down_proj).sum(0)
    if adapter.family.fused_mlp:
        rows = _salience(mlp.gate_up_proj).sum(1)
        channels = rows[:size] + rows[size:] + down
    else:
        channels = _salience(mlp.gate_proj).sum(1) + _salience(mlp.up_proj).sum(1) + down
    o_cols = _salience(attn.o_proj).sum(0).reshape(heads, hd).sum(1)
    if adapter.family.fused_qkv:
        rows = _salience(attn.qkv_proj).sum(1)
        q = rows[: heads * hd].reshape(heads, hd).sum(1)
        k = rows[heads * hd : heads * hd + kv * hd].reshape(kv, hd).sum(1)
        v = rows[heads * hd + kv * hd :].reshape(kv, hd).sum(1)
    else:
        q = _salience(attn.q_proj).sum(1).reshape(heads, hd).sum(1)
        k = _salience(attn.k_proj).sum(1).reshape(kv, hd).sum(1)
        v = _salience(attn.v_proj).sum(1).reshape(kv, hd).sum(1)
    groups = (q + o_cols).reshape(kv, rep).sum(1) + k + v
    return channels, groups


class TaylorWidthPass(CompressionPass):
    name = "taylor-width"
    streams = True  # runs on a lazy model through the sequential engine
    description = "LLM-Pruner first-order Taylor importance (param_first) per MLP channel and KV group, uniform widths."
    params = (
        WIDTH_RATIO,
        PassParam("prune_attention", "bool", True, "also remove whole KV groups"),
        PassParam("layer_start", "int", None, "first layer pruned (official block_*_layer_start; default: 0)"),
        PassParam("layer_end", "int", None, "layer after the last pruned (official block_*_layer_end; default: all)"),
        PassParam("batch_size", "int", None, "calibration samples per backward batch (official: all at once)"),
    )


    def run(self, engine: ForwardEngine) -> PassResult:
        engine.require_calibration(self.name)
        ratio = check_ratio(self.name, self.config["ratio"])
        adapter = engine.adapter
        mode = "groups" if self.config["prune_attention"] else "none"
        target = uniform_target(adapter, ratio, mode)
        require_removal(self.name, adapter, ratio, mode, target)
        w = adapter.widths()
        start = self.config["layer_start"] or 0
        end = adapter.num_layers if self.config["layer_end"] is None else self.config["layer_end"]
        if not 0 <= start < end <= adapter.num_layers:
            raise PassError(f"taylor-width: layer range [{start}, {end}) must lie in [0, {adapter.num_layers}] and be "
                            "non-empty")
        importance = {}
        for i, layer in engine.layer_gradients(lowest=start):  # any order: the sequential engine goes top-down
            if i < end:
                with torch.no_grad():
                    importance[i] = group_importance(adapter, layer)
        ops, tensors, scores = [], {}, []
        for i in range(start, end):
            channels, groups = importance[i]
            keep = top_k(channels, target.channels) if target.channels < w["intermediate_size"] else None
            kept_groups = top_k(groups, target.groups).tolist() if target.groups < w["num_key_value_heads"] else None
            ops += width_ops(i, keep, kept_groups, None, tensors)
            scores.append([round(float(g), 6) for g in groups])
        trace = {"criterion": "taylor param_first", "layers": [start, end], "group_importance": scores,
                 **params_trace(adapter, target, end - start)}
        return PassResult(ops, trace, tensors)
