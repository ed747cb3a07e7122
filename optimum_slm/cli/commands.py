"""The ``slm`` command line: one click group, also served as ``optimum-cli slm ...``.

    slm compress --model smollm2-135m --ratio 0.2 --calib-data wiki-leads --output out
    slm apply --model smollm2-135m --plan out/slm_plan.json --output rebuilt
    slm list
    slm inspect out/slm_plan.json

The commands only turn options into calls of the Python API (``SLMCompressor``, ``CompressionPlan``, the pass
registry) and print the results. Bad input surfaces as an ``SLMError``; the group turns it into one line
``error: <message>`` on stderr and exit code 2. This module stays cheap to import (click only): ``optimum-cli``
imports it to build its parser, so torch and transformers are imported inside the commands.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Iterable, Sequence

import click

from .._version import __version__
from ..calibration_defaults import FIT_SAMPLES, FIT_SEQ_LEN, SAMPLINGS
from ..errors import SLMError

#: the model dtypes and devices the loaders accept
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
DEVICE_CHOICES = ("cpu", "cuda", "auto")


class SLMUsageError(click.ClickException):
    """An ``SLMError`` shown the CLI way: ``error: <message>`` on stderr, exit code 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


#: exit codes: bad input (the user can fix it), a failure (the machine or a bug), an interrupt
EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130
_debug = False


def one_line(text: Any) -> str:
    """``text`` on one line: a multi-line message would read as a traceback."""
    return " ".join(str(text).split())


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {one_line(message)}", err=True)
    sys.exit(code)


class SLMGroup(click.Group):
    """A click group whose every failure is one ``error: ...`` line on stderr and an exit code, never a traceback.

    Bad input (an ``SLMError``, a usage error) exits 2; a failure of the machine (disk full, read-only folder) or an
    unexpected error exits 1, the latter with a hint to rerun with ``--debug``, which shows the traceback.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SLMError as exc:
            raise SLMUsageError(one_line(exc)) from None

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            _fail("interrupted", EXIT_INTERRUPTED)
        except KeyboardInterrupt:
            _fail("interrupted", EXIT_INTERRUPTED)
        except click.ClickException as exc:
            where = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) is not None else ""
            _fail(exc.format_message() + (where if isinstance(exc, click.UsageError) else ""),
                  EXIT_BAD_INPUT if isinstance(exc, (click.UsageError, SLMUsageError)) else exc.exit_code)
        except SLMError as exc:
            _fail(str(exc), EXIT_BAD_INPUT)
        except OSError as exc:
            if _debug:
                raise
            target = f": {exc.filename}" if getattr(exc, "filename", None) else ""
            _fail(f"{exc.strerror or exc}{target}", EXIT_FAILURE)
        except Exception as exc:  # noqa: BLE001 - the last line of defence of a command line
            if _debug:
                raise
            _fail(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug to see the traceback)", EXIT_FAILURE)
        sys.exit(result if isinstance(result, int) else 0)


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    global _debug
    _debug = bool(value) or bool(os.environ.get("OPTIMUM_SLM_DEBUG"))


def _set_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value:
        return
    from ..progress import set_quiet

    set_quiet(True)
    # transformers' own bars (weight loading) too; before its import the hub's switch is read from the environment
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    else:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def quiet_option(func):
    """``--quiet``: hide progress bars (accepted by the group and by every command)."""
    return click.option(
        "--quiet",
        "-q",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_set_quiet,
        help="Hide progress bars.",
    )(func)


def model_options(func=None, *, what: str = "Base model"):
    """The options that choose and load a model (shared by ``compress``, ``apply`` and ``heal``; ``what`` names the
    model in ``--model``'s help)."""
    if func is None:
        return lambda f: model_options(f, what=what)
    decorators = [
        click.option("--model", required=True, metavar="PATH_OR_ID",
                     help=f"{what}: checkpoint folder, hub id (offline cache), .gguf file or alias "
                          "(smollm2-135m)."),
        click.option("--gguf-file", default=None, metavar="FILE",
                     help="GGUF file inside --model (a folder) to load and convert."),
        click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None,
                     help="Load the base in this dtype (default: the checkpoint's)."),
        click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto", show_default=True,
                     help="Where to run the model."),
        click.option("--allow-download", is_flag=True,
                     help="Let a hub id that is not in the local Hub cache be downloaded (off: offline first)."),
        click.option("--allow-pickle", is_flag=True,
                     help="Accept a pickle-only checkpoint (pytorch_model.bin). UNSAFE: a pickle can run code."),
    ]
    for decorate in reversed(decorators):
        func = decorate(func)
    return func


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """``2GiB``, ``500MB``, ``1.5GB``, ``4096`` (bytes) -> bytes; a one-line error otherwise."""
    import re

    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise click.BadParameter(f"expected a size like 2GiB or 500MB, got {text!r}", param_hint="'--max-memory'")
    return int(float(match.group(1)) * _UNITS[unit])


