"""``sleb``: SLEB (Song et al., ICML 2024), greedy block elimination by calibration loss.

Official loop (leapingjagg-dev/SLEB ``sleb.py``)::

    alive = [0..L-1]
    repeat K times:
        for j in early_barrier .. len(alive) - latter_barrier - 1:    # first / last alive blocks are never tried
            switch alive[j] off (identity pass-through), loss_j = calibration NLL, switch it on
        remove alive[argmin_j loss_j]                                   # removals accumulate

Speed, exactly the same numbers: switching block j off leaves every block below it unchanged, so a trial runs only
the alive blocks above j, from the current model's recorded input of block j. After each round the inputs of the
blocks above the removed one are re-recorded for the compressed model (one partial pass). ``sleb_naive`` is the
official-style reference (every trial a full model forward, one calibration sample at a time); the tests check that
both choose the same blocks and ``benchmarks/sleb_speed.py`` times them.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch
from torch import nn

from ...arch import ArchAdapter
from ...engine import Batches, ForwardEngine, Slot
from ...errors import PassError
from ...metrics import next_token_nll
from ...plan import drop_op
from ...progress import progress_bar
from ..base import NUM_LAYERS, PROTECT, RATIO, CompressionPass, PassParam, PassResult


def _check_barriers(num_layers: int, count: int, early: int, latter: int) -> None:
    # in the last round len(alive) = L - count + 1 blocks are alive, of which early + latter are barriers
    if num_layers - count + 1 - early - latter < 1:
        raise PassError(
            f"sleb: cannot remove {count} of {num_layers} layers with early_barrier={early}, latter_barrier={latter}"
        )


def _round_candidates(alive: Sequence[int], early: int, latter: int, protect: set[int]) -> list[int]:
    """Positions in ``alive`` tried in one round (official range, minus protected layers)."""
    found = [j for j in range(early, len(alive) - latter) if alive[j] not in protect]
    if not found:
        raise PassError(f"sleb: no removable block left among {len(alive)} alive (barriers and protect)")
    return found


def sleb_fast(
    engine: ForwardEngine,
    count: int,
    early_barrier: int = 1,
    latter_barrier: int = 1,
    protect: set[int] | None = None,
    progress=None,
) -> tuple[list[int], list[dict[str, Any]]]:
    """Greedy SLEB on the engine's recorded activations. Returns (removed base layers in removal order, rounds)."""
    protect = protect or set()
    engine.record_layer_inputs()
    layers = list(engine.adapter.layers)
    alive = list(range(engine.num_layers))
    # states[k]: input of alive[k] in the CURRENT compressed model, per batch; states[len(alive)]: raw output
    states: list[Batches] = list(engine.inputs)
    removed: list[int] = []
    rounds: list[dict[str, Any]] = []
    for _ in range(count):
        started = time.perf_counter()
        losses: dict[int, float] = {}
        for j in _round_candidates(alive, early_barrier, latter_barrier, protect):
            above = [Slot(layers[i], i) for i in alive[j + 1 :]]
            total, tokens = engine.token_nll(engine.run_layers(above, states[j]))
            losses[alive[j]] = total
            if progress is not None:
                progress.update(1)
        best = min(losses, key=lambda i: (losses[i], i))
        k = alive.index(best)
        rounds.append({"removed": best, "loss": {str(i): l for i, l in losses.items()}, "tokens": tokens})
        removed.append(best)
        del alive[k]
        # re-record: the removed block's input now feeds alive[k]; everything above is recomputed
        above = [Slot(layers[i], i) for i in alive[k:]]
        recorded: list[Batches] = []
        engine.run_layers(above, states[k], final_norm=False, slot_inputs=recorded)
        states = states[:k] + recorded
        rounds[-1]["seconds"] = round(time.perf_counter() - started, 3)
    return removed, rounds


class _PassLayer(nn.Module):
    """A switched-off decoder layer: returns its input (the official ``pass_layer``)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        # models read per-layer attributes such as ``attention_type`` off the layer object when building masks
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@torch.inference_mode()
def _naive_loss(model: nn.Module, ids: torch.Tensor, per_sample: bool) -> float:
    device = next(model.parameters()).device
    total = 0.0
    chunks = [ids[i : i + 1] for i in range(ids.shape[0])] if per_sample else [ids]
    for batch in chunks:
        batch = batch.to(device)
        total += next_token_nll(model(batch, use_cache=False).logits, batch)[0]
    return total


def sleb_naive(
    model: nn.Module,
    ids: torch.Tensor,
    count: int,
    early_barrier: int = 1,
    latter_barrier: int = 1,
    protect: set[int] | None = None,
    per_sample: bool = True,
) -> tuple[list[int], list[dict[str, float]]]:
    """Reference SLEB as the official code runs it: each trial switches one block off and runs the whole model.

    ``per_sample=True`` feeds one calibration sequence at a time (the official ``get_loss`` loop). The model is
    restored before returning. Returns (removed base layers in removal order, per-round losses by base layer).
    """
    protect = protect or set()
    adapter = ArchAdapter(model)
    layers = adapter.layers
    original = list(layers)
    alive = list(range(len(original)))
    removed: list[int] = []
    rounds: list[dict[str, float]] = []
    try:
        for _ in range(count):
            losses: dict[int, float] = {}
            for j in _round_candidates(alive, early_barrier, latter_barrier, protect):
                layers[alive[j]] = _PassLayer(original[alive[j]])
                try:
                    losses[alive[j]] = _naive_loss(model, ids, per_sample)
                finally:
                    layers[alive[j]] = original[alive[j]]
            best = min(losses, key=lambda i: (losses[i], i))
            rounds.append(losses)
            removed.append(best)
            alive.remove(best)
            layers[best] = _PassLayer(original[best])  # stays off for the following rounds
    finally:
        for i, layer in enumerate(original):
            layers[i] = layer
    return removed, rounds


class SLEBPass(CompressionPass):
    name = "sleb"
    streams = True  # runs on a lazy model through the sequential engine
    handles_removed_sublayers = True  # removes whole layers, running them only through the engine
    description = "SLEB: greedy removal of the block whose absence costs the least calibration loss, round by round."
    params = (
        RATIO,
        NUM_LAYERS,
        PROTECT,
        PassParam("early_barrier", "int", 1, "the first N alive blocks are never removed (official 1)"),
        PassParam("latter_barrier", "int", 1, "the last N alive blocks are never removed (official 1)"),
        PassParam("batch_size", "int", None, "calibration samples per forward batch (run-time only)"),
    )

    def validate(self) -> None:
        super().validate()
        for key in ("early_barrier", "latter_barrier"):
            if self.config[key] < 0:
                raise PassError(f"{key} must be >= 0, got {self.config[key]}")

    def run(self, engine: ForwardEngine) -> PassResult:
        engine.require_calibration(self.name)
        n = engine.num_layers
        count = self.target_count(n)
        protect = self.protected(n)
        early, latter = self.config["early_barrier"], self.config["latter_barrier"]
        _check_barriers(n, count, early, latter)
        total = sum(n - r - early - latter for r in range(count))
        with progress_bar(total=total, desc="sleb: trying blocks", unit="trial") as bar:
            removed, rounds = sleb_fast(engine, count, early, latter, protect, progress=bar)
        trace = {"removal_order": removed, "rounds": rounds}
        return PassResult([drop_op(removed)], trace)
