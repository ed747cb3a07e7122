"""The planning step: a request's passes and calibration set -> engine -> pass(es) -> ``CompressionPlan``.

``plan_compression`` is the planning step of every front door: ``optimum_slm.orchestrate`` calls it with a
``Recipe`` and the drawn ``CalibrationSet``, and the Python API calls it directly::

    plan = optimum_slm.plan_compression(model, "slm-plus", CalibrationConfig("wiki-leads"), tokenizer=tok, ratio=0.2)

It translates Python arguments into a ``Recipe`` (recorded in the plan), draws the calibration set once, consults the
plan cache, builds one forward engine per stage and hands it to the pass, turns what the pass returns into a plan
stage (ops in base numbering, side-car tensors named), and stores the plan in the cache. A stage after the first
plans on the model compressed by the stages before it; its ops are re-expressed in base numbering by their op kinds.
The model passed in is never modified. ``compress`` is its former name, kept as an alias for one release.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .arch import ArchAdapter
from .calibration import CalibrationConfig, CalibrationSet, load_calibration
from .engine import engine_for, is_lazy_model
from .engine.budget import MemoryBudget
from .engine.lazy import check_not_offloaded, lazy_copy
from .errors import CalibrationError, PassError, SLMError
from .passes.base import CompressionPass
from .plan import CompressionPlan, Stage, describe_base, fingerprint, kind_of
from .plan.cache import PlanCache, plan_key
from .plan.execute import apply_plan
from .plan.fingerprint import SCHEME, jsonable
from .recipe import DEFAULT_METHOD, PassStage, Recipe
from .registry import get_pass, pass_classes

logger = logging.getLogger(__name__)

StageSpec = str | Mapping[str, Any] | CompressionPass
CacheSpec = bool | str | os.PathLike | PlanCache | None
CalibrationSpec = CalibrationConfig | CalibrationSet | str | torch.Tensor | Sequence[str] | None


def resolve_stages(method: StageSpec | Sequence[StageSpec] | Recipe, params: Mapping[str, Any]
                   ) -> list[CompressionPass]:
    """Pass instances for a method name (with ``params``), a pass instance, a ``Recipe``, or a list of stages (names,
    pass instances or ``{"method": name, **params}`` objects)."""
    if isinstance(method, Recipe):
        if params:
            raise PassError("give the parameters inside the recipe's stages, not to plan_compression()")
        return method.passes()
    if isinstance(method, (str, CompressionPass, Mapping)):
        specs: list = [method]
    elif isinstance(method, Sequence) and method:
        specs = list(method)
        if params:
            raise PassError("give parameters inside each stage when compressing with several stages")
    else:
        raise PassError(f"method must be a pass name, a pass, a Recipe or a non-empty list of stages, got {method!r}")
    passes = []
    for k, spec in enumerate(specs):
        where = f"stage {k + 1}: " if len(specs) > 1 else ""
        if isinstance(spec, CompressionPass):
            if params and len(specs) == 1:
                raise PassError("give the parameters to the pass instance, not to plan_compression()")
            passes.append(spec)
        elif isinstance(spec, str):
            passes.append(_get_pass(where, spec, params if len(specs) == 1 else {}))
        elif isinstance(spec, Mapping):
            stage = dict(spec)
            name = stage.pop("method", None)
            if not isinstance(name, str):
                raise PassError(f"{where}a stage needs a 'method' naming a pass, got {spec!r}")
            passes.append(_get_pass(where, name, {**stage, **(params if len(specs) == 1 else {})}))
        else:
            raise PassError(f"{where}a stage is a pass name, a pass or an object with 'method', got {spec!r}")
    return passes


def _get_pass(where: str, name: str, params: Mapping[str, Any]) -> CompressionPass:
    try:
        return get_pass(name, **params)
    except PassError as exc:
        raise PassError(f"{where}{exc}") from None


def recipe_of(passes: Sequence[CompressionPass], calibration: CalibrationConfig | None) -> Recipe | None:
    """The recipe that the given passes (and calibration config) amount to; None when a pass is not the registered
    class of its name (an ad-hoc instance cannot be written back as a recipe)."""
    classes = pass_classes()
    stages = []
    for p in passes:
        if classes.get(p.name) is not type(p):
            return None
        stages.append(PassStage(p.name, p.given_params))
    return Recipe(stages=tuple(stages), calibration=calibration or CalibrationConfig())


def calibration_set(calibration: CalibrationSpec, tokenizer=None, fit: torch.Tensor | None = None
                    ) -> CalibrationSet | None:
    """The ``CalibrationSet`` of a ``CalibrationConfig``, a corpus source string, a list of documents, token ids or a
    set as given; ``fit`` (a fit set given beside bare ids) goes with it."""
    if calibration is None:
        return None
    if isinstance(calibration, CalibrationSet):
        return calibration.with_fit(fit) if fit is not None else calibration
    if isinstance(calibration, torch.Tensor):
        return CalibrationSet(calibration, fit=fit)
    if isinstance(calibration, str):
        calibration = CalibrationConfig(calibration)
    if isinstance(calibration, CalibrationConfig):
        drawn = calibration.load(tokenizer)
    elif isinstance(calibration, (list, tuple)) and all(isinstance(d, str) for d in calibration):
        if tokenizer is None:
            raise SLMError("a tokenizer is needed to build calibration data from text")
        drawn = load_calibration(tokenizer, list(calibration))
    else:
        raise SLMError(f"calibration must be a CalibrationConfig, a corpus source, documents, token ids or a "
                       f"CalibrationSet, got {type(calibration).__name__}")
    return drawn.with_fit(fit) if fit is not None else drawn


def _cache(cache: CacheSpec) -> PlanCache | None:
    if cache is None or cache is False:
        return None
    if cache is True:
        return PlanCache()
    if isinstance(cache, PlanCache):
        return cache
    return PlanCache(cache)


def _requested(p: CompressionPass) -> dict[str, Any]:
    return {k: v for k, v in jsonable(p.public_params()).items() if k not in p.search_outputs}


def _entry_key(plan: CompressionPlan, passes: Sequence[CompressionPass], dtype: str | None) -> str:
    """The cache key re-derived from a cached plan's own content: its base fingerprint, stage methods and recorded
    parameters (the searched ones, e.g. a found threshold, as requested), its calibration hashes; the dtype and the
    version come from the request (a plan does not record them)."""
    stages = []
    for stage, p in zip(plan.stages, passes):
        params = {k: v for k, v in jsonable(stage.params).items() if k not in p.search_outputs}
        requested = jsonable(p.public_params())
        params.update({k: requested[k] for k in p.search_outputs if k in requested})
        stages.append((stage.method, params))
    blocks = [s.calibration for s in plan.stages if s.calibration]
    data_sha = blocks[0].get("sha256") if blocks else None
    fits = [b["fit"].get("sha256") for b in blocks if isinstance(b.get("fit"), dict)]
    if fits:
        data_sha = f"{data_sha}+fit:{fits[0]}"
    return plan_key(plan.base.get("fingerprint"), stages, data_sha, dtype)


def _entry_matches(plan: CompressionPlan, fp: str, passes: Sequence[CompressionPass], ids_sha: str | None,
                   fit_sha: str | None = None, key: str | None = None, dtype: str | None = None) -> str | None:
    """Why a cached plan does not answer this request (None when it does); with ``key``, also when the key re-derived
    from the plan's content (``_entry_key``) is not ``key``, the one it is stored under."""
    if plan.base.get("fingerprint") != fp or plan.base.get("fingerprint_scheme") != SCHEME:
        return "it was made for another base"
    if [s.method for s in plan.stages] != [p.name for p in passes]:
        return f"it holds method {plan.method!r}"
    for stage, p in zip(plan.stages, passes):
        recorded = {k: v for k, v in jsonable(stage.params).items() if k not in p.search_outputs}
        if recorded != _requested(p):
            return f"its {p.name} parameters differ"
        if p.needs_calibration and (stage.calibration or {}).get("sha256") != ids_sha:
            return "it was made on other calibration data"
        if p.needs_fit_set and ((stage.calibration or {}).get("fit") or {}).get("sha256") != fit_sha:
            return "it was fitted on another fit set"
    if key is not None and _entry_key(plan, passes, dtype) != key:
        return "the key re-derived from its content is not the key it is stored under"
    return None


