"""The ``slm export`` command: a checkpoint folder (what ``slm compress`` or ``slm heal`` wrote) as one file another
runtime loads. ``--format gguf``: llama.cpp (and what builds on it: llama-cpp-python, Ollama, LM Studio)."""

from __future__ import annotations

import time

import click

from .common import duration, folder_size, quiet_option

#: the formats ``slm export`` writes
FORMATS = ("gguf",)
#: the GGUF tensor types (``optimum_slm.io.gguf_export.DTYPES``, repeated so that ``--help`` imports nothing heavy)
GGUF_DTYPES = ("f16", "f32")


@click.command("export")
@click.option("--model", "-m", required=True, metavar="DIR",
              help="The checkpoint folder to export (config.json, safetensors weights, tokenizer files).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="gguf", show_default=True,
              help="gguf: one .gguf file for llama.cpp (llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3; per-layer "
                   "widths of llama/mistral/qwen2 as llama.cpp's deci architecture).")
@click.option("--output", "-o", required=True, metavar="FILE", help="The file to write, e.g. model.gguf.")
@click.option("--dtype", type=click.Choice(GGUF_DTYPES), default="f16", show_default=True,
              help="Type of the 2-D weights (norms and biases stay f32). Quantize further with llama.cpp's "
                   "llama-quantize.")
@click.option("--tokenizer-pre", default=None, metavar="NAME",
              help="llama.cpp's pre-tokenizer name (llama-bpe, qwen2, smollm, gpt-2, default, ...), for a tokenizer "
                   "it cannot be told from [default: detected as llama.cpp's converter detects it].")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@quiet_option
def export_command(model: str, fmt: str, output: str, dtype: str, tokenizer_pre: str | None,
                   overwrite: bool) -> None:
    """Export a checkpoint for another runtime: --format gguf writes one GGUF file for llama.cpp, written
    atomically (nothing is left behind on failure)."""
    from ..io.gguf_export import export_gguf

    started = time.perf_counter()
    info: dict = {}
    path = export_gguf(model, output, dtype=dtype, overwrite=overwrite, pre=tokenizer_pre, info=info)
    click.echo(f"wrote {path} (GGUF, llama.cpp architecture {info['arch']}, {info['layers']} layers, {dtype}, "
               f"pre-tokenizer {info['pre']}, {folder_size(path)}) in {duration(time.perf_counter() - started)}")


def register_commands(group: click.Group) -> None:
    group.add_command(export_command)
