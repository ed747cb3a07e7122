"""Width op kinds: narrow a layer's MLP (kept intermediate channels) or its attention (kept KV groups, optionally
the same number of query heads inside each group), in base layer numbering, on any alive layer — one an earlier
stage merged included.

* ``narrow_mlp`` ``{"layer": i, "keep": <int64 tensor name>, "bias": <float32 [hidden] tensor name>?}``: keep the
  listed channels (indices into the base's ``intermediate_size``); ``bias`` is FLAP's compensation, written into
  ``down_proj``'s bias (the family's ``mlp_bias`` switch must exist);
* ``narrow_attn`` ``{"layer": i, "groups": [g, ...], "heads": [[j, ...], ...]?, "bias": <tensor name>?}``: keep whole
  KV groups (so GQA stays valid), and optionally the same number of query heads ``j`` (0..n_rep-1) in each kept
  group; ``bias`` goes into ``o_proj``'s bias (the ``attention_bias`` switch).

A layer is narrowed at most once per module. When every alive layer ends with the same widths the config says so
(``intermediate_size``, head counts) and vanilla ``from_pretrained`` loads the result; per-layer widths are recorded
in the config as ``slm_layer_widths``, which ``optimum_slm.load_model`` reads to rebuild the model. A width of zero
(``intermediate_size`` 0, ``num_key_value_heads`` 0) is a removed MLP / attention (``sublayer_ops``): such a branch
cannot be narrowed, and it makes the widths per-layer.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Sequence

import torch

from ..arch.families import family_for_type
from ..errors import PlanError
from .ops import OpKind, PlanShape, Tensors, check_in_base, int_list


def _layer(op: Mapping[str, Any], shape: PlanShape, what: str) -> int:
    layer = op.get("layer")
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise PlanError(f"{what}: 'layer' must be an integer, got {layer!r}")
    check_in_base([layer], shape, what)
    if layer not in shape.layers:
        raise PlanError(f"{what}: base layer {layer} was removed by an earlier op")
    return layer


def _base_width(shape: PlanShape, key: str, what: str) -> int:
    value = (shape.base_widths or {}).get(key)
    if not isinstance(value, int):
        raise PlanError(f"{what}: the plan's base records no {key} (a plan written before width ops existed)")
    return value


def _bias(op: Mapping[str, Any], shape: PlanShape, tensors: Tensors, flag: str, what: str) -> dict[str, int]:
    """Check the op's compensation bias, if any; the width flag it sets (``{"mlp_bias": 1}``) or nothing."""
    name = op.get("bias")
    if name is None:
        return {}
    if not isinstance(name, str) or name not in tensors:
        raise PlanError(f"{what}: bias tensor {name!r} is not in the plan's tensors")
    t = tensors[name]
    if t.dim() != 1 or t.dtype != torch.float32 or (shape.hidden_size and t.numel() != shape.hidden_size):
        raise PlanError(f"{what}: bias tensor {name!r} must be float32 [hidden size], got {t.dtype} {list(t.shape)}")
    family = family_for_type(shape.model_type)
    if family is None or getattr(family, flag) is None:
        raise PlanError(f"{what}: {shape.model_type} has no config switch for this bias (bias compensation needs "
                        f"{'mlp_bias' if 'mlp' in flag else 'attention_bias'})")
    return {flag.removesuffix("_flag"): 1}


#: the width that is zero when a layer's attention / MLP was removed (``sublayer_ops``)
REMOVED_KEY = {"attn": "num_key_value_heads", "mlp": "intermediate_size"}


def branch_removed(widths: Mapping[str, int], branch: str) -> bool:
    """Whether a layer's recorded widths say its ``branch`` (``attn`` / ``mlp``) was removed (a width of zero)."""
    return widths.get(REMOVED_KEY[branch]) == 0


def _narrowed(shape: PlanShape, layer: int, update: dict[str, int], what: str) -> PlanShape:
    widths = {k: dict(v) for k, v in shape.widths.items()}
    current = widths.setdefault(layer, {})
    for branch, label in (("attn", "attention"), ("mlp", "MLP")):
        if REMOVED_KEY[branch] in update and branch_removed(current, branch):
            raise PlanError(f"{what}: layer {layer}'s {label} was removed by an earlier op; there is nothing to "
                            "narrow")
    twice = sorted(set(update) & set(current) - {"mlp_bias", "attention_bias"})
    if twice:
        raise PlanError(f"{what}: layer {layer}'s {twice[0]} was already narrowed by an earlier op")
    current.update(update)
    return replace(shape, widths=widths, derived=shape.derived | {layer})


