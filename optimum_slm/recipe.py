"""``Recipe``: one whole compression request — stages, calibration, healing, memory budget, output options.

Every front door only translates its arguments into a ``Recipe`` (CLI flags, a recipe file, lm-eval
``model_args``, Python arguments) and hands it to ``optimum_slm.orchestrate``. A recipe file is its YAML (or JSON)
form::

    calibration:             # optional: any CalibrationConfig field
      fit_samples: 1024
    max_memory: 4GiB         # optional: stream the layers from disk when the weights exceed half of it
    output:                  # optional
      save_dtype: bfloat16
    stages:
      - method: slm-plus
        ratio: 0.2
      - method: flap
        ratio: 0.2
      - heal: lora           # optional last stage: HealConfig settings (``data`` is required)
        data: wiki-leads
        max_steps: 200

Each stage names a pass and its parameters; each plans on the model the stages before it produced, and all of them
become ONE plan. ``Recipe.from_yaml(r.to_yaml()) == r`` for every recipe (peft's config symmetry): parameters are
kept as given, parsed by the pass's own parameter types (``ratio: "0.2"`` and ``ratio: 0.2`` are the same recipe),
defaults are not filled in. A recipe is checked in full when it is built — unknown keys, unknown passes or
parameters, out-of-range values — with one line naming the stage, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .calibration import CalibrationConfig
from .engine.budget import MemoryBudget, format_size
from .errors import PassError, SLMError
from .healing.config import HealConfig, HealError
from .passes.base import CompressionPass
from .registry import get_pass, get_pass_class

#: the keys of a recipe file
RECIPE_KEYS = ("stages", "calibration", "max_memory", "output")
CALIBRATION_KEYS = tuple(f.name for f in dataclasses.fields(CalibrationConfig))
#: the dtypes a checkpoint can be written in
SAVE_DTYPES = ("float32", "bfloat16", "float16")
#: the pass every front door uses when none is named: the recommended one (``slm`` is the faithful reproduction)
DEFAULT_METHOD = "slm-plus"


class RecipeError(SLMError):
    """A recipe that cannot be read or names bad stages or settings."""


@dataclass(frozen=True)
class PassStage:
    """One compression stage: a registered pass and the parameters given to it (parsed, defaults left out)."""

    method: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise PassError(f"a stage needs a 'method' naming a pass, got {self.method!r}")
        spec = {p.name: p for p in get_pass_class(self.method).params}
        unknown = sorted(set(self.params) - set(spec))
        if unknown:
            get_pass(self.method, **dict(self.params))  # the pass's own message, listing the valid keys
        parsed = {key: spec[key].parse(value) for key, value in self.params.items() if value is not None}
        object.__setattr__(self, "params", dict(sorted(parsed.items())))
        self.build()  # parameter combinations (ratio with num_layers, ranges) are the pass's to check

    def build(self) -> CompressionPass:
        """A fresh pass instance with these parameters."""
        return get_pass(self.method, **dict(self.params))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **{k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()}}


@dataclass(frozen=True)
class OutputOptions:
    """What is written and checked: ``plan_only`` (the plan, no checkpoint), ``check`` (the quality check on unseen
    calibration text), ``save_dtype`` (the checkpoint's dtype; None: the model's)."""

    plan_only: bool = False
    check: bool = True
    save_dtype: str | None = None

    def __post_init__(self) -> None:
        for name in ("plan_only", "check"):
            if not isinstance(getattr(self, name), bool):
                raise RecipeError(f"output {name} must be true or false, got {getattr(self, name)!r}")
        if self.save_dtype is not None and self.save_dtype not in SAVE_DTYPES:
            raise RecipeError(f"output save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {self.save_dtype!r}")


@dataclass(frozen=True)
class Recipe:
    """A whole compression request. See the module docstring for the file form.

    ``stages``: one or more ``PassStage``; ``calibration``: where the calibration ids come from (``source=None``: the
    bundled ``wiki-leads`` when a stage needs data or the corpus is installed, resolved by the orchestrator);
    ``heal``: a ``HealConfig`` that trains the compressed model before it is written; ``max_memory``: the memory
    budget in bytes (None: the memory available); ``output``: ``OutputOptions``.
    """

    stages: tuple[PassStage, ...]
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    heal: HealConfig | None = None
    max_memory: int | None = None
    output: OutputOptions = field(default_factory=OutputOptions)

    def __post_init__(self) -> None:
        stages = tuple(self.stages) if isinstance(self.stages, (list, tuple)) else self.stages
        if not isinstance(stages, tuple) or not stages or not all(isinstance(s, PassStage) for s in stages):
            raise RecipeError("a recipe needs one or more compression stages")
        object.__setattr__(self, "stages", stages)
        if self.max_memory is not None:
            object.__setattr__(self, "max_memory", MemoryBudget.of(self.max_memory).limit)
        if self.heal is not None and self.heal.data is None:
            raise RecipeError("the heal stage needs 'data' (the training text)")
        if self.heal is not None and self.output.plan_only:
            raise RecipeError("healing changes the weights, so it needs a checkpoint: drop the heal stage or "
                              "--plan-only")

    # ------------------------------------------------------------------ building
    @classmethod
    def single(cls, method: str = DEFAULT_METHOD, **params: Any) -> "Recipe":
        """A one-stage recipe: ``Recipe.single("slm-plus", ratio=0.2)``."""
        return cls(stages=(PassStage(method, params),))

    @classmethod
    def from_stages(cls, stages: Sequence[Mapping[str, Any] | str], **fields: Any) -> "Recipe":
        """A recipe from stage objects (``{"method": name, **params}``, or a last ``{"heal": ..., **settings}``) or
        pass names; ``fields`` are the other ``Recipe`` fields."""
        return cls.from_dict({"stages": list(stages)}, **fields)

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe", **overrides: Any) -> "Recipe":
        """A recipe from its dict form (see the module docstring); ``overrides`` replace fields after parsing."""
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: a recipe is a mapping with 'stages', got {type(data).__name__}")
        unknown = sorted(set(data) - set(RECIPE_KEYS))
        if unknown:
            raise RecipeError(f"{where}: unknown key {unknown[0]!r} (a recipe has {', '.join(RECIPE_KEYS)})")
        raw = data.get("stages")
        if not isinstance(raw, list) or not raw:
            raise RecipeError(f"{where}: 'stages' must be a non-empty list")
        stages: list[PassStage] = []
        heal = None
        for k, stage in enumerate(raw, 1):
            if isinstance(stage, str):
                stage = {"method": stage}
            if isinstance(stage, dict) and "heal" in stage:
                heal = _heal_stage(stage, k, len(raw), where)
                continue
            if not isinstance(stage, dict) or not isinstance(stage.get("method"), str):
                raise RecipeError(f"{where}: stage {k} must be a mapping with a 'method', got {stage!r}")
            params = {key: value for key, value in stage.items() if key != "method"}
            try:
                stages.append(PassStage(stage["method"], params))
            except PassError as exc:
                raise RecipeError(f"{where}: stage {k} ({stage['method']}): {exc}") from None
        fields = {"stages": tuple(stages), "heal": heal}
        if data.get("calibration") is not None:
            block = data["calibration"]
            if not isinstance(block, dict):
                raise RecipeError(f"{where}: 'calibration' must be a mapping, got {type(block).__name__}")
            try:
                fields["calibration"] = CalibrationConfig.from_dict(block, where="calibration")
            except SLMError as exc:
                raise RecipeError(f"{where}: {exc}") from None
        if data.get("max_memory") is not None:
            try:
                fields["max_memory"] = MemoryBudget.of(data["max_memory"]).limit
            except SLMError as exc:
                raise RecipeError(f"{where}: max_memory: {exc}") from None
        if data.get("output") is not None:
            block = data["output"]
            known = [f.name for f in dataclasses.fields(OutputOptions)]
            if not isinstance(block, dict) or set(block) - set(known):
                bad = sorted(set(block) - set(known))[0] if isinstance(block, dict) else block
                raise RecipeError(f"{where}: unknown output setting {bad!r}; valid: {', '.join(known)}")
            try:
                fields["output"] = OutputOptions(**block)
            except RecipeError as exc:
                raise RecipeError(f"{where}: {exc}") from None
        fields.update(overrides)
        try:
            return cls(**fields)
        except RecipeError as exc:
            raise RecipeError(f"{where}: {exc}") from None

    @classmethod
    def from_yaml(cls, path_or_text: str | os.PathLike, **overrides: Any) -> "Recipe":
        """A recipe from a YAML/JSON file, or from YAML/JSON text (a string with a newline)."""
        text, where, is_json = _read(path_or_text)
        try:
            data = json.loads(text, object_pairs_hook=_unique_keys(where)) if is_json else _load_yaml(text, where)
        except RecipeError:
            raise
        except Exception as exc:  # noqa: BLE001 - yaml and json raise their own types; one line either way
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise RecipeError(f"{where} is not valid YAML/JSON: {first}") from None
        return cls.from_dict(data, where, **overrides)

    # ------------------------------------------------------------------ writing
    def to_dict(self) -> dict[str, Any]:
        """The dict form: ``stages`` (a ``heal`` stage last when there is one) and the other fields where they differ
        from their defaults."""
        stages: list[dict[str, Any]] = [s.to_dict() for s in self.stages]
        if self.heal is not None:
            stages.append(_heal_dict(self.heal))
        out: dict[str, Any] = {}
        calibration = _non_default(self.calibration)
        if calibration:
            out["calibration"] = calibration
        if self.max_memory is not None:
            out["max_memory"] = format_size(self.max_memory)
        output = _non_default(self.output)
        if output:
            out["output"] = output
        out["stages"] = stages
        return out

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def save(self, path: str | os.PathLike) -> None:
        """Write the recipe as YAML (``.json``: JSON)."""
        path = os.fspath(path)
        text = json.dumps(self.to_dict(), indent=2) + "\n" if path.endswith(".json") else self.to_yaml()
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)

    def plan_record(self) -> dict[str, Any]:
        """What the plan records of the request that made it: the stages, the calibration and the heal stage (the
        memory budget and output options change how the result is computed and written, not which result)."""
        out = self.to_dict()
        out.pop("max_memory", None)
        out.pop("output", None)
        return out

    # ------------------------------------------------------------------ using
    def passes(self) -> list[CompressionPass]:
        """A fresh pass instance per stage."""
        return [s.build() for s in self.stages]

    @property
    def needs_calibration(self) -> bool:
        return any(p.needs_calibration for p in self.passes())

    @property
    def budget(self) -> MemoryBudget:
        return MemoryBudget(self.max_memory)

    def replace(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, **changes)

    def with_calibration(self, **values: Any) -> "Recipe":
        """This recipe with calibration fields replaced (``values`` left at None are not changed)."""
        given = {k: v for k, v in values.items() if v is not None}
        return self.replace(calibration=dataclasses.replace(self.calibration, **given)) if given else self


def _unique_keys(where: str):
    """A ``json`` object hook that refuses a key given twice in one object (json keeps the last one silently)."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise RecipeError(f"{where}: key {key!r} is given twice in one mapping; keep one")
            out[key] = value
        return out

    return hook