def plan_compression(
    model: nn.Module,
    method: StageSpec | Sequence[StageSpec] | Recipe = DEFAULT_METHOD,
    calibration: CalibrationSpec = None,
    *,
    tokenizer=None,
    fit: torch.Tensor | None = None,
    cache: CacheSpec = True,
    name_or_path: str | None = None,
    budget: MemoryBudget | None = None,
    **params: Any,
) -> CompressionPlan:
    """Plan the compression of ``model`` by one pass, a list of stages or a ``Recipe``; returns the plan (the model is
    unchanged).

    ``method``: a pass name (``params`` are its parameters), a ``CompressionPass``, a list of stages (each a name, a
    pass or ``{"method": name, **params}``), or a ``Recipe`` (its stages; its calibration unless ``calibration`` is
    given). ``calibration``: a ``CalibrationConfig`` or corpus source (needs ``tokenizer``), a ``CalibrationSet``,
    documents, or token ids ``[n, seq]``. ``fit``: the fit set ``[n, seq]`` for passes that fit least-squares maps
    (default: the one drawn with a ``CalibrationConfig``'s ``fit_samples``; bare ids fall back to the search set,
    with a warning). ``cache``: True (the user cache), a folder or ``PlanCache``, or False; a cached plan is used
    only when it matches the request, and the returned plan's ``reused_from`` then names it. ``name_or_path`` is
    recorded as the base's name; ``budget`` (a ``MemoryBudget``) bounds the sequential engine of a lazy model.
    The plan records the request as ``plan.recipe`` (when its passes are registered ones).
    """
    if not isinstance(model, nn.Module):
        raise SLMError(f"plan_compression's first argument is the model (an nn.Module, e.g. from load_model), got "
                       f"{type(model).__name__}")
    passes = resolve_stages(method, params)
    check_not_offloaded(model)
    # the calibration given as a corpus to draw from belongs to the recorded request (drawn data does not)
    config = CalibrationConfig(calibration) if isinstance(calibration, str) else (
        calibration if isinstance(calibration, CalibrationConfig) else None)
    if isinstance(method, Recipe):
        recipe = method.replace(calibration=config) if config is not None else method
        if calibration is None and recipe.calibration.source is not None:
            calibration = recipe.calibration
    else:
        recipe = recipe_of(passes, config)
    needs = [p.name for p in passes if p.needs_calibration]
    calib = calibration_set(calibration, tokenizer, fit)
    if calib is not None:  # ids the model's embedding cannot look up fail here, not deep inside a forward
        vocab = _vocab_size(model)
        check_token_ids(calib.ids, vocab, "calibration ids")
        if fit is not None:
            check_token_ids(fit, vocab, "fit ids")
    if calib is None and needs:
        raise PassError(f"pass {needs[0]!r} needs calibration data (--calib-data / calibration=...)")
    ids_sha = calib.describe()["sha256"] if calib is not None else None
    fits = any(p.needs_fit_set for p in passes)
    fit_ids = calib.fit_ids() if fits and calib is not None else None
    fit_sha = calib.describe_fit(fit_ids)["sha256"] if fit_ids is not None else None
    if fit_ids is None and calib is not None and fits:
        fit_sha = ids_sha  # the passes fall back to the search set
    fp = fingerprint(model)
    store = _cache(cache)
    key = None
    plan = None
    if store is not None:
        dtype = str(next(model.parameters()).dtype)
        data_sha = ids_sha if needs else None
        if fit_sha is not None:
            data_sha = f"{data_sha}+fit:{fit_sha}"
        key = plan_key(fp, [(p.name, p.public_params()) for p in passes], data_sha, dtype)
        cached = store.get(key)
        if cached is not None:
            why = _entry_matches(cached, fp, passes, ids_sha, fit_sha, key, dtype) or store.check_binding(key)
            if why is None:
                cached.reused_from = store.path(key)
                logger.info("reusing the cached plan %s", store.path(key))
                plan = cached
            else:
                logger.warning("cached plan %s does not match its key (%s); recomputing it", store.path(key), why)
    if plan is None:
        base = describe_base(model, fp)
        if name_or_path:
            base["name_or_path"] = name_or_path
        plan = _run_stages(model, passes, calib, base, fit_ids, budget or MemoryBudget())
        if store is not None and key is not None:
            store.put(key, plan)
    # the request this plan answers (a cached plan may have been made by another front door's equal request)
    plan.recipe = recipe.plan_record() if recipe is not None else None
    return plan


