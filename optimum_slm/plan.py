"""Compression plans ("window specs"): small JSON documents that rebuild a compressed model from its base.

A plan names its base by a fingerprint, lists ordered operations in the base's ORIGINAL layer numbering, and records
how it was found (method, params, calibration, trace). ``apply_plan`` is the only executor.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ._version import __version__
from .arch import ArchAdapter, layer_state, load_layer_state, text_config
from .errors import PlanError
from .merge import get_merge_rule

PLAN_FORMAT = "optimum-slm.plan"
PLAN_VERSION = 1

# Config keys that differ between equivalent loads of one checkpoint (GGUF vs converted, dtype, attention backend).
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "quantization_config",
    "architectures",
    "use_cache",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "_experts_implementation",
    "tie_word_embeddings",
}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.dtype):
        return str(value)
    return repr(value)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the text config, every tensor's name and shape, and a sample of a few tensors' values.

    Values are rounded to bfloat16 before hashing so a checkpoint loaded in float32 or bfloat16 matches itself.
    """
    h = hashlib.sha256()
    cfg = text_config(model).to_dict()
    cfg = {k: v for k, v in cfg.items() if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")}
    h.update(json.dumps(_jsonable(cfg), sort_keys=True).encode())
    state = dict(model.named_parameters())
    for name in sorted(state):
        h.update(f"{name}:{tuple(state[name].shape)};".encode())
    names = sorted(state)
    probes = [names[0], names[len(names) // 2], names[-1]] + [n for n in names if ".layers.0." in n][:1]
    for name in probes:
        flat = state[name].detach().reshape(-1)[:4096].to("cpu", torch.float32).to(torch.bfloat16)
        h.update(flat.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- operations
@dataclass(frozen=True)
class OpSpec:
    """How one plan operation is validated; ``layers(op)`` lists the base layers it consumes."""

    name: str
    validate: Callable[[Mapping[str, Any], int], None]
    layers: Callable[[Mapping[str, Any]], list[int]]
    removed: Callable[[Mapping[str, Any]], int]


def _int_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise PlanError(f"{what} must be a list of integers, got {value!r}")
    return value


def _check_range(indices: list[int], num_layers: int, what: str) -> None:
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise PlanError(f"{what}: layer index {bad[0]} out of range 0..{num_layers - 1}")


def _validate_merge(op: Mapping[str, Any], num_layers: int) -> None:
    layers = _int_list(op.get("layers"), "merge op 'layers'")
    if len(layers) != 2:
        raise PlanError(f"merge op 'layers' is an inclusive range [start, end], got {layers}")
    start, end = layers
    if start >= end:
        raise PlanError(f"merge window [{start}, {end}] needs start < end")
    _check_range(layers, num_layers, f"merge window [{start}, {end}]")
    rule = op.get("rule", "official")
    if not isinstance(rule, str):
        raise PlanError(f"merge op 'rule' must be a string, got {rule!r}")
    try:
        merge_rule = get_merge_rule(rule)
    except Exception as exc:
        raise PlanError(str(exc)) from None
    args = op.get("args", {})
    if not isinstance(args, dict):
        raise PlanError(f"merge op 'args' must be an object, got {args!r}")
    merge_rule.check_args(args, end - start + 1)


def _validate_drop(op: Mapping[str, Any], num_layers: int) -> None:
    layers = _int_list(op.get("layers"), "drop op 'layers'")
    if not layers:
        raise PlanError("drop op needs at least one layer")
    if len(set(layers)) != len(layers):
        raise PlanError(f"drop op lists a layer twice: {layers}")
    _check_range(layers, num_layers, "drop op")


OPS: dict[str, OpSpec] = {
    "merge": OpSpec(
        "merge",
        _validate_merge,
        lambda op: list(range(op["layers"][0], op["layers"][1] + 1)),
        lambda op: op["layers"][1] - op["layers"][0],
    ),
    "drop": OpSpec("drop", _validate_drop, lambda op: list(op["layers"]), lambda op: len(op["layers"])),
}


def merge_op(start: int, end: int, rule: str = "official", **extra: Any) -> dict[str, Any]:
    """A merge op over the inclusive base-layer range [start, end]."""
    return {"op": "merge", "layers": [int(start), int(end)], "rule": rule, **extra}


def drop_op(layers) -> dict[str, Any]:
    """A drop op removing the given base layers."""
    return {"op": "drop", "layers": sorted(int(i) for i in layers)}


def layers_after(ops: list[Mapping[str, Any]], num_layers: int) -> int:
    return num_layers - sum(OPS[op["op"]].removed(op) for op in ops)


# --------------------------------------------------------------------------------------------- the plan
@dataclass
class CompressionPlan:
    """A compression plan; ``save``/``load`` read and write its JSON form with full validation."""

    base: dict[str, Any]
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    ops: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    trace: dict[str, Any] = field(default_factory=dict)
    num_layers_after: int | None = None
    created_with: str = f"optimum-slm {__version__}"

    def __post_init__(self) -> None:
        if self.num_layers_after is None:
            self.validate()
            self.num_layers_after = layers_after(self.ops, int(self.base["num_layers"]))
        self.validate()

    # -------------------------------------------------------------------- construction helpers
    @classmethod
    def for_model(cls, model: nn.Module, method: str, ops: list[dict[str, Any]], **kwargs: Any) -> "CompressionPlan":
        """A plan for ``model`` as base (fingerprint computed here)."""
        return cls(base=describe_base(model), method=method, ops=ops, **kwargs)

    # -------------------------------------------------------------------- views
    @property
    def num_layers(self) -> int:
        return int(self.base["num_layers"])

    @property
    def windows(self) -> list[tuple[int, int]]:
        """The merge windows as (start, end) in base numbering, top first as the passes found them."""
        return [tuple(op["layers"]) for op in self.ops if op["op"] == "merge"]

    @property
    def removed_layers(self) -> int:
        return self.num_layers - int(self.num_layers_after)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "base": _jsonable(self.base),
            "method": self.method,
            "params": _jsonable(self.params),
            "ops": _jsonable(self.ops),
            "num_layers_after": self.num_layers_after,
            "calibration": _jsonable(self.calibration),
            "trace": _jsonable(self.trace),
            "created_with": self.created_with,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=False) + "\n"

    def plan_id(self) -> str:
        """sha256 of what defines the compressed model: base fingerprint and ops."""
        core = {"base": self.base.get("fingerprint"), "ops": self.ops}
        return hashlib.sha256(json.dumps(_jsonable(core), sort_keys=True).encode()).hexdigest()

    # -------------------------------------------------------------------- validation and I/O
    def validate(self) -> None:
        base = self.base
        if not isinstance(base, dict):
            raise PlanError("plan 'base' must be an object")
        for key, typ in (("num_layers", int), ("model_type", str), ("fingerprint", str)):
            if not isinstance(base.get(key), typ) or isinstance(base.get(key), bool):
                raise PlanError(f"plan base.{key} must be a {typ.__name__}, got {base.get(key)!r}")
        if not isinstance(self.method, str) or not self.method:
            raise PlanError(f"plan 'method' must be a non-empty string, got {self.method!r}")
        if not isinstance(self.params, dict):
            raise PlanError("plan 'params' must be an object")
        if not isinstance(self.ops, list):
            raise PlanError("plan 'ops' must be a list")
        n = base["num_layers"]
        used: dict[int, int] = {}
        for k, op in enumerate(self.ops):
            if not isinstance(op, dict) or not isinstance(op.get("op"), str):
                raise PlanError(f"plan op #{k} must be an object with a string 'op'")
            spec = OPS.get(op["op"])
            if spec is None:
                raise PlanError(f"plan op #{k}: unknown op {op['op']!r}; known: {', '.join(sorted(OPS))}")
            spec.validate(op, n)
            for i in spec.layers(op):
                if i in used:
                    raise PlanError(f"plan ops #{used[i]} and #{k} overlap at base layer {i}")
                used[i] = k
        if self.num_layers_after is not None:
            expect = layers_after(self.ops, n)
            if self.num_layers_after != expect:
                raise PlanError(f"plan num_layers_after={self.num_layers_after} but its ops leave {expect} layers")
            if expect < 1:
                raise PlanError("plan removes every layer")
        if not isinstance(self.trace, dict):
            raise PlanError("plan 'trace' must be an object")

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as sorted, indented JSON (atomic: temp file, then rename)."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".slm_plan.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(self.to_json())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def from_dict(cls, data: Any) -> "CompressionPlan":
        if not isinstance(data, dict):
            raise PlanError("a plan must be a JSON object")
        if data.get("format") != PLAN_FORMAT:
            raise PlanError(f"not an optimum-slm plan (format={data.get('format')!r}, expected {PLAN_FORMAT!r})")
        if data.get("version") != PLAN_VERSION:
            raise PlanError(f"unsupported plan version {data.get('version')!r}; this release reads version {PLAN_VERSION}")
        for key in ("base", "method", "ops", "num_layers_after"):
            if key not in data:
                raise PlanError(f"plan lacks the field {key!r}")
        if not isinstance(data["num_layers_after"], int):
            raise PlanError(f"plan num_layers_after must be an integer, got {data['num_layers_after']!r}")
        return cls(
            base=data["base"],
            method=data["method"],
            params=data.get("params") or {},
            ops=data["ops"],
            calibration=data.get("calibration"),
            trace=data.get("trace") or {},
            num_layers_after=data["num_layers_after"],
            created_with=data.get("created_with", ""),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CompressionPlan":
        """Read and validate a plan file."""
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise PlanError(f"plan file not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan file {path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
        return cls.from_dict(data)

    def summary(self) -> str:
        """A few human-readable lines: method, windows, layers before/after."""
        lines = [
            f"method: {self.method}  params: {json.dumps(self.params, sort_keys=True)}",
            f"base: {self.base.get('name_or_path')} ({self.base['model_type']}, {self.num_layers} layers, "
            f"fingerprint {self.base['fingerprint'][:12]})",
            f"layers: {self.num_layers} -> {self.num_layers_after} ({self.removed_layers} removed)",
        ]
        for op in self.ops:
            if op["op"] == "merge":
                lines.append(f"  merge {op['layers'][0]}-{op['layers'][1]} (rule {op.get('rule', 'official')})")
            else:
                lines.append(f"  {op['op']} {op.get('layers')}")
        return "\n".join(lines)


def describe_base(model: nn.Module) -> dict[str, Any]:
    """The ``base`` block of a plan for this model."""
    adapter = ArchAdapter(model)
    return {
        "name_or_path": getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None),
        "model_type": adapter.config.model_type,
        "num_layers": adapter.num_layers,
        "fingerprint": model_fingerprint(model),
    }


# --------------------------------------------------------------------------------------------- executor
def apply_plan(model: nn.Module, plan: CompressionPlan, strict: bool = True) -> nn.Module:
    """Rebuild the compressed model from its base, in place; returns ``model``.

    Refuses a model whose fingerprint differs from ``plan.base['fingerprint']`` unless ``strict=False``.
    """
    adapter = ArchAdapter(model)
    if adapter.num_layers != plan.num_layers:
        raise PlanError(f"plan is for a {plan.num_layers}-layer base, the model has {adapter.num_layers} layers")
    if adapter.config.model_type != plan.base["model_type"]:
        raise PlanError(f"plan is for model_type {plan.base['model_type']!r}, the model is {adapter.config.model_type!r}")
    if strict:
        fp = model_fingerprint(model)
        if fp != plan.base["fingerprint"]:
            raise PlanError(
                f"plan was made for another base (fingerprint {plan.base['fingerprint'][:12]}, model {fp[:12]}); "
                "pass strict=False to apply it anyway"
            )
    layers = list(adapter.layers)
    # slot for each surviving position: (type_index, module); merged slots are built from the ORIGINAL weights
    replacement: dict[int, tuple[int, nn.Module]] = {}
    removed: set[int] = set()
    for op in plan.ops:
        if op["op"] == "drop":
            removed.update(op["layers"])
        elif op["op"] == "merge":
            low, high = op["layers"]
            rule = get_merge_rule(op.get("rule", "official"))
            states = [layer_state(layers[i]) for i in range(low, high + 1)]
            kinds = adapter.tensor_kinds(layers[low])
            merged_state = rule(states, kinds, **op.get("args", {}))
            anchor = rule.anchor_index(low, high)
            module = layers[anchor]
            load_layer_state(module, merged_state)
            if op.get("scales"):
                adapter.fold_branch_scales(module, _decode_scales(op, adapter))
            replacement[low] = (anchor, module)
            removed.update(i for i in range(low, high + 1) if i != low)
        else:  # validated plans only contain known ops
            raise PlanError(f"op {op['op']!r} has no executor")
    slots = []
    for i in range(plan.num_layers):
        if i in removed:
            continue
        slots.append(replacement.get(i, (i, layers[i])))
    adapter.set_layers(slots)
    return model


def _decode_scales(op: Mapping[str, Any], adapter: ArchAdapter) -> dict[str, torch.Tensor]:
    from .calibrated import decode_vector

    hidden = int(adapter.config.hidden_size)
    known = {b.name for b in adapter.family.branches}
    scales = {}
    for name, text in op["scales"].items():
        if name not in known:
            raise PlanError(f"merge window {op['layers']}: unknown branch {name!r}; known: {', '.join(sorted(known))}")
        try:
            vec = decode_vector(text)
        except ValueError:
            raise PlanError(f"merge window {op['layers']}: scales[{name!r}] is not base64 float32") from None
        if vec.numel() != hidden:
            raise PlanError(f"merge window {op['layers']}: scales[{name!r}] has {vec.numel()} values, hidden size is {hidden}")
        scales[name] = vec
    return scales


def clone_plan(plan: CompressionPlan) -> CompressionPlan:
    return CompressionPlan.from_dict(copy.deepcopy(plan.to_dict()))
