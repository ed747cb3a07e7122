"""The ``slm analyze`` and ``slm bench`` commands; ``register_commands(cli)`` adds them to the ``slm`` group."""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any, Callable

import click

from ..errors import SLMError
from .common import model_options


def _handle_errors(fn: Callable) -> Callable:
    """Bad input becomes one ``error: <message>`` line and exit status 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SLMError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper


def _parse_batch_sizes(_ctx, _param, value: str) -> list[int]:
    try:
        sizes = [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like 1,16, got {value!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise click.BadParameter(f"batch sizes must be positive integers, got {value!r}")
    return sizes


def _resolve_quiet(quiet: bool) -> bool:
    """The command's ``--quiet`` or the group's ``slm -q``; when set, also silence transformers' load bars."""
    from ..progress import is_quiet, set_quiet

    if quiet:
        set_quiet(True)
    quiet = is_quiet()
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return quiet


def _short_name(path: str) -> str:
    return os.path.basename(os.path.normpath(path)) or path


# ------------------------------------------------------------------------------------------------ analyze
@click.command("analyze")
@model_options(what="Model to analyse")
@click.option("--calib-data", default="wiki-leads", show_default=True,
              help="Calibration source: .txt/.jsonl/.json file, folder, corpus alias or datasets name.")
@click.option("--output", "output_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for cka.png, profile.png and analysis.json.")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), default=None,
              help="A plan JSON (slm_plan.json) whose merge windows / dropped layers are drawn on both plots.")
@click.option("--calib-samples", default=10, show_default=True, type=int, help="Calibration sequences.")
@click.option("--calib-seq-len", default=128, show_default=True, type=int, help="Tokens per sequence.")
@click.option("--seed", default=1234, show_default=True, type=int, help="Calibration sampling seed.")
@click.option("--batch-size", default=16, show_default=True, type=int,
              help="CKA minibatch size (the official script's 16).")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@_handle_errors
def analyze_command(model, gguf_file, dtype, device, allow_download, allow_pickle, calib_data, output_dir, plan_path,
                    calib_samples, calib_seq_len, seed, batch_size, quiet) -> None:
    """Layer-output CKA heatmap and adjacent-layer / block-influence profile (PNG + JSON)."""
    from ..analysis import analyze_layers, plan_overlay
    from ..reports.plots import _pyplot, write_analysis
    from ..arch import ArchAdapter
    from ..calibration import load_calibration
    from ..loading import load_model
    from ..plan import CompressionPlan

    quiet = _resolve_quiet(quiet)
    _pyplot()  # before loading anything: a missing matplotlib is reported at once
    if batch_size < 1:
        raise SLMError(f"--batch-size must be positive, got {batch_size}")
    plan = CompressionPlan.load(plan_path) if plan_path else None
    model_path = model
    model, tokenizer = load_model(model_path, gguf_file=gguf_file, dtype=dtype, device=device,
                                  allow_download=allow_download, allow_pickle=allow_pickle)
    plan_overlay(plan, ArchAdapter(model).num_layers)  # a plan for another base fails before the analysis runs
    ids = load_calibration(tokenizer, calib_data, calib_samples, calib_seq_len, seed)
    if not quiet:
        click.echo(f"analysing {model_path}: {ids.ids.shape[0]}x{ids.ids.shape[1]} tokens from {calib_data}", err=True)
    result = analyze_layers(model, ids, batch_size=batch_size)
    result["model"] = model_path
    paths = write_analysis(result, output_dir, plan)
    bi = result["block_influence"]
    order = sorted(range(len(bi)), key=bi.__getitem__)
    patches = ", ".join(f"{a}-{b}" for a, b in result["patches"]) or "none"
    click.echo(f"wrote {paths['cka']}, {paths['profile']}, {paths['json']}")
    click.echo(f"layers: {result['num_layers']}; patches (pairwise CKA >= {result['patch_threshold']}): {patches}")
    click.echo(f"lowest block influence (most redundant): {', '.join(map(str, order[:5]))}; "
               f"highest: {', '.join(map(str, order[-3:][::-1]))}")


# ------------------------------------------------------------------------------------------------ bench
@click.command("bench")
@click.option("--model", "model_path", required=True, help="Baseline model (checkpoint folder, GGUF or alias).")
@click.option("--compare", "compare", multiple=True, help="Model(s) to compare against the baseline (repeatable).")
@click.option("--batch-sizes", default="1,16", show_default=True, callback=_parse_batch_sizes,
              help="Comma-separated batch sizes.")
@click.option("--prompt-len", default=128, show_default=True, type=int, help="Prompt tokens.")
@click.option("--new-tokens", default=128, show_default=True, type=int, help="Generated tokens (fixed count).")
@click.option("--warmup", default=None, type=int, help="Untimed warm-up runs [CUDA 10, CPU 1].")
@click.option("--repeats", default=None, type=int, help="Timed runs, median reported [CUDA 20, CPU 3].")
@click.option("--gguf-file", default=None, help="GGUF file name inside --model's folder.")
@click.option("--dtype", default=None, type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              help="Load dtype (default: the checkpoint's).")
@click.option("--device", default=None, help="cpu, cuda or auto (default: auto).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (every sample, mean/std/median) instead of a table.")
@click.option("--engine", type=click.Choice(["transformers", "vllm", "llama.cpp"]), default="transformers",
              show_default=True,
              help="Engine to time: transformers (in process, every measure), or the serving engines vLLM and "
                   "llama.cpp (checkpoint folders; llama.cpp gets each exported to a temporary GGUF) when installed "
                   "in this environment.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@_handle_errors
def bench_command(model_path, compare, batch_sizes, prompt_len, new_tokens, warmup, repeats, gguf_file, dtype,
                  device, as_json, engine, quiet) -> None:
    """Prefill/decode latency, tokens/s, peak memory and speedup against the first model."""
    from ..bench import bench_models, format_table
    from ..loading import load_model

    quiet = _resolve_quiet(quiet)
    if engine != "transformers":
        from ..bench import bench_engine, format_engine_table
        from ..loading import resolve_model_path

        paths = [resolve_model_path(p) for p in (model_path, *compare)]
        report = None if quiet else (lambda msg: click.echo(f"  {msg}", err=True))
        rows = bench_engine(engine, paths, batch_sizes, prompt_len, new_tokens, repeats or 3, progress=report)
        click.echo(json.dumps(rows, indent=1) if as_json else format_engine_table(rows))
        return
    models = []
    for k, path in enumerate([model_path, *compare]):
        model, tok = load_model(path, gguf_file=gguf_file if k == 0 else None, dtype=dtype, device=device)
        models.append((_short_name(path), model, tok))
    report = None if quiet else (lambda msg: click.echo(f"  {msg}", err=True))
    results = bench_models(models, batch_sizes, prompt_len, new_tokens, warmup, repeats, progress=report,
                           warn=lambda line: click.echo(f"warning: {line}", err=True))
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=1))
    else:
        click.echo(format_table(results))


def register_commands(group: click.Group) -> None:
    """Add ``analyze`` and ``bench`` to a click group (the ``slm`` CLI)."""
    group.add_command(analyze_command)
    group.add_command(bench_command)