#: the former name of ``plan_compression`` (it returns a plan; it does not write a compressed model), kept for one
#: release
compress = plan_compression


def _stage_calibration(p: CompressionPass, calib: CalibrationSet | None, fit: torch.Tensor | None
                       ) -> dict[str, Any] | None:
    """The plan stage's ``calibration`` block: the search set, and the fit set when the pass read one."""
    if calib is None or not p.needs_calibration:
        return None
    block = calib.describe()
    if p.needs_fit_set:
        block["fit"] = calib.describe_fit(fit if fit is not None else calib.ids)
    return block


def _vocab_size(model: nn.Module) -> int | None:
    """The number of rows of the model's input embedding (the config's ``vocab_size`` when it has none)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embedding, "num_embeddings", None)
    if isinstance(rows, int):
        return rows
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) else None


def check_token_ids(ids: torch.Tensor, vocab: int | None, what: str) -> None:
    """Refuse token ids the model's embedding cannot look up (negative, or >= its vocabulary), in one line."""
    if vocab is None or ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise CalibrationError(f"{what} hold token {bad}, outside the model's vocabulary 0..{vocab - 1}; were they "
                               f"made with this model's tokenizer?")


def _ask_for_more(p: CompressionPass) -> str:
    """What to change so that pass ``p`` removes something."""
    given = [name for name in ("ratio", "num_layers", "threshold") if p.config.get(name) is not None]
    asks = {"ratio": "a larger ratio", "num_layers": "more layers (num_layers)", "threshold": "a lower threshold"}
    return "ask for " + (" or ".join(asks[name] for name in given) if given else "more (a ratio or num_layers)")


