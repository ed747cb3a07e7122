"""``minitron-width``: Minitron's activation-based width importance (Muralidharan et al. 2024; NVIDIA ModelOpt).

Importance from one forward pass over the calibration set: an MLP channel's is the activation entering
``down_proj``, a query head's the L2 norm of its slice of the attention output entering ``o_proj``; each is
aggregated as Minitron does — mean of |activation| over the sequence, then L2 over the samples. Heads are ranked
within each KV group and the same number of the least important query heads is removed from every group, so the
KV groups (and GQA) stay intact. MLP channels keep the top-k. Every layer gets the same widths (a standard
checkpoint; ModelOpt itself works on Megatron models only), ``ratio`` is the fraction of projection parameters
removed, MLP widths are multiples of 8.
"""

from __future__ import annotations


from ...engine import ForwardEngine
from ...progress import progress_bar
from ..base import CompressionPass, PassParam, PassResult
from .common import (WIDTH_RATIO, check_ratio, collect_input_stats, params_trace, require_removal, top_k,
                     uniform_target, width_ops)


class MinitronWidthPass(CompressionPass):
    name = "minitron-width"
    streams = True  # runs on a lazy model through the sequential engine
    description = "Minitron activation importance per MLP channel and query head (ranked within KV groups), uniform widths."
    params = (
        WIDTH_RATIO,
        PassParam("prune_attention", "bool", True, "also remove query heads (the same number in every KV group)"),
        PassParam("batch_size", "int", None, "calibration samples per forward batch (run-time only)"),
    )


    def run(self, engine: ForwardEngine) -> PassResult:
        engine.require_calibration(self.name)
        ratio = check_ratio(self.name, self.config["ratio"])
        adapter = engine.adapter
        mode = "heads" if self.config["prune_attention"] else "none"
        target = uniform_target(adapter, ratio, mode)
        require_removal(self.name, adapter, ratio, mode, target)
        w = adapter.widths()
        kv, rep, hd = w["num_key_value_heads"], w["num_attention_heads"] // w["num_key_value_heads"], w["head_dim"]
        engine.record_layer_inputs()
        ops, tensors = [], {}
        with progress_bar(total=engine.num_layers, desc="minitron-width: layers", unit="layer") as bar:
            for i, layer in enumerate(adapter.layers):
                attn, mlp, _ = collect_input_stats(engine, layer, i, engine.inputs[i])  # the base's activations
                channels = mlp.sample_l2.sqrt()
                keep = top_k(channels, target.channels) if target.channels < w["intermediate_size"] else None
                heads = None
                if target.heads_per_group < rep:
                    per_head = attn.sample_l2.reshape(kv * rep, hd).sum(1).sqrt().reshape(kv, rep)
                    heads = [top_k(per_head[g], target.heads_per_group).tolist() for g in range(kv)]
                ops += width_ops(i, keep, list(range(kv)) if heads else None, heads, tensors)
                bar.update(1)
        trace = {"criterion": "activation (mean |x| over the sequence, L2 over samples)",
                 **params_trace(adapter, target)}
        return PassResult(ops, trace, tensors)
