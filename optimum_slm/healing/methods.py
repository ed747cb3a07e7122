"""What a healing method trains: ``lora`` adapters on the projections (merged into the weights at the end) or the
``tail`` of the network (last decoder layers, final norm, ``lm_head``). Each method prepares a model for training and
finishes it back into a plain model."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..arch import ArchAdapter
from .config import LORA_TARGETS, HealConfig, HealError


@dataclass
class Trainable:
    """A model prepared for healing: what to run, which parameters train, and how to get the plain model back."""

    model: nn.Module
    params: dict[str, nn.Parameter]
    finish: Callable[[], nn.Module]
    description: str


def prepare(model: nn.Module, config: HealConfig) -> Trainable:
    """Freeze ``model`` and open what ``config.method`` trains."""
    for p in model.parameters():
        p.requires_grad_(False)
    return _lora(model, config) if config.method == "lora" else _tail(model, config)


def _lora(model: nn.Module, config: HealConfig) -> Trainable:
    from peft import LoraConfig, get_peft_model

    adapter = ArchAdapter(model)
    names = {name.rsplit(".", 1)[-1] for layer in adapter.layers for name, m in layer.named_modules()
             if isinstance(m, nn.Linear)}
    targets = list(config.lora_targets)
    missing = [t for t in targets if t not in names]
    if missing and tuple(targets) == LORA_TARGETS:
        # the paper's Llama names, asked for by default, on a family that names (or fuses) them otherwise, e.g. Phi-3's
        # qkv_proj and gate_up_proj: every linear module of the decoder layers is the same choice
        targets, missing = sorted(names), []
    if missing:
        raise HealError(f"LoRA target {missing[0]!r} is not a linear module of this model's decoder layers; "
                        f"its linear modules: {', '.join(sorted(names))}")
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; not the user's concern
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, lora)
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}

    def finish() -> nn.Module:
        return peft_model.merge_and_unload()

    return Trainable(peft_model, params, finish,
                     f"LoRA r={config.lora_r}, alpha={config.lora_alpha:g}, dropout={config.lora_dropout:g} on "
                     f"{','.join(targets)}")


def _tail(model: nn.Module, config: HealConfig) -> Trainable:
    adapter = ArchAdapter(model)
    if config.tail_layers > adapter.num_layers:
        raise HealError(f"heal tail_layers {config.tail_layers} exceeds the model's {adapter.num_layers} decoder "
                        "layers")
    modules = [*adapter.layers[-config.tail_layers:], adapter.final_norm, model.get_output_embeddings()]
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(True)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return Trainable(model, params, lambda: model,
                     f"last {config.tail_layers} decoder layers + final norm + lm_head"
                     + (" (tied to the input embeddings, which train with it)" if tied else ""))
