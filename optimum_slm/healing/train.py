"""The healing loop: AdamW with linear warm-up and decay, gradient accumulation, clipping, a validation loss every
``eval_steps`` optimizer steps, the best weights kept and early stopping (``patience``).

Everything stays in memory until the caller writes the result, so an interrupted run leaves nothing on disk.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..progress import progress_bar
from .config import HealConfig, HealError
from .data import IGNORE, Example, HealData, collate, epoch_order, load_heal_data, micro_batches, steps_per_epoch
from .methods import prepare


def _autocast(config: HealConfig, device: torch.device):
    """bf16 autocast when asked (``bf16``) or, for ``auto``, on a CUDA device that supports it; else fp32."""
    if config.precision == "fp32":
        return contextlib.nullcontext(), "fp32"
    if config.precision == "auto" and not (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return contextlib.nullcontext(), "fp32"
    return torch.autocast(device.type, dtype=torch.bfloat16), "bf16 autocast"


def _loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions of a batch (fp32 logits)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(shifted, batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum")


@torch.no_grad()
def validation_loss(model: nn.Module, examples: list[Example], batch_size: int, pad_id: int, device: torch.device,
                    autocast: Any = None, desc: str | None = None) -> float:
    """Token-weighted mean next-token loss of ``model`` on ``examples``; ``desc``: show a progress bar (with an ETA)
    of that name over the validation batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    batches = list(micro_batches(examples, range(len(examples)), batch_size))
    bar = progress_bar(total=len(batches), desc=desc, unit="batch") if desc is not None else None
    try:
        for batch in batches:
            tokens = sum(e.label_tokens for e in batch)
            if tokens:
                with autocast or contextlib.nullcontext():
                    total += float(_loss_sum(model, {k: v.to(device) for k, v in collate(batch, pad_id).items()}))
                count += tokens
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    if not count:
        raise HealError("the validation examples hold no response tokens to score (all prompt, or cut off at "
                        "--cutoff-len)")
    return total / count


def _schedule(step: int, warmup: int, total: int) -> float:
    """Linear warm-up from 0 over ``warmup`` steps, then linear decay to 0 at ``total`` (the Trainer's default)."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def heal_model(model: nn.Module, tokenizer, config: HealConfig, data: HealData | None = None
               ) -> tuple[nn.Module, dict[str, Any]]:
    """Heal ``model`` in memory; returns the plain healed model (LoRA merged) and the run's record.

    The record holds the method, data, steps and tokens trained, the validation loss before training, at the best
    evaluation (whose weights are returned) and at each evaluation, why training stopped, and the wall time.
    """
    started = time.perf_counter()
    data = data or load_heal_data(tokenizer, config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = next(model.parameters()).device
    autocast, precision = _autocast(config, device)
    torch.manual_seed(config.seed)
    trainable = prepare(model, config)
    net, params = trainable.model, trainable.params
    per_epoch = steps_per_epoch(len(data.train), config.sequences_per_step)
    planned = max(1, math.ceil(config.epochs * per_epoch))
    if config.max_steps is not None:
        planned = min(planned, config.max_steps)
    if config.warmup_steps >= planned:
        warnings.warn(f"the warm-up ({config.warmup_steps} steps) is as long as the run ({planned} steps): the "
                      f"learning rate never reaches {config.learning_rate:g}; lower --warmup-steps", stacklevel=2)
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _schedule(s, config.warmup_steps, planned))

    def evaluate(desc: str) -> float:
        return validation_loss(net, data.val, config.batch_size, pad_id, device, autocast, desc=desc)

    def snapshot() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in params.items()}

    before = evaluate("heal: validation loss before training")  # a long pass on a busy host: show its ETA
    history = [{"step": 0, "val_loss": before}]
    best, best_step, best_state, worse, last_val = before, 0, snapshot(), 0, before
    step, tokens, stopped, last_loss = 0, 0, "completed", float("nan")
    net.train()
    # the budget counts training and its evaluations, not the data's loading or the evaluation before training
    deadline = time.perf_counter() + 60 * config.max_minutes if config.max_minutes is not None else None
    bar = progress_bar(total=planned, desc=f"heal ({config.method})", unit="step")
    try:
        epoch = 0
        while step < planned:
            at_start = step
            order = epoch_order(len(data.train), config.seed, epoch)
            batches = list(micro_batches(data.train, order, config.batch_size))
            for first in range(0, len(batches), config.grad_accum):
                group = batches[first : first + config.grad_accum]
                label_tokens = sum(e.label_tokens for b in group for e in b)
                if not label_tokens:
                    continue
                step_loss = 0.0
                for micro in group:
                    batch = {k: v.to(device) for k, v in collate(micro, pad_id).items()}
                    with autocast:
                        loss = _loss_sum(net, batch) / label_tokens
                    loss.backward()
                    step_loss += float(loss.detach())
                    tokens += int(batch["attention_mask"].sum())
                if not math.isfinite(step_loss):
                    stopped = f"non-finite training loss at step {step + 1} (try a lower --lr)"
                    warnings.warn(f"healing stopped: {stopped}; keeping the best weights (step {best_step})",
                                  stacklevel=2)
                    optimizer.zero_grad(set_to_none=True)
                    break
                torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                last_loss = step_loss
                bar.update(1)
                out_of_time = deadline is not None and time.perf_counter() >= deadline
                if step % config.eval_steps == 0 or step == planned or out_of_time:
                    last_val = val = evaluate(f"heal: validation at step {step}")
                    history.append({"step": step, "val_loss": val, "train_loss": step_loss})
                    if val < best:
                        best, best_step, best_state, worse = val, step, snapshot(), 0
                    else:
                        worse += 1
                    if config.patience and worse >= config.patience:
                        stopped = (f"early stop at step {step}: {worse} evaluations without a lower validation "
                                   "loss")
                        break
                bar.set_postfix(loss=f"{step_loss:.3f}", val=f"{last_val:.3f}", best=f"{best:.3f}")
                if out_of_time and step < planned:
                    stopped = f"reached --max-minutes ({config.max_minutes:g}) at step {step}"
                    break
                if step >= planned:
                    break
            else:
                if step == at_start:
                    raise HealError("no training example has tokens to learn from (all prompt, or cut off at "
                                    "--cutoff-len)")
                epoch += 1
                continue
            break
    finally:
        bar.close()
    if step == planned and stopped == "completed":
        stopped = "reached --max-steps" if config.max_steps is not None and planned == config.max_steps \
            else f"completed {config.epochs:g} epochs"
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(best_state[name])
    healed = trainable.finish()
    for p in healed.parameters():
        p.requires_grad_(False)
    healed.eval()
    record = {
        "method": config.method,
        "trained": trainable.description,
        "trainable_parameters": sum(p.numel() for p in params.values()),
        "data": data.describe(),
        "config": config.to_dict(),
        "precision": precision,
        "steps": step,
        "planned_steps": planned,
        "steps_per_epoch": per_epoch,
        "tokens_trained": tokens,
        "last_train_loss": _finite_or_none(last_loss),
        "val_loss_before": before,
        "val_loss_best": best,
        "best_step": best_step,
        "val_history": [{k: _finite_or_none(v) for k, v in h.items()} for h in history],  # JSON has no NaN
        "stopped": stopped,
        "kept": f"the weights of step {best_step}" if best_step else
                "the input weights: no evaluation beat the starting validation loss",
        "seconds": round(time.perf_counter() - started, 1),
    }
    return healed, record


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value
