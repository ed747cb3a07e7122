"""The ``set_weights`` op kind: replace the parameters of one decoder layer with side-car tensors.

``{"op": "set_weights", "layer": i, "tensors": {"<parameter name>": "<tensor name>", ...}}``: base layer i (alive; it
may be the layer a ``merge`` op built) gets the listed parameters — names as ``named_parameters()`` gives them
inside the layer, e.g. ``self_attn.q_proj.weight`` — from the plan's tensors. Every listed name must be a parameter
of the layer with the tensor's exact shape; a layer whose widths an earlier op changed gets tensors of its new
widths. A refined merge (``slm-plus refine_epochs=N``, ``merge/refine.py``) writes one after its ``merge`` op: the
merged layer's weights after gradient block reconstruction, which no closed form rebuilds from the base.

The layer no longer holds its base weights, so a later merge refuses it; its widths are unchanged.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Sequence

import torch

from ..errors import PlanError
from .ops import OpKind, PlanShape, Tensors
from .width_ops import _layer, _position


class SetWeightsOp(OpKind):
    name = "set_weights"
    keys = frozenset({"op", "layer", "tensors"})

    def validate(self, op, shape: PlanShape, tensors: Tensors) -> PlanShape:
        what = f"set_weights op (layer {op.get('layer')})"
        self.check_keys(op, what)
        layer = _layer(op, shape, what)
        refs = op.get("tensors")
        if not isinstance(refs, dict) or not refs:
            raise PlanError(f"{what}: 'tensors' must be a non-empty object parameter name -> tensor name, got "
                            f"{refs!r}")
        for param, name in refs.items():
            if not isinstance(name, str) or name not in tensors:
                raise PlanError(f"{what}: tensor {name!r} ({param}) is not in the plan's tensors")
            if tensors[name].dtype != torch.float32:
                raise PlanError(f"{what}: tensor {name!r} ({param}) must be float32, got {tensors[name].dtype}")
        return replace(shape, derived=shape.derived | {layer})

    def apply(self, ctx, op, tensors: Tensors) -> None:
        layer = op["layer"]
        module = ctx.writable(layer)
        params = dict(module.named_parameters())
        for param, name in op["tensors"].items():
            target, value = params.get(param), tensors[name]
            if target is None:
                raise PlanError(f"set_weights op (layer {layer}): the layer has no parameter {param!r}")
            if tuple(target.shape) != tuple(value.shape):
                raise PlanError(f"set_weights op (layer {layer}): {param} is {list(target.shape)} in the model, the "
                                f"plan's tensor {name!r} is {list(value.shape)}")
            with torch.no_grad():
                target.copy_(value.to(target.dtype))

    def describe(self, op) -> str:
        return f"set_weights {op['layer']} ({len(op['tensors'])} tensors)"

    def footprint(self, op) -> dict[str, list]:
        return {"refined": [op["layer"]]}

    def to_base(self, op, slots: Sequence[int]) -> dict[str, Any]:
        return {**op, "layer": _position(op, slots, self.name)}


def set_weights_op(layer: int, tensors: Mapping[str, str]) -> dict[str, Any]:
    """A ``set_weights`` op on base layer ``layer``; ``tensors``: parameter name -> the plan's tensor name."""
    return {"op": "set_weights", "layer": int(layer), "tensors": dict(tensors)}