def streams_layers(size: int | None, max_memory: str | None) -> bool:
    """Whether to plan and write with the model's layers streamed from disk (the sequential engine), for weight files
    of ``size`` bytes (None: not a safetensors folder).

    With ``--max-memory``: when the weight files exceed half the budget (applying a plan and the checks make
    copies); without it: when they exceed 70% of the memory the machine has available.
    """
    if size is None:
        if max_memory is not None:
            raise SLMError("--max-memory streams layers from safetensors shards: give a checkpoint folder")
        return False
    if max_memory is not None:
        return size > parse_size(max_memory) // 2
    from ..engine.spill import available_memory

    available = available_memory()
    return available is not None and size > 0.7 * available


def _lazy_kwargs(lazy: bool, max_memory: str | None) -> dict:
    """``load_model`` arguments for a streamed (lazy) model and its budget."""
    if not lazy:
        return {}
    return {"lazy": True, "memory_budget": parse_size(max_memory) if max_memory is not None else None}


def memory_option(func):
    """``--max-memory``: the budget that chooses the in-memory or the sequential (streaming) engine."""
    return click.option("--max-memory", default=None, metavar="SIZE",
                        help="Memory budget (e.g. 2GiB): a model whose weights exceed half of it is planned and "
                             "written with its layers streamed from the safetensors shards, one at a time "
                             "(default: stream when the weights exceed 70% of the available memory).")(func)


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


def _size(path: str) -> str:
    """The size of a file or folder, human-readable."""
    total = os.path.getsize(path) if os.path.isfile(path) else sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
    for unit in ("B", "KB", "MB", "GB"):
        if total < 1000 or unit == "GB":
            return f"{total:,.0f} {unit}" if unit == "B" else f"{total:,.1f} {unit}"
        total /= 1000
    return ""  # pragma: no cover


