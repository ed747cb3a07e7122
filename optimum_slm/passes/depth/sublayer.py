"""``slm-plus granularity=sublayer``: slm-plus's greedy search over the 2L sub-layers (attention and MLP units).

Attention sub-layers are far more removable than whole layers (FinerCut, arXiv 2405.18218: 42% of a 70 B model's
attention sub-layers at 99% of its zero-shot score), so the search removes units, not layers:

* a unit is one residual branch of one decoder layer, its attention or its MLP. Every round scores units that are
  still there (and fit in the budget left) removed on top of the units already removed, and removes the best-ranked
  one: ``unit_rank=per-param`` (default), the least change of the final hidden state per parameter removed (the
  knapsack's greedy rule: the budget counts parameters and an MLP holds about three times an attention's), or
  ``change``, the least change (FinerCut's rule). The change is the similarity's log drop (the slm-plus similarity,
  per-token cosine by default);
* each candidate is scored with its bridge: the layer keeps its other branch, whose output gets a d×d map fitted on
  the search set's recorded base activations (layer input → the base's next-layer input, ridge ``search_ridge``
  towards the identity), so the search sees what a map can recover — as slm-plus's window search does;
* candidates resume from the compressed model's recorded activations at their layer (only the layers above run),
  and a unit's change measured in an earlier round predicts its change now (the changes of removals far apart add
  up, in practice): units are scored in order of that prediction and a round stops once no remaining prediction
  beats the best measured (a lazy greedy; the first round scores every unit, later ones a few);
* after the search the maps are fitted on the fit set (``fit_order``, ``ridge``, the identity prior of slm-plus) and
  folded into the kept branch's output projection (attention removed: ``down_proj``; MLP removed: ``o_proj``;
  Gemma-2/3: before the post-branch norm, with its refitted gain). A layer that loses both units computes the
  identity: it becomes a whole-layer ``drop`` (there is no branch left to carry a map).

The budget counts PARAMETERS: ``ratio`` (or ``num_layers``) is converted to the parameters of round(ratio × L)
decoder layers — what a depth pass at that ratio removes — and units are removed while their parameters fit in it,
so the result never exceeds it and ends within one attention unit of it (a layer dropped whole also loses its
norms, a few thousand parameters, which the budget does not count). An attention unit holds about a quarter of a
layer's parameters in the supported families, so the search removes more units than a depth pass removes layers.

The plan holds ``drop_attn`` / ``drop_mlp`` ops (plan/sublayer_ops.py) with their maps in the side-car, and ``drop``
for whole layers. Removing an attention saves less compute per parameter than removing a layer (the MLP's share of
the FLOPs stays); compare at equal parameters and at equal measured decode speed
(``benchmarks/frontier_smollm2.py``).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Mapping

import torch
from torch import nn

from ...arch.sublayers import SUBLAYER_MODULES
from ...engine import Batches, ForwardEngine, Slot
from ...engine.lazy import is_lazy
from ...errors import PassError
from ...plan import drop_op
from ...plan.sublayer_ops import OTHER, drop_branch_op
from ...progress import advance_to, progress_bar
from ...similarity import get_similarity
from ..base import PassResult

#: the units of a layer, in forward order
UNITS = ("attn", "mlp")
Unit = tuple[int, str]
#: which units of each layer are removed (only layers with at least one)
Removed = Mapping[int, frozenset]


def unit_parameters(engine: ForwardEngine) -> tuple[dict[Unit, int], int]:
    """Each unit's parameter count and the parameters of one whole decoder layer (the largest: a layer that lost a
    unit to an earlier stage is not one)."""
    adapter = engine.adapter
    units, largest = {}, 0
    for i, layer in enumerate(adapter.layers):
        # numel works on a lazy layer's meta tensors too: nothing is read
        for branch in UNITS:
            units[(i, branch)] = sum(p.numel() for p in getattr(layer, SUBLAYER_MODULES[branch]).parameters())
        largest = max(largest, sum(p.numel() for p in layer.parameters()))
    return units, largest


class SublayerEvaluator:
    """Scores candidates (a set of removed units) against the base, memoised by that set.

    Keeps the bridged layers of the committed units; a candidate's bridged layer is built for one call, so at most
    one layer beyond the committed ones is alive at a time. A bridged layer shares every tensor with the base layer
    except the ones its map (and Gemma's gain) is folded into (for a lazy model, whose base layers are read from
    disk only while they run, it is a full copy instead).
    """

    def __init__(self, engine: ForwardEngine, similarity: str, search_ridge: float | None,
                 outlier_clip: float | None = None):
        self.engine = engine
        self.adapter = engine.adapter
        #: the units the model lacks already (an earlier stage removed them): its own layers are those layers
        self.pre: dict[int, frozenset] = self.adapter.removed_sublayers()
        self.layers = list(self.adapter.layers)
        self.num_layers = len(self.layers)
        self.similarity = get_similarity(similarity)
        self.search_ridge = search_ridge
        self.outlier_clip = outlier_clip
        self.memo: dict[frozenset, float] = {}
        self.evaluations = 0
        self.committed: dict[int, frozenset] = {}
        self._built: dict[tuple[int, frozenset], nn.Module] = {}

    # ------------------------------------------------------------------ building
    def bridged_layer(self, index: int, branch: str, search_map: bool) -> nn.Module:
        """Base layer ``index`` without its ``branch`` (``attn`` / ``mlp``); with ``search_map``, the kept branch
        carries a map fitted on the search set."""
        kept = OTHER[branch]
        base = self.layers[index]
        if is_lazy(base) or any(p.is_meta for p in base.parameters()):
            module = self.engine.copy_layer(index)
        else:
            # share every tensor but those the map folds into (the kept branch's projection, its post-branch norm)
            private = self.adapter.map_fold_modules(kept)
            shared = {id(p): p for name, p in base.named_parameters()
                      if not any(name.startswith(prefix + ".") for prefix in private)}
            module = copy.deepcopy(base, memo=shared)
        self.adapter.remove_sublayer(module, branch)
        if search_map and self.search_ridge is not None:
            from ...merge.lstsq import fit_search_map

            fit_search_map(self.engine, module, index, index, index + 1, (kept,), self.search_ridge,
                           f"search map: layer {index} without its {branch}", self.outlier_clip)
        return module

    def layer_module(self, index: int, gone: frozenset) -> nn.Module | None:
        """The module layer ``index`` is with the units ``gone`` removed; None when both are (the identity)."""
        if gone == self.pre.get(index, frozenset()):
            return self.layers[index]
        if len(gone) == len(UNITS):
            return None
        key = (index, gone)
        module = self._built.get(key)
        if module is None:
            module = self.bridged_layer(index, next(iter(gone)), search_map=True)
            if self.committed.get(index) == gone:
                self._built[key] = module
            else:
                self.last_built = (key, module)
        return module

    #: the last candidate layer built for a score (key, module): the search keeps its round's best one, so committing
    #: it does not build and fit it again
    last_built: tuple[tuple[int, frozenset], nn.Module] | None = None

    def adopt(self, built: tuple[tuple[int, frozenset], nn.Module] | None) -> None:
        """Keep a candidate layer built while scoring (``last_built``) when its units are now committed."""
        if built is not None and self.committed.get(built[0][0]) == built[0][1]:
            self._built.setdefault(built[0], built[1])

    def stack(self, removed: Removed, start: int) -> tuple[list[Slot], list[int]]:
        """Slots of the compressed model from base layer ``start`` up, and the base index of each."""
        slots, where = [], []
        for i in range(start, self.num_layers):
            module = self.layer_module(i, removed.get(i, frozenset()))
            if module is not None:
                slots.append(Slot(module, i))
                where.append(i)
        return slots, where

    def commit(self, removed: Removed) -> None:
        """Declare the removed units whose bridged layers are kept between calls (the others are freed)."""
        self.committed = dict(removed)
        for key in list(self._built):
            if self.committed.get(key[0]) != key[1]:
                del self._built[key]

    # ------------------------------------------------------------------ scoring
    def score(self, removed: Removed, start: int, start_hidden: Batches, record: list | None = None) -> float:
        """Similarity of the base with ``removed`` taken out, the layers from ``start`` up run on ``start_hidden``;
        ``record`` (an empty list) receives every slot's input, then the last one's output, unless memoised."""
        key = frozenset((i, b) for i, gone in removed.items() for b in gone)
        if key in self.memo:
            return self.memo[key]
        slots, _ = self.stack(removed, start)
        final = self.engine.run_layers(slots, start_hidden, slot_inputs=record)
        value = float(self.similarity(self.engine, final))
        self.memo[key] = value
        self.evaluations += 1
        return value


#: how a round ranks the units it scored: ``change`` removes the unit whose removal changes the final state least
#: (FinerCut's choice); ``per-param`` the least change per parameter removed (the greedy rule of a knapsack: the
#: budget counts parameters, and an MLP holds about three times an attention's)
RANKS = ("change", "per-param")


def _damage(before: float, after: float) -> float:
    """What one removal cost: −log of the similarity's ratio (≥ 0 when the similarity drops; logs keep it additive
    over removals of a similarity that multiplies, like slm's window costs)."""
    return math.log(max(before, 1e-12)) - math.log(max(after, 1e-12))


