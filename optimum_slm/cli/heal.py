"""The ``slm heal`` command: train a compressed checkpoint a little (LoRA or the network's tail) on held-out-checked
data and write a plain checkpoint. Option defaults come from ``HealConfig`` (the published recipes)."""

from __future__ import annotations

import math
import time
from typing import Any

import click

from ..healing.config import DATA_FORMATS, HEAL_METHODS, PRECISIONS, HealConfig
from .common import DTYPE_CHOICES, duration, folder_size, model_options, quiet_option

_DEFAULTS = HealConfig()


def heal_options(func):
    """The healing settings, one option per ``HealConfig`` field (shared with nothing else, kept together)."""
    d = _DEFAULTS
    decorators = [
        click.option("--data", required=True, metavar="SOURCE",
                     help="Training text (.txt, .jsonl/.json with --text-field, a folder, wiki-leads, a datasets "
                          "name) or Alpaca instruction JSON/JSONL (instruction, input, output; loss on the "
                          "response only)."),
        click.option("--method", type=click.Choice(HEAL_METHODS), default=d.method, show_default=True,
                     help="lora: the paper's LoRA, merged into the weights; tail: train the last --tail-layers "
                          "layers, the final norm and lm_head."),
        click.option("--data-format", type=click.Choice(DATA_FORMATS), default=d.data_format, show_default=True,
                     help="auto: instructions when the rows have 'instruction' and 'output', else text."),
        click.option("--text-field", default=d.text_field, show_default=True,
                     help="Text field of .jsonl/.json/datasets rows (text data)."),
        click.option("--cutoff-len", type=int, default=d.cutoff_len, show_default=True,
                     help="Tokens per training sequence (text is packed to it, instructions cut at it)."),
        click.option("--val-size", type=int, default=None,
                     help="Validation sequences (text) or rows (instructions) held out [default: 5% of the data, "
                          "at most 2000]."),
        click.option("--val-seed", type=int, default=d.val_seed, show_default=True,
                     help="Seed of the validation split."),
        click.option("--epochs", type=float, default=d.epochs, show_default=True, help="Passes over the data."),
        click.option("--max-steps", type=int, default=None, help="Stop after this many optimizer steps."),
        click.option("--max-minutes", type=float, default=None,
                     help="Stop after the step that reaches this many minutes of training (its evaluations "
                          "included); that step is evaluated and the best evaluation kept."),
        click.option("--lr", type=float, default=None,
                     help="Peak learning rate [default: 1e-4 for lora, 1e-5 for tail]."),
        click.option("--batch-size", type=int, default=d.batch_size, show_default=True,
                     help="Sequences per forward pass (micro-batch)."),
        click.option("--grad-accum", type=int, default=d.grad_accum, show_default=True,
                     help="Micro-batches per optimizer step (a step sees batch-size x grad-accum sequences)."),
        click.option("--warmup-steps", type=int, default=d.warmup_steps, show_default=True,
                     help="Linear warm-up steps, then linear decay to 0."),
        click.option("--weight-decay", type=float, default=d.weight_decay, show_default=True, help="AdamW decay."),
        click.option("--eval-steps", type=int, default=d.eval_steps, show_default=True,
                     help="Evaluate the validation loss every this many steps."),
        click.option("--patience", type=int, default=d.patience, show_default=True,
                     help="Stop after this many evaluations without a lower validation loss (0: never)."),
        click.option("--precision", type=click.Choice(PRECISIONS), default=d.precision, show_default=True,
                     help="auto: bf16 autocast on a GPU that supports it, else fp32."),
        click.option("--lora-r", type=int, default=d.lora_r, show_default=True, help="LoRA rank."),
        click.option("--lora-alpha", type=float, default=d.lora_alpha, show_default=True, help="LoRA alpha."),
        click.option("--lora-dropout", type=float, default=d.lora_dropout, show_default=True, help="LoRA dropout."),
        click.option("--lora-targets", default=",".join(d.lora_targets), show_default=True,
                     help="Comma-separated linear modules of the decoder layers that get adapters."),
        click.option("--tail-layers", type=int, default=d.tail_layers, show_default=True,
                     help="Decoder layers the tail method trains (the last ones)."),
        click.option("--seed", type=int, default=d.seed, show_default=True, help="Training seed."),
    ]
    for decorate in reversed(decorators):
        func = decorate(func)
    return func


#: HealConfig fields the command passes through under the same name
CONFIG_FIELDS = ("data", "method", "data_format", "text_field", "cutoff_len", "val_size", "val_seed", "epochs",
                 "max_steps", "max_minutes", "lr", "batch_size", "grad_accum", "warmup_steps", "weight_decay",
                 "eval_steps", "patience", "precision", "lora_r", "lora_alpha", "lora_dropout", "lora_targets",
                 "tail_layers", "seed")


def describe_run(record: dict[str, Any]) -> str:
    """One line on a finished healing run."""
    before, best = record["val_loss_before"], record["val_loss_best"]
    return (f"healed ({record['method']}): validation loss {before:.4f} -> {best:.4f} (perplexity "
            f"{math.exp(before):,.2f} -> {math.exp(best):,.2f}) after {record['steps']} steps, "
            f"{record['tokens_trained']:,} tokens; {record['stopped']}; kept {record['kept']}")


@click.command("heal")
@model_options(what="The model to heal (usually a compressed checkpoint)")
@heal_options
@click.option("--output", "-o", required=True, metavar="DIR", help="Output folder (must be empty or new).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--save-dtype", type=click.Choice(DTYPE_CHOICES), default=None,
              help="Write the checkpoint in this dtype (default: the dtype the model was loaded in).")
@quiet_option
def heal_command(model: str, gguf_file: str | None, dtype: str | None, device: str, allow_download: bool,
                 allow_pickle: bool, output: str, overwrite: bool, save_dtype: str | None, **settings: Any) -> None:
    """Heal a compressed model: LoRA (the SLM paper's recipe) or tail fine-tuning, best checkpoint by held-out
    validation loss, written as a plain checkpoint with the plan and card carried over."""
    from ..healing import heal
    from ..io.names import CARD_FILE, HEAL_FILE

    started = time.perf_counter()
    config = HealConfig(**{name: settings[name] for name in CONFIG_FIELDS})  # checked before the load
    record = heal(model, output, config, overwrite=overwrite, gguf_file=gguf_file, dtype=dtype, device=device,
                  allow_download=allow_download, allow_pickle=allow_pickle, save_dtype=save_dtype)
    click.echo(describe_run(record))
    click.echo(f"wrote {output} (checkpoint, {HEAL_FILE}, {CARD_FILE}, {folder_size(output)}) in "
               f"{duration(time.perf_counter() - started)}")


def register_commands(group: click.Group) -> None:
    group.add_command(heal_command)
