"""Sub-layer op kinds: remove one residual branch of a decoder layer — its attention or its MLP — and keep the other.

* ``drop_attn`` ``{"layer": i, "tensors": {"map": name, "gain": name?}?}``: layer i keeps its MLP only and
  computes ``h + mlp(norm(h))``;
* ``drop_mlp`` ``{"layer": i, "tensors": {"attn_map": name, "attn_gain": name?}?}``: layer i keeps its attention
  only and computes ``h + attn(norm(h))``.

A removed branch is a per-layer width of zero in the width ops' mechanism (``width_ops``): ``num_key_value_heads``
and ``num_attention_heads`` 0 for an attention, ``intermediate_size`` 0 for an MLP, recorded in the config's
``slm_layer_widths`` and rebuilt by ``ArchAdapter.rebuild_layer_widths`` (``optimum_slm.load_model``, ``slm apply``,
``lm_eval --model slm``); the module that stands in for it (``arch/sublayers.py``) has no parameters, so nothing of
it is saved.

``tensors`` (optional) bridge the removal: a fitted d×d map on the KEPT branch's output (roles as the ``lstsq-attn``
merge names them: ``map`` on the MLP, ``attn_map`` on the attention), folded into its output projection
(``down_proj`` / ``o_proj``), and, in a family with post-branch norms (Gemma-2/3), the refitted gain of that
branch's norm (``gain`` / ``attn_gain``). See ``ArchAdapter.fold_output_map``.

A layer keeps at least one branch: removing the second is refused (a ``drop`` op removes the whole layer). A layer
that lost a branch no longer holds its base weights: a later merge must not read them, and a width op must not
narrow the removed branch.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar, Mapping, Sequence

import torch

from ..errors import PlanError
from ..merge.rules import BRANCH_ROLES, GAIN_ROLES
from .ops import OpKind, PlanShape, Tensors, _has_post_norm
from .width_ops import _layer, _position, branch_removed

#: the per-layer widths that record a removed branch (the same mechanism as narrowed widths)
ZERO_WIDTHS = {"attn": {"num_attention_heads": 0, "num_key_value_heads": 0}, "mlp": {"intermediate_size": 0}}
#: the width keys and bias flag of each branch, dropped from a layer's widths when the branch goes
BRANCH_WIDTH_KEYS = {"attn": ("num_attention_heads", "num_key_value_heads", "attention_bias"),
                     "mlp": ("intermediate_size", "mlp_bias")}
LABELS = {"attn": "attention", "mlp": "MLP"}
OTHER = {"attn": "mlp", "mlp": "attn"}


class DropBranchOp(OpKind):
    """Remove one residual branch (``branch``) of a layer; an optional fitted map goes on the other one."""

    branch: ClassVar[str] = ""
    keys = frozenset({"op", "layer", "tensors"})

    def roles(self, shape: PlanShape, refs: Any) -> list[str]:
        """The tensor roles a bridge of this op needs on ``shape``'s model type."""
        kept = OTHER[self.branch]
        roles = [BRANCH_ROLES[kept]]
        post_norm = _has_post_norm(shape.model_type)
        # a plan whose base type is unknown may hold either form (as merge ops allow)
        if post_norm or (post_norm is None and isinstance(refs, dict) and GAIN_ROLES[kept] in refs):
            roles.append(GAIN_ROLES[kept])
        return roles

    def validate(self, op, shape: PlanShape, tensors: Tensors) -> PlanShape:
        what = f"{self.name} op (layer {op.get('layer')})"
        self.check_keys(op, what)
        layer = _layer(op, shape, what)
        widths = dict(shape.widths.get(layer, {}))
        if branch_removed(widths, self.branch):
            raise PlanError(f"{what}: layer {layer}'s {LABELS[self.branch]} was already removed by an earlier op")
        if branch_removed(widths, OTHER[self.branch]):
            raise PlanError(f"{what}: layer {layer} would keep neither attention nor MLP; remove the whole layer "
                            f"with a drop op instead")
        self._check_tensors(op, shape, tensors, what)
        for key in BRANCH_WIDTH_KEYS[self.branch]:  # a narrowed branch may still be removed whole
            widths.pop(key, None)
        widths.update(ZERO_WIDTHS[self.branch])
        return replace(shape, widths={**shape.widths, layer: widths}, derived=shape.derived | {layer})

    def _check_tensors(self, op, shape: PlanShape, tensors: Tensors, what: str) -> None:
        refs = op.get("tensors")
        if refs is None:
            return
        roles = self.roles(shape, refs)
        if not isinstance(refs, dict) or set(refs) != set(roles):
            raise PlanError(f"{what}: 'tensors' must be {{{', '.join(roles)}}}"
                            + (f" for a {shape.model_type} model" if shape.model_type else "") + f", got {refs!r}")
        for role, name in refs.items():
            if not isinstance(name, str) or name not in tensors:
                raise PlanError(f"{what}: tensor {name!r} ({role}) is not in the plan's tensors")
            t = tensors[name]
            rank = 2 if role == BRANCH_ROLES[OTHER[self.branch]] else 1
            if t.dim() != rank or t.dtype != torch.float32:
                kind = "2-D float32 matrix" if rank == 2 else "1-D float32 vector"
                raise PlanError(f"{what}: tensor {name!r} ({role}) must be a {kind}, got {t.dtype} {list(t.shape)}")
            if shape.hidden_size is not None and any(n != shape.hidden_size for n in t.shape):
                raise PlanError(f"{what}: tensor {name!r} ({role}) has shape {list(t.shape)}, hidden size is "
                                f"{shape.hidden_size}")

    def apply(self, ctx, op, tensors: Tensors) -> None:
        module = ctx.writable(op["layer"])
        ctx.adapter.remove_sublayer(module, self.branch)
        refs = op.get("tensors")
        if refs:
            kept = OTHER[self.branch]
            gain = refs.get(GAIN_ROLES[kept])
            ctx.adapter.fold_output_map(module, tensors[refs[BRANCH_ROLES[kept]]], kept,
                                        tensors[gain] if gain else None)

    def describe(self, op) -> str:
        bridge = f" (map on the {LABELS[OTHER[self.branch]]} output)" if op.get("tensors") else ""
        return f"{self.name} {op['layer']}{bridge}"

    def footprint(self, op) -> dict[str, list]:
        return {f"{self.branch}_dropped": [op["layer"]]}

    def to_base(self, op, slots: Sequence[int]) -> dict[str, Any]:
        return {**op, "layer": _position(op, slots, self.name)}


class DropAttention(DropBranchOp):
    name = "drop_attn"
    branch = "attn"


class DropMLP(DropBranchOp):
    name = "drop_mlp"
    branch = "mlp"


def drop_branch_op(branch: str, layer: int, tensors: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A ``drop_attn`` / ``drop_mlp`` op on base layer ``layer``; ``tensors``: the bridge's role → tensor name."""
    op: dict[str, Any] = {"op": f"drop_{branch}", "layer": int(layer)}
    if tensors:
        op["tensors"] = dict(tensors)
    return op
