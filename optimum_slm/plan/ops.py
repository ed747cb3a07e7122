"""Plan operations: each op kind validates, applies and describes itself; nothing else switches on op names.

An op is a JSON object ``{"op": <kind>, ...}`` in the base model's ORIGINAL layer numbering. Validation threads a
``PlanShape`` through the ops of every stage in order (the alive layers in base numbering, which of them no longer
hold a base layer's weights, per-layer widths), so a later op sees what the earlier ones left. Built-in kinds:

* ``drop`` ``{"layers": [i, ...]}``: remove those layers;
* ``merge`` ``{"layers": [low, high], "rule": name, "args": {...}, "tensors": {role: name}}``: collapse the base layers
  low..high into one layer by a merge rule (merge/rules.py); the result takes position ``low``. A window must consist
  of layers that still hold their base weights (a merged layer cannot be merged again: the op is defined on the
  base's tensors). Fitted rules reference side-car tensors by name in ``tensors``;
* ``scale_branches`` ``{"layers": [i, ...], "factor": f}``: multiply the output of every residual branch (attention
  and MLP) of those layers by the positive number f, folded into their weights (``ArchAdapter.fold_branch_scales``:
  the rows of ``o_proj``/``down_proj``, or a post-branch norm's gain). With the final norm and every layer's input
  norms blind to a scalar, this computes exactly (up to the norms' ε) what the unscaled layers compute on a residual
  stream multiplied by 1/f where it enters the first of them (LinearPatch's scalar part, see
  passes/depth/linearpatch.py).

Third-party kinds register through the ``register_op_kinds`` hook.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import torch

from ..arch import load_layer_state, window_states
from ..arch.families import family_for_type
from ..errors import PlanError

Op = Mapping[str, Any]
Tensors = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class PlanShape:
    """The model's shape at a point of a plan: alive layers (base numbering, bottom to top) and their widths."""

    num_base_layers: int
    layers: tuple[int, ...]
    #: alive layers whose weights are no longer exactly a base layer's (merged, narrowed)
    derived: frozenset[int] = frozenset()
    hidden_size: int | None = None
    #: per-layer widths that differ from the base's, e.g. {13: {"intermediate_size": 1024}} (width ops)
    widths: Mapping[int, Mapping[str, int]] = field(default_factory=dict)
    #: the base's model type and widths (intermediate_size, heads, KV heads, head_dim), which width ops check against
    model_type: str | None = None
    base_widths: Mapping[str, int] | None = None

    @classmethod
    def of_base(cls, num_layers: int, hidden_size: int | None = None, model_type: str | None = None,
                base_widths: Mapping[str, int] | None = None) -> "PlanShape":
        return cls(num_layers, tuple(range(num_layers)), frozenset(), hidden_size, {}, model_type, base_widths)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def without(self, removed: Iterable[int]) -> "PlanShape":
        gone = set(removed)
        return replace(self, layers=tuple(i for i in self.layers if i not in gone), derived=self.derived - gone,
                       widths={k: v for k, v in self.widths.items() if k not in gone})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_layers": self.num_layers, "layers": list(self.layers)}
        if self.widths:
            out["widths"] = {str(k): dict(v) for k, v in sorted(self.widths.items())}
        return out


def int_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise PlanError(f"{what} must be a list of integers, got {value!r}")
    return value


def check_in_base(indices: Sequence[int], shape: PlanShape, what: str) -> None:
    bad = [i for i in indices if not 0 <= i < shape.num_base_layers]
    if bad:
        raise PlanError(f"{what}: layer index {bad[0]} out of range 0..{shape.num_base_layers - 1}")


def check_alive(indices: Sequence[int], shape: PlanShape, what: str) -> None:
    alive = set(shape.layers)
    gone = [i for i in indices if i not in alive]
    if gone:
        raise PlanError(f"{what}: overlap at base layer {gone[0]} with an earlier op (already removed)")