def greedy_sublayer_search(evaluator: SublayerEvaluator, budget: int, params: Mapping[Unit, int],
                           protect: set[int], rank: str = "change", progress=None, lazy: bool = True
                           ) -> tuple[dict[int, frozenset], list[dict[str, Any]]]:
    """Remove one unit per round, the best-ranked one, while the removed units' parameters fit in ``budget``.

    A unit's value is minus its damage (the similarity's log drop from the model as committed; ``rank``
    ``per-param``: divided by its parameters). ``lazy``: a unit's damage measured in an earlier round predicts its
    damage now (damages of distant removals add up, in practice), so units are scored in order of that prediction and
    a round stops once no remaining prediction beats the best value measured; units never scored, and those of the
    layer the last round changed, are always scored. ``lazy=False`` scores every unit every round.
    Returns the removed units by layer and one record per round."""
    if rank not in RANKS:
        raise PassError(f"unit rank must be one of {', '.join(RANKS)}, got {rank!r}")
    engine = evaluator.engine.record_layer_inputs()
    n = evaluator.num_layers
    removed: dict[int, frozenset] = dict(evaluator.pre)
    spent = 0
    rounds: list[dict[str, Any]] = []
    damages: dict[Unit, float] = {}
    # the input of every layer of the current compressed model, so a candidate resumes at its own layer: first the
    # base's recorded inputs, then after each round the winner's activations from its scoring run
    starts: dict[int, Batches] = {i: engine.inputs[i] for i in range(n)}
    # the similarity of the model as it is (1 for the base; lower when an earlier stage removed units)
    first = min(removed, default=n)
    current = evaluator.score(removed, first, starts[first] if first < n else engine.inputs[n])
    inf = float("inf")

    def value(unit: Unit, damage: float) -> float:
        return -damage / (params[unit] if rank == "per-param" else 1)

    while True:
        options = [(i, b) for i in range(n) for b in UNITS
                   if i not in protect and b not in removed.get(i, ()) and spent + params[(i, b)] <= budget]
        if not options:
            break
        predicted = {u: value(u, damages[u]) if lazy and u in damages else inf for u in options}
        order = sorted(options, key=lambda u: (-predicted[u], u))
        best_v, best_s, best, best_inputs, best_module, scored = -inf, -inf, None, [], None, 0
        for unit in order:
            if best is not None and predicted[unit] <= best_v:
                break
            layer, branch = unit
            candidate = {**removed, layer: removed.get(layer, frozenset()) | {branch}}
            recorded: list[Batches] = []
            evaluator.last_built = None
            s = evaluator.score(candidate, layer, starts[layer], record=recorded)
            damages[unit] = _damage(current, s)
            v = value(unit, damages[unit])
            scored += 1
            # ties go to the higher layer, then the MLP: the same choice whatever order the units were scored in
            if best is None or (v, unit) > (best_v, best):
                best_v, best_s, best, best_inputs, best_module = v, s, unit, recorded, evaluator.last_built
        layer, branch = best
        removed = {**removed, layer: removed.get(layer, frozenset()) | {branch}}
        spent += params[best]
        current = best_s
        for other in UNITS:  # the layer's other unit now removes a whole layer: its old damage predicts nothing
            damages.pop((layer, other), None)
        evaluator.commit(removed)
        evaluator.adopt(best_module)
        evaluator.last_built = best_module = None
        if not best_inputs:  # a memoised score recorded nothing: run the new stack from its change
            best_inputs = []
            slots, _ = evaluator.stack(removed, layer)
            engine.run_layers(slots, starts[layer], slot_inputs=best_inputs)
        _, where = evaluator.stack(removed, layer)
        for j in range(layer, n):
            # a layer computing the identity has the input of the next slot (or the stack's output)
            k = next((k for k, i in enumerate(where) if i >= j), len(where))
            starts[j] = best_inputs[k]
        rounds.append({"round": len(rounds), "layer": layer, "branch": branch, "sim": round(best_s, 6),
                       "params": params[best], "candidates": len(options), "scored": scored})
        advance_to(progress, int(100 * spent / budget))
        if progress is not None:
            progress.set_postfix(scored=evaluator.evaluations, attn=sum("attn" in g for g in removed.values()),
                                 mlp=sum("mlp" in g for g in removed.values()))
    return removed, rounds


