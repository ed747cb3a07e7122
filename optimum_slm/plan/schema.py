"""The plan document: a base, a list of stages of ops, side-car tensors; JSON + safetensors on disk.

A plan names its base by a fingerprint and lists **stages** replayed in order on the base. Each stage records how it
was found (``method``, ``params``, ``calibration``, ``trace``) and its ``ops`` in the base's ORIGINAL layer numbering
(plan/ops.py). The shape after every op is derived by the op kinds' ``validate``; ``shape_after`` and
``num_layers_after`` are recorded for readers and checked on load. Fitted values live in the side-car
(plan/tensors.py). Version 1 files (0.1.0) are upgraded in memory on load (plan/v1.py).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from .._version import __version__
from ..arch import ArchAdapter
from ..errors import PlanError
from ..io.names import PLAN_FILE
from ..io.output import follow_umask
from . import tensors as sidecar
from .fingerprint import SCHEME, SCHEMES, fingerprint, jsonable
from .ops import PlanShape, kind_of

PLAN_FORMAT = "optimum-slm.plan"
PLAN_VERSION = 2
#: bounds on what a plan may ask for, checked before anything is allocated
MAX_LAYERS = 4096
MAX_OPS = 100_000
_FIELDS = {"format", "version", "base", "stages", "shape_after", "num_layers_after", "tensors", "created_with", "recipe"}


def _reject_constant(name: str) -> Any:
    raise PlanError(f"plan holds the non-finite number {name}; every number in a plan must be finite")


def parse_json(text: str, what: str) -> Any:
    """JSON text of a plan; NaN/Infinity are refused (Python's json would accept them), and so are integers beyond
    64 bits (no plan field needs them; Python refuses to read ones of over 4300 digits)."""

    def parse_int(digits: str) -> int:
        if len(digits.lstrip("-")) > 20 or not -(2**63) <= int(digits) < 2**64:
            shown = digits if len(digits) <= 24 else f"{digits[:10]}...{digits[-6:]}"
            raise PlanError(f"{what} holds the {len(digits.lstrip('-'))}-digit integer {shown}; every integer in a "
                            "plan must fit in 64 bits")
        return int(digits)

    try:
        return json.loads(text, parse_constant=_reject_constant, parse_int=parse_int)
    except json.JSONDecodeError as exc:
        raise PlanError(f"{what} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    except RecursionError:
        raise PlanError(f"{what} is nested too deeply to be a plan") from None


def _finite_numbers(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise PlanError(f"{where} holds the non-finite number {value}")
    if isinstance(value, dict):
        for k, v in value.items():
            _finite_numbers(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _finite_numbers(v, f"{where}[{i}]")


def plain(value: Any) -> Any:
    """``value`` ready for a plan's JSON: ``jsonable``, with non-finite floats (a trace's infinite perplexity) as
    strings ("inf", "nan"), since plan files hold finite numbers only."""
    value = jsonable(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


@dataclass
class Stage:
    """One step of a plan: the pass that found it (``method``, ``params``, ``calibration``, ``trace``) and its ops."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    ops: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    trace: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "params": plain(self.params),
            "calibration": plain(self.calibration),
            "trace": plain(self.trace),
            "ops": plain(self.ops),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "Stage":
        if not isinstance(data, dict):
            raise PlanError(f"{where} must be an object")
        unknown = set(data) - {"method", "params", "calibration", "trace", "ops"}
        if unknown:
            raise PlanError(f"{where} has unknown keys {sorted(unknown)}")
        stage = cls(method=data.get("method"), params=data.get("params") or {}, ops=data.get("ops"),
                    calibration=data.get("calibration"), trace=data.get("trace") or {})
        stage.check(where)
        return stage

    def check(self, where: str) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise PlanError(f"{where}: 'method' must be a non-empty string, got {self.method!r}")
        if not isinstance(self.params, dict):
            raise PlanError(f"{where}: 'params' must be an object")
        if self.calibration is not None and not isinstance(self.calibration, dict):
            raise PlanError(f"{where}: 'calibration' must be an object or null, got {type(self.calibration).__name__}")
        if not isinstance(self.trace, dict):
            raise PlanError(f"{where}: 'trace' must be an object")
        if not isinstance(self.ops, list):
            raise PlanError(f"{where}: 'ops' must be a list")
        if len(self.ops) > MAX_OPS:
            raise PlanError(f"{where} has {len(self.ops)} ops; at most {MAX_OPS} are accepted")