def _run_stages(model: nn.Module, passes: Sequence[CompressionPass], calib: CalibrationSet | None,
                base: dict[str, Any], fit: torch.Tensor | None, budget: MemoryBudget) -> CompressionPlan:
    ids = calib.ids if calib is not None else None
    stages: list[Stage] = []
    tensors: dict[str, torch.Tensor] = {}
    timings: list[dict[str, Any]] = []
    plan: CompressionPlan | None = None
    for k, p in enumerate(passes):
        if plan is None:
            work, slots = model, None
        else:  # plan on the model the earlier stages produced; positions map back to base layers
            # a lazy model's copy shares its loaded tensors and reads its layers from the same files
            work = apply_plan(lazy_copy(model) if is_lazy_model(model) else copy.deepcopy(model), plan, strict=False)
            slots = list(plan.shape_after.layers)
        if is_lazy_model(work) and not p.streams:
            streaming = ", ".join(sorted(name for name, cls in pass_classes().items() if cls.streams))
            raise SLMError(f"pass {p.name!r} does not declare that it runs on the sequential engine (streams = True), "
                           f"so it needs the model in memory; run it without --max-memory (streaming: {streaming})")
        if not p.handles_removed_sublayers and ArchAdapter(work).removed_sublayers():
            accepting = ", ".join(sorted(name for name, cls in pass_classes().items()
                                         if cls.handles_removed_sublayers is True)) + ", slm-plus granularity=sublayer"
            raise SLMError(f"{f'stage {k + 1}: ' if len(passes) > 1 else ''}pass {p.name!r} cannot run on layers "
                           "without their attention or MLP (removed by slm-plus granularity=sublayer); put that stage "
                           f"last, or use a pass that removes whole layers ({accepting})")
        memory = {"budget": budget} if is_lazy_model(work) else {}  # the in-memory engine holds the model already
        engine = engine_for(work)(work, ids if p.needs_calibration else None, batch_size=p.config.get("batch_size"),
                                  fit_ids=fit if p.needs_fit_set else None, **memory)
        started = time.perf_counter()
        try:
            result = p.run(engine)
        finally:
            engine.close()
        if not result.ops:  # an empty plan would write a copy of the base and call it compressed
            raise PassError(f"{f'stage {k + 1}: ' if len(passes) > 1 else ''}pass {p.name!r} removes nothing from "
                            f"this model (its plan has no ops); {_ask_for_more(p)}")
        # the load-independent cost goes into the plan (decoder-layer runs, in passes over the search set); the wall
        # time only into ``plan.timings``, so the same plan always has the same bytes
        result.trace["layer_evaluations"] = round(engine.layer_evaluations, 2)
        timing = {"method": p.name, "seconds": round(time.perf_counter() - started, 2), **result.timings}
        del engine
        prefix = f"stage{k}." if k else ""
        renamed = {name: prefix + name for name in result.tensors}
        ops = [kind_of(op).rename_tensors(op, renamed) for op in result.ops]
        if slots is not None:
            ops = [kind_of(op).to_base(op, slots) for op in ops]
        tensors.update({renamed[name]: t.detach().to("cpu").contiguous() for name, t in result.tensors.items()})
        stage = Stage(
            method=p.name,
            params=dict(result.params) if result.params is not None else p.public_params(),
            ops=ops,
            calibration=_stage_calibration(p, calib, fit),
            trace=result.trace,
        )
        stages.append(stage)
        timings.append(timing)
        plan = CompressionPlan(base=base, stages=list(stages), tensors=dict(tensors))
    assert plan is not None
    plan.timings = timings
    return plan
