"""The ``slm`` command line: one click group, also served as ``optimum-cli slm ...``.

    slm compress --model smollm2-135m --ratio 0.2 --calib-data wiki-leads --output out
    slm apply --model smollm2-135m --plan out/slm_plan.json --output rebuilt
    slm list
    slm inspect out/slm_plan.json

The commands only turn options into one request (a ``Recipe``, a ``ModelSource``) for ``optimum_slm.orchestrate``
and print the results. Bad input surfaces as an ``SLMError``; the group turns it into one line
``error: <message>`` on stderr and exit code 2. This module stays cheap to import (click only): ``optimum-cli``
imports it to build its parser, so torch and transformers are imported inside the commands.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Sequence

import click

from .._version import __version__
from ..calibration_defaults import FIT_SAMPLES, FIT_SEQ_LEN, SAMPLINGS
from .common import (DTYPE_CHOICES, SLMGroup, _set_debug, duration, folder_size, memory_option, model_options,
                     parse_size, quiet_option)


def _parse_param(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise click.BadParameter(f"expected KEY=VALUE, got {text!r}", param_hint="'--param'")
    return key, value.strip()


def pass_params(named: dict[str, Any], extra: Iterable[str]) -> dict[str, Any]:
    """Pass parameters from the dedicated options (those given) and ``--param KEY=VALUE`` pairs.

    Values stay strings: the pass parses and validates them (an unknown key lists the valid ones).
    """
    params = {k: v for k, v in named.items() if v is not None}
    for item in extra:
        key, value = _parse_param(item)
        if key in params:
            raise click.UsageError(f"parameter {key!r} is given twice (an option and --param, or two --param)")
        params[key] = value
    return params


def _plan_cache(no_cache: bool):
    """The plan cache the CLI uses: the user cache, or a fresh computation that refreshes it (``--no-cache``)."""
    if not no_cache:
        return True
    from ..plan.cache import PlanCache

    return PlanCache(read=False)


def _command_line(ctx: click.Context) -> str:
    """The command that reproduces this run: the options that differ from their defaults, in declaration order."""
    import shlex

    parts = ["slm", ctx.info_name or "compress"]
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.expose_value is False:
            continue
        value = ctx.params.get(param.name)
        if value is None or value == param.default or value == () or value is False:
            continue
        flag = param.opts[0]
        if param.is_flag:
            parts.append(flag)
        elif param.multiple:
            parts += [item for v in value for item in (flag, shlex.quote(str(v)))]
        else:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


@click.group(cls=SLMGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="optimum-slm")
@quiet_option
@click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
              help="Show the traceback of an unexpected error (also OPTIMUM_SLM_DEBUG=1).")
def cli() -> None:
    """Depth compression of LLMs: Sliding-Window Merging and depth-pruning passes, plain HF checkpoints."""


@cli.command()
@model_options
@click.option("--method", default="slm-plus", show_default=True, metavar="NAME",
              help="Compression pass (see 'list'); slm-plus is the recommended one, slm the faithful reproduction.")
@click.option("--ratio", type=float, default=None,
              help="How much to remove, in (0, 1): the fraction of decoder layers for depth passes, of the pruned "
                   "projections' parameters for width passes (see 'list').")
@click.option("--num-layers", type=int, default=None, help="Number of decoder layers to remove.")
@click.option("--threshold", type=float, default=None, help="Similarity threshold (threshold-driven passes).")
@click.option("--merge", default=None, metavar="RULE", help="Merge rule of merging passes (e.g. official, paper).")
@click.option("--calib-data", default=None, metavar="SOURCE",
              help="Calibration corpus: .txt (blank-line separated), .jsonl/.json, a folder, wiki-leads, or a "
                   "datasets name. Default: wiki-leads (when its package is installed or the pass needs data).")
@click.option("--calib-samples", type=int, default=10, show_default=True, help="Calibration sequences.")
@click.option("--calib-seq-len", type=int, default=128, show_default=True, help="Tokens per calibration sequence.")
@click.option("--calib-sampling", type=click.Choice(SAMPLINGS), default="auto", show_default=True,
              help="crop: random crops of long-enough documents (official SLM); pack: documents joined by EOS and "
                   "cut; auto: crop when enough documents are long enough, else pack.")
@click.option("--fit-samples", type=int, default=FIT_SAMPLES, show_default=True,
              help="Fit-set sequences (packed, after the search set's documents) for passes that fit a "
                   "least-squares map: replaceme, the *-lstsq merge rules.")
@click.option("--fit-seq-len", type=int, default=FIT_SEQ_LEN, show_default=True, help="Tokens per fit-set sequence.")
@click.option("--seed", type=int, default=1234, show_default=True, help="Calibration sampling seed.")
@click.option("--text-field", default="text", show_default=True, help="Text field of .jsonl/.json/datasets rows.")
@click.option("--output", "-o", required=True, metavar="DIR", help="Output folder (must be empty or new).")
@click.option("--plan-only", is_flag=True, help="Write only DIR/slm_plan.json, no checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--param", "extra_params", multiple=True, metavar="KEY=VALUE",
              help="A pass-specific parameter (repeatable); 'list' shows each pass's parameters.")
@click.option("--recipe", default=None, metavar="RECIPE.yaml",
              help="Stages to run in order into one plan (YAML: stages: [{method: slm-plus, ratio: 0.2}, ...]); "
                   "instead of --method and its parameters.")
@click.option("--no-cache", is_flag=True, help="Compute the plan even when the plan cache holds it (and store it).")
@click.option("--no-check", is_flag=True,
              help="Skip the quality check (perplexity and final-state cosine on unseen calibration text).")
@click.option("--save-dtype", type=click.Choice(DTYPE_CHOICES), default=None,
              help="Write the checkpoint in this dtype (default: the dtype the model was loaded in).")
@memory_option
@quiet_option
@click.pass_context
def compress(ctx: click.Context, model: str, gguf_file: str | None, dtype: str | None, device: str,
             allow_download: bool, allow_pickle: bool, method: str,
             ratio: float | None, num_layers: int | None, threshold: float | None, merge: str | None,
             calib_data: str | None, calib_samples: int, calib_seq_len: int, calib_sampling: str,
             fit_samples: int, fit_seq_len: int, seed: int, text_field: str,
             output: str, plan_only: bool, overwrite: bool, extra_params: Sequence[str], recipe: str | None,
             no_cache: bool, no_check: bool, save_dtype: str | None, max_memory: str | None) -> None:
    """Compress a model with a pass.

    Writes DIR: a plain checkpoint with fewer layers, slm_plan.json (+ slm_plan.tensors) and a model card
    (--plan-only: the plan), then checks the result's quality on unseen text and warns when it looks broken.
    """
    import time

    from ..orchestrate import ModelSource, run
    from ..io.names import CARD_FILE, HEAL_FILE, PLAN_FILE

    started = time.perf_counter()
    # everything that can be checked without the model is checked before the (long) load and search
    request = recipe_from_options(ctx, recipe)
    source = ModelSource(model, gguf_file=gguf_file, dtype=dtype, device=device, allow_download=allow_download,
                         allow_pickle=allow_pickle)
    result = run(request, source, output, overwrite=overwrite, cache=_plan_cache(no_cache),
                 command=_command_line(ctx), notify=lambda line: click.echo(line, err=True))
    plan, target = result.plan, result.output
    if plan.reused_from:
        click.echo(f"reused the cached plan {plan.reused_from} (--no-cache recomputes it)")
    click.echo(plan.summary())
    for timing in plan.timings:
        fit = f", of which fitting {timing['fit_seconds']:.1f} s" if "fit_seconds" in timing else ""
        click.echo(f"planned {timing['method']} in {timing['seconds']:.1f} s{fit}")
    _echo_check(plan, no_check)
    if plan.heal_record is not None:
        from .heal import describe_run

        click.echo(describe_run(plan.heal_record))
    files = f"{PLAN_FILE} (plan only)" if request.output.plan_only else f"checkpoint, {PLAN_FILE}, {CARD_FILE}" + (
        f", {HEAL_FILE}" if plan.heal_record is not None else "")
    click.echo(f"wrote {target} ({files}, {folder_size(target)}) in {duration(time.perf_counter() - started)}")
    from ..plan.width_ops import REMOVED_KEY, branch_removed, layer_widths

    uniform, per_layer = layer_widths(plan.shape_after)
    if not request.output.plan_only and uniform is None:
        removed = any(branch_removed(w, b) for w in per_layer for b in REMOVED_KEY)
        click.echo(SUBLAYER_NOTE if removed else PER_LAYER_WIDTHS_NOTE)


#: said after writing a checkpoint whose layers have different widths (who can serve it, and the alternative)
PER_LAYER_WIDTHS_NOTE = (
    "note: the layers have different widths: optimum_slm.load_model and llama.cpp (slm export --format gguf, as its "
    "deci architecture) load this checkpoint; vanilla transformers and vLLM cannot. For them, prune to uniform widths "
    "(flap's default structure=UL-UM; taylor-width without layer_start/layer_end)")


#: said after writing a checkpoint with layers that lost their attention or MLP (drop_attn / drop_mlp ops)
SUBLAYER_NOTE = (
    "note: some layers are without their attention or MLP: optimum_slm.load_model and lm_eval --model slm load this "
    "checkpoint; vanilla transformers, vLLM and the GGUF export cannot. For them, compress with whole layers "
    "(slm-plus granularity=layer)")


#: ``compress`` options that are calibration fields, by field
CALIBRATION_OPTIONS = {"source": "calib_data", "n_samples": "calib_samples", "seq_len": "calib_seq_len",
                       "seed": "seed", "text_field": "text_field", "sampling": "calib_sampling",
                       "fit_samples": "fit_samples", "fit_seq_len": "fit_seq_len"}


def recipe_from_options(ctx: click.Context, recipe_file: str | None):
    """The ``Recipe`` that ``compress``'s options ask for: ``--recipe``'s file with the options given explicitly on
    the command line winning over it, or one stage of ``--method`` with its parameters."""
    import dataclasses

    from ..calibration import CalibrationConfig
    from ..recipe import OutputOptions, PassStage, Recipe

    options = ctx.params
    targets = [flag for flag, name in (("--ratio", "ratio"), ("--num-layers", "num_layers"),
                                       ("--threshold", "threshold")) if options[name] is not None]
    if len(targets) > 1:
        raise click.UsageError(f"give only one of --ratio, --num-layers, --threshold (got {', '.join(targets)})")
    params = pass_params({name: options[name] for name in ("ratio", "num_layers", "threshold", "merge")},
                         options["extra_params"])

    def given(name: str) -> bool:  # on the command line, not a default
        return ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE

    output = {"plan_only": options["plan_only"], "check": not options["no_check"],
              "save_dtype": options["save_dtype"]}
    max_memory = parse_size(options["max_memory"]) if options["max_memory"] is not None else None
    calibration = {name: options[option] for name, option in CALIBRATION_OPTIONS.items()}
    if recipe_file is None:
        return Recipe(stages=(PassStage(options["method"], params),), calibration=CalibrationConfig(**calibration),
                      max_memory=max_memory, output=OutputOptions(**output))
    if params or given("method"):
        raise click.UsageError("--recipe names the methods and their parameters; drop --method, --ratio, "
                               "--num-layers, --threshold, --merge and --param")
    request = Recipe.from_yaml(recipe_file)
    explicit = {name: value for name, value in calibration.items() if given(CALIBRATION_OPTIONS[name])}
    changes: dict = {"calibration": dataclasses.replace(request.calibration, **explicit)}
    outputs = {name: value for name, value in output.items()
               if given({"check": "no_check"}.get(name, name))}
    if outputs:
        if outputs.get("plan_only") and request.heal is not None:
            raise click.UsageError("the recipe's heal stage trains the weights, so it needs a checkpoint: drop "
                                   "--plan-only or the heal stage")
        changes["output"] = dataclasses.replace(request.output, **outputs)
    if max_memory is not None:
        changes["max_memory"] = max_memory
    return request.replace(**changes)


def _echo_check(plan, skipped: bool) -> None:
    """The quality check's line, and its warning (on stderr, loud) when the result looks broken."""
    from ..quality import describe, warning

    check = plan.quality_check
    if check is None:
        click.echo("quality check: skipped" + (" (--no-check)" if skipped else " (no calibration text to hold out)"))
        return
    click.echo(describe(check))
    loud = warning(check, plan.method)
    if loud:
        click.secho(loud, err=True, fg="red", bold=True)