def _load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # '<<' merges: explicit keys may override merged ones
                    key = self.construct_object(key_node, deep=True)
                    try:
                        first = seen.get(key)
                    except TypeError:  # an unhashable key: SafeLoader refuses it itself
                        continue
                    line = key_node.start_mark.line + 1
                    if first is not None:
                        raise RecipeError(f"{where}: key {key!r} is given twice in one mapping (lines {first} and "
                                          f"{line}); keep one")
                    seen[key] = line
            return super().construct_mapping(node, deep=deep)

    loader = UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read(path_or_text: str | os.PathLike) -> tuple[str, str, bool]:
    """The text of a recipe file (or the text given), where it came from, and whether it is JSON."""
    value = os.fspath(path_or_text)
    if "\n" in value:
        return value, "recipe", value.lstrip().startswith("{")
    try:
        with open(value, encoding="utf-8") as fh:
            return fh.read(), f"recipe {value}", value.endswith(".json")
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {value}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {value}: {getattr(exc, 'strerror', None) or exc}") from None


def _heal_stage(stage: dict[str, Any], k: int, n: int, where: str) -> HealConfig:
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
    return config


def _heal_dict(config: HealConfig) -> dict[str, Any]:
    settings = _non_default(config)
    method = settings.pop("method", config.method)
    return {"heal": method, **settings}


def _non_default(obj: Any) -> dict[str, Any]:
    """A dataclass's fields that differ from their defaults (tuples as lists), in declaration order."""
    default = type(obj)()
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value != getattr(default, f.name):
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out
