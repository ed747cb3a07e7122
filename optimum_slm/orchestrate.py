"""The one road from a request to a compressed model: ``Recipe`` + model -> plan -> quality check -> apply -> heal ->
write.

Every front door translates its arguments into a ``Recipe`` and calls this module: ``slm compress`` /
``optimum-cli slm compress`` (``run``), ``SLMCompressor`` (``compress_loaded``), ``lm_eval --model slm``
(``plan_for`` + ``compress_in_memory``, or ``write_compressed`` with ``parallelize=True``) and ``slm apply``
(``write_compressed``). What happens in which order, what is defaulted (the calibration corpus), and whether the
model's layers are streamed from disk (the ``MemoryBudget``) is decided here, once.

    recipe = Recipe.single("slm-plus", ratio=0.2)
    result = run(recipe, ModelSource("smollm2-135m"), "out/")
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .arch import param_count
from .calibration import CalibrationSet, downloads_allowed
from .engine import is_lazy_model
from .engine.budget import MemoryBudget
from .errors import SLMError
from .io.checkpoint import resolve_save_dtype, write_checkpoint, write_plan_only
from .io.output import claim_output, local_paths
from .loading import load_model, resolve_model_path
from .pipeline import CacheSpec, plan_compression
from .plan import CompressionPlan, apply_plan
from .quality import QualityCheck
from .recipe import Recipe
from .reports.card import healing_section, model_card

#: the corpus every front door calibrates on when none is given (a pass needs data, or the corpus is installed)
DEFAULT_CORPUS = "wiki-leads"


@dataclass(frozen=True)
class ModelSource:
    """Where a base model comes from and how to load it (``load_model``'s arguments)."""

    name_or_path: str
    gguf_file: str | None = None
    dtype: str | None = None
    device: str | None = "auto"
    allow_download: bool = False
    allow_pickle: bool = False

    @property
    def path(self) -> str:
        return resolve_model_path(self.name_or_path, self.gguf_file)

    def weights_size(self) -> int | None:
        """The size of the weight files: an upper bound for a compressed checkpoint (None: not a safetensors
        folder)."""
        path = self.path
        if not os.path.isdir(path):
            return None
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                   if f.endswith(".safetensors")) or None

    def load(self, lazy: bool = False) -> tuple[nn.Module, Any]:
        """``(model, tokenizer)``; ``lazy``: the decoder layers stay on disk and are read while they run."""
        return load_model(self.name_or_path, gguf_file=self.gguf_file, dtype=self.dtype, device=self.device,
                          allow_download=self.allow_download, allow_pickle=self.allow_pickle, lazy=lazy)


@dataclass
class CompressionResult:
    """What a run produced: the plan (with ``quality_check`` in its trace and ``heal_record`` when it healed), the
    compressed model (None when the model given is still the base: only the plan was written, the check ran on a
    copy), the parameters before, the folder written, and whether the layers were streamed from disk."""

    plan: CompressionPlan
    model: nn.Module | None = None
    params_before: int = 0
    output: str | None = None
    streamed: bool = False


def resolve_recipe(recipe: Recipe) -> Recipe:
    """``recipe`` with its defaults decided: the calibration corpus is ``wiki-leads`` when none is named and a stage
    needs data or the corpus is installed (then the quality check has unseen text to read)."""
    if recipe.calibration.source is not None:
        return recipe
    from .assets import WIKI_PACKAGE, package_dir

    if recipe.needs_calibration or package_dir(WIKI_PACKAGE) is not None:
        return recipe.with_calibration(source=DEFAULT_CORPUS)
    return recipe


def draw_calibration(recipe: Recipe, tokenizer) -> CalibrationSet | None:
    """The calibration set the recipe asks for (None when it names no corpus)."""
    if recipe.calibration.source is None:
        return None
    return recipe.calibration.load(tokenizer)