@cli.command()
@model_options
@click.option("--plan", "plan_file", required=True, metavar="PLAN.json", help="A plan made for this base.")
@click.option("--output", "-o", required=True, metavar="DIR", help="Output folder (must be empty or new).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--save-dtype", type=click.Choice(DTYPE_CHOICES), default=None,
              help="Write the checkpoint in this dtype (default: the dtype the model was loaded in).")
@memory_option
@quiet_option
def apply(model: str, gguf_file: str | None, dtype: str | None, device: str, allow_download: bool,
          allow_pickle: bool, plan_file: str, output: str, overwrite: bool, save_dtype: str | None,
          max_memory: str | None) -> None:
    """Rebuild a compressed checkpoint from base + plan."""
    from ..engine.budget import MemoryBudget
    from ..io.names import CARD_FILE, PLAN_FILE
    from ..orchestrate import ModelSource, apply_saved
    from ..plan import CompressionPlan

    plan = CompressionPlan.load(plan_file)
    budget = MemoryBudget(parse_size(max_memory) if max_memory is not None else None)
    source = ModelSource(model, gguf_file=gguf_file, dtype=dtype, device=device, allow_download=allow_download,
                         allow_pickle=allow_pickle)
    result = apply_saved(plan, source, output, overwrite=overwrite, save_dtype=save_dtype, budget=budget)
    click.echo(f"wrote {result.output} (checkpoint, {PLAN_FILE}, {CARD_FILE}, {folder_size(result.output)})")
    click.echo(f"layers: {plan.num_layers} -> {plan.num_layers_after}")