def _condensed(lines: list[str], kinds: list[Any], limit: int = 8) -> list[str]:
    """A stage's op lines; past ``limit``, runs of one kind are folded into ``kind × n (first … last)``."""
    if len(lines) <= limit:
        return lines
    out: list[str] = []
    start = 0
    for end in range(1, len(lines) + 1):
        if end == len(lines) or kinds[end] != kinds[start]:
            run = lines[start:end]
            out.append(run[0] if len(run) == 1 else f"{kinds[start]} × {len(run)} ({run[0]} … {run[-1]})")
            start = end
    return out


def describe_base(model: nn.Module, fingerprint_value: str | None = None) -> dict[str, Any]:
    """The ``base`` block of a plan for this model (fingerprint under the current scheme, ``SCHEME``, computed unless
    given)."""
    adapter = ArchAdapter(model)
    return {
        "name_or_path": getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None),
        "model_type": adapter.config.model_type,
        "num_layers": adapter.num_layers,
        "hidden_size": int(adapter.config.hidden_size),
        "widths": adapter.widths(),
        "fingerprint": fingerprint_value or fingerprint(model),
        "fingerprint_scheme": SCHEME,
    }


def _recipe_block(value: Any) -> dict | None:
    if value is not None and not isinstance(value, dict):
        raise PlanError(f"plan 'recipe' must be an object, got {type(value).__name__}")
    return value


def _check_base(base: Any) -> None:
    if not isinstance(base, dict):
        raise PlanError("plan 'base' must be an object")
    for key, typ in (("num_layers", int), ("model_type", str), ("fingerprint", str)):
        if not isinstance(base.get(key), typ) or isinstance(base.get(key), bool):
            raise PlanError(f"plan base.{key} must be a {typ.__name__}, got {base.get(key)!r}")
    if not 1 <= base["num_layers"] <= MAX_LAYERS:
        raise PlanError(f"plan base.num_layers must be in 1..{MAX_LAYERS}, got {base['num_layers']}")
    hidden = base.get("hidden_size")
    if hidden is not None and (not isinstance(hidden, int) or isinstance(hidden, bool) or not 0 < hidden <= 1 << 20):
        raise PlanError(f"plan base.hidden_size must be a positive integer, got {hidden!r}")
    widths = base.get("widths")
    if widths is not None and (not isinstance(widths, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 24 for v in widths.values())):
        raise PlanError(f"plan base.widths must map width names to positive integers, got {widths!r}")
    if base.get("fingerprint_scheme", "v1") not in SCHEMES:
        raise PlanError(f"plan base.fingerprint_scheme must be one of {', '.join(SCHEMES)}, got "
                        f"{base.get('fingerprint_scheme')!r}")


