"""``flap``: FLAP (An et al., AAAI 2024), the fluctuation metric with bias compensation; retraining-free.

Official code (CASIA-IVA-Lab/FLAP ``lib/prune.py``, ``lib/layerwrapper.py``): layer by layer, each layer seeing the
already-pruned layers below, hooks on the inputs of ``o_proj`` and ``down_proj`` collect every input channel's mean
and fluctuation (sample variance over all calibration tokens). The default metric WIFV scores channel j by
σ²_j · ‖W[:, j]‖² (W = ``o_proj`` / ``down_proj``); attention scores are squared once more and summed per head
(here: per KV group, whole groups, so GQA stays valid — the official code hard-codes head_dim 128 and MHA). The
removed channels' mean contribution W[:, P] x̄_P is added to the output projection's bias (bias compensation).

Differences from the official code: the default structure is ``UL-UM`` (the same widths in every layer, so the
checkpoint is a standard config; ``structure=AL-AM``, the official default, standardises the scores within each
layer, ranks every KV group (weighted by its parameters in MLP channels) and MLP channel of the model together and
keeps the most important (1 − ratio) of the parameters, giving per-layer widths that ``optimum_slm.load_model``
reloads), KV groups instead of single heads, UL-UM MLP widths rounded to multiples of 8, and ``ratio`` is the
fraction of the projection parameters removed (see passes/width/common.py). AL-AM's statistics come from the
unpruned model in one pass (the global ranking needs every layer's scores before any layer is pruned). Bias compensation needs the family's ``mlp_bias`` /
``attention_bias`` switches (Llama); elsewhere it is off by default and refused when asked for.
"""

from __future__ import annotations

from typing import Any

import torch

from ...engine import ForwardEngine, Slot
from ...errors import PassError
from ...progress import progress_bar
from ..base import CompressionPass, PassParam, PassResult
from .common import (WIDTH_RATIO, check_ratio, collect_input_stats, group_scores, params_trace, require_removal,
                     top_k, uniform_target, width_ops)

METRICS = ("WIFV", "IFV", "WIFN")


def channel_metric(name: str, stats, weight: torch.Tensor) -> torch.Tensor:
    """FLAP's per-input-channel metric of a projection ``weight`` [out, in] with input statistics ``stats``."""
    w = weight.detach().double()
    if name == "IFV":
        return stats.variance
    if name == "WIFV":
        return stats.variance * w.pow(2).sum(0)
    return (w.abs() * stats.mean_square.sqrt()[None, :]).mean(0)  # WIFN