def _format_default(value: Any) -> str:
    return "-" if value is None else json.dumps(value) if not isinstance(value, str) else value


@cli.command(name="list")
@quiet_option
def list_command() -> None:
    """List the registered passes and their parameters."""
    from ..arch.families import FAMILIES, map_fold
    from ..registry import pass_classes

    classes = pass_classes()
    for name, cls in classes.items():
        click.echo(f"{name}: {cls.description}")
        width = max((len(p.name) for p in cls.params), default=0)
        for p in cls.params:
            choices = f" [{'|'.join(p.choices)}]" if p.choices else ""
            click.echo(f"    {p.name:<{width}}  {p.type:<8}  default {_format_default(p.default):<14}  "
                       f"{p.help}{choices}")
        click.echo()
    click.echo("Parameters are given as --ratio/--num-layers/--threshold/--merge or --param KEY=VALUE.")
    click.echo()
    click.echo("Families (model_type: how the default method's fitted maps reach the checkpoint):")
    for family in FAMILIES:
        click.echo(f"    {', '.join(family.model_types):<12}  {map_fold(family)}")


@cli.command()
@click.argument("plan_file", metavar="PLAN.json")
@quiet_option
def inspect(plan_file: str) -> None:
    """Summarise a plan file.

    Shows the windows, layers before/after, the similarities from the trace and the calibration.
    """
    from ..plan import CompressionPlan
    from ..reports.inspect import inspect_lines

    for line in inspect_lines(CompressionPlan.load(plan_file), plan_file):
        click.echo(line)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point (``slm``); the group turns every failure into one line and an exit code."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="slm")