def fit_bridges(evaluator: SublayerEvaluator, removed: Removed, order: str, ridge: float
                ) -> tuple[dict[int, nn.Module], dict[int, dict[str, torch.Tensor]], dict[str, Any]]:
    """Fit every single removal's map on the fit set and fold it into the kept branch (fresh bridged layers, without
    the search maps). Returns the bridged layers and their fitted tensors by layer, and the fit's cost record."""
    from ...merge.lstsq import MapSite, fit_output_maps

    singles = sorted((i, next(iter(gone))) for i, gone in removed.items()
                     if len(gone) == 1 and gone != evaluator.pre.get(i))
    if not singles:
        return {}, {}, {}
    modules = {i: evaluator.bridged_layer(i, b, search_map=False) for i, b in singles}
    # named by layer: the fit's progress line reads "fitting 3, 7, 12" (and "(attn)" for maps on an attention)
    sites = [MapSite(str(i), modules[i], i, i, i + 1, (OTHER[b],)) for i, b in singles]

    def stack_below(k: int) -> list[Slot]:
        # the compressed model from the first site up to site k (bottom-up order: lower maps already folded)
        slots = []
        for i in range(sites[0].input_at, sites[k].input_at):
            if i in modules:
                slots.append(Slot(modules[i], i))
            elif len(removed.get(i, ())) < len(UNITS):  # the layer as the model has it
                slots.append(Slot(evaluator.layers[i], i))
        return slots

    maps, cost = fit_output_maps(evaluator.engine, sites, stack_below, order, ridge, what="slm-plus sublayer maps",
                                 outlier_clip=evaluator.outlier_clip)
    tensors = {i: maps[site.name] for (i, _), site in zip(singles, sites)}
    return modules, tensors, {"order": order, "ridge": ridge, **cost}


