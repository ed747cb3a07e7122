"""``laco``: LaCo layer collapse (Yang et al., EMNLP 2024 Findings), top-down, with its RDSC merge.

Official loop (yangyifei729/LaCo ``laco_llama-13b.ipynb``; positions in the CURRENT, already collapsed model)::

    lay = H - C
    while lay >= L:
        m = min(C - 1, len(layers) - lay - 1)          # fold the next m layers into layer lay
        candidate = merge(current, lay, m)
        if sim(original, candidate) > T:                # mean over samples of the flattened final-state cosine
            current = candidate; lay -= I
            if lay >= len(layers): lay = len(layers) - 1 - C
        else:
            lay -= 1

Merges chain: a later window may contain an already merged layer (and, once the model has shrunk, the original top
layer). In base numbering a chained window is one merge op over the union of its original layers:

* ``merge="official"``: the notebook's in-place update ``copy[lay] += current[lay+k] − copy[lay]`` leaves the top
  layer's projections and layer ``lay``'s norms and biases. That is merge.py's ``official`` rule, and it composes: a
  chain of such merges equals ``official`` on the union window.
* ``merge="paper"``: RDSC θ*_l = θ_l + Σ_{k=1..m}(θ_{l+k} − θ_l) on the projections (norms and biases of layer l) —
  merge.py's ``paper`` rule on a window of unmerged layers. A chained window has other coefficients, so it becomes a
  ``linear`` op with the exact coefficients of every original layer.

With ``ratio``/``num_layers`` the loop stops at the target (the last merge folds only the layers still needed) and,
when the given threshold does not reach it, the threshold is lowered by bisection to the largest value that does.
Speed: no model copy; layers below ``lay`` are the base's, so a candidate runs from the recorded input of ``lay``
through the merged layer and the collapsed layers above; similarities are memoised by the candidate's structure.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch import nn

from ...arch import load_layer_state, window_states
from ...engine import ForwardEngine, Slot
from ...metrics import per_sample_cosine
from ...errors import PassError
from ...merge import get_merge_rule
from ...plan import merge_op
from ...progress import advance_to, progress_bar
from ..base import NUM_LAYERS, PROTECT, RATIO, CompressionPass, PassParam, PassResult


@dataclass(frozen=True)
class Unit:
    """One layer of the collapsed model: base layers ``lo..hi`` and the projection coefficients over them
    (``paper`` mode; ``None`` for an unmerged layer or for the ``official`` rule, which needs none)."""

    lo: int
    hi: int
    coeffs: tuple[float, ...] | None = None

    @property
    def merged(self) -> bool:
        return self.hi > self.lo


def rdsc_coefficients(units: list[Unit]) -> tuple[float, ...]:
    """Coefficients over the union's base layers of RDSC applied to ``units`` (bottom first):
    φ_0 + Σ_{k≥1}(φ_k − φ_0) = Σ_{k≥1} φ_k − (m − 1)·φ_0, each φ itself a combination of base layers."""
    lo, hi = units[0].lo, units[-1].hi
    m = len(units) - 1
    out = [0.0] * (hi - lo + 1)
    for k, u in enumerate(units):
        weight = float(1 - m) if k == 0 else 1.0
        if u.coeffs is None and u.merged:
            raise ValueError("a merged unit in paper mode carries coefficients")
        own = u.coeffs if u.coeffs is not None else (1.0,)
        for offset, c in enumerate(own):
            out[u.lo - lo + offset] += weight * c
    return tuple(out)


class LaCoSearch:
    """The LaCo loop over one engine, memoised across thresholds."""

    def __init__(self, engine: ForwardEngine, mode: str, C: int, I: int, H: int, L: int, protect: set[int]):
        self.engine, self.mode = engine, mode
        self.C, self.I, self.H, self.L = C, I, H, L
        self.protect = protect
        self.layers = list(engine.adapter.layers)
        self.kinds = engine.adapter.tensor_kinds(self.layers[0])
        self.memo: dict[tuple, float] = {}
        self.modules: dict[Unit, nn.Module] = {}
        self.evaluations = 0
        self.progress = None

    # ------------------------------------------------------------------ merge ops and modules
    def op_for(self, unit: Unit) -> tuple[str, dict[str, Any]]:
        """(rule, args) of the merge op that rebuilds ``unit`` from the base."""
        if self.mode == "official":
            return "official", {}
        size = unit.hi - unit.lo + 1
        if unit.coeffs == (1.0 - (size - 1),) + (1.0,) * (size - 1):
            return "paper", {}
        return "linear", {"coefficients": list(unit.coeffs)}

    def module_for(self, unit: Unit) -> nn.Module:
        if not unit.merged:
            return self.layers[unit.lo]
        if unit in self.modules:
            return self.modules[unit]
        rule, args = self.op_for(unit)
        states = window_states([self.layers[i] for i in range(unit.lo, unit.hi + 1)])
        module = copy.deepcopy(self.layers[unit.lo])
        load_layer_state(module, get_merge_rule(rule)(states, self.kinds, **args))
        return module

    def collapse(self, units: list[Unit]) -> Unit:
        coeffs = rdsc_coefficients(units) if self.mode == "paper" else None
        return Unit(units[0].lo, units[-1].hi, coeffs)

    # ------------------------------------------------------------------ scoring
    def sim(self, units: list[Unit], position: int, candidate: Unit, m: int) -> float:
        """Final-state cosine vs the base of ``units`` with ``units[position..position+m]`` replaced by ``candidate``."""
        above = units[position + m + 1 :]
        key = (candidate, tuple(u for u in above if u.merged))
        if key in self.memo:
            return self.memo[key]
        if units[position].lo != position:  # every layer below the window is a base layer (top-down loop)
            raise AssertionError("laco: a merged layer below the window")
        slots = [Slot(self.module_for(candidate), candidate.lo)] + [Slot(self.module_for(u), u.lo) for u in above]
        hidden = self.engine.run_layers(slots, candidate.lo)
        value = float(per_sample_cosine(hidden, self.engine.base_final).mean())
        self.memo[key] = value
        self.evaluations += 1
        return value

    def run(self, threshold: float, target: int | None) -> tuple[list[Unit], list[dict[str, Any]]]:
        """One LaCo loop at ``threshold``; stops once ``target`` layers are removed (None: no target)."""
        units = [Unit(i, i) for i in range(self.engine.num_layers)]
        tried: list[dict[str, Any]] = []
        removed = 0
        lay = self.H - self.C
        if self.progress is not None:  # lay only moves down, from H - C to L
            self.progress.reset(total=lay - self.L + 1)
            self.progress.set_description(f"laco: threshold {threshold:.4g}")
        while lay >= self.L:
            advance_to(self.progress, self.H - self.C - lay)
            remaining = None if target is None else target - removed
            if remaining == 0:
                break
            m = min(self.C - 1, len(units) - lay - 1)
            if remaining is not None:
                m = min(m, remaining)
            if m <= 0:
                lay -= 1
                continue
            candidate = self.collapse(units[lay : lay + m + 1])
            entry: dict[str, Any] = {"position": lay, "window": [candidate.lo, candidate.hi], "folded": m}
            if any(candidate.lo <= i <= candidate.hi for i in self.protect):
                entry.update(sim=None, passed=False, blocked=True)
                tried.append(entry)
                lay -= 1
                continue
            s = self.sim(units, lay, candidate, m)
            passed = s > threshold
            entry.update(sim=round(s, 6), passed=passed)
            tried.append(entry)
            if passed:
                self.modules.setdefault(candidate, self.module_for(candidate))
                units = units[:lay] + [candidate] + units[lay + m + 1 :]
                removed += m
                lay -= self.I
                if lay >= len(units):  # the notebook's reset; unreachable for I >= 1, kept for fidelity
                    lay = len(units) - 1 - self.C
            else:
                lay -= 1
        advance_to(self.progress, self.H - self.C - self.L + 1)
        return units, tried


def removed_count(units: list[Unit]) -> int:
    return sum(u.hi - u.lo for u in units)


class LaCoPass(CompressionPass):
    name = "laco"
    streams = True  # runs on a lazy model through the sequential engine
    search_outputs = ("threshold",)
    description = "LaCo layer collapse: top-down RDSC merges of C-layer windows accepted while the output cosine > T."
    params = (
        RATIO,
        NUM_LAYERS,
        PROTECT,
        PassParam("threshold", "float", 0.45, "T: a merge is kept when the final-state cosine is > T (official 0.45)"),
        PassParam("merge_layers", "int", 7, "C: layers per merge window, C−1 fold into the first (official 7)"),
        PassParam("interval", "int", 1, "I: positions to move down after an accepted merge (official 1)"),
        PassParam("highest_layer", "int", None, "H: the first window is [H−C, H−1] (official: the last layer, L−1)"),
        PassParam("lowest_layer", "int", 0, "L: the lowest window start (official 0)"),
        PassParam("merge", "str", "official", "official (in-place code) or paper (RDSC formula)", ("official", "paper")),
        PassParam("batch_size", "int", None, "calibration samples per forward batch (run-time only)"),
    )

    def validate(self) -> None:
        super().validate()
        if self.config["merge_layers"] < 2:
            raise PassError(f"merge_layers (C) must be >= 2, got {self.config['merge_layers']}")
        if self.config["interval"] < 1:
            raise PassError(f"interval (I) must be >= 1, got {self.config['interval']}")
        if self.config["lowest_layer"] < 0:
            raise PassError(f"lowest_layer (L) must be >= 0, got {self.config['lowest_layer']}")
        if not -1.0 <= self.config["threshold"] < 1.0:
            raise PassError(f"threshold (T) is a cosine and must be in [-1, 1), got {self.config['threshold']}")

    def run(self, engine: ForwardEngine) -> PassResult:
        engine.require_calibration(self.name)
        n = engine.num_layers
        target = self.target_count(n, required=False)
        C = self.config["merge_layers"]
        H = n - 1 if self.config["highest_layer"] is None else self.config["highest_layer"]
        L = self.config["lowest_layer"]
        if not 0 <= H < n:
            raise PassError(f"highest_layer (H) must be in 0..{n - 1}, got {H}")
        if H - C < L:
            raise PassError(f"laco: no window fits: H − C = {H - C} is below L = {L} (C={C}, {n} layers)")
        search = LaCoSearch(engine, self.config["merge"], C, self.config["interval"], H, L, self.protected(n))
        with progress_bar(desc="laco: trying merges", unit="position") as bar:
            engine.record_layer_inputs()
            search.progress = bar
            threshold = self.config["threshold"]
            history: list[dict[str, Any]] = []

            def run(t: float):
                result = search.run(t, target)
                history.append({"threshold": round(t, 6), "removed": removed_count(result[0])})
                return result

            units, tried = run(threshold)
            if target is not None and removed_count(units) < target:
                threshold, units, tried = self._lower_threshold(run, threshold, target, n)
        trace: dict[str, Any] = {
            "tried": tried,
            "merges": [[u.lo, u.hi] for u in units if u.merged],
            "similarity_evaluations": search.evaluations,
            "H": H,
        }
        if target is not None:
            trace["target_removed"] = target
            trace["search"] = history
        ops = []
        for u in sorted((u for u in units if u.merged), key=lambda u: -u.lo):  # top first, as found
            rule, args = search.op_for(u)
            ops.append(merge_op(u.lo, u.hi, rule, **({"args": args} if args else {})))
        params = self.public_params()
        params["threshold"] = threshold
        return PassResult(ops, trace, params=params)

    @staticmethod
    def _lower_threshold(run, start: float, target: int, n: int):
        """The largest threshold <= ``start`` whose loop removes ``target`` layers (bisection; cosines are >= −1)."""
        lo, hi = -1.01, start
        units, tried = run(lo)
        if removed_count(units) < target:
            raise PassError(
                f"laco: cannot remove {target} of {n} layers even when every merge is accepted; "
                "lower lowest_layer or raise highest_layer / merge_layers"
            )
        best = (lo, units, tried)
        while hi - lo > 1e-6:
            mid = (lo + hi) / 2
            units, tried = run(mid)
            if removed_count(units) >= target:
                lo, best = mid, (mid, units, tried)
            else:
                hi = mid
        # a short threshold with the same outcome is easier to quote and re-run
        t, units, _ = best
        for digits in range(2, 7):
            r = round(t, digits)
            if r <= t:
                u2, tr2 = run(r)
                if u2 == units:
                    return r, u2, tr2
        return best
