"""``SLMLM``: lm-eval's ``HFLM`` evaluating a base model compressed in memory by an optimum-slm pass or plan.

The ``model_args`` are translated into one ``Recipe`` (``recipe_from_model_args``); planning, applying and healing
happen in ``optimum_slm.orchestrate``, as for ``slm compress``.

``--model_args`` keys (lm-eval parses the values; commas separate keys, lists go in brackets):

* ``base`` (required): checkpoint folder, hub id (offline cache), ``.gguf`` file or alias (``smollm2-135m``,
  ``qwen2.5-coder-1.5b``); ``gguf_file``: a GGUF file inside ``base``. GGUF bases are converted once to a plain
  checkpoint in the user cache.
* ``plan``: a plan file to apply (its base fingerprint must match), instead of computing one; or
* ``recipe``: a recipe file (YAML stages, e.g. slm-plus then flap) compressed into one plan (a last ``heal`` stage
  trains the compressed model before it is evaluated); or
* ``method`` (default ``slm-plus``, the recommended pass; ``slm`` is the faithful reproduction) with ``ratio`` |
  ``num_layers`` | ``threshold``, ``merge``, and any other parameter of that pass (``slm list`` shows them; an
  unknown key is refused with the valid ones listed); ``calib`` (calibration source, default ``wiki-leads`` when
  the pass needs data or the corpus is installed), ``calib_samples`` (10), ``calib_seq_len`` (128), ``calib_sampling`` (``auto``: crop,
  or pack when too few documents are long enough), ``fit_samples`` (256) and ``fit_seq_len`` (256) (the fit set of
  passes that fit a least-squares map: ``replaceme``, the ``*-lstsq`` merge rules), ``seed`` (1234), ``text_field``.
* ``max_memory`` (e.g. ``4GiB``): the memory budget, as ``slm compress --max-memory``. A base whose weights exceed
  half of it (without it: 70% of the memory available) is planned with its layers streamed from its shards and written
  compressed to the user cache, and lm-eval loads that checkpoint: the whole base is never in memory.
* ``plan_cache``: folder of computed plans (default: ``plans`` in the optimum-slm user cache, shared with
  ``slm compress`` and the Python API). A plan is keyed by base fingerprint + method + parameters +
  calibration-ids hash + dtype, so a run with the same arguments as an earlier one (from any front door) reuses it
  and logs that it did; ``plan_cache=none`` computes without the cache.
* ``dtype`` (``auto``), ``peft`` (an adapter folder applied AFTER compression, so it must target the compressed
  model; its weights must be safetensors unless ``allow_pickle=True``);
* ``allow_download`` (default False): like ``slm compress``, nothing is downloaded: ``base`` (and ``peft``) must be a
  folder, an alias or in the local Hub cache, so an unknown id fails at once in one line; ``allow_pickle`` (default
  False): accept pickle-only weights (``pytorch_model.bin``, ``adapter_model.bin``: loading a pickle can run code);
  every other ``HFLM`` argument (``max_length``, ``trust_remote_code``, ...) is passed through. ``device`` and
  ``batch_size`` come from lm-eval's own ``--device`` / ``--batch_size``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import sys
from typing import Any, Callable

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from optimum_slm.errors import ModelLoadError, PassError, SLMError

# a child of lm-eval's logger, so the messages show with lm-eval's own formatting and verbosity
logger = logging.getLogger("lm_eval.slm")

#: HFLM arguments passed through unchanged; every other unknown key is a pass parameter
HFLM_KEYS = frozenset(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs", "pretrained", "gguf_file",
                                                                     "peft", "dtype"}


#: set by ``python -m lm_eval_slm``; the ``lm_eval`` console script is recognised by its name
CLI_FLAG = "OPTIMUM_SLM_LM_EVAL_CLI"


def _under_cli() -> bool:
    return bool(os.environ.get(CLI_FLAG)) or os.path.basename(sys.argv[0] or "") in ("lm_eval", "lm-eval")


def _one_line_errors(init: Callable) -> Callable:
    """Under lm-eval's command line, bad input ends the run with one ``error: ...`` line and exit code 2 (lm-eval
    itself would print a traceback); from Python the ``SLMError`` propagates as usual."""

    @functools.wraps(init)
    def wrapper(self, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except SLMError as exc:
            if not _under_cli():
                raise
            print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


class SLMLM(HFLM):
    """An ``HFLM`` whose model is ``base`` compressed by optimum-slm (a computed, cached or given plan)."""

    def __init__(
        self,
        base: str | None = None,
        gguf_file: str | None = None,
        method: str = "slm-plus",
        ratio: float | None = None,
        num_layers: int | None = None,
        threshold: float | None = None,
        merge: str | None = None,
        plan: str | None = None,
        calib: str | None = None,
        calib_samples: int = 10,
        calib_seq_len: int = 128,
        calib_sampling: str = "auto",
        fit_samples: int = 256,
        fit_seq_len: int = 256,
        seed: int = 1234,
        text_field: str = "text",
        dtype: str = "auto",
        peft: str | None = None,
        plan_cache: str | None = None,
        recipe: str | None = None,
        max_memory: str | None = None,
        allow_download: bool = False,
        allow_pickle: bool = False,
        **kwargs: Any,
    ) -> None:
        self._init(base=base, gguf_file=gguf_file, method=method, ratio=ratio, num_layers=num_layers,
                   threshold=threshold, merge=merge, plan=plan, calib=calib, calib_samples=calib_samples,
                   calib_seq_len=calib_seq_len, calib_sampling=calib_sampling, fit_samples=fit_samples,
                   fit_seq_len=fit_seq_len, seed=seed, text_field=text_field, dtype=dtype, peft=peft,
                   plan_cache=plan_cache, recipe=recipe, max_memory=max_memory,
                   allow_download=allow_download, allow_pickle=allow_pickle, **kwargs)

    @_one_line_errors
    def _init(self, *, base, gguf_file, method, ratio, num_layers, threshold, merge, plan, calib, calib_samples,
              calib_seq_len, calib_sampling, fit_samples, fit_seq_len, seed, text_field, dtype, peft, plan_cache,
              recipe, max_memory, allow_download=False, allow_pickle=False, **kwargs: Any) -> None:
        from optimum_slm.engine.budget import MemoryBudget
        from optimum_slm.loading import check_loadable, resolve_model_path
        from optimum_slm.orchestrate import ModelSource

        allow_download, allow_pickle = _flag("allow_download", allow_download), _flag("allow_pickle", allow_pickle)
        if base is None or "pretrained" in kwargs:
            raise ModelLoadError("the slm model needs base=<checkpoint, hub id, .gguf or alias> in --model_args "
                                 "(not pretrained=)")
        hf_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in HFLM_KEYS}
        if hf_kwargs.get("tp_plan"):
            raise SLMError("the slm model compresses the model it loads; tp_plan (tensor parallelism) is not supported "
                           "(parallelize=True, an accelerate device map, is)")
        params = {k: v for k, v in (("ratio", ratio), ("num_layers", num_layers), ("threshold", threshold),
                                    ("merge", merge)) if v is not None}
        params.update(kwargs)  # anything else is for the pass, which refuses unknown keys listing the valid ones
        if plan is not None and (params or calib is not None or recipe is not None):
            given = ", ".join(sorted(params) + (["calib"] if calib is not None else [])
                              + (["recipe"] if recipe is not None else []))
            raise PassError(f"plan= applies a saved plan; drop the search arguments ({given})")
        calibration = {"source": calib, "n_samples": calib_samples, "seq_len": calib_seq_len, "seed": seed,
                       "text_field": text_field, "sampling": calib_sampling, "fit_samples": fit_samples,
                       "fit_seq_len": fit_seq_len}
        # the request, checked before anything is loaded (None: apply the given plan file)
        self.slm_recipe = None if plan is not None else recipe_from_model_args(method, params, calibration, recipe,
                                                                              max_memory)
        budget = self.slm_recipe.budget if self.slm_recipe is not None else MemoryBudget.of(max_memory)
        self.slm_base = str(base)
        self.slm_method = method
        self.slm_plan_file = plan
        self.slm_peft = _adapter_folder(str(peft), allow_download, allow_pickle) if peft else None
        self.slm_plan_cache = plan_cache
        self.slm_plan = None
        self.slm_plan_reused = False
        # HFLM loads a plain checkpoint folder (GGUF and aliases resolved here) and calls our _create_model
        path = resolve_model_path(self.slm_base, gguf_file)
        check_loadable(path, self.slm_base, allow_download=allow_download, allow_pickle=allow_pickle,
                       hints=("allow_download=True in --model_args", "allow_pickle=True in --model_args"))
        if not allow_download:  # a hub id is loaded from its cached snapshot: no network, no retries
            path = _cached_snapshot(path) or path
        self.slm_prebuilt = None
        # the base is too large for the budget (max_memory=, or 70% of the memory available), or an accelerate device
        # map (layers over GPUs, or offloaded) is HFLM's to build from a plain checkpoint: plan and write the
        # compressed checkpoint with the layers streamed from the base's shards, then let HFLM load that one
        streamed = budget.streams(ModelSource(path).weights_size())
        if hf_kwargs.get("parallelize") or streamed:
            why = "parallelize=True" if hf_kwargs.get("parallelize") else "a base larger than the memory budget"
            if self.slm_recipe is not None and self.slm_recipe.heal is not None:
                raise SLMError(f"{why} writes the compressed checkpoint from the base's shards; a heal stage trains the "
                               "whole model in memory: drop one of them")
            path = self.slm_prebuilt = self._prebuilt_checkpoint(path, dtype)
        super().__init__(pretrained=path, dtype=dtype, **hf_kwargs)
        self._shard_across_cpu_processes()

    def _shard_across_cpu_processes(self) -> None:
        """Under ``accelerate launch`` / ``torchrun`` with several CPU processes, split the requests between them.

        lm-eval's HFLM sets its rank and world size only when it counts several GPUs, so CPU processes would each
        evaluate everything; here each takes its share and lm-eval gathers the results over the gloo group."""
        accelerator = getattr(self, "accelerator", None)
        if accelerator is None or accelerator.num_processes < 2 or getattr(self, "_world_size", 1) > 1:
            return
        if accelerator.device.type != "cpu":
            return
        self._rank = accelerator.process_index
        self._world_size = accelerator.num_processes
        self._device = accelerator.device

    # HFLM.__init__ calls this with the tokenizer already built; compress right after the base is loaded
    def _create_model(self, pretrained: str, **kwargs: Any) -> None:
        kwargs["peft"] = None  # adapters go on the compressed model, below
        super()._create_model(pretrained, **kwargs)
        if self.slm_prebuilt is None:
            self._compress()
        if self.slm_peft:
            from peft import PeftModel

            self._model = PeftModel.from_pretrained(self._model, self.slm_peft)
        # HFLM cached the base's AutoConfig; the compressed model's config has the new layer count
        self._config = self._model.config

    def _plan_for(self, model, tokenizer) -> tuple[Any, str]:
        """The plan to evaluate (given, cached or computed on ``model``) and where it came from."""
        from optimum_slm.orchestrate import plan_for, resolve_recipe
        from optimum_slm.plan import CompressionPlan

        if self.slm_recipe is None:
            return CompressionPlan.load(self.slm_plan_file), f"plan file {self.slm_plan_file}"
        cache = True if self.slm_plan_cache is None else (
            False if str(self.slm_plan_cache).lower() == "none" else self.slm_plan_cache)
        accelerator = getattr(self, "accelerator", None)  # set by HFLM under accelerate launch / torchrun
        recipe = resolve_recipe(self.slm_recipe)
        # data-parallel processes: the main one computes (and caches) the plan first, the others then reuse it
        with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
            try:
                plan = plan_for(recipe, model, tokenizer, cache=cache, name_or_path=self.slm_base)
            except SLMError as exc:
                if recipe.calibration.source is None:
                    raise type(exc)(f"{exc} (give calib=<corpus> in --model_args)") from None
                raise
        if plan.reused_from:
            self.slm_plan_reused = True
            logger.info("slm: reusing cached plan %s", plan.reused_from)
            return plan, f"cached plan {plan.reused_from}"
        logger.info("slm: computed a %s plan", plan.method)
        return plan, "computed"

    def _prebuilt_checkpoint(self, path: str, dtype: str) -> str:
        """``parallelize=True`` or a base over the memory budget: the compressed checkpoint of ``path``, planned and
        written with the decoder layers
        streamed from its safetensors shards (never the whole model in CPU memory), kept in the user cache under the
        plan's digest. An evaluation of the same plan reuses it only when its ``slm_plan.json`` is this plan and every
        file matches the sha256 manifest written with it (``io.manifest``); anything else is rebuilt, with a
        warning."""
        import hashlib

        from optimum_slm.arch import ArchAdapter, param_count
        from optimum_slm.io.manifest import write_folder_manifest
        from optimum_slm.loading import cache_dir
        from optimum_slm.orchestrate import ModelSource, write_compressed
        from optimum_slm.plan.width_ops import layer_widths

        model, tokenizer = ModelSource(path, dtype=dtype).load(lazy=True)
        plan, origin = self._plan_for(model, tokenizer)
        if layer_widths(plan.shape_after)[0] is None:  # (a base over the budget is written the same way)
            raise SLMError("the compressed checkpoint is written from the base's shards and loaded by transformers "
                           "(parallelize=True, or a base over the memory budget), which needs the same widths in every "
                           "layer; this plan narrows layers differently (drop parallelize=True, or give max_memory=)")
        # the plan's JSON lists every side-car tensor with its sha256, so it identifies the checkpoint with the dtype
        digest = hashlib.sha256((plan.to_json() + str(dtype)).encode())
        folder = os.path.join(cache_dir("compressed"), digest.hexdigest()[:32])
        before, params_before = ArchAdapter(model).num_layers, param_count(model)
        why = _prebuilt_differs(folder, plan) if os.path.exists(folder) else "absent"
        if why is None:
            origin += f"; compressed checkpoint reused from {folder}"
        else:
            if why != "absent":
                logger.warning("slm: the cached compressed checkpoint %s is not the one this plan writes (%s); "
                               "rebuilding it", folder, why)
            write_compressed(plan, model, tokenizer, folder, overwrite=True)
            write_folder_manifest(folder, cache_dir("digests"))  # what a later reuse checks the folder against
            origin += f"; compressed checkpoint written to {folder}"
        self.slm_plan = plan
        logger.info("slm: evaluating %s compressed by %s: %d -> %d layers, %s parameters before (%s); loading it "
                    "with parallelize=True", self.slm_base, plan.method, before, plan.num_layers_after,
                    f"{params_before:,}", origin)
        return folder

    def _compress(self) -> None:
        from optimum_slm.arch import ArchAdapter, param_count
        from optimum_slm.orchestrate import compress_in_memory

        model = self._model
        before = ArchAdapter(model).num_layers
        plan, origin = self._plan_for(model, self.tokenizer)
        result = compress_in_memory(self.slm_recipe, model, self.tokenizer, plan=plan)
        self._model, self.slm_plan = result.model, plan
        if plan.heal_record is not None:
            record = plan.heal_record
            logger.info("slm: healed (%s): validation loss %.4f -> %.4f after %d steps", record["method"],
                        record["val_loss_before"], record["val_loss_best"], record["steps"])
        after = ArchAdapter(result.model).num_layers
        logger.info("slm: evaluating %s compressed by %s: %d -> %d layers, %s -> %s parameters (%s)",
                    self.slm_base, plan.method, before, after, f"{result.params_before:,}",
                    f"{param_count(result.model):,}", origin)
        for line in plan.summary().splitlines():
            logger.info("slm plan | %s", line)


def _flag(name: str, value: Any) -> bool:
    """A boolean ``--model_args`` value (lm-eval parses ``true``/``false``; a string or 0/1 from Python is accepted)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise SLMError(f"{name} must be True or False, got {value!r}")