class FLAPPass(CompressionPass):
    name = "flap"
    streams = True  # runs on a lazy model through the sequential engine
    description = "FLAP width pruning: fluctuation metric per MLP channel and KV group, bias compensation, uniform widths."
    params = (
        WIDTH_RATIO,
        PassParam("metric", "str", "WIFV", "channel metric (official WIFV)", choices=METRICS),
        PassParam("bias_compensation", "bool", None,
                  "add the removed channels' mean output as bias (default: on where the family allows it)"),
        PassParam("prune_attention", "bool", True, "also remove whole KV groups (attention heads of a group)"),
        PassParam("structure", "str", "UL-UM",
                  "UL-UM: the same widths in every layer (standard checkpoint); AL-AM: official adaptive per-layer "
                  "widths (reload with optimum_slm.load_model)", choices=("UL-UM", "AL-AM")),
        PassParam("batch_size", "int", None, "calibration samples per forward batch (run-time only)"),
    )


    def run(self, engine: ForwardEngine) -> PassResult:
        engine.require_calibration(self.name)
        ratio = check_ratio(self.name, self.config["ratio"])
        adapter = engine.adapter
        family = adapter.family
        compensate = self.config["bias_compensation"]
        representable = family.mlp_bias_flag is not None and family.attention_bias_flag is not None
        if compensate and not representable:
            raise PassError(f"flap: bias compensation needs mlp_bias/attention_bias config switches, which "
                            f"{family.name} does not have; use --param bias_compensation=false")
        compensate = representable if compensate is None else compensate
        if self.config["structure"] == "AL-AM":
            return self._adaptive(engine, ratio, compensate)
        mode = "groups" if self.config["prune_attention"] else "none"
        target = uniform_target(adapter, ratio, mode)
        require_removal(self.name, adapter, ratio, mode, target)
        engine.record_layer_inputs()
        hidden = engine.inputs[0]
        ops: list[dict[str, Any]] = []
        tensors: dict[str, torch.Tensor] = {}
        layers = list(adapter.layers)
        with progress_bar(total=len(layers), desc="flap: pruning layers", unit="layer") as bar:
            for i, layer in enumerate(layers):
                with engine.loaded(layer):  # its weights are read for the scores and the compensation
                    layer_ops, pruned = self._prune_layer(engine, i, layer, hidden, target, compensate, tensors)
                ops += layer_ops
                # the next layer sees this layer pruned (the official layer-sequential statistics)
                hidden = engine.run_layers([Slot(pruned, i)], hidden, final_norm=False)
                bar.update(1)
        trace = {"metric": self.config["metric"], "bias_compensation": bool(compensate), "structure": "UL-UM",
                 **params_trace(adapter, target)}
        return PassResult(ops, trace, tensors)

    def _prune_layer(self, engine: ForwardEngine, i: int, layer, hidden, target, compensate: bool,
                     tensors: dict[str, torch.Tensor]):
        """UL-UM for one (loaded) layer on its input ``hidden``: its narrow ops and a pruned copy of it."""
        adapter = engine.adapter
        w = adapter.widths()
        attn_stats, mlp_stats, _ = collect_input_stats(engine, layer, i, hidden)
        mlp_score = channel_metric(self.config["metric"], mlp_stats, layer.mlp.down_proj.weight)
        keep = top_k(mlp_score, target.channels) if target.channels < w["intermediate_size"] else None
        groups = None
        if target.groups < w["num_key_value_heads"]:
            attn_score = channel_metric(self.config["metric"], attn_stats, layer.self_attn.o_proj.weight)
            _, per_group = group_scores(attn_score.pow(2), adapter)  # squared once more, as official
            groups = top_k(per_group, target.groups).tolist()
        mlp_bias = attn_bias = None
        if compensate:
            if keep is not None:
                mlp_bias = _compensation(layer.mlp.down_proj, mlp_stats.mean, keep)
            if groups is not None:
                q_rows, _ = adapter.attention_rows(groups)
                attn_bias = _compensation(layer.self_attn.o_proj, attn_stats.mean, q_rows)
        layer_ops = width_ops(i, keep, groups, None, tensors, mlp_bias, attn_bias)
        return layer_ops, _pruned_copy(adapter, layer, keep, groups, mlp_bias, attn_bias)

    def _adaptive(self, engine: ForwardEngine, ratio: float, compensate: bool) -> PassResult:
        """AL-AM: z-scored scores of every KV group and MLP channel of the model ranked together."""
        adapter = engine.adapter
        w = adapter.widths()
        rep, hd = w["num_attention_heads"] // w["num_key_value_heads"], w["head_dim"]
        group_weight = hd * (2 * rep + 2) / 3  # a KV group's parameters in units of one MLP channel's
        engine.record_layer_inputs()
        layers = list(adapter.layers)
        stats, candidates = [], []  # candidates: (z-score, weight, layer, "mlp"|"attn", index)
        with progress_bar(total=len(layers), desc="flap: scoring layers", unit="layer") as bar:
            for i, layer in enumerate(layers):
                with engine.loaded(layer):
                    attn_stats, mlp_stats, _ = collect_input_stats(engine, layer, i, engine.inputs[i])
                    stats.append((attn_stats, mlp_stats))
                    mlp_score = _zscore(channel_metric(self.config["metric"], mlp_stats, layer.mlp.down_proj.weight))
                    candidates += [(float(s), 1.0, i, "mlp", j) for j, s in enumerate(mlp_score)]
                    if self.config["prune_attention"]:
                        attn_score = channel_metric(self.config["metric"], attn_stats, layer.self_attn.o_proj.weight)
                        _, per_group = group_scores(attn_score.pow(2), adapter)
                        candidates += [(float(s), group_weight, i, "attn", g)
                                       for g, s in enumerate(_zscore(per_group))]
                bar.update(1)
        total = sum(c[1] for c in candidates)
        kept: dict[tuple[int, str], list[int]] = {}
        mass = 0.0
        for score, weight, i, kind, index in sorted(candidates, key=lambda c: (-c[0], c[2], c[3], c[4])):
            if mass >= (1 - ratio) * total:
                break
            kept.setdefault((i, kind), []).append(index)
            mass += weight
        ops: list[dict[str, Any]] = []
        tensors: dict[str, torch.Tensor] = {}
        widths = []
        for i, layer in enumerate(layers):
            attn_stats, mlp_stats = stats[i]
            channels = sorted(kept.get((i, "mlp"), [])) or [int(torch.argmax(mlp_stats.variance))]  # keep >= 1
            keep = torch.tensor(channels)
            groups = None
            if self.config["prune_attention"]:
                groups = sorted(kept.get((i, "attn"), [])) or [0]
            narrow_mlp = compensate or len(channels) < w["intermediate_size"]
            narrow_attn = groups is not None and (compensate or len(groups) < w["num_key_value_heads"])
            mlp_bias = attn_bias = None
            if compensate:
                with engine.loaded(layer):
                    mlp_bias = _compensation(layer.mlp.down_proj, mlp_stats.mean, keep)
                    if groups is not None:
                        attn_bias = _compensation(layer.self_attn.o_proj, attn_stats.mean,
                                                  adapter.attention_rows(groups)[0])
            ops += width_ops(i, keep if narrow_mlp else None, groups if narrow_attn else None, None, tensors,
                             mlp_bias if narrow_mlp else None, attn_bias if narrow_attn else None)
            widths.append({"intermediate_size": len(channels), "num_key_value_heads": len(groups or range(
                w["num_key_value_heads"]))})
        trace = {"metric": self.config["metric"], "bias_compensation": bool(compensate), "structure": "AL-AM",
                 "kept_fraction": round(mass / total, 4), "layer_widths": widths}
        return PassResult(ops, trace, tensors)


def _zscore(scores: torch.Tensor) -> torch.Tensor:
    """FLAP's standardisation within a layer: (x − mean) / std."""
    std = scores.std()
    return (scores - scores.mean()) / (std if std > 0 else 1.0)


def _compensation(linear, mean: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """W[:, P] @ x̄[P] over the removed input channels P (plus the projection's own bias, when it has one)."""
    removed = torch.ones(mean.numel(), dtype=torch.bool)
    removed[kept] = False
    bias = linear.weight.detach().double()[:, removed] @ mean[removed]
    if linear.bias is not None:
        bias = bias + linear.bias.detach().double()
    return bias.float()


def _pruned_copy(adapter, layer, keep, groups, mlp_bias, attn_bias):
    import copy

    pruned = copy.deepcopy(layer)
    if keep is not None:
        adapter.narrow_mlp(pruned, keep, down_bias=mlp_bias)
    if groups is not None:
        adapter.narrow_attention(pruned, groups, None, o_bias=attn_bias)
    return pruned
