"""Healing runs from a checkpoint folder to a written checkpoint: ``heal`` and ``save_healed``."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from torch import nn

from ..io.checkpoint import resolve_save_dtype, write_checkpoint
from ..io.names import CARD_FILE, HEAL_FILE, PLAN_FILE
from ..io.output import check_output_dir, claim_output, local_paths
from .config import HealConfig, HealError
from .train import heal_model


def _previous_runs(source_dir: str | None) -> list[dict[str, Any]]:
    path = os.path.join(source_dir, HEAL_FILE) if source_dir else None
    if not path or not os.path.isfile(path):
        return []
    try:
        with open(path, encoding="utf-8") as fh:
            runs = json.load(fh)
    except (OSError, ValueError) as exc:
        raise HealError(f"{path} cannot be read: {exc}") from None
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise HealError(f"{path} is not a list of healing records")
    return runs


def carried_plan(source_dir: str | None, model: nn.Module):
    """The input checkpoint's plan (None when it has none), checked to describe this model's layer count."""
    from ..arch import ArchAdapter
    from ..plan import CompressionPlan

    path = os.path.join(source_dir, PLAN_FILE) if source_dir else None
    if not path or not os.path.isfile(path):
        return None
    plan = CompressionPlan.load(path)
    layers = ArchAdapter(model).num_layers
    if plan.num_layers_after != layers:
        raise HealError(f"{path} describes a model with {plan.num_layers_after} layers but the checkpoint has "
                        f"{layers}; it is not this checkpoint's plan")
    return plan


def save_healed(model: nn.Module, tokenizer, record: dict[str, Any], save_directory: str, *,
                source_dir: str | None = None, plan=None, card: str | None = None, overwrite: bool = False,
                save_dtype: Any = None) -> str:
    """Write the healed checkpoint atomically: weights, tokenizer, the carried plan, ``slm_heal.json`` (earlier
    runs of the input kept) and the model card (the input's, or ``card``) with a healing section appended."""
    from ..reports.card import healing_section

    check_output_dir(save_directory, overwrite)  # a refused output fails before the input's record is read
    runs = _previous_runs(source_dir) + [record]
    if card is None:
        readme = os.path.join(source_dir, CARD_FILE) if source_dir else None
        if readme and os.path.isfile(readme):
            with open(readme, encoding="utf-8") as fh:
                card = fh.read()
        else:
            name = getattr(model, "name_or_path", None) or source_dir or "model"
            card = (f"---\nlibrary_name: transformers\ntags: [optimum-slm]\n---\n\n# Healed `{name}`\n\n"
                    "Made with [optimum-slm](https://pypi.org/project/optimum-slm/).\n")
    card = card.rstrip("\n") + "\n\n" + healing_section(record, len(runs))
    return write_checkpoint(model, tokenizer, save_directory, plan=plan, card=card, heal_runs=runs,
                            overwrite=overwrite, save_dtype=save_dtype)


def heal(model: str, output: str | os.PathLike, config: HealConfig | None = None, *, overwrite: bool = False,
         gguf_file: str | None = None, dtype: Any = None, device: str | None = None, allow_download: bool = False, allow_pickle: bool = False,
         save_dtype: Any = None, **settings: Any) -> dict[str, Any]:
    """Heal checkpoint ``model`` and write the result to ``output``; returns the run's record.

    ``config`` (a ``HealConfig``) and/or ``settings`` (its fields, e.g. ``data="wiki-leads", method="tail"``; they
    override ``config``'s) say how. Nothing is written unless the run finishes; ``output`` must be empty or new
    (``overwrite`` replaces it).
    """
    from ..loading import load_model, resolve_model_path

    try:
        config = dataclasses.replace(config, **settings) if config is not None else HealConfig(**settings)
    except TypeError as exc:
        raise HealError(f"unknown heal setting: {exc}") from None
    if config.data is None:
        raise HealError("no heal data given (--data / data=...)")
    if save_dtype is not None:
        resolve_save_dtype(save_dtype)
    with claim_output(output, overwrite, protect=local_paths(model, config.data)) as target:
        net, tokenizer = load_model(model, gguf_file=gguf_file, dtype=dtype, device=device, allow_download=allow_download,
                                    allow_pickle=allow_pickle)
        source = resolve_model_path(model, gguf_file)
        source_dir = source if os.path.isdir(source) else None
        plan = carried_plan(source_dir, net)
        _previous_runs(source_dir)  # an unreadable record fails before the training, not after
        from ..calibration import downloads_allowed

        with downloads_allowed(allow_download):  # a datasets name as --data is read from the local cache unless asked
            healed, record = heal_model(net, tokenizer, config)
        save_healed(healed, tokenizer, record, target, source_dir=source_dir, plan=plan, overwrite=overwrite,
                    save_dtype=save_dtype)
    return record
