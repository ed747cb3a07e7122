"""The one compression pipeline: calibration -> engine -> pass(es) -> ``CompressionPlan``.

``compress`` is what every front door calls (``slm compress``, ``optimum-cli slm compress``, ``SLMCompressor``,
``lm_eval --model slm``, the benchmarks)::

    plan = optimum_slm.compress(model, "slm-plus", CalibrationConfig("wiki-leads"), tokenizer=tok, ratio=0.2)

It loads the calibration ids once, consults the plan cache, builds one forward engine per stage and hands it to the
pass, turns what the pass returns into a plan stage (ops in base numbering, side-car tensors named), and stores the
plan in the cache. A stage after the first plans on the model compressed by the stages before it; its ops are
re-expressed in base numbering by their op kinds. The model passed in is never modified.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .calibration import CalibrationConfig, describe_calibration, fit_ids as drawn_fit_ids, load_calibration
from .engine import engine_for, is_lazy_model
from .engine.lazy import check_not_offloaded, lazy_copy
from .errors import PassError, SLMError
from .passes.base import CompressionPass
from .plan import CompressionPlan, Stage, describe_base, fingerprint, kind_of
from .plan.cache import PlanCache, plan_key
from .plan.execute import apply_plan
from .plan.fingerprint import jsonable
from .registry import get_pass

logger = logging.getLogger(__name__)

#: the pass every front door uses when none is named: the recommended one (``slm`` is the faithful reproduction)
DEFAULT_METHOD = "slm-plus"

StageSpec = str | Mapping[str, Any] | CompressionPass
CacheSpec = bool | str | os.PathLike | PlanCache | None


def resolve_stages(method: StageSpec | Sequence[StageSpec], params: Mapping[str, Any]) -> list[CompressionPass]:
    """Pass instances for a method name (with ``params``), a pass instance, or a list of stages (names, pass
    instances or ``{"method": name, **params}`` objects)."""
    if isinstance(method, (str, CompressionPass, Mapping)):
        specs: list = [method]
    elif isinstance(method, Sequence) and method:
        specs = list(method)
        if params:
            raise PassError("give parameters inside each stage when compressing with several stages")
    else:
        raise PassError(f"method must be a pass name, a pass or a non-empty list of stages, got {method!r}")
    passes = []
    for k, spec in enumerate(specs):
        where = f"stage {k + 1}: " if len(specs) > 1 else ""
        if isinstance(spec, CompressionPass):
            if params and len(specs) == 1:
                raise PassError("give the parameters to the pass instance, not to compress()")
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


def calibration_ids(calibration: Any, tokenizer=None) -> torch.Tensor | None:
    """Token ids from a ``CalibrationConfig``, a corpus source string, a list of documents, or ids as given."""
    if calibration is None or isinstance(calibration, torch.Tensor):
        return calibration
    if isinstance(calibration, str):
        calibration = CalibrationConfig(calibration)
    if isinstance(calibration, CalibrationConfig):
        return calibration.load(tokenizer)
    if isinstance(calibration, (list, tuple)) and all(isinstance(d, str) for d in calibration):
        if tokenizer is None:
            raise SLMError("a tokenizer is needed to build calibration data from text")
        return load_calibration(tokenizer, list(calibration))
    raise SLMError(f"calibration must be a CalibrationConfig, a corpus source, documents or token ids, got "
                   f"{type(calibration).__name__}")


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


def _entry_matches(plan: CompressionPlan, fp: str, passes: Sequence[CompressionPass], ids_sha: str | None,
                   fit_sha: str | None = None) -> str | None:
    """Why a cached plan does not answer this request (None when it does)."""
    if plan.base.get("fingerprint") != fp or plan.base.get("fingerprint_scheme") != "v2":
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
    return None


def compress(
    model: nn.Module,
    method: StageSpec | Sequence[StageSpec] = DEFAULT_METHOD,
    calibration: CalibrationConfig | str | torch.Tensor | Sequence[str] | None = None,
    *,
    tokenizer=None,
    fit: torch.Tensor | None = None,
    cache: CacheSpec = True,
    name_or_path: str | None = None,
    **params: Any,
) -> CompressionPlan:
    """Plan the compression of ``model`` by one pass or a list of stages; returns the plan (the model is unchanged).

    ``method``: a pass name (``params`` are its parameters), a ``CompressionPass``, or a list of stages, each a name,
    a pass or ``{"method": name, **params}``. ``calibration``: a ``CalibrationConfig`` or corpus source (needs
    ``tokenizer``), or token ids ``[n, seq]``. ``fit``: the fit set ``[n, seq]`` for passes that fit least-squares
    maps (default: the one drawn with a ``CalibrationConfig``'s ``fit_samples``; bare ids fall back to the search
    set, with a warning). ``cache``: True (the user cache), a folder or ``PlanCache``, or False;
    a cached plan is used only when it matches the request, and the returned plan's ``reused_from`` then names it.
    ``name_or_path`` is recorded as the base's name.
    """
    passes = resolve_stages(method, params)
    check_not_offloaded(model)
    needs = [p.name for p in passes if p.needs_calibration]
    ids = calibration_ids(calibration, tokenizer)
    if ids is None and needs:
        raise PassError(f"pass {needs[0]!r} needs calibration data (--calib-data / calibration=...)")
    ids_sha = describe_calibration(ids)["sha256"] if ids is not None else None
    fits = any(p.needs_fit_set for p in passes)
    if fits:
        if fit is None:
            fit = drawn_fit_ids(ids)
        if fit is not None and (not isinstance(fit, torch.Tensor) or fit.dim() != 2 or fit.dtype != torch.long):
            raise PassError(f"fit must be token ids [n, seq_len] (a LongTensor), got {getattr(fit, 'shape', fit)!r}")
    else:
        fit = None
    fit_sha = describe_calibration(fit)["sha256"] if fit is not None else None
    if fit is None and ids is not None and fits:
        fit_sha = ids_sha  # the passes fall back to the search set
    fp = fingerprint(model)
    store = _cache(cache)
    key = None
    if store is not None:
        dtype = str(next(model.parameters()).dtype)
        data_sha = ids_sha if needs else None
        if fit_sha is not None:
            data_sha = f"{data_sha}+fit:{fit_sha}"
        key = plan_key(fp, [(p.name, p.public_params()) for p in passes], data_sha, dtype)
        cached = store.get(key)
        if cached is not None:
            why = _entry_matches(cached, fp, passes, ids_sha, fit_sha)
            if why is None:
                cached.reused_from = store.path(key)
                logger.info("reusing the cached plan %s", store.path(key))
                return cached
            logger.warning("cached plan %s does not match its key (%s); recomputing it", store.path(key), why)
    base = describe_base(model, fp)
    if name_or_path:
        base["name_or_path"] = name_or_path
    plan = _run_stages(model, passes, ids, base, fit)
    if store is not None and key is not None:
        store.put(key, plan)
    return plan


def _stage_calibration(p: CompressionPass, ids: torch.Tensor | None, fit: torch.Tensor | None
                       ) -> dict[str, Any] | None:
    """The plan stage's ``calibration`` block: the search set, and the fit set when the pass read one."""
    if ids is None or not p.needs_calibration:
        return None
    block = describe_calibration(ids)
    if p.needs_fit_set:
        block["fit"] = describe_calibration(fit if fit is not None else ids)
    return block


def _run_stages(model: nn.Module, passes: Sequence[CompressionPass], ids: torch.Tensor | None,
                base: dict[str, Any], fit: torch.Tensor | None = None) -> CompressionPlan:
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
            from .registry import pass_classes

            streaming = ", ".join(sorted(name for name, cls in pass_classes().items() if cls.streams))
            raise SLMError(f"pass {p.name!r} does not declare that it runs on the sequential engine (streams = True), "
                           f"so it needs the model in memory; run it without --max-memory (streaming: {streaming})")
        engine = engine_for(work)(work, ids if p.needs_calibration else None, batch_size=p.config.get("batch_size"),
                               fit_ids=fit if p.needs_fit_set else None)
        started = time.perf_counter()
        try:
            result = p.run(engine)
        finally:
            engine.close()
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
            calibration=_stage_calibration(p, ids, fit),
            trace=result.trace,
        )
        stages.append(stage)
        timings.append(timing)
        plan = CompressionPlan(base=base, stages=list(stages), tensors=dict(tensors))
    assert plan is not None
    plan.timings = timings
    return plan