class OpKind:
    """One kind of plan operation. Subclasses set ``name`` and implement ``validate``, ``apply`` and ``describe``."""

    name: ClassVar[str] = ""
    #: the keys an op of this kind may have (``op`` included); anything else is refused
    keys: ClassVar[frozenset[str]] = frozenset({"op"})

    def check_keys(self, op: Op, what: str) -> None:
        """Refuse keys this kind does not know (a typo would otherwise be ignored silently)."""
        unknown = sorted(set(op) - self.keys)
        if unknown:
            raise PlanError(f"{what}: unknown keys {unknown}")

    def validate(self, op: Op, shape: PlanShape, tensors: Tensors) -> PlanShape:  # pragma: no cover - abstract
        """Check ``op`` against the running ``shape`` and the plan's tensors; return the shape after it."""
        raise NotImplementedError

    def apply(self, ctx, op: Op, tensors: Tensors) -> None:  # pragma: no cover - abstract
        """Rewrite ``ctx`` (an ``execute.ApplyContext``): build new modules, never change the model's own."""
        raise NotImplementedError

    def describe(self, op: Op) -> str:  # pragma: no cover - abstract
        """One human-readable line."""
        raise NotImplementedError

    def footprint(self, op: Op) -> dict[str, list]:
        """What the op does to layers, for plots and cards: ``{"merged": [[lo, hi]], "dropped": [i, ...]}``."""
        return {}

    #: op keys whose values name side-car tensors (besides the ``tensors`` role → name object)
    tensor_keys: ClassVar[tuple[str, ...]] = ()

    def tensor_names(self, op: Op) -> list[str]:
        """The side-car tensors the op references."""
        refs = op.get("tensors") or {}
        names = list(refs.values()) if isinstance(refs, Mapping) else []
        return names + [op[k] for k in self.tensor_keys if isinstance(op.get(k), str)]

    def rename_tensors(self, op: Op, renamed: Mapping[str, str]) -> dict[str, Any]:
        """``op`` with its tensor references renamed (the pipeline prefixes a later stage's tensors)."""
        out = dict(op)
        if isinstance(op.get("tensors"), Mapping):
            out["tensors"] = {role: renamed.get(name, name) for role, name in op["tensors"].items()}
        for key in self.tensor_keys:
            if isinstance(op.get(key), str):
                out[key] = renamed.get(op[key], op[key])
        return out

    def to_base(self, op: Op, slots: Sequence[int]) -> dict[str, Any]:
        """The op written for a compressed model (positions 0..n-1), re-expressed in base numbering; ``slots[p]`` is
        the base index of position ``p``."""
        raise PlanError(f"op {self.name!r} cannot be re-expressed in base numbering")


def positions_to_base(op: Op, slots: Sequence[int], name: str) -> list[int]:
    """An op's ``layers`` given as positions of a compressed model, in base numbering (``slots[p]``)."""
    layers = int_list(op.get("layers"), f"{name} op 'layers'")
    bad = [p for p in layers if not 0 <= p < len(slots)]
    if bad:
        raise PlanError(f"{name} op: position {bad[0]} out of range 0..{len(slots) - 1}")
    return [slots[p] for p in layers]


def positive_number(op: Op, key: str, what: str) -> float:
    """``op[key]`` as a finite number > 0 (a scale folded into weights); one-line ``PlanError`` otherwise."""
    value = op.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise PlanError(f"{what}: '{key}' must be a finite number > 0, got {value!r}")
    return float(value)


class DropOp(OpKind):
    name = "drop"
    keys = frozenset({"op", "layers"})

    def validate(self, op: Op, shape: PlanShape, tensors: Tensors) -> PlanShape:
        layers = int_list(op.get("layers"), "drop op 'layers'")
        if not layers:
            raise PlanError("drop op needs at least one layer")
        if len(set(layers)) != len(layers):
            raise PlanError(f"drop op lists a layer twice: {layers}")
        self.check_keys(op, "drop op")
        check_in_base(layers, shape, "drop op")
        check_alive(layers, shape, "drop op")
        return shape.without(layers)

    def apply(self, ctx, op: Op, tensors: Tensors) -> None:
        ctx.remove(op["layers"])

    def describe(self, op: Op) -> str:
        return "drop " + ", ".join(str(i) for i in op["layers"])

    def footprint(self, op: Op) -> dict[str, list]:
        return {"dropped": sorted(op["layers"])}

    def to_base(self, op: Op, slots: Sequence[int]) -> dict[str, Any]:
        return drop_op(positions_to_base(op, slots, "drop"))


