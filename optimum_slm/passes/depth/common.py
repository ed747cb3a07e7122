"""Helpers shared by the one-shot depth baselines: lowest-score selection, trace rounding, residual-stream reads."""

from __future__ import annotations

from typing import Mapping

from ...errors import PassError


def select_lowest(name: str, scores: Mapping[int, float], count: int, excluded: set[int]) -> list[int]:
    """The ``count`` layers with the lowest score among those not ``excluded`` (ties: lower index first, as a
    stable ``argsort`` gives); sorted ascending."""
    candidates = sorted((s, i) for i, s in scores.items() if i not in excluded)
    if len(candidates) < count:
        raise PassError(
            f"{name}: only {len(candidates)} removable layers (protected: {sorted(excluded)}), cannot remove {count}"
        )
    return sorted(i for _, i in candidates[:count])


def round_scores(scores: Mapping[int, float], digits: int = 6) -> dict[str, float]:
    """Scores keyed by layer index as JSON-friendly strings, rounded for the plan trace."""
    return {str(i): float(f"{s:.{digits}g}") for i, s in sorted(scores.items())}


def stream_state(engine, i: int, post_norm_last: bool):
    """The residual stream entering base layer ``i`` per batch; ``i = L`` is the stack's output, after the final norm
    when ``post_norm_last`` (as HF ``hidden_states[L]``, which ShortGPT and angular distance read)."""
    if i == engine.num_layers and post_norm_last:
        return engine.base_final
    return engine.inputs[i]