@dataclass
class CompressionPlan:
    """A compression plan: ``base`` + ordered ``stages`` + side-car ``tensors``. Validated on construction."""

    base: dict[str, Any]
    stages: list[Stage]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    created_with: str = f"optimum-slm {__version__}"
    #: the request that made this plan (``Recipe.plan_record()``: stages, calibration, heal stage); None for a plan
    #: made from ad-hoc pass instances or by an older release. Informative: the ops, not the recipe, rebuild the model
    recipe: dict | None = None
    #: the plan-cache file this plan was reused from (set by the pipeline; not part of the plan)
    reused_from: str | None = field(default=None, init=False, compare=False, repr=False)
    #: wall-clock seconds of the run that made this plan, per stage (``{"method", "seconds", ...}``); kept out of the
    #: file so a plan's bytes depend only on what was found (empty for a loaded or cached plan)
    timings: list = field(default_factory=list, init=False, compare=False, repr=False)
    #: the record of the healing run that followed this plan in the same command (a recipe's ``heal`` stage; written
    #: to ``slm_heal.json``, not into the plan: the plan rebuilds the model before healing)
    heal_record: dict | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.shape_after = self.validate()

    # -------------------------------------------------------------------- construction helpers
    @classmethod
    def single(cls, base: dict[str, Any], method: str, ops: list[dict[str, Any]], params: dict | None = None,
               calibration: dict | None = None, trace: dict | None = None,
               tensors: Mapping[str, torch.Tensor] | None = None) -> "CompressionPlan":
        """A one-stage plan."""
        stage = Stage(method, dict(params or {}), list(ops), calibration, dict(trace or {}))
        return cls(base=base, stages=[stage], tensors=dict(tensors or {}))

    @classmethod
    def for_model(cls, model: nn.Module, method: str, ops: list[dict[str, Any]], **kwargs: Any) -> "CompressionPlan":
        """A one-stage plan for ``model`` as base (fingerprint computed here)."""
        return cls.single(describe_base(model), method, ops, **kwargs)

    # -------------------------------------------------------------------- views
    @property
    def num_layers(self) -> int:
        return int(self.base["num_layers"])

    @property
    def num_layers_after(self) -> int:
        return self.shape_after.num_layers

    @property
    def removed_layers(self) -> int:
        return self.num_layers - self.num_layers_after

    @property
    def method(self) -> str:
        """The stages' methods, joined by ``+``."""
        return " + ".join(s.method for s in self.stages)

    @property
    def ops(self) -> list[dict[str, Any]]:
        """Every op of every stage, in order."""
        return [op for s in self.stages for op in s.ops]

    def _single(self, attribute: str) -> Any:
        if len(self.stages) == 1:
            return getattr(self.stages[0], attribute)
        return {f"stage{k}": getattr(s, attribute) for k, s in enumerate(self.stages)}

    @property
    def params(self) -> dict[str, Any]:
        """The stage's params (several stages: by ``stage<k>``)."""
        return self._single("params")

    @property
    def trace(self) -> dict[str, Any]:
        """The stage's trace (several stages: by ``stage<k>``)."""
        return self._single("trace")

    @property
    def quality_check(self) -> dict[str, Any] | None:
        """The quality check of the compression that wrote this plan (in the last stage's trace), if any."""
        check = self.stages[-1].trace.get("quality_check")
        return check if isinstance(check, dict) else None

    @property
    def calibration(self) -> dict[str, Any] | None:
        """The first calibrated stage's calibration block."""
        return next((s.calibration for s in self.stages if s.calibration), None)

    def footprint(self) -> dict[str, list]:
        """Merged windows (top first, as found) and dropped layers of every op, in base numbering."""
        out: dict[str, list] = {"merged": [], "dropped": []}
        for op in self.ops:
            for key, values in kind_of(op).footprint(op).items():
                out.setdefault(key, []).extend(values)
        out["dropped"] = sorted(out["dropped"])
        return out

    @property
    def windows(self) -> list[tuple[int, int]]:
        """The merge windows as (start, end) in base numbering, in op order (top first as the passes find them)."""
        return [tuple(w) for w in self.footprint()["merged"]]

    def describe_ops(self) -> list[str]:
        """One line per op, from its kind."""
        return [kind_of(op).describe(op) for op in self.ops]

    # -------------------------------------------------------------------- validation
    def base_shape(self, hidden_size: int | None = None) -> PlanShape:
        return PlanShape.of_base(self.num_layers, hidden_size or self.base.get("hidden_size"),
                                 self.base.get("model_type"), self.base.get("widths"))

    def validate(self, hidden_size: int | None = None) -> PlanShape:
        """Check everything that needs no model; returns the shape after the last op."""
        _check_base(self.base)
        if not isinstance(self.stages, list) or not self.stages:
            raise PlanError("plan 'stages' must be a non-empty list")
        if not isinstance(self.tensors, dict):
            raise PlanError("plan 'tensors' must be a mapping of names to tensors")
        for name, t in self.tensors.items():
            if not isinstance(t, torch.Tensor):
                raise PlanError(f"plan tensor {name!r} is not a tensor")
            sidecar.check_tensor(name, t)
        used: set[str] = set()
        shape = self.base_shape(hidden_size)
        for s, stage in enumerate(self.stages):
            where = f"plan stage {s}" if len(self.stages) > 1 else "plan"
            stage.check(where)
            for k, op in enumerate(stage.ops):
                kind = kind_of(op, f"{where} op #{k}")
                shape = kind.validate(op, shape, self.tensors)
                used.update(kind.tensor_names(op))
        unused = sorted(set(self.tensors) - used)
        if unused:
            raise PlanError(f"plan tensor {unused[0]!r} is referenced by no op")
        if shape.num_layers < 1:
            raise PlanError("plan removes every layer")
        from .width_ops import check_biases

        check_biases(shape)
        return shape

    # -------------------------------------------------------------------- JSON
    def manifest(self) -> dict[str, dict]:
        return {name: sidecar.describe(t) for name, t in sorted(self.tensors.items())}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "base": plain(self.base),
            "stages": [s.to_dict() for s in self.stages],
            "shape_after": self.shape_after.to_dict(),
            "num_layers_after": self.num_layers_after,
            "tensors": self.manifest(),
            "created_with": self.created_with,
            **({"recipe": plain(self.recipe)} if self.recipe is not None else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any, tensors: Mapping[str, torch.Tensor] | None = None) -> "CompressionPlan":
        """A plan from its JSON object (version 1 is upgraded); ``tensors``: its side-car, already checked."""
        if not isinstance(data, dict):
            raise PlanError("a plan must be a JSON object")
        if data.get("format") != PLAN_FORMAT:
            raise PlanError(f"not an optimum-slm plan (format={data.get('format')!r}, expected {PLAN_FORMAT!r})")
        version = data.get("version")
        if version == 1:
            from .v1 import upgrade

            data, tensors = upgrade(data)
        elif version != PLAN_VERSION:
            raise PlanError(f"unsupported plan version {version!r}; this release reads versions 1 and {PLAN_VERSION}")
        for key in ("base", "stages", "num_layers_after"):
            if key not in data:
                raise PlanError(f"plan lacks the field {key!r}")
        unknown = sorted(set(data) - _FIELDS)
        if unknown:
            raise PlanError(f"plan has the unknown field {unknown[0]!r} (version 2 keeps ops inside 'stages')")
        _finite_numbers({k: v for k, v in data.items() if k != "tensors"}, "plan")
        manifest = data.get("tensors") or {}
        if not isinstance(manifest, dict):
            raise PlanError("plan 'tensors' must be an object")
        tensors = dict(tensors or {})
        missing = sorted(set(manifest) - set(tensors))
        if missing:
            raise PlanError(f"plan references the side-car tensor {missing[0]!r}, which was not loaded")
        for name, entry in manifest.items():
            sidecar.check_tensor(name, tensors[name], entry)
        if set(tensors) - set(manifest):
            raise PlanError(f"tensor {sorted(set(tensors) - set(manifest))[0]!r} is not in the plan's manifest")
        stages = data["stages"]
        if not isinstance(stages, list) or not stages:
            raise PlanError("plan 'stages' must be a non-empty list")
        plan = cls(
            base=data["base"],
            stages=[Stage.from_dict(s, f"plan stage {k}") for k, s in enumerate(stages)],
            tensors=tensors,
            created_with=str(data.get("created_with", "")),
            recipe=_recipe_block(data.get("recipe")),
        )
        recorded = data["num_layers_after"]
        if not isinstance(recorded, int) or isinstance(recorded, bool):
            raise PlanError(f"plan num_layers_after must be an integer, got {recorded!r}")
        if recorded != plan.num_layers_after:
            raise PlanError(f"plan num_layers_after={recorded} but its ops leave {plan.num_layers_after} layers")
        shape = data.get("shape_after")
        if shape is not None and shape != plan.shape_after.to_dict():
            raise PlanError("plan shape_after does not match what its ops leave")
        return plan

    # -------------------------------------------------------------------- files
    @classmethod
    def load(cls, path: str | os.PathLike) -> "CompressionPlan":
        """Read and validate a plan file and its side-car (``<plan>.tensors``, when it lists tensors)."""
        if not isinstance(path, (str, os.PathLike)):
            raise PlanError(f"CompressionPlan.load takes the path of a plan file, got {type(path).__name__}")
        path = os.fspath(path)
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            raise PlanError(f"plan file not found: {path}") from None
        except IsADirectoryError:
            raise PlanError(f"{path} is a directory; give the plan file (e.g. {os.path.join(path, PLAN_FILE)})") \
                from None
        except OSError as exc:
            raise PlanError(f"cannot read plan file {path}: {exc.strerror or exc}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PlanError(f"plan file {path} is not UTF-8 text (not a plan?)") from None
        data = parse_json(text, f"plan file {path}")
        manifest = data.get("tensors") if isinstance(data, dict) and data.get("version") == PLAN_VERSION else None
        if manifest is not None and not isinstance(manifest, dict):
            raise PlanError(f"plan file {path}: 'tensors' must be an object")
        tensors = sidecar.read_sidecar(path, manifest or {})
        return cls.from_dict(data, tensors)

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as sorted, indented JSON and its side-car (atomic: temp files, then renames)."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        text = self.to_json()
        side = sidecar.sidecar_path(path)
        temps: list[str] = []
        try:
            if self.tensors:
                fd, tmp_side = tempfile.mkstemp(prefix=".slm_plan.", suffix=".tensors.tmp", dir=directory)
                os.close(fd)
                temps.append(tmp_side)
                sidecar.write_sidecar(tmp_side, self.tensors)
            fd, tmp = tempfile.mkstemp(prefix=".slm_plan.", dir=directory)
            temps.append(tmp)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            for t in temps:
                follow_umask(t)
            if self.tensors:
                os.replace(temps[0], side)
            elif os.path.exists(side):
                os.unlink(side)  # a stale side-car of an earlier plan at this path
            legacy = sidecar.legacy_sidecar_path(path)
            if os.path.exists(legacy):
                os.unlink(legacy)  # an older release's side-car of an earlier plan at this path
            os.replace(tmp, path)
        finally:
            for t in temps:
                if os.path.exists(t):
                    os.unlink(t)

    # -------------------------------------------------------------------- text
    def summary(self) -> str:
        """A few human-readable lines: stages, base, layers before/after, one line per op."""
        lines = []
        for k, stage in enumerate(self.stages):
            label = f"stage {k + 1}: " if len(self.stages) > 1 else ""
            lines.append(f"{label}method: {stage.method}  params: {json.dumps(jsonable(stage.params), sort_keys=True)}")
        lines += [
            f"base: {self.base.get('name_or_path')} ({self.base['model_type']}, {self.num_layers} layers, "
            f"fingerprint {self.base['fingerprint'][:12]})",
            f"layers: {self.num_layers} -> {self.num_layers_after} ({self.removed_layers} removed)",
        ]
        marks = self.footprint()
        attn, mlp = len(marks.get("attn_dropped", [])), len(marks.get("mlp_dropped", []))
        if attn or mlp:
            lines.append(f"sub-layers: {attn} attention and {mlp} MLP removed (layers kept without them)")
        for stage in self.stages:
            lines += [f"  {line}" for line in _condensed([kind_of(op).describe(op) for op in stage.ops],
                                                         [op.get("op") for op in stage.ops])]
        for stage in self.stages:
            cost, fit = stage.trace.get("layer_evaluations"), stage.trace.get("fit")
            if isinstance(fit, dict) and isinstance(fit.get("fit_tokens"), int):
                lines.append(f"fit: least-squares maps on {fit['fit_tokens']:,} tokens ({fit.get('order')}, ridge "
                             f"{fit.get('ridge')}), {fit.get('fit_layer_passes')} layer passes over the fit set")
            refined = stage.trace.get("refine")
            for window, r in (refined.items() if isinstance(refined, dict) else ()):
                if isinstance(r, dict) and {"before", "after", "best_epoch", "epochs"} <= r.keys():
                    lines.append(f"refine {window}: held-out relative error {r['before']:.4g} -> {r['after']:.4g} "
                                 f"(best epoch {r['best_epoch']} of {r['epochs']}, lr {r.get('lr')}"
                                 + (f", lowered {r['rate_backoffs']}x to {r.get('final_lr'):.2g}"
                                    if r.get("rate_backoffs") else "")
                                 + ("; kept the fitted merge)" if r["best_epoch"] == 0 else ")"))
            if isinstance(cost, (int, float)) and cost:
                lines.append(f"cost: {cost:,.1f} layer evaluations over the search set ({stage.method})")
        return "\n".join(lines)