def _has_post_norm(model_type: str | None) -> bool | None:
    """Whether a model type's branches reach the residual stream through a norm; None when the type is unknown."""
    family = family_for_type(model_type) if model_type else None
    return None if family is None else any(b.post_norm for b in family.branches)


class MergeOp(OpKind):
    name = "merge"
    keys = frozenset({"op", "layers", "rule", "args", "tensors"})

    @staticmethod
    def _rule(op: Op):
        from ..errors import PassError
        from ..merge import get_merge_rule

        rule = op.get("rule", "official")
        if not isinstance(rule, str):
            raise PlanError(f"merge op 'rule' must be a string, got {rule!r}")
        try:
            return get_merge_rule(rule)
        except PassError as exc:
            raise PlanError(str(exc)) from None

    def validate(self, op: Op, shape: PlanShape, tensors: Tensors) -> PlanShape:
        layers = int_list(op.get("layers"), "merge op 'layers'")
        if len(layers) != 2:
            raise PlanError(f"merge op 'layers' is an inclusive range [start, end], got {layers}")
        low, high = layers
        what = f"merge window [{low}, {high}]"
        if low >= high:
            raise PlanError(f"{what} needs start < end")
        self.check_keys(op, what)
        check_in_base(layers, shape, what)
        window = list(range(low, high + 1))
        check_alive(window, shape, what)
        merged = [i for i in window if i in shape.derived]
        if merged:
            raise PlanError(f"{what}: overlap at base layer {merged[0]} with an earlier op (no longer a base layer)")
        rule = self._rule(op)
        args = op.get("args", {})
        if not isinstance(args, dict):
            raise PlanError(f"{what}: 'args' must be an object, got {args!r}")
        rule.check_args(args, high - low + 1)
        self._check_tensors(op, rule, shape, tensors, what)
        after = shape.without(window[1:])
        return replace(after, derived=after.derived | {low})

    @staticmethod
    def _check_tensors(op: Op, rule, shape: PlanShape, tensors: Tensors, what: str) -> None:
        refs = op.get("tensors")
        if not rule.tensor_roles:
            if refs:
                raise PlanError(f"{what}: merge rule {rule.name!r} takes no tensors")
            return
        roles = list(rule.tensor_roles)
        if rule.gain_roles:
            # a family with post-branch norms (Gemma-2/3) pairs every map with its norm's refitted gain; a plan
            # whose base type is unknown may hold either form
            post_norm = _has_post_norm(shape.model_type)
            if post_norm or (post_norm is None and isinstance(refs, dict) and set(refs) >= set(rule.gain_roles)):
                roles += rule.gain_roles
        if not isinstance(refs, dict) or set(refs) != set(roles):
            raise PlanError(f"{what}: merge rule {rule.name!r} needs tensors {{{', '.join(roles)}}}"
                            + (f" for a {shape.model_type} model" if shape.model_type else "") + f", got {refs!r}")
        for role, name in refs.items():
            if not isinstance(name, str) or name not in tensors:
                raise PlanError(f"{what}: tensor {name!r} ({role}) is not in the plan's tensors")
            t = tensors[name]
            rank = len(rule.tensor_shape(role, 0))
            if t.dim() != rank or t.dtype != torch.float32:
                kind = "1-D float32 vector" if rank == 1 else "2-D float32 matrix"
                raise PlanError(f"{what}: tensor {name!r} ({role}) must be a {kind}, got {t.dtype} {list(t.shape)}")
            if shape.hidden_size is not None and tuple(t.shape) != rule.tensor_shape(role, shape.hidden_size):
                raise PlanError(f"{what}: tensor {name!r} ({role}) has shape {list(t.shape)}, hidden size is "
                                f"{shape.hidden_size}")

    def apply(self, ctx, op: Op, tensors: Tensors) -> None:
        low, high = op["layers"]
        rule = self._rule(op)
        base = ctx.base_layers
        states = window_states([base[i] for i in range(low, high + 1)])
        merged = rule(states, ctx.adapter.tensor_kinds(base[low]), **op.get("args", {}))
        anchor = rule.anchor_index(low, high)
        module = copy.deepcopy(base[anchor])  # the model's own layers stay untouched until the final swap
        load_layer_state(module, merged)
        if rule.finish is not None:
            refs = op.get("tensors") or {}
            rule.finish(ctx.adapter, module, {role: tensors[name] for role, name in refs.items()})
        ctx.replace(low, anchor, module)
        ctx.remove(range(low + 1, high + 1))

    def describe(self, op: Op) -> str:
        low, high = op["layers"]
        return f"merge {low}-{high} (rule {op.get('rule', 'official')})"

    def footprint(self, op: Op) -> dict[str, list]:
        return {"merged": [list(op["layers"])]}

    def to_base(self, op: Op, slots: Sequence[int]) -> dict[str, Any]:
        layers = int_list(op.get("layers"), "merge op 'layers'")
        if len(layers) != 2 or not 0 <= layers[0] < layers[1] < len(slots):
            raise PlanError(f"merge op: window {layers} out of range 0..{len(slots) - 1}")
        p, q = layers
        if slots[q] - slots[p] != q - p:
            raise PlanError(f"merge op: positions {p}-{q} span layers an earlier stage removed; a merge must cover "
                            "consecutive base layers")
        return {**op, "layers": [slots[p], slots[q]]}


