"""``shortgpt``: ShortGPT's Block Influence (Men et al. 2024), one-shot removal of the least influential layers.

Official code (icip-cas/ShortGPT ``metrics.py`` / ``shortgpt.py``): with x_i = ``hidden_states[i]`` (the input of
layer i) BI_i = Σ_{samples, tokens} (1 − cos(x_i,t, x_{i+1},t)), NaN cosines counted as 0.5; remove the n layers with
the lowest BI (``argsort(importances)[:n]``), nothing protected. HF's ``hidden_states[L]`` is the final-norm output,
so the official last-layer score compares a raw input with a normed output; ``last_layer_norm`` keeps that (default)
or compares raw residual streams throughout.
"""

from __future__ import annotations

from ...metrics import block_influence
from ...plan import drop_op
from ..base import NUM_LAYERS, PROTECT, RATIO, CompressionPass, PassParam, PassResult
from .common import round_scores, select_lowest, stream_state

LAST_LAYER_NORM = PassParam(
    "last_layer_norm",
    "bool",
    True,
    "the last layer's output is taken after the final norm, like HF hidden_states[L] in the official code",
)


class ShortGPTPass(CompressionPass):
    name = "shortgpt"
    streams = True  # runs on a lazy model through the sequential engine
    handles_removed_sublayers = True  # removes whole layers, running them only through the engine
    description = "ShortGPT Block Influence: remove the layers with the lowest Σ(1 − cos(input, output)), one shot."
    params = (RATIO, NUM_LAYERS, PROTECT, LAST_LAYER_NORM)

    def run(self, engine) -> PassResult:
        engine.require_calibration(self.name)
        engine.record_layer_inputs()
        n = engine.num_layers
        count = self.target_count(n)
        protect = self.protected(n)
        scores: dict[int, float] = {}
        for i in range(n):
            outputs = stream_state(engine, i + 1, self.config["last_layer_norm"])
            scores[i] = sum(block_influence(x, y) for x, y in zip(engine.inputs[i], outputs))
        removed = select_lowest(self.name, scores, count, protect)
        trace = {"block_influence": round_scores(scores), "order": sorted(scores, key=lambda i: (scores[i], i))}
        return PassResult([drop_op(removed)], trace)
