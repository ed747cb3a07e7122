"""The ``rescale`` op kind: multiply the residual stream below a point by a number, folded into the weights.

``{"op": "rescale", "layers": [i, ...], "scale": s}`` multiplies by ``s`` the token embedding and the output of every
residual branch of the listed layers (base numbering, alive; the ``o_proj``/``down_proj`` rows and biases, or the
gains of Gemma-2/3's post-branch norms: ``ArchAdapter.scale_branches``). When the list is every alive layer below
some layer ``c``, the residual stream entering ``c`` becomes ``s`` times what it was: each of its terms (the embedding
and the branch outputs below ``c``) is scaled, and the branches themselves see the same normalised inputs (their input
norms are scale-invariant, up to the norms' ε). That is Prune&Comp's magnitude compensation, with no run-time cost.

Embedding tensors are multiplied in op order (each product cast back to the weight's dtype, like the official
in-place ``*=``); an output head tied to the embedding keeps its logits: the final norm's gain is divided by ``s``
(see ``ArchAdapter.scaled_stream_input``). A rescaled layer no longer holds its base weights, so a later ``merge``
refuses it (merges read the base's tensors).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable, Sequence

from ..errors import PlanError
from .ops import (OpKind, Op, PlanShape, Tensors, check_alive, check_in_base, int_list, positions_to_base,
                  positive_number)


def _spans(layers: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` as ``0-2, 5``."""
    out, start = [], None
    for k, i in enumerate(layers):
        if start is None:
            start = i
        if k + 1 == len(layers) or layers[k + 1] != i + 1:
            out.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ", ".join(out)


class RescaleOp(OpKind):
    name = "rescale"
    keys = frozenset({"op", "layers", "scale"})

    def validate(self, op: Op, shape: PlanShape, tensors: Tensors) -> PlanShape:
        what = "rescale op"
        self.check_keys(op, what)
        layers = int_list(op.get("layers"), f"{what} 'layers'")
        if layers != sorted(set(layers)):
            raise PlanError(f"{what}: 'layers' must be increasing base layer indices, each once, got {layers}")
        positive_number(op, "scale", what)
        check_in_base(layers, shape, what)
        check_alive(layers, shape, what)
        return replace(shape, derived=shape.derived | set(layers))

    def apply(self, ctx, op: Op, tensors: Tensors) -> None:
        scale = float(op["scale"])
        for i in op["layers"]:
            ctx.adapter.scale_branches(ctx.writable(i), scale)
        ctx.embedding_scales.append(scale)

    def describe(self, op: Op) -> str:
        layers = op["layers"]
        below = f" + layers {_spans(layers)}" if layers else ""
        return f"rescale x{op['scale']:.6g} (embedding{below})"

    def to_base(self, op: Op, slots: Sequence[int]) -> dict[str, Any]:
        return rescale_op(positions_to_base(op, slots, "rescale"), op.get("scale"))


def rescale_op(layers: Iterable[int], scale: float) -> dict[str, Any]:
    """A ``rescale`` op: the embedding and the branch outputs of ``layers`` (base numbering) times ``scale``."""
    return {"op": "rescale", "layers": sorted(int(i) for i in layers), "scale": float(scale)}