class ScaleBranchesOp(OpKind):
    name = "scale_branches"
    keys = frozenset({"op", "layers", "factor"})

    def validate(self, op: Op, shape: PlanShape, tensors: Tensors) -> PlanShape:
        layers = int_list(op.get("layers"), "scale_branches op 'layers'")
        what = "scale_branches op"
        if not layers or len(set(layers)) != len(layers):
            raise PlanError(f"{what} needs at least one layer, each once, got {layers}")
        self.check_keys(op, what)
        check_in_base(layers, shape, what)
        check_alive(layers, shape, what)
        positive_number(op, "factor", what)
        # the scaled layers no longer hold their base weights: a later merge must not read the base's
        return replace(shape, derived=shape.derived | set(layers))

    def apply(self, ctx, op: Op, tensors: Tensors) -> None:
        for layer in op["layers"]:
            # acts on the layer as earlier ops left it
            ctx.adapter.scale_branches(ctx.writable(layer), float(op["factor"]))

    def describe(self, op: Op) -> str:
        return f"scale_branches {', '.join(str(i) for i in op['layers'])} x{op['factor']:.6g}"

    def to_base(self, op: Op, slots: Sequence[int]) -> dict[str, Any]:
        return {**op, "layers": positions_to_base(op, slots, "scale_branches")}


BUILTIN_KINDS: tuple[OpKind, ...] = (DropOp(), MergeOp(), ScaleBranchesOp())


def op_kinds() -> dict[str, OpKind]:
    """Every registered op kind by name (built-ins and plugins)."""
    from ..plugins import collect

    return collect("register_op_kinds", OpKind, "op kind", PlanError)


def kind_of(op: Any, where: str = "plan op") -> OpKind:
    """The kind of ``op``; ``PlanError`` for a malformed op or an unknown kind."""
    if not isinstance(op, dict) or not isinstance(op.get("op"), str):
        raise PlanError(f"{where} must be an object with a string 'op'")
    kinds = op_kinds()
    kind = kinds.get(op["op"])
    if kind is None:
        raise PlanError(f"{where}: unknown op {op['op']!r}; known: {', '.join(sorted(kinds))}")
    return kind


def merge_op(start: int, end: int, rule: str = "official", **extra: Any) -> dict[str, Any]:
    """A merge op over the inclusive base-layer range [start, end]."""
    return {"op": "merge", "layers": [int(start), int(end)], "rule": rule, **extra}


def drop_op(layers: Iterable[int]) -> dict[str, Any]:
    """A drop op removing the given base layers."""
    return {"op": "drop", "layers": sorted(int(i) for i in layers)}


def scale_branches_op(layers: Iterable[int], factor: float) -> dict[str, Any]:
    """A scale_branches op: every residual branch output of the given base layers multiplied by ``factor``."""
    return {"op": "scale_branches", "layers": sorted(int(i) for i in layers), "factor": float(factor)}