class NarrowMLP(OpKind):
    name = "narrow_mlp"
    tensor_keys = ("keep", "bias")
    keys = frozenset({"op", "layer", "keep", "bias"})

    def validate(self, op, shape, tensors):
        what = f"narrow_mlp op (layer {op.get('layer')})"
        self.check_keys(op, what)
        layer = _layer(op, shape, what)
        size = _base_width(shape, "intermediate_size", what)
        name = op.get("keep")
        if not isinstance(name, str) or name not in tensors:
            raise PlanError(f"{what}: 'keep' must name an int64 tensor of the plan, got {name!r}")
        keep = tensors[name]
        if keep.dim() != 1 or keep.dtype != torch.int64 or keep.numel() < 1:
            raise PlanError(f"{what}: tensor {name!r} must be a non-empty int64 vector of channel indices")
        if keep.numel() > 1 and not bool((keep[1:] > keep[:-1]).all()):
            raise PlanError(f"{what}: tensor {name!r} must list channels in increasing order, each once")
        if int(keep[0]) < 0 or int(keep[-1]) >= size:
            raise PlanError(f"{what}: channel indices must be in 0..{size - 1}")
        update = {"intermediate_size": int(keep.numel()), **_bias(op, shape, tensors, "mlp_bias_flag", what)}
        return _narrowed(shape, layer, update, what)

    def apply(self, ctx, op, tensors):
        module = ctx.writable(op["layer"])
        bias = tensors[op["bias"]] if op.get("bias") else None
        ctx.adapter.narrow_mlp(module, tensors[op["keep"]], down_bias=bias)

    def describe(self, op):
        return f"narrow_mlp {op['layer']}" + (" (+bias)" if op.get("bias") else "")

    def to_base(self, op, slots: Sequence[int]):
        return {**op, "layer": _position(op, slots, "narrow_mlp")}


class NarrowAttention(OpKind):
    name = "narrow_attn"
    tensor_keys = ("bias",)
    keys = frozenset({"op", "layer", "groups", "heads", "bias"})

    def validate(self, op, shape, tensors):
        what = f"narrow_attn op (layer {op.get('layer')})"
        self.check_keys(op, what)
        layer = _layer(op, shape, what)
        kv = _base_width(shape, "num_key_value_heads", what)
        rep = _base_width(shape, "num_attention_heads", what) // kv
        groups = int_list(op.get("groups"), f"{what} 'groups'")
        if not groups or groups != sorted(set(groups)) or groups[0] < 0 or groups[-1] >= kv:
            raise PlanError(f"{what}: 'groups' must be increasing KV-group indices in 0..{kv - 1}, at least one")
        heads = op.get("heads")
        per_group = rep
        if heads is not None:
            if not isinstance(heads, list) or len(heads) != len(groups):
                raise PlanError(f"{what}: 'heads' must list the kept query heads of each kept group")
            lists = [int_list(h, f"{what} 'heads'") for h in heads]
            per_group = len(lists[0])
            for h in lists:
                if len(h) != per_group or not h or h != sorted(set(h)) or h[0] < 0 or h[-1] >= rep:
                    raise PlanError(f"{what}: every kept group keeps the same number (>= 1) of increasing query "
                                    f"heads in 0..{rep - 1}")
        update = {"num_key_value_heads": len(groups), "num_attention_heads": len(groups) * per_group,
                  **_bias(op, shape, tensors, "attention_bias_flag", what)}
        return _narrowed(shape, layer, update, what)

    def apply(self, ctx, op, tensors):
        module = ctx.writable(op["layer"])
        bias = tensors[op["bias"]] if op.get("bias") else None
        ctx.adapter.narrow_attention(module, list(op["groups"]), op.get("heads"), o_bias=bias)

    def describe(self, op):
        heads = f", {len(op['heads'][0])} heads each" if op.get("heads") else ""
        return f"narrow_attn {op['layer']} (groups {','.join(map(str, op['groups']))}{heads})" + \
            (" (+bias)" if op.get("bias") else "")

    def to_base(self, op, slots: Sequence[int]):
        return {**op, "layer": _position(op, slots, "narrow_attn")}


def _position(op: Mapping[str, Any], slots: Sequence[int], name: str) -> int:
    layer = op.get("layer")
    if not isinstance(layer, int) or not 0 <= layer < len(slots):
        raise PlanError(f"{name} op: position {layer!r} out of range 0..{len(slots) - 1}")
    return slots[layer]


def layer_widths(shape: PlanShape) -> tuple[dict[str, int] | None, list[dict[str, int]]]:
    """(the widths every alive layer shares, or None when they differ; each alive layer's narrowed widths)."""
    per_layer = [dict(shape.widths.get(layer, {})) for layer in shape.layers]
    uniform = per_layer[0] if all(w == per_layer[0] for w in per_layer) else None
    if uniform and any(branch_removed(uniform, b) for b in REMOVED_KEY):
        uniform = None  # a removed branch is never a config-wide width (a head count of 0 builds no model)
    return uniform, per_layer


def check_biases(shape: PlanShape) -> None:
    """A compensation bias switches the config's bias flag on for every layer, so it must be in every layer."""
    _, per_layer = layer_widths(shape)
    for flag, branch in (("mlp_bias", "mlp"), ("attention_bias", "attn")):
        # a layer whose branch was removed has no projection to hold the bias: it agrees with either setting
        marked = [bool(w.get(flag)) or branch_removed(w, branch) for w in per_layer]
        if any(w.get(flag) for w in per_layer) and not all(marked):
            layer = shape.layers[marked.index(False)]
            raise PlanError(f"layer {layer} has no {flag.replace('_', ' ')} while other layers do: bias compensation "
                            "must narrow every layer (the config switch is one for all layers)")