def run_sublayer(compression_pass, engine: ForwardEngine) -> PassResult:
    """The ``granularity=sublayer`` run of ``slm-plus`` (``compression_pass``, whose config it reads)."""
    config = compression_pass.config
    name = f"{compression_pass.name} granularity=sublayer"
    engine.require_calibration(compression_pass.name)
    if not engine.adapter.supports_output_map():
        raise PassError(f"{name}: {engine.adapter.family.name} has no exact fold for the maps that bridge a removed "
                        "sub-layer; use granularity=layer")
    n = engine.num_layers
    if n < 2:
        raise PassError(f"{name} needs at least 2 decoder layers, the model has {n}")
    target = compression_pass.target_count(n)
    protect = compression_pass.protected(n) if config["protect"] is not None else set()
    params, per_layer = unit_parameters(engine)
    budget = target * per_layer
    gone = engine.adapter.removed_sublayers()
    if not any(size <= budget for (i, b), size in params.items() if i not in protect and b not in gone.get(i, ())):
        raise PassError(f"{name}: no unit fits in the budget of {budget:,} parameters")
    with progress_bar(desc=f"{name}: searching units", unit="% of budget", total=100) as bar:
        engine.record_layer_inputs()
        evaluator = SublayerEvaluator(engine, config["similarity"], config["search_ridge"], config.get("outlier_clip"))
        removed, rounds = greedy_sublayer_search(evaluator, budget, params, protect, config["unit_rank"],
                                                 progress=bar)
        timings: dict[str, float] = {}
        trace: dict[str, Any] = {}
        modules, fitted, fit = fit_bridges(evaluator, removed, config["fit_order"], config["ridge"])
        if fit:
            timings["fit_seconds"] = fit.pop("fit_seconds")
            trace["fit"] = fit
    tensors: dict[str, torch.Tensor] = {}
    ops = []
    new = {i: gone - evaluator.pre.get(i, frozenset()) for i, gone in removed.items()}
    new = {i: gone for i, gone in new.items() if gone}
    dropped = sorted(i for i in new if len(removed[i]) == len(UNITS))
    for i in sorted(new):
        if i not in dropped:
            branch = next(iter(new[i]))
            refs = {}
            for role, value in fitted[i].items():
                tensors[f"drop_{branch}.{i}.{role}"] = value
                refs[role] = f"drop_{branch}.{i}.{role}"
            ops.append(drop_branch_op(branch, i, refs))
    if dropped:
        ops.append(drop_op(dropped))
    removed_params = sum(params[(i, b)] for i, gone in new.items() for b in gone)
    trace.update({
        "rounds": rounds,
        "attn_removed": sorted(i for i, gone in new.items() if "attn" in gone),
        "mlp_removed": sorted(i for i, gone in new.items() if "mlp" in gone),
        "layers_dropped": dropped,
        "param_budget": budget,
        "params_removed": removed_params,
        "budget_layers": target,
        "layers_equivalent": round(removed_params / per_layer, 3),
        "similarity_evaluations": evaluator.evaluations,
    })
    if protect:
        trace["protected"] = sorted(protect)
    del modules  # the plan rebuilds them; only the fitted tensors leave the pass
    return PassResult(ops, trace, tensors, compression_pass.public_params(), timings)