def plan_for(recipe: Recipe, model: nn.Module, tokenizer, *, calibration: CalibrationSet | None = None,
             cache: CacheSpec = True, name_or_path: str | None = None) -> CompressionPlan:
    """The plan of a resolved ``recipe`` for ``model`` (cached or computed; ``calibration``: the set already drawn,
    else drawn here)."""
    if calibration is None:
        calibration = draw_calibration(recipe, tokenizer)
    try:
        return plan_compression(model, recipe, calibration, tokenizer=tokenizer, cache=cache,
                                name_or_path=name_or_path, budget=recipe.budget)
    except SLMError as exc:
        if calibration is None:
            raise type(exc)(f"{exc} (name a calibration corpus)") from None
        raise


def compress_in_memory(recipe: Recipe | None, model: nn.Module, tokenizer, *, plan: CompressionPlan | None = None,
                       calibration: CalibrationSet | None = None, cache: CacheSpec = True,
                       name_or_path: str | None = None) -> CompressionResult:
    """Plan (unless ``plan`` is given), check, apply in place and heal: the compressed model, not written.

    ``recipe`` None: apply the given ``plan`` as it is (no check, no healing). The quality check (``recipe.output.check``) measures the base on calibration-corpus text no pass read before the
    model changes, and the result after; it goes into the plan's trace (``quality_check``). A ``heal`` stage trains
    the compressed model afterwards; its record is ``plan.heal_record``.
    """
    if recipe is None:
        if plan is None:
            raise SLMError("compress_in_memory needs a recipe or a plan")
        before = param_count(model)
        apply_plan(model, plan, strict=True)
        return CompressionResult(plan, model, before)
    recipe = resolve_recipe(recipe)
    if calibration is None and (plan is None or recipe.output.check):
        calibration = draw_calibration(recipe, tokenizer)
    if plan is None:
        plan = plan_for(recipe, model, tokenizer, calibration=calibration, cache=cache, name_or_path=name_or_path)
    before = param_count(model)
    probe = _quality_probe(recipe, model, tokenizer, calibration)
    apply_plan(model, plan, strict=True)
    if probe is not None:
        plan.stages[-1].trace["quality_check"] = probe.run(model)
    if recipe.heal is not None:
        from .healing import heal_model

        model, plan.heal_record = heal_model(model, tokenizer, recipe.heal)
    return CompressionResult(plan, model, before)


def _quality_probe(recipe: Recipe, model: nn.Module, tokenizer, calibration: CalibrationSet | None
                   ) -> QualityCheck | None:
    if not recipe.output.check or calibration is None or tokenizer is None:
        return None
    unseen = calibration.unseen()
    return QualityCheck.prepare(model, tokenizer, unseen, calibration.source, recipe.budget) if unseen else None


def compress_loaded(recipe: Recipe, model: nn.Module, tokenizer, output: str | os.PathLike, *,
                    calibration: CalibrationSet | None = None, overwrite: bool = False, cache: CacheSpec = True,
                    command: str | None = None, name_or_path: str | None = None) -> CompressionResult:
    """Compress a loaded model by ``recipe`` and write ``output``: checkpoint + plan + card (``plan_only``: the
    plan). The model is compressed in place unless only the plan is written (then the check runs on a copy)."""
    recipe = resolve_recipe(recipe)
    if recipe.output.save_dtype is not None:
        resolve_save_dtype(recipe.output.save_dtype)
    with claim_output(output, overwrite, protect=local_paths(name_or_path, recipe.calibration.source)):
        if not recipe.output.plan_only:
            result = compress_in_memory(recipe, model, tokenizer, calibration=calibration, cache=cache,
                                        name_or_path=name_or_path)
            result.output = write_result(result, tokenizer, output, overwrite=overwrite,
                                         save_dtype=recipe.output.save_dtype, command=command)
            return result
        if calibration is None:
            calibration = draw_calibration(recipe, tokenizer)
        plan = plan_for(recipe, model, tokenizer, calibration=calibration, cache=cache, name_or_path=name_or_path)
        probe = _quality_probe(recipe, model, tokenizer, calibration)
        consumed, before = False, param_count(model)
        if probe is not None:
            # a lazy model cannot be copied (its layers are the checkpoint's anyway): it is compressed in place
            consumed = is_lazy_model(model)
            checked = apply_plan(model if consumed else copy.deepcopy(model), plan)
            plan.stages[-1].trace["quality_check"] = probe.run(checked)
        path = write_plan_only(plan, output, overwrite)
        return CompressionResult(plan, model if consumed else None, before, path)


