"""``slm``: Sliding-Window Merging (SLM/SWM), faithful to the official SLM.py control flow.

Official loop (L layers, 0-indexed; ``sim`` compares the CURRENT compressed candidate with the ORIGINAL model)::

    high = L - 2; low = high - 1                  # the last layer is never in a window
    while low >= 0:
        s = sim(merge(model, low, high))
        if s > T:  low -= 1                       # strict '>': grow the window down
        elif low + 1 != high:                     # the last passing window [low+1, high] has >= 2 layers
            model = merge(model, low + 1, high); high = low
        else:      high -= 1; low -= 1            # a 2-layer window already fails: slide
    # a window still passing when low reaches -1 is never committed; layer 0 is never merged

Speed: no model copy. Layers below a window are the base's, so a candidate runs from the recorded input of its bottom
layer through the merged layer and the (already compressed) layers above it. Similarities are memoised by the
candidate model's structure (its set of windows), which also makes the target-ratio search cheap.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any

import torch
from torch import nn

from ..arch import ArchAdapter, layer_state, load_layer_state
from ..engine import ForwardEngine, Slot
from ..errors import PassError
from ..hookspecs import hookimpl
from ..merge import MERGE_RULES, MergeRule, get_merge_rule
from ..plan import CompressionPlan, merge_op
from ..progress import progress_bar
from ..similarity import SIMILARITIES, get_similarity
from .base import NUM_LAYERS, RATIO, CompressionPass, PassParam

logger = logging.getLogger(__name__)

Window = tuple[int, int]


class WindowEvaluator:
    """Scores candidate models "committed windows + one candidate window" against the base, memoised.

    Holds the committed windows' merged layers and at most one extra (candidate) layer at a time.
    """

    def __init__(self, engine: ForwardEngine, rule: MergeRule, similarity: str, progress=None):
        self.engine = engine
        self.adapter: ArchAdapter = engine.adapter
        self.layers = list(self.adapter.layers)
        self.rule = rule
        self.similarity_name = similarity
        self.similarity = get_similarity(similarity)
        self.kinds = self.adapter.tensor_kinds(self.layers[0])
        self.memo: dict[frozenset, float] = {}
        self.evaluations = 0
        self._merged: dict[Window, nn.Module] = {}
        self.progress = progress

    def merged_layer(self, low: int, high: int) -> nn.Module:
        """A fresh module holding the merge of base layers low..high (the anchor's copy, merged weights)."""
        states = [layer_state(self.layers[i]) for i in range(low, high + 1)]
        module = copy.deepcopy(self.layers[self.rule.anchor_index(low, high)])
        load_layer_state(module, self.rule(states, self.kinds))
        return module

    def _slot_for_window(self, low: int, high: int, keep: bool) -> Slot:
        if (low, high) in self._merged:
            return Slot(self._merged[(low, high)], self.rule.anchor_index(low, high))
        module = self.merged_layer(low, high)
        if keep:
            self._merged[(low, high)] = module
        return Slot(module, self.rule.anchor_index(low, high))

    def stack(self, windows: list[Window], start: int, keep: bool = True) -> list[Slot]:
        """Slots of the compressed model from base layer ``start`` up, for non-overlapping ``windows``."""
        by_low = {w[0]: w for w in windows}
        slots, i = [], start
        while i < self.adapter.num_layers:
            if i in by_low:
                low, high = by_low[i]
                slots.append(self._slot_for_window(low, high, keep))
                i = high + 1
            else:
                slots.append(Slot(self.layers[i], i))
                i += 1
        return slots

    def score(self, committed: list[Window], candidate: Window) -> float:
        """Similarity of "committed + candidate" (a no-op candidate [k, k] scores the committed model)."""
        low, high = candidate
        windows = list(committed) + ([candidate] if low < high else [])
        key = frozenset(windows)
        if key in self.memo:
            return self.memo[key]
        if low < high:  # the candidate's layer lives for this call only; committed layers are kept
            slots = [self._slot_for_window(low, high, keep=False)] + self.stack(list(committed), high + 1)
        else:
            slots = self.stack(list(committed), low)
        value = self.similarity(self.engine, self.engine.run_layers(slots, low))
        self.memo[key] = value
        self.evaluations += 1
        if self.progress is not None:
            self.progress.update(1)
        return value

    def forget(self, keep: set[Window]) -> None:
        """Drop merged layers of windows no longer committed (keeps memory at the committed set)."""
        for w in list(self._merged):
            if w not in keep:
                del self._merged[w]


def official_window_loop(
    evaluator: WindowEvaluator,
    threshold: float,
    num_layers: int,
    protect: set[int] | None = None,
    max_window: int | None = None,
) -> tuple[list[Window], list[dict[str, Any]]]:
    """The official top-down SLM loop. Returns (committed windows top first, every tried window with its score).

    Optional constraints, off in the faithful configuration: a window that contains a ``protect``ed layer or has
    more than ``max_window`` layers fails without being scored (so the last passing window is committed, or the
    window slides).
    """
    protect = protect or set()
    committed: list[Window] = []
    tried: list[dict[str, Any]] = []
    high = num_layers - 2
    low = high - 1
    while low >= 0:
        blocked = low < high and (
            any(i in protect for i in range(low, high + 1))
            or (max_window is not None and high - low + 1 > max_window)
        )
        if blocked:
            passed = False
            tried.append({"window": [low, high], "sim": None, "passed": False, "blocked": True})
        else:
            s = evaluator.score(committed, (low, high))
            passed = s > threshold
            if low < high:
                tried.append({"window": [low, high], "sim": round(s, 6), "passed": passed})
        if passed:
            low -= 1
        elif low + 1 != high:
            committed.append((low + 1, high))
            evaluator.forget(set(committed))
            high = low
        else:
            high -= 1
            low -= 1
    return committed, tried


def removed_by(windows: list[Window]) -> int:
    return sum(h - l for l, h in windows)


class SLMPass(CompressionPass):
    name = "slm"
    description = "Sliding-Window Merging (AAAI-26), faithful to the official SLM.py; threshold or target ratio."
    params = (
        PassParam("threshold", "float", 0.72, "similarity threshold; sim > threshold grows the window"),
        RATIO,
        NUM_LAYERS,
        PassParam("merge", "str", "official", "merge rule", choices=None),
        PassParam("similarity", "str", "final-cosine", "similarity criterion", choices=tuple(SIMILARITIES)),
        PassParam("protect", "int_list", None, "base layers never placed in a window"),
        PassParam("max_window", "int", None, "largest window size in layers"),
        PassParam("batch_size", "int", None, "calibration samples per forward batch (run-time only)"),
    )
    runtime_params = ("batch_size",)

    def validate(self) -> None:
        super().validate()
        get_merge_rule(self.config["merge"])
        if self.config["max_window"] is not None and self.config["max_window"] < 2:
            raise PassError(f"max_window must be >= 2, got {self.config['max_window']}")

    def public_params(self) -> dict[str, Any]:
        return {k: v for k, v in super().public_params().items() if k not in self.runtime_params}

    def plan(self, model: nn.Module, calibration: torch.Tensor) -> CompressionPlan:
        if calibration is None:
            raise PassError("pass 'slm' needs calibration token ids")
        engine = ForwardEngine(model, calibration, batch_size=self.config["batch_size"])
        n = engine.num_layers
        if n < 4:
            raise PassError(f"slm needs at least 4 decoder layers, the model has {n}")
        target = self.target_count(n, required=False)
        protect = self.protected(n)
        rule = get_merge_rule(self.config["merge"])
        with progress_bar(desc=f"slm: scoring windows", unit="window") as bar:
            engine.record_layer_inputs()
            evaluator = WindowEvaluator(engine, rule, self.config["similarity"], progress=bar)
            run = lambda t: official_window_loop(evaluator, t, n, protect, self.config["max_window"])
            search: list[dict[str, Any]] = []
            if target is None:
                threshold = self.config["threshold"]
                windows, tried = run(threshold)
            else:
                threshold, windows, tried, search = self._search_threshold(run, target, bar)
            bar.set_postfix(committed=len(windows), removed=removed_by(windows))
        params = self.public_params()
        params["threshold"] = threshold
        trace: dict[str, Any] = {
            "tried": tried,
            "windows": [list(w) for w in windows],
            "similarity_evaluations": evaluator.evaluations,
        }
        if target is not None:
            trace["search"] = search
            trace["target_removed"] = target
            got = removed_by(windows)
            if got != target:
                msg = (
                    f"slm: no threshold removes exactly {target} layers; using threshold {threshold} which removes "
                    f"{got}"
                )
                trace["note"] = msg
                warnings.warn(msg, stacklevel=2)
        ops = [merge_op(lo, hi, rule.name) for lo, hi in windows]
        return self.make_plan(model, ops, calibration, trace=trace, params=params)

    @staticmethod
    def _search_threshold(run, target: int, bar) -> tuple[float, list[Window], list, list]:
        """Bisection over the threshold for exactly ``target`` removed layers (memoised runs)."""
        search: list[dict[str, Any]] = []
        results: dict[float, tuple[list[Window], list]] = {}

        def count(t: float) -> int:
            if t not in results:
                results[t] = run(t)
                search.append({"threshold": round(t, 6), "removed": removed_by(results[t][0])})
                bar.set_postfix(threshold=f"{t:.4f}", removed=search[-1]["removed"])
            return removed_by(results[t][0])

        hi = 1.0  # cosine-type scores are <= 1, so nothing passes: 0 removed
        lo = 0.72
        while count(lo) < target and lo > -1.0:
            hi = lo
            lo = max(-1.0, lo - 0.05)
        chosen = None
        if count(lo) == target:
            chosen = lo
        elif count(lo) > target:
            for _ in range(40):
                mid = (lo + hi) / 2
                c = count(mid)
                if c == target:
                    chosen = mid
                    break
                if c > target:
                    lo = mid
                else:
                    hi = mid
                if hi - lo < 1e-7:
                    break
        if chosen is not None:
            # report a short threshold when one with few decimals gives the same windows
            for digits in range(2, 7):
                r = round(chosen, digits)
                if count(r) == target and results[r][0] == results[chosen][0]:
                    chosen = r
                    break
        else:
            below = [t for t in results if removed_by(results[t][0]) < target]
            chosen = max(below, key=lambda t: (removed_by(results[t][0]), t))
        windows, tried = results[chosen]
        return chosen, windows, tried, search


@hookimpl
def register_passes(register):
    register(SLMPass)
