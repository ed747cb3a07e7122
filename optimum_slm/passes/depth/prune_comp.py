"""``prune-comp``: Prune&Comp (Chen et al., AAAI 2026), iterative layer pruning with magnitude compensation, faithful
to the official code (chenxinrui-tsinghua/PruneAndComp: ``CosSim_BI.py``, the CosSim(BI) metric of its README
example and ``run.sh``, with ``magcomp.py``'s ``get_scale_params`` and ``fuse_scale``).

Official loop, ``num_to_prune`` rounds, each on the model as the previous rounds left it (changed in place)::

    BI_k = Σ_{samples, tokens} (1 − cos(input of layer k, output of layer k))     every alive layer; NaN cosines 0.5
    p    = argmin_k BI_k                                                         stable sort: the lowest k on ties
    m_k[n, c] = mean over the tokens of sample n of |input of layer k|, channel c  (k = p, p + 1: the removed layer's
                                                                                     input and output)
    s    = mean_c ( (1/N) Σ_n m_{p+1}[n, c] / m_p[n, c] )                        one number
    delete layer p; embed_tokens.weight *= s; o_proj.weight *= s and down_proj.weight *= s of every layer below p

The fold multiplies every term of the residual stream entering the cut (the embedding and each branch output below
it) by ``s``, so the stream the next layer reads has the removed layer's output magnitude; the layers below see the
same normalised inputs (their RMSNorms are scale-invariant up to ε). No run-time cost. Here each round becomes two
plan ops: ``drop [b]`` and ``rescale {"layers": <alive layers below b>, "scale": s}`` (plan/stream_ops.py), so
``apply_plan`` performs the official fold, in the official order, on the base's weights.

The search runs each round's model as ``apply_plan`` builds it: a rescaled layer is a private copy with the same
folds (bit-identical weights); the embedding output is the base's recorded one multiplied by the scales in turn
(bit-identical to the scaled embedding's lookup in every family but Gemma-2/3, whose √d multiplier comes after the
lookup and rounds differently in the last bit). Round 0 reads the base's recorded activations; every later round
runs the alive layers once over the search set, which gives both the BIs and the magnitudes.

Kept from the official code: BI on raw layer outputs (no final norm; the last layer may go), the 0.5 for NaN cosines,
the per-sample per-channel ratio averaged over samples then channels, one scalar per round, the fold into the
embedding and every layer below the cut (only those: the layers above are untouched), no barrier layers.

Differences, all documented: the official BI reads 128 and the scale 256 calibration samples of 2048 wikitext-2
tokens (seed 0); here both read the search set (``--calib-*``). The official model runs in float16; ours in its load
dtype, BI cosines in float64. A round whose lowest-BI layer is the last one fails in the official code (its hook list
has no layer above: ``IndexError``); here its output (before the final norm) is the magnitude reference. Where the
fold would not do what it intends, ``rescale`` does: Gemma-2/3's post-branch norms would cancel a scaled ``o_proj``
/ ``down_proj``, so their gains are scaled instead; ``o_proj``/``down_proj`` biases (none in the official models) are
scaled with the weights; and an output head tied to the embedding (the official models are untied) would turn the
in-place ``embed_tokens.weight *= s`` into logits × s, so the final norm's gain is divided by ``s`` (exact).
``compensate=false`` is the paper's "iterative pruning alone" ablation (the loop without ``fuse_scale``); the
one-shot baseline (``OneShotPrune.py`` fed the first round's BI order) is ``shortgpt last_layer_norm=false``.
``protect`` (no official counterpart) keeps base layers out of every round's choice.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ...engine import ForwardEngine, Slot
from ...errors import PassError
from ...metrics import block_influence
from ...plan import drop_op
from ...plan.stream_ops import rescale_op
from ...progress import progress_bar
from ..base import NUM_LAYERS, PROTECT, RATIO, CompressionPass, PassParam, PassResult
from .common import round_scores


def channel_magnitudes(hidden: torch.Tensor) -> torch.Tensor:
    """Per sample, per channel: the mean of |h| over the tokens, ``[rows, hidden]`` float32 (the official
    ``abs().mean(dim=0).mean(dim=1)`` of a one-sample batch)."""
    return hidden.float().abs().mean(dim=1)


def compensation_scale(before: torch.Tensor, after: torch.Tensor) -> float:
    """The official scale from the per-sample channel magnitudes of the removed layer's input (``before``) and
    output (``after``), both ``[samples, hidden]``: mean over channels of (mean over samples of after / before).
    Returned as the float32 number the fold multiplies by."""
    ratio = after.float() / before.float()
    return float(ratio.double().mean(dim=0).mean().float())


def _measure(engine: ForwardEngine, alive: Sequence[int], layer_scales: dict[int, list[float]],
             embedding_scales: Sequence[float]) -> tuple[list[float], list[torch.Tensor]]:
    """BI of every alive layer and the channel magnitudes entering each (the last: the top layer's output) in the
    current model: the base minus the removed layers, with the rescales so far folded in."""
    layers, adapter = engine.adapter.layers, engine.adapter
    if not embedding_scales and list(alive) == list(range(engine.num_layers)):
        # the base model itself: its recorded activations
        states = [engine.inputs[i] for i in range(engine.num_layers + 1)]
        bi = [sum(block_influence(x, y) for x, y in zip(states[k], states[k + 1])) for k in range(len(alive))]
        mags = [torch.cat([channel_magnitudes(h).cpu() for h in s]) for s in states]
        return bi, mags
    hidden = engine.run_layers([], 0, final_norm=False)  # the recorded embedding output, on the compute device
    for s in embedding_scales:  # as the rescaled embedding looks it up: w ← (w·s) in float32, cast back, in turn
        hidden = [(h.float() * s).to(h.dtype) for h in hidden]
    bi: list[float] = []
    mags = [torch.cat([channel_magnitudes(h).cpu() for h in hidden])]
    for i in alive:
        module = layers[i]
        if layer_scales[i]:
            module = engine.copy_layer(i)  # a private copy, rescaled as apply_plan rescales it
            with torch.no_grad():
                for s in layer_scales[i]:
                    adapter.scale_branches(module, s)
        out = engine.run_layers([Slot(module, i)], hidden, final_norm=False)
        bi.append(sum(block_influence(x, y) for x, y in zip(hidden, out)))
        mags.append(torch.cat([channel_magnitudes(h).cpu() for h in out]))
        hidden = out
    return bi, mags


def prune_comp(engine: ForwardEngine, count: int, protect: set[int] | None = None, compensate: bool = True,
               progress=None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The official loop on the engine's search set. Returns (plan ops, trace)."""
    protect = protect or set()
    engine.record_layer_inputs()
    alive = list(range(engine.num_layers))
    layer_scales: dict[int, list[float]] = {i: [] for i in alive}
    embedding_scales: list[float] = []
    ops: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    initial: list[int] = []
    for _ in range(count):
        bi, mags = _measure(engine, alive, layer_scales, embedding_scales)
        if not rounds:  # the official log's "initialized layer importance": the base's layers by BI
            initial = sorted(range(len(bi)), key=lambda k: (bi[k], k))
        candidates = [k for k in range(len(alive)) if alive[k] not in protect]
        if not candidates:
            raise PassError(f"prune-comp: no removable layer left among {len(alive)} alive (protect)")
        p = min(candidates, key=lambda k: (bi[k], k))
        scale = compensation_scale(mags[p], mags[p + 1])
        removed = alive.pop(p)
        rounds.append({"removed": removed, "position": p, "scale": scale,
                       "block_influence": round_scores(dict(zip(alive[:p] + [removed] + alive[p:], bi)))})
        if compensate:
            if not scale > 0 or scale == float("inf"):
                raise PassError(f"prune-comp: the magnitude scale for layer {removed} is {scale} (a channel of its "
                                "input has zero magnitude on the calibration data); use compensate=false")
            embedding_scales.append(scale)
            for i in alive[:p]:
                layer_scales[i].append(scale)
            ops += [drop_op([removed]), rescale_op(alive[:p], scale)]
        if progress is not None:
            progress.update(1)
    if not compensate:
        ops = [drop_op(r["removed"] for r in rounds)]
    trace = {
        "removal_order": [r["removed"] for r in rounds],
        "scales": [r["scale"] for r in rounds],
        "compensated": compensate,
        "initial_order": initial,
        "rounds": rounds,
    }
    return ops, trace


class PruneCompPass(CompressionPass):
    name = "prune-comp"
    streams = True  # runs on a lazy model through the sequential engine (copies of rescaled layers, one at a time)
    description = ("Prune&Comp (AAAI 2026): remove the lowest-Block-Influence layer, rescale the embedding and the "
                   "layers below by the magnitude gap (folded offline), re-measure, repeat.")
    params = (
        RATIO,
        NUM_LAYERS,
        PROTECT,
        PassParam("compensate", "bool", True, "fold the magnitude scale after each removal (official); false: "
                  "iterative BI pruning alone (the paper's ablation)"),
        PassParam("batch_size", "int", None, "calibration samples per forward batch (run-time only)"),
    )

    def run(self, engine: ForwardEngine) -> PassResult:
        engine.require_calibration(self.name)
        n = engine.num_layers
        count = self.target_count(n)
        protect = self.protected(n)
        if n - len(protect) < count:
            raise PassError(f"prune-comp: only {n - len(protect)} removable layers (protected: {sorted(protect)}), "
                            f"cannot remove {count}")
        with progress_bar(total=count, desc="prune-comp: rounds", unit="layer") as bar:
            ops, trace = prune_comp(engine, count, protect, self.config["compensate"], progress=bar)
        return PassResult(ops, trace)
