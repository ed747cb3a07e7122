"""``angular``: Gromov et al. ("The unreasonable ineffectiveness of the deeper layers"), one contiguous block.

No official code exists; this follows the paper's definition as implemented by sramshetty/ShortGPT (``angular=True``,
the code SLM ships) and arcee-ai/PruneMe: with x^ℓ the input of layer ℓ (HF ``hidden_states[ℓ]``),
d(ℓ, n) = (1/π)·arccos(cos(x^ℓ_T, x^{ℓ+n}_T)) on the last token T, averaged over samples (cosine clamped to [−1, 1]
as PruneMe does); ℓ* = argmin_ℓ d(ℓ, n) over ℓ = 0..L−n and layers ℓ*..ℓ*+n−1 are removed. ``hidden_states[L]`` is
post-norm in HF, kept by ``last_layer_norm`` (default). A block containing a ``protect``ed layer is not a candidate.
"""

from __future__ import annotations

import math

import torch

from ...errors import PassError
from ...metrics import token_cosines
from ...plan import drop_op
from ..base import NUM_LAYERS, PROTECT, RATIO, CompressionPass, PassResult
from .common import round_scores, stream_state
from .shortgpt import LAST_LAYER_NORM


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(1/π)·arccos(cos(a, b)) along the last dimension, cosine clamped to [−1, 1]; in [0, 1]."""
    return torch.arccos(token_cosines(a, b).clamp(-1.0, 1.0)) / math.pi


class AngularPass(CompressionPass):
    name = "angular"
    streams = True  # runs on a lazy model through the sequential engine
    handles_removed_sublayers = True  # removes whole layers, running them only through the engine
    description = "Gromov et al. angular distance at the last token: remove the most redundant contiguous block."
    params = (RATIO, NUM_LAYERS, PROTECT, LAST_LAYER_NORM)

    def run(self, engine) -> PassResult:
        engine.require_calibration(self.name)
        engine.record_layer_inputs()
        L = engine.num_layers
        block = self.target_count(L)
        protect = self.protected(L)

        def state(i: int) -> list[torch.Tensor]:
            return stream_state(engine, i, self.config["last_layer_norm"])

        distances: dict[int, float] = {}
        for start in range(0, L - block + 1):
            per_sample = torch.cat(
                [angular_distance(x[:, -1], y[:, -1]) for x, y in zip(state(start), state(start + block))]
            )
            distances[start] = float(per_sample.mean())
        allowed = {s: d for s, d in distances.items() if not any(i in protect for i in range(s, s + block))}
        if not allowed:
            raise PassError(f"angular: every {block}-layer block contains a protected layer")
        best = min(allowed, key=lambda s: (allowed[s], s))
        trace = {"block_size": block, "distance_by_start": round_scores(distances), "start": best}
        return PassResult([drop_op(range(best, best + block))], trace)