def run(recipe: Recipe, source: ModelSource | str, output: str | os.PathLike, *, overwrite: bool = False,
        cache: CacheSpec = True, command: str | None = None,
        notify: Callable[[str], None] | None = None) -> CompressionResult:
    """Load ``source``, compress it by ``recipe`` and write ``output`` — everything ``slm compress`` does.

    The memory budget decides whether the decoder layers are streamed from the checkpoint's shards (the sequential
    engine): when the weight files exceed half of ``recipe.max_memory``, or 70% of the available memory without
    one. ``notify`` receives one line when the run streams.
    """
    source = ModelSource(source) if isinstance(source, str) else source
    recipe = resolve_recipe(recipe)
    if recipe.output.save_dtype is not None:
        resolve_save_dtype(recipe.output.save_dtype)
    size = source.weights_size()
    streamed = recipe.budget.streams(size)
    if streamed and recipe.heal is not None:
        raise SLMError("healing trains the whole model in memory: drop the heal stage or --max-memory")
    need = None if recipe.output.plan_only else size
    with claim_output(output, overwrite, need_bytes=need,
                      protect=local_paths(source.name_or_path, source.path, recipe.calibration.source)) as target:
        if streamed and notify is not None:
            notify("streaming the decoder layers from the checkpoint's shards (sequential engine)")
        model, tokenizer = source.load(lazy=streamed)
        with downloads_allowed(source.allow_download):  # a datasets corpus name: the local cache unless allowed
            result = compress_loaded(recipe, model, tokenizer, target, overwrite=overwrite, cache=cache,
                                     command=command, name_or_path=source.name_or_path)
    result.streamed = streamed
    return result


def write_result(result: CompressionResult, tokenizer, output: str | os.PathLike, *, overwrite: bool = False,
                 save_dtype: str | torch.dtype | None = None, command: str | None = None) -> str:
    """Write a compressed (and perhaps healed) model: checkpoint, tokenizer, plan, model card, healing record."""
    model, plan = result.model, result.plan
    dtype = str(resolve_save_dtype(save_dtype) if save_dtype is not None else next(model.parameters()).dtype)
    card = model_card(plan, result.params_before, param_count(model), dtype=dtype.replace("torch.", ""),
                      command=command)
    runs = None
    if plan.heal_record is not None:
        runs = [plan.heal_record]
        card = card.rstrip("\n") + "\n\n" + healing_section(plan.heal_record, 1)
    return write_checkpoint(model, tokenizer, output, plan=plan, card=card, heal_runs=runs, overwrite=overwrite,
                            save_dtype=save_dtype)


def write_compressed(plan: CompressionPlan, model: nn.Module, tokenizer, output: str | os.PathLike, *,
                     overwrite: bool = False, save_dtype: str | torch.dtype | None = None, strict: bool = True
                     ) -> CompressionResult:
    """Apply a given plan to ``model`` in place and write the checkpoint (``slm apply``, lm-eval's
    ``parallelize=True``)."""
    if save_dtype is not None:
        resolve_save_dtype(save_dtype)
    before = param_count(model)
    apply_plan(model, plan, strict=strict)
    result = CompressionResult(plan, model, before)
    result.output = write_result(result, tokenizer, output, overwrite=overwrite, save_dtype=save_dtype)
    return result


def apply_saved(plan: CompressionPlan, source: ModelSource | str, output: str | os.PathLike, *,
                overwrite: bool = False, save_dtype: str | None = None,
                budget: MemoryBudget | None = None) -> CompressionResult:
    """Rebuild a compressed checkpoint from its base and plan (``slm apply``), streamed when the budget says so."""
    source = ModelSource(source) if isinstance(source, str) else source
    size = source.weights_size()
    streamed = (budget or MemoryBudget()).streams(size)
    with claim_output(output, overwrite, need_bytes=size,
                      protect=local_paths(source.name_or_path, source.path)) as target:
        model, tokenizer = source.load(lazy=streamed)
        result = write_compressed(plan, model, tokenizer, target, overwrite=overwrite, save_dtype=save_dtype)
    result.streamed = streamed
    return result