def _cached_snapshot(name: str, filename: str = "config.json") -> str | None:
    """The local Hub-cache folder of hub id ``name`` when ``filename`` of it is cached (None for a folder, or an id
    that is not cached)."""
    if os.path.isdir(name) or os.path.exists(name):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, filename)
    except Exception:  # noqa: BLE001 - a malformed repo id is simply not in the cache
        return None
    return os.path.dirname(cached) if isinstance(cached, str) else None


def _adapter_folder(peft: str, allow_download: bool, allow_pickle: bool) -> str:
    """The folder of the ``peft=`` adapter (a hub id resolved in the local Hub cache), refused in one line when it is
    not an adapter, is not available offline (unless ``allow_download``: PEFT then downloads it), or holds only
    pickle weights (unless ``allow_pickle``)."""
    folder = peft
    if not os.path.isdir(folder):
        if os.path.exists(folder):
            raise ModelLoadError(f"peft={peft!r} is a file; give the adapter's folder (adapter_config.json and its "
                                 "weights)")
        cached = _cached_snapshot(peft, "adapter_config.json")
        if cached is None:
            if allow_download:
                return peft
            raise ModelLoadError(f"peft={peft!r} is not an adapter folder or an adapter in the local Hub cache; "
                                 "downloads are off (allow them with allow_download=True in --model_args)")
        folder = cached
    files = os.listdir(folder)
    if "adapter_config.json" not in files:
        raise ModelLoadError(f"peft={peft!r} is a folder without adapter_config.json, not a PEFT adapter")
    if not any(f.endswith(".safetensors") for f in files):
        pickles = sorted(f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")))
        if not pickles:
            raise ModelLoadError(f"peft={peft!r} holds no adapter weights (adapter_model.safetensors)")
        if not allow_pickle:
            raise ModelLoadError(
                f"peft={peft!r} holds only pickle weights ({pickles[0]}), which optimum-slm does not load (a pickle "
                "can run code); save the adapter with safetensors (save_pretrained(..., safe_serialization=True)) "
                "or add allow_pickle=True to --model_args if you trust it")
    return folder


def _prebuilt_differs(folder: str, plan) -> str | None:
    """Why the cached compressed checkpoint ``folder`` is not the one ``plan`` writes (None when it is): its
    ``slm_plan.json`` must be this plan (the same JSON), and every file must match the sha256 manifest written with
    the folder (none added, none missing, none changed)."""
    import json

    from optimum_slm.io.manifest import check_folder_manifest
    from optimum_slm.io.names import PLAN_FILE
    from optimum_slm.loading import cache_dir

    try:
        with open(os.path.join(folder, PLAN_FILE), encoding="utf-8") as fh:
            written = json.load(fh)
    except (OSError, ValueError):
        return f"it has no readable {PLAN_FILE}"
    if written != json.loads(plan.to_json()):
        return f"its {PLAN_FILE} is not this plan"
    return check_folder_manifest(folder, cache_dir("digests"))


def recipe_from_model_args(method: str, params: dict[str, Any], calibration: dict[str, Any],
                           recipe_file: str | None, max_memory: str | None = None):
    """The ``Recipe`` that ``--model_args`` ask for: ``recipe=``'s file, whose calibration the keys given with
    non-default values (and ``max_memory``, when given) override, or one stage of ``method`` with its parameters.
    lm-eval evaluates the result, so the quality check is off."""
    import dataclasses

    from optimum_slm.calibration import CalibrationConfig
    from optimum_slm.recipe import OutputOptions, PassStage, Recipe

    values = dict(calibration)
    for key in ("n_samples", "seq_len", "seed", "fit_samples", "fit_seq_len"):
        try:
            values[key] = int(values[key])
        except (TypeError, ValueError):
            name = {"n_samples": "calib_samples", "seq_len": "calib_seq_len"}.get(key, key)
            raise PassError(f"{name} must be an integer, got {values[key]!r}") from None
    values["sampling"] = str(values["sampling"])
    output = OutputOptions(check=False)
    memory = {} if max_memory is None else {"max_memory": max_memory}
    if recipe_file is None:
        return Recipe(stages=(PassStage(method, params),), calibration=CalibrationConfig(**values), output=output,
                      **memory)
    if params:
        raise PassError(f"recipe= names the methods and parameters; drop {', '.join(sorted(params))}")
    recipe = Recipe.from_yaml(recipe_file)
    defaults = CalibrationConfig().to_dict()
    given = {key: value for key, value in values.items() if value != defaults[key]}
    return recipe.replace(calibration=dataclasses.replace(recipe.calibration, **given), output=output, **memory)


def _register() -> None:
    """Register ``slm`` (upgrading the start-up hook's lazy placeholder to this class)."""
    try:
        register_model("slm")(SLMLM)
    except ValueError:
        # already registered lazily by another route (an lm-eval that reads the ``lm_eval.models`` entry point
        # keeps its own placeholder); the registry loads this very class from it
        logger.debug("lm-eval model 'slm' was already registered; keeping that registration")


_register()