def _duration(seconds: float) -> str:
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes}m{sec:02d}s" if minutes else f"{seconds:.1f}s"


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
@click.option("--ratio", type=float, default=None, help="Fraction of decoder layers to remove, in (0, 1).")
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

    Writes DIR: a plain checkpoint with fewer layers, slm_plan.json (+ slm_plan.safetensors) and a model card
    (--plan-only: the plan), then checks the result's quality on unseen text and warns when it looks broken.
    """
    import time

    started = time.perf_counter()
    given = [name for name, value in (("--ratio", ratio), ("--num-layers", num_layers), ("--threshold", threshold))
             if value is not None]
    if len(given) > 1:
        raise click.UsageError(f"give only one of --ratio, --num-layers, --threshold (got {', '.join(given)})")
    params = pass_params({"ratio": ratio, "num_layers": num_layers, "threshold": threshold, "merge": merge},
                         extra_params)

    from ..compressor import PLAN_FILE, SLMCompressor
    from ..fileio import claim_output
    from ..registry import get_pass

    # everything that can be checked without the model is checked before the (long) load and search
    if recipe is not None:
        from ..recipe import read_recipe

        explicit = ctx.get_parameter_source("method") == click.core.ParameterSource.COMMANDLINE
        if params or explicit:
            raise click.UsageError("--recipe names the methods and their parameters; drop --method, --ratio, "
                                   "--num-layers, --threshold, --merge and --param")
        from ..recipe import split_heal

        stages, recipe_calibration = read_recipe(recipe)
        stages, heal_config = split_heal(stages)
        if heal_config is not None and plan_only:
            raise click.UsageError("the recipe's heal stage trains the weights, so it needs a checkpoint: drop "
                                   "--plan-only or the heal stage")
        # the recipe's calibration settings fill in what the command line left at its defaults
        options = {"source": "calib_data", "n_samples": "calib_samples", "seq_len": "calib_seq_len", "seed": "seed",
                   "text_field": "text_field", "sampling": "calib_sampling", "fit_samples": "fit_samples",
                   "fit_seq_len": "fit_seq_len"}
        given = {key: value for key, value in recipe_calibration.items()
                 if ctx.get_parameter_source(options[key]) != click.core.ParameterSource.COMMANDLINE}
        calib_data = given.get("source", calib_data)
        calib_samples, calib_seq_len = given.get("n_samples", calib_samples), given.get("seq_len", calib_seq_len)
        seed, text_field = given.get("seed", seed), given.get("text_field", text_field)
        calib_sampling = given.get("sampling", calib_sampling)
        fit_samples, fit_seq_len = given.get("fit_samples", fit_samples), given.get("fit_seq_len", fit_seq_len)
        method, params = stages, {}
        needs_data = any(get_pass(s["method"], **{k: v for k, v in s.items() if k != "method"}).needs_calibration
                         for s in stages)
    else:
        heal_config = None
        needs_data = get_pass(method, **params).needs_calibration
    if calib_data is None:
        from ..assets import WIKI_PACKAGE, package_dir

        if needs_data or package_dir(WIKI_PACKAGE) is not None:
            calib_data = "wiki-leads"
    from ..calibration import CalibrationConfig

    calibration = CalibrationConfig(calib_data, calib_samples, calib_seq_len, seed, text_field, calib_sampling,
                                    fit_samples, fit_seq_len)  # checks the numbers before the load
    size = _weights_size(model, gguf_file)
    need = None if plan_only else size
    lazy = streams_layers(size, max_memory)
    if lazy and heal_config is not None:
        raise click.UsageError("healing trains the whole model in memory: drop the heal stage or --max-memory")
    with claim_output(output, overwrite, need_bytes=need) as target:
        if lazy:
            click.echo("streaming the decoder layers from the checkpoint's shards (sequential engine)", err=True)
        compressor = SLMCompressor.from_pretrained(model, gguf_file=gguf_file, dtype=dtype, device=device,
                                                   allow_download=allow_download, allow_pickle=allow_pickle,
                                                   **_lazy_kwargs(lazy, max_memory))
        plan = compressor.compress(target, method=method, calibration=calibration if calib_data else None,
                                   overwrite=overwrite, plan_only=plan_only, cache=_plan_cache(no_cache),
                                   check=not no_check, save_dtype=save_dtype, command=_command_line(ctx),
                                   heal=heal_config, **params)
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
    files = f"{PLAN_FILE} (plan only)" if plan_only else f"checkpoint, {PLAN_FILE}, README.md" + (
        ", slm_heal.json" if plan.heal_record is not None else "")
    click.echo(f"wrote {target} ({files}, {_size(target)}) in {_duration(time.perf_counter() - started)}")


def _weights_size(model: str, gguf_file: str | None) -> int | None:
    """The size of the base's weight files: an upper bound for the compressed checkpoint (None when unknown)."""
    from ..loading import resolve_model_path

    path = resolve_model_path(model, gguf_file)
    if not os.path.isdir(path):
        return None
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")) or None


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
    from ..compressor import SLMCompressor
    from ..fileio import claim_output
    from ..plan import CompressionPlan

    plan = CompressionPlan.load(plan_file)
    size = _weights_size(model, gguf_file)
    lazy = streams_layers(size, max_memory)
    with claim_output(output, overwrite, need_bytes=size) as target:
        compressor = SLMCompressor.from_pretrained(model, gguf_file=gguf_file, dtype=dtype, device=device,
                                                   allow_download=allow_download, allow_pickle=allow_pickle,
                                                   **_lazy_kwargs(lazy, max_memory))
        compressor.apply(plan, target, overwrite=overwrite, save_dtype=save_dtype)
    click.echo(f"wrote {target} (checkpoint, slm_plan.json, README.md, {_size(target)})")
    click.echo(f"layers: {plan.num_layers} -> {plan.num_layers_after}")


def _format_default(value: Any) -> str:
    return "-" if value is None else json.dumps(value) if not isinstance(value, str) else value


@cli.command(name="list")
@quiet_option
def list_command() -> None:
    """List the registered passes and their parameters."""
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


# analyze and bench live in cli/analysis.py and join the group here
from .analysis import register_commands  # noqa: E402

register_commands(cli)
from .heal import register_commands as register_heal  # noqa: E402

register_heal(cli)
