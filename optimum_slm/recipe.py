"""Recipes: an ordered list of stages in a YAML (or JSON) file, compressed into ONE plan by the pipeline.

    stages:
      - method: slm-plus
        ratio: 0.2
      - method: flap
        ratio: 0.2

Each stage names a pass and its parameters; each plans on the model the stages before it produced. A last stage
``heal: lora`` (or ``tail``) with ``HealConfig`` settings (``data`` is required) trains the compressed model before
it is written (``slm compress --recipe``), e.g.::

      - heal: lora
        data: wiki-leads
        max_steps: 200

An optional ``calibration`` mapping sets the calibration data of the run (any of ``source``, ``n_samples``, ``seq_len``,
``seed``, ``text_field``, ``sampling``, ``fit_samples``, ``fit_seq_len``; see ``CalibrationConfig``); a value given
explicitly on the command line wins over the recipe's. A recipe is checked in full when it is read — unknown keys, unknown passes or parameters, out-of-range values — with one line
naming the stage, before any model is loaded.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .errors import PassError, SLMError

RECIPE_KEYS = {"stages", "calibration"}
CALIBRATION_KEYS = ("source", "n_samples", "seq_len", "seed", "text_field", "sampling", "fit_samples", "fit_seq_len")


class RecipeError(SLMError):
    """A recipe file that cannot be read or names bad stages."""


def load_recipe(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The stages of a recipe file, validated (each becomes a ``{"method": ..., **params}`` object)."""
    return read_recipe(path)[0]


def read_recipe(path: str | os.PathLike) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A recipe file's stages and its ``calibration`` settings (empty when it has none), validated."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - yaml and json raise their own types; one line either way
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise RecipeError(f"recipe {path} is not valid YAML/JSON: {first}") from None
    return parse_recipe(data, path), parse_calibration(data, path)


def parse_calibration(data: Any, where: str = "recipe") -> dict[str, Any]:
    """A recipe's ``calibration`` mapping, checked by building a ``CalibrationConfig`` from it."""
    from .calibration import CalibrationConfig

    block = data.get("calibration") if isinstance(data, dict) else None
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise RecipeError(f"{where}: 'calibration' must be a mapping, got {type(block).__name__}")
    unknown = sorted(set(block) - set(CALIBRATION_KEYS))
    if unknown:
        raise RecipeError(f"{where}: unknown calibration key {unknown[0]!r}; valid: {', '.join(CALIBRATION_KEYS)}")
    try:
        CalibrationConfig(**{"source": "x", **block})
    except SLMError as exc:
        raise RecipeError(f"{where}: {exc}") from None
    return dict(block)


def split_heal(stages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Any]:
    """A validated recipe's compression stages and its ``HealConfig`` (None when it has no ``heal`` stage)."""
    if stages and "heal" in stages[-1]:
        from .healing import HealConfig

        last = stages[-1]
        settings = {key: value for key, value in last.items() if key != "heal"}
        return stages[:-1], HealConfig.from_dict({"method": last["heal"], **settings})
    return stages, None


def _check_heal_stage(stage: dict[str, Any], k: int, n: int, where: str) -> None:
    from .healing import HealConfig, HealError

    if "method" in stage:
        raise RecipeError(f"{where}: stage {k} has both 'heal' and 'method'; a heal stage is 'heal: lora' or "
                          "'heal: tail' with its settings")
    if k != n or k == 1:
        raise RecipeError(f"{where}: stage {k}: a heal stage must be the last stage and follow a compression "
                          "stage (a plan rebuilds the model before healing)")
    settings = {key: value for key, value in stage.items() if key != "heal"}
    try:
        config = HealConfig.from_dict({"method": stage["heal"], **settings}, where=f"{where}: stage {k} (heal)")
    except HealError as exc:
        message = str(exc)
        raise RecipeError(message if message.startswith(where) else f"{where}: stage {k} (heal): {message}") from None
    if config.data is None:
        raise RecipeError(f"{where}: stage {k} (heal) needs 'data' (the training text)")


def parse_recipe(data: Any, where: str = "recipe") -> list[dict[str, Any]]:
    """Validate a recipe object (``{"stages": [...]}``) and return its stages (a last ``heal`` stage included; see
    ``split_heal``)."""
    from .registry import get_pass

    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe is a mapping with 'stages', got {type(data).__name__}")
    unknown = sorted(set(data) - RECIPE_KEYS)
    if unknown:
        raise RecipeError(f"{where}: unknown key {unknown[0]!r} (a recipe has 'stages' and optionally 'calibration')")
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise RecipeError(f"{where}: 'stages' must be a non-empty list")
    out = []
    for k, stage in enumerate(stages, 1):
        if isinstance(stage, dict) and "heal" in stage:
            _check_heal_stage(stage, k, len(stages), where)
            out.append(dict(stage))
            continue
        if not isinstance(stage, dict) or not isinstance(stage.get("method"), str):
            raise RecipeError(f"{where}: stage {k} must be a mapping with a 'method', got {stage!r}")
        params = {key: value for key, value in stage.items() if key != "method"}
        try:
            get_pass(stage["method"], **params)
        except PassError as exc:
            raise RecipeError(f"{where}: stage {k} ({stage['method']}): {exc}") from None
        out.append(dict(stage))
    return out
