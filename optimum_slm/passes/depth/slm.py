"""``slm``: Sliding-Window Merging (SLM/SWM), faithful to the official SLM.py control flow, plus named variants.

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

Variants (all off by default): ``similarity`` (see similarity.py), ``merge`` (any registered merge rule, e.g.
``calibrated``: keep-top plus fitted branch scales, see merge/calibrated.py; a fitted rule is fitted for every scored
candidate, so the search sees the merge it will commit), ``protect`` / ``max_window`` constraints, and ``search``:

* ``official``: the loop above;
* ``global``: score every window of 2..``max_window`` layers on its own (only it merged), then pick the
  non-overlapping set that removes exactly the target count with the least total cost Σ −log(sim) (dynamic
  programming). A keep-top window equals deleting the layers below its top, so this space contains ShortGPT's and
  Shortened-LLM's choices;
* ``greedy``: remove one layer per round: every round scores each way of growing the plan by one layer (a new
  2-layer window, or an existing window extended up or down) with the committed windows in place, and keeps the
  best. Candidates resume from the compressed model's recorded activations, so only the layers above the change run.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from typing import Any

import torch
from torch import nn

from ...arch import ArchAdapter, load_layer_state, window_states
from ...engine import Batches, ForwardEngine, Slot
from ...errors import PassError
from ...merge import MERGE_RULES, get_merge_rule
from ...plan import merge_op
from ...progress import advance_to, progress_bar
from ...similarity import SIMILARITIES, get_similarity
from ..base import FIT_ORDER, NUM_LAYERS, OUTLIER_CLIP, RATIO, RIDGE, CompressionPass, PassParam, PassResult

logger = logging.getLogger(__name__)

Window = tuple[int, int]
CALIBRATED = "calibrated"
SEARCHES = ("official", "global", "greedy")
SEARCH_RIDGE = PassParam("search_ridge", "float", None, "score candidates with a map fitted on the search set with this "
                         "ridge (rules with a fitted map; default: off)")


class WindowEvaluator:
    """Scores compressed candidates (a set of merged windows) against the base, memoised by the window set.

    Keeps the merged layers of the ``committed`` windows; any other window's layer is built for one call, so at most
    one extra layer beyond the committed ones is alive at a time.
    """

    def __init__(self, engine: ForwardEngine, merge: str, similarity: str, search_ridge: float | None = None,
                 outlier_clip: float | None = None):
        self.engine = engine
        #: the outlier-aware fit's clip of every map, search-set and final (None: every token alike)
        self.outlier_clip = outlier_clip
        #: when set (and the rule fits a map), every scored candidate gets a map fitted on the search set with this
        #: ridge, so the search sees what a map can recover; the final maps are fitted on the fit set afterwards
        self.search_ridge = search_ridge if get_merge_rule(merge).fit_map else None
        self.adapter: ArchAdapter = engine.adapter
        self.layers = list(self.adapter.layers)
        self.rule = get_merge_rule(merge)
        self.similarity = get_similarity(similarity)
        self.kinds = self.adapter.tensor_kinds(self.layers[0])
        self.memo: dict[frozenset, float] = {}
        self.evaluations = 0
        self.committed: set[Window] = set()
        self._merged: dict[Window, nn.Module] = {}
        #: fitted tensors of every window built so far, by window and role
        self._fitted: dict[Window, dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------ building
    def merged_layer(self, low: int, high: int) -> nn.Module:
        """A fresh module holding the merge of base layers low..high (the anchor layer's copy, merged weights)."""
        anchor = self.rule.anchor_index(low, high)
        states = window_states([self.layers[i] for i in range(low, high + 1)])
        module = copy.deepcopy(self.layers[anchor])
        load_layer_state(module, self.rule(states, self.kinds))
        if self.rule.fit is not None:
            self._fitted[(low, high)] = self.rule.fit(self.engine, module, anchor, low, high)
        if self.search_ridge is not None:
            self._search_map(module, anchor, low, high)
        return module

    def _search_map(self, module: nn.Module, anchor: int, low: int, high: int) -> None:
        """Fold a map fitted on the search set's recorded base activations (window input → window output)."""
        from ...merge.lstsq import fit_search_map

        fit_search_map(self.engine, module, anchor, low, high + 1, self.rule.map_branches, self.search_ridge,
                       f"search map {low}-{high}", self.outlier_clip)

    def slot(self, window: Window) -> Slot:
        low, high = window
        module = self._merged.get(window)
        if module is None:
            module = self.merged_layer(low, high)
            if window in self.committed:
                self._merged[window] = module
        return Slot(module, self.rule.anchor_index(low, high))

    def stack(self, windows, start: int) -> list[Slot]:
        """Slots of the compressed model from base layer ``start`` up, for non-overlapping ``windows``."""
        by_low = {w[0]: w for w in windows}
        slots, i = [], start
        while i < self.adapter.num_layers:
            if i in by_low:
                slots.append(self.slot(by_low[i]))
                i = by_low[i][1] + 1
            else:
                slots.append(Slot(self.layers[i], i))
                i += 1
        return slots

    def commit(self, windows) -> None:
        """Declare the windows whose merged layers are kept between calls (the others are freed)."""
        self.committed = set(windows)
        for w in list(self._merged):
            if w not in self.committed:
                del self._merged[w]

    def op(self, window: Window, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The merge op of ``window``; a fitted rule's tensors are added to ``tensors`` under readable names."""
        if not self.rule.tensor_roles:
            return merge_op(window[0], window[1], self.rule.name)
        refs = {}
        for role, value in self._fitted[window].items():
            name = f"merge.{window[0]}-{window[1]}.{role}"
            tensors[name] = value
            refs[role] = name
        return merge_op(window[0], window[1], self.rule.name, tensors=refs)

    def fit_maps(self, windows, order: str, ridge: float, keep_replay: bool = False) -> dict[str, Any]:
        """Fit the rule's least-squares map of every window on the fit set and fold it into the merged layers;
        returns the fit's cost record. ``keep_replay``: leave the base states the fit streamed for ``refine`` to
        replay (the caller frees them: ``engine.release_fit_replay``)."""
        from ...merge.lstsq import MapSite, fit_output_maps

        ordered = sorted(windows)
        # rebuild the merged layers without the search-set maps, then keep them: lower ones carry their maps into
        # higher fits
        self.search_ridge = None
        self._merged.clear()
        self.commit(ordered)
        sites = [MapSite(f"{lo}-{hi}", self.slot((lo, hi)).module, self.rule.anchor_index(lo, hi), lo, hi + 1,
                         self.rule.map_branches) for lo, hi in ordered]
        first = ordered[0][0]

        def stack_below(k: int) -> list[Slot]:
            full = self.stack(ordered, first)
            stop = next(i for i, s in enumerate(full) if s.module is sites[k].module)
            return full[:stop]

        maps, cost = fit_output_maps(self.engine, sites, stack_below, order, ridge, what=self.rule.name,
                                     outlier_clip=self.outlier_clip, keep_replay=keep_replay)
        for (lo, hi), site in zip(ordered, sites):
            self._fitted.setdefault((lo, hi), {}).update(maps[site.name])
        return {"order": order, "ridge": ridge, **cost}

    def refine(self, windows, ops: list[dict[str, Any]], tensors: dict[str, torch.Tensor], epochs: int,
               lr: float) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
        """Refine every committed window's merged layer (``merge/refine.py``, on the base's states) and follow its
        merge op with a ``set_weights`` op; returns the ops and a record per window. A window whose best held-out
        epoch is the fitted merge itself (epoch 0) keeps its merge alone: a ``set_weights`` op would store the
        weights the merge already rebuilds."""
        from ...merge.refine import refine_layer
        from ...plan.refine_ops import set_weights_op

        out, records = [], {}
        for window, op in zip(windows, ops):
            lo, hi = window
            slot = self.slot(window)
            records[f"{lo}-{hi}"] = refine_layer(self.engine, slot.module, slot.type_index, lo, hi + 1, epochs, lr,
                                                 what=f"refine {lo}-{hi}")
            if records[f"{lo}-{hi}"]["best_epoch"] == 0:
                out.append(op)
                continue
            refs = {}
            for name, value in slot.module.named_parameters():
                refs[name] = f"refine.{lo}-{hi}.{name}"
                tensors[refs[name]] = value.detach().to("cpu", torch.float32).clone()
            out += [op, set_weights_op(lo, refs)]
        return out, records

    # ------------------------------------------------------------------ scoring
    def score_set(self, windows, start: int | None = None, start_hidden: Batches | None = None,
                  record: list | None = None) -> float:
        """Similarity of the base with ``windows`` merged. ``start``/``start_hidden`` resume from a given point;
        ``record`` (an empty list) receives the input of every slot run (see ``ForwardEngine.run_layers``), unless
        the score was memoised."""
        windows = [tuple(w) for w in windows]
        key = frozenset(windows)
        if key in self.memo:
            return self.memo[key]
        if start is None:
            start = min((w[0] for w in windows), default=self.adapter.num_layers - 1)
        slots = self.stack(windows, start)
        final = self.engine.run_layers(slots, start if start_hidden is None else start_hidden, slot_inputs=record)
        value = float(self.similarity(self.engine, final))
        self.memo[key] = value
        self.evaluations += 1
        return value

    def score(self, committed: list[Window], candidate: Window) -> float:
        """Similarity of "committed + candidate" (a no-op candidate [k, k] scores the committed model)."""
        low, high = candidate
        windows = list(committed) + ([candidate] if low < high else [])
        return self.score_set(windows, start=low)


# ---------------------------------------------------------------------------------------------- searches
def official_window_loop(
    evaluator: WindowEvaluator,
    threshold: float,
    num_layers: int,
    protect: set[int] | None = None,
    max_window: int | None = None,
    progress=None,
) -> tuple[list[Window], list[dict[str, Any]]]:
    """The official top-down SLM loop. Returns (committed windows top first, every tried window with its score).

    ``progress`` (a bar of ``num_layers - 2`` steps) follows ``low``, which only ever moves down to -1.

    Optional constraints, off in the faithful configuration: a window that contains a ``protect``ed layer or has
    more than ``max_window`` layers fails without being scored (so the last passing window is committed, or the
    window slides).
    """
    protect = protect or set()
    committed: list[Window] = []
    tried: list[dict[str, Any]] = []
    high = num_layers - 2
    low = high - 1
    first_low = low
    while low >= 0:
        advance_to(progress, first_low - low)
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
            evaluator.commit(committed)
            high = low
        else:
            high -= 1
            low -= 1
    advance_to(progress, first_low + 1)
    return committed, tried


def _cost(sim: float) -> float:
    return -math.log(max(sim, 1e-12))


def best_window_set(costs: dict[Window, float], num_layers: int, target: int) -> list[Window] | None:
    """Non-overlapping windows removing exactly ``target`` layers with the least total cost (dynamic programming)."""
    inf = float("inf")
    # best[i][k]: least cost over layers >= i with k layers removed there; choice[i][k]: window starting at i or None
    best = [[inf] * (target + 1) for _ in range(num_layers + 1)]
    choice: list[list[Window | None]] = [[None] * (target + 1) for _ in range(num_layers + 1)]
    best[num_layers][0] = 0.0
    by_low: dict[int, list[Window]] = {}
    for w in costs:
        by_low.setdefault(w[0], []).append(w)
    for i in range(num_layers - 1, -1, -1):
        for k in range(target + 1):
            best[i][k] = best[i + 1][k]
            for w in by_low.get(i, ()):
                removed = w[1] - w[0]
                if removed <= k and best[w[1] + 1][k - removed] + costs[w] < best[i][k]:
                    best[i][k] = best[w[1] + 1][k - removed] + costs[w]
                    choice[i][k] = w
    if best[0][target] == inf:
        return None
    windows, i, k = [], 0, target
    while i < num_layers:
        w = choice[i][k]
        if w is None:
            i += 1
        else:
            windows.append(w)
            k -= w[1] - w[0]
            i = w[1] + 1
    return sorted(windows, reverse=True)


def global_window_search(
    evaluator: WindowEvaluator, target: int, num_layers: int, protect: set[int], max_window: int, progress=None
) -> tuple[list[Window], list[dict[str, Any]]]:
    """Score every allowed window alone, then the best non-overlapping set for the target count."""
    candidates = [
        (low, high)
        for low in range(num_layers)
        for high in range(low + 1, min(num_layers, low + max_window))
        if high - low <= target and not any(i in protect for i in range(low, high + 1))
    ]
    tried = []
    costs: dict[Window, float] = {}
    if progress is not None:
        progress.reset(total=len(candidates))
    for w in sorted(candidates, key=lambda w: (-w[0], w[1])):  # top first: short runs are cheap
        s = evaluator.score_set([w])
        advance_to(progress, len(tried) + 1)
        costs[w] = _cost(s)
        tried.append({"window": list(w), "sim": round(s, 6)})
    windows = best_window_set(costs, num_layers, target)
    if windows is None:
        raise PassError(f"no set of allowed windows removes exactly {target} layers (check protect / max_window)")
    return windows, tried


def _free(i: int, windows, protect: set[int], num_layers: int) -> bool:
    return 0 <= i < num_layers and i not in protect and not any(lo <= i <= hi for lo, hi in windows)


def greedy_window_search(
    evaluator: WindowEvaluator,
    target: int,
    num_layers: int,
    protect: set[int],
    max_window: int,
    lazy: bool = True,
    progress=None,
) -> tuple[list[Window], list[dict[str, Any]]]:
    """Grow the plan one removed layer per round, keeping the best-scoring growth each time.

    ``lazy``: a growth's score from an earlier round bounds its score now (more merged layers never make the model
    more similar to the base, in practice), so candidates are scored in order of that bound and a round stops once
    no remaining bound beats the best score found; new growths are always scored. ``lazy=False`` scores all.
    """
    engine = evaluator.engine.record_layer_inputs()
    windows: list[Window] = []
    tried: list[dict[str, Any]] = []
    bounds: dict[tuple, float] = {}
    # the input of every slot of the current compressed stack, by the base index it starts at, so candidates resume
    # at their lowest changed layer: first the base's own recorded inputs, then after each round the winner's
    # activations from its scoring run (the layers below its first change are unchanged)
    starts: dict[int, Batches] = {i: engine.inputs[i] for i in range(num_layers)}
    for round_no in range(target):
        # (change key, candidate windows, first changed layer)
        options: list[tuple[tuple, list[Window], int]] = []
        for i in range(num_layers - 1):
            if _free(i, windows, protect, num_layers) and _free(i + 1, windows, protect, num_layers):
                options.append((("add", (i, i + 1)), windows + [(i, i + 1)], i))
        for w in windows:
            if w[1] - w[0] + 1 >= max_window:
                continue
            rest = [x for x in windows if x != w]
            if _free(w[0] - 1, windows, protect, num_layers):
                grown = (w[0] - 1, w[1])
                options.append((("grow", w, grown), rest + [grown], w[0] - 1))
            if _free(w[1] + 1, windows, protect, num_layers):
                grown = (w[0], w[1] + 1)
                options.append((("grow", w, grown), rest + [grown], w[0]))
        if not options:
            raise PassError(f"greedy search: nothing left to merge after removing {round_no} layers")
        inf = float("inf")
        order = sorted(options, key=lambda o: -(bounds.get(o[0], inf) if lazy else inf))
        best_s, best, best_start, best_inputs, scored = -inf, None, 0, [], 0
        for key, cand, start in order:
            if lazy and key in bounds and bounds[key] <= best_s:
                break
            recorded: list[Batches] = []
            s = evaluator.score_set(cand, start=start, start_hidden=starts[start], record=recorded)
            bounds[key] = s
            scored += 1
            if best is None or (s, sorted(cand)) > (best_s, sorted(best)):
                best_s, best, best_start, best_inputs = s, cand, start, recorded
        tried.append({"round": round_no, "windows": sorted([list(w) for w in best], reverse=True),
                      "sim": round(best_s, 6), "candidates": len(options), "scored": scored})
        windows = best
        evaluator.commit(windows)
        if not best_inputs:  # a memoised score recorded nothing: run the new stack from its first change
            best_inputs = []
            engine.run_layers(evaluator.stack(windows, best_start), starts[best_start], slot_inputs=best_inputs)
        starts = {i: h for i, h in starts.items() if i < best_start}
        starts.update(zip(slot_starts(windows, best_start, num_layers), best_inputs))
        advance_to(progress, round_no + 1)
        if progress is not None:
            progress.set_postfix(scored=evaluator.evaluations, windows=len(windows))
    return sorted(windows, reverse=True), tried


def slot_starts(windows, start: int, num_layers: int) -> list[int]:
    """The base index each slot of the compressed stack begins at, from base layer ``start`` up."""
    by_low = {w[0]: w for w in windows}
    out, i = [], start
    while i < num_layers:
        out.append(i)
        i = by_low[i][1] + 1 if i in by_low else i + 1
    return out


def removed_by(windows) -> int:
    return sum(h - l for l, h in windows)


# ---------------------------------------------------------------------------------------------- the pass
class SLMPass(CompressionPass):
    name = "slm"
    streams = True  # runs on a lazy model through the sequential engine
    search_outputs = ("threshold",)
    description = "Sliding-Window Merging (AAAI-26), faithful to the official SLM.py; threshold or target ratio."
    params = (
        PassParam("threshold", "float", 0.72, "similarity threshold; sim > threshold grows the window (official search)"),
        RATIO,
        NUM_LAYERS,
        PassParam("merge", "str", "official", f"merge rule: {', '.join(MERGE_RULES)}"),
        PassParam("similarity", "str", "final-cosine", "similarity criterion", choices=tuple(SIMILARITIES)),
        PassParam("search", "str", "official", "window search: official, global or greedy", choices=SEARCHES),
        PassParam("protect", "int_list", None, "base layers never placed in a window"),
        PassParam("max_window", "int", None, "largest window size in layers (global/greedy default: 8)"),
        PassParam("batch_size", "int", None, "calibration samples per forward batch (run-time only)"),
        FIT_ORDER,
        RIDGE,
        SEARCH_RIDGE,
        OUTLIER_CLIP,
    )

    @property
    def needs_fit_set(self) -> bool:
        return get_merge_rule(self.config["merge"]).fit_map

    def validate(self) -> None:
        super().validate()
        rule = get_merge_rule(self.config["merge"])
        search_ridge = self.config.get("search_ridge")
        if search_ridge is not None and not 0 < search_ridge < float("inf"):
            raise PassError(f"search_ridge must be a finite number > 0, got {search_ridge}")
        for name in ("fit_order", "ridge", "search_ridge", "outlier_clip"):
            if self.config.get(name) is not None and not rule.fit_map:
                raise PassError(f"{name} applies to merge rules with a fitted map (e.g. calibrated-lstsq), not "
                                f"{rule.name!r}")
        threshold = self.config.get("threshold")
        if threshold is not None:
            # nll is exp(NLL_base - NLL_candidate) > 0; every other criterion is a cosine-like score in [-1, 1]
            nll = self.config["similarity"] == "nll"
            if not (0.0 < threshold < float("inf") if nll else -1.0 <= threshold < 1.0):
                allowed = "(0, inf)" if nll else "[-1, 1)"
                raise PassError(f"threshold must be in {allowed} for similarity {self.config['similarity']!r}, "
                                f"got {threshold}")
        if self.config["max_window"] is not None and self.config["max_window"] < 2:
            raise PassError(f"max_window must be >= 2, got {self.config['max_window']}")
        if self.config["search"] != "official" and self.config["ratio"] is None and self.config["num_layers"] is None:
            raise PassError(f"search={self.config['search']} needs ratio or num_layers")

    def public_params(self) -> dict[str, Any]:
        params = super().public_params()
        if self.config["search"] != "official":
            params.pop("threshold", None)
        return params

    def default_protect(self, num_layers: int) -> set[int]:
        return set()

    def run(self, engine: ForwardEngine) -> PassResult:
        engine.require_calibration(self.name)
        n = engine.num_layers
        if n < 4:
            raise PassError(f"{self.name} needs at least 4 decoder layers, the model has {n}")
        target = self.target_count(n, required=False)
        protect = self.protected(n) if self.config["protect"] is not None else self.default_protect(n)
        search = self.config["search"]
        params = self.public_params()
        trace: dict[str, Any] = {}
        # the bar's unit follows the search: positions of the official loop, candidates of the global search,
        # removed layers (rounds) of the greedy one, so its total and ETA are known
        unit, total = {"official": ("position", n - 2), "global": ("window", None),
                       "greedy": ("layer", target)}[search]
        with progress_bar(desc=f"{self.name}: searching windows", unit=unit, total=total) as bar:
            engine.record_layer_inputs()
            evaluator = WindowEvaluator(engine, self.config["merge"], self.config["similarity"],
                                        self.config.get("search_ridge"), self.config.get("outlier_clip"))
            if search == "official":

                def run(t: float):
                    bar.reset(total=n - 2)
                    bar.set_description(f"{self.name}: threshold {t:.4g}")
                    return official_window_loop(evaluator, t, n, protect, self.config["max_window"], progress=bar)

                if target is None:
                    threshold = self.config["threshold"]
                    windows, tried = run(threshold)
                else:
                    threshold, windows, tried, trace["search"] = self._search_threshold(run, target, bar)
                params["threshold"] = threshold
            else:
                max_window = self.config["max_window"] or 8
                fn = global_window_search if search == "global" else greedy_window_search
                windows, tried = fn(evaluator, target, n, protect, max_window, progress=bar)
            bar.set_postfix(committed=len(windows), removed=removed_by(windows))
            timings: dict[str, float] = {}
            refine = bool(windows and self.config.get("refine_epochs"))
            try:
                if windows and evaluator.rule.fit_map:
                    # refinement trains on the base states the fit streamed (each window's input and output): the
                    # fit keeps them for it instead of refinement running the base over the fit set again
                    trace["fit"] = evaluator.fit_maps(windows, self.config["fit_order"] or "bottom-up",
                                                      self.config["ridge"] or 0.0, keep_replay=refine)
                    timings["fit_seconds"] = trace["fit"].pop("fit_seconds")
                tensors: dict[str, torch.Tensor] = {}
                ops = [evaluator.op(w, tensors) for w in windows]
                if refine:
                    ops, trace["refine"] = evaluator.refine(windows, ops, tensors, self.config["refine_epochs"],
                                                            self.config["refine_lr"])
                    timings["fit_seconds"] = timings.get("fit_seconds", 0.0) + sum(
                        r.pop("seconds") for r in trace["refine"].values())
            finally:
                evaluator.engine.release_fit_replay()
        if not windows:
            best = max((t["sim"] for t in tried if t.get("sim") is not None), default=None)
            raise PassError(f"{self.name}: threshold {params.get('threshold')} merges no window (highest similarity seen "
                            f"{best}; the official loop commits a window only once a larger one fails, so a very low "
                            "threshold merges nothing either); give --ratio or another --threshold")
        trace.update(
            {"tried": tried, "windows": [list(w) for w in windows], "similarity_evaluations": evaluator.evaluations}
        )
        if protect:
            trace["protected"] = sorted(protect)
        if target is not None:
            trace["target_removed"] = target
            got = removed_by(windows)
            if got != target:
                msg = (
                    f"{self.name}: no threshold removes exactly {target} layers; using threshold "
                    f"{params.get('threshold')} which removes {got}"
                )
                trace["note"] = msg
                warnings.warn(msg, stacklevel=2)
        return PassResult(ops, trace, tensors, params, timings)

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
