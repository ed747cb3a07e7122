"""Recipes: an ordered list of stages in a YAML (or JSON) file, compressed into ONE plan by the pipeline.

    stages:
      - method: slm-plus
        ratio: 0.2
      - method: flap
        ratio: 0.2

Each stage names a pass and its parameters; each plans on the model the stages before it produced. A recipe is
checked in full when it is read — unknown keys, unknown passes or parameters, out-of-range values — with one line
naming the stage, before any model is loaded.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .errors import PassError, SLMError

RECIPE_KEYS = {"stages"}


class RecipeError(SLMError):
    """A recipe file that cannot be read or names bad stages."""


def load_recipe(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The stages of a recipe file, validated (each becomes a ``{"method": ..., **params}`` object)."""
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
    return parse_recipe(data, path)


def parse_recipe(data: Any, where: str = "recipe") -> list[dict[str, Any]]:
    """Validate a recipe object (``{"stages": [...]}``) and return its stages."""
    from .registry import get_pass

    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe is a mapping with 'stages', got {type(data).__name__}")
    unknown = sorted(set(data) - RECIPE_KEYS)
    if unknown:
        raise RecipeError(f"{where}: unknown key {unknown[0]!r} (a recipe has only 'stages')")
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise RecipeError(f"{where}: 'stages' must be a non-empty list")
    out = []
    for k, stage in enumerate(stages, 1):
        if not isinstance(stage, dict) or not isinstance(stage.get("method"), str):
            raise RecipeError(f"{where}: stage {k} must be a mapping with a 'method', got {stage!r}")
        params = {key: value for key, value in stage.items() if key != "method"}
        try:
            get_pass(stage["method"], **params)
        except PassError as exc:
            raise RecipeError(f"{where}: stage {k} ({stage['method']}): {exc}") from None
        out.append(dict(stage))
    return out
