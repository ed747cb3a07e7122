"""Merge rules: pure functions that collapse a window of decoder layers into one layer's tensors.

A rule takes the window's layer states bottom to top (``states[0]`` is layer ``low``, ``states[-1]`` layer ``high``)
and the kind of every tensor (``projection``, ``norm``, ``bias``, see ``arch.ArchAdapter.tensor_kinds``), and returns
one state. ``anchor`` says which layer's slot (and therefore per-layer config such as the attention type) the merged
layer takes.

Formulas (θ_i = a layer's tensors, window l..h):

* ``official``  projections: the running update of the official SLM.py, c ← c + w·(θ_i − c) for i = l..h with
  w = 1, i.e. θ_h (the top layer's projections, bit-for-bit as the official code computes them); norms and biases:
  θ_l (the bottom layer's). Anchor: bottom.
* ``paper``     projections: θ_l + Σ_{i=l+1..h} (θ_i − θ_l) (the paper's figure, LaCo's RDSC); norms, biases: θ_l.
* ``mean``      every tensor: (1/(h−l+1)) Σ_{i=l..h} θ_i.
* ``keep-bottom`` every tensor: θ_l (plain deletion of layers l+1..h).
* ``keep-top``  every tensor: θ_h, in θ_h's slot (plain deletion of layers l..h−1).
* ``linear``    projections: Σ_{i=l..h} c_i·θ_i with the op's ``args.coefficients`` [c_l, …, c_h]; norms and biases:
  θ_l. It expresses chained merges exactly, e.g. LaCo's RDSC applied again to an already merged layer
  (``paper`` applied twice is not ``paper`` on the union window). Anchor: bottom.

* ``lstsq``     ``keep-bottom``, then one least-squares d×d map T on the kept layer's MLP output, fitted on the fit
  set after the search so the layer's output matches the base's at the window's top (ReplaceMe's fold; see
  lstsq.py); ``keep-top-lstsq``: the same on ``keep-top``; ``calibrated-lstsq``: ``calibrated``, then the map. The
  map is the op's side-car tensor ``map`` ([hidden, hidden]); ``finish`` folds it into ``down_proj``.
* ``calibrated`` every tensor: θ_h, in θ_h's slot (``keep-top``), then per-channel output scales of each residual
  branch folded into the weights (see calibrated.py). The scales are fitted at plan time (``fit``) and stored as the
  op's side-car tensors ``attn`` and ``mlp`` (one value per hidden channel); ``finish`` folds them at apply time.

Rules that need arguments read them from the merge op's ``args`` object (``merge_op(l, h, rule, args={...})``); rules
with fitted tensors name them in ``tensor_roles`` and the op references them in its ``tensors`` object. Built-in rules
are registered through the ``register_merge_rules`` plugin hook like any third-party rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from ..arch import NORM, PROJECTION
from ..errors import PassError, PlanError

State = Mapping[str, torch.Tensor]
#: the role of a fitted d×d map among a rule's side-car tensors: on the MLP output, and on the attention output
MAP_ROLE = "map"
ATTN_MAP_ROLE = "attn_map"
#: residual branch -> the role of its map
BRANCH_ROLES = {"attn": ATTN_MAP_ROLE, "mlp": MAP_ROLE}
#: residual branch -> the role of the refitted gain of its post-branch norm, which accompanies its map in families
#: with such a norm (Gemma-2/3: the map is folded before the norm, see ``ArchAdapter.fold_output_map``)
GAIN_ROLES = {"attn": "attn_gain", "mlp": "gain"}
Kinds = Mapping[str, str]


@dataclass(frozen=True)
class MergeRule:
    """A named merge rule: ``fn(states, kinds) -> state`` and the slot its result takes."""

    name: str
    fn: Callable[..., dict[str, torch.Tensor]]
    anchor: str  # "bottom" or "top"
    description: str
    #: optional ``check(args, window_size)`` raising ``PlanError`` for bad op arguments (rules with arguments)
    check: Callable[[Mapping, int], None] | None = None
    #: names of the side-car tensors an op of this rule references (fitted rules), each a [hidden] vector
    tensor_roles: tuple[str, ...] = ()
    #: ``finish(adapter, module, tensors)``: applied to the merged layer at apply time (fitted rules)
    finish: Callable[..., None] | None = None
    #: ``fit(engine, module, type_index, low, high) -> tensors``: fits and folds the tensors at plan time
    fit: Callable[..., dict[str, torch.Tensor]] | None = None
    #: True: after the search, the pass fits a least-squares d×d map on the fit set for each committed window and
    #: folds it into the merged layer's ``down_proj`` (role ``map``, a [hidden, hidden] tensor; see lstsq.py)
    fit_map: bool = False

    @property
    def map_branches(self) -> tuple[str, ...]:
        """The residual branches this rule fits a d×d map on, in fitting order (attention before MLP)."""
        return tuple(b for b, role in BRANCH_ROLES.items() if role in self.tensor_roles) if self.fit_map else ()

    @property
    def gain_roles(self) -> tuple[str, ...]:
        """The roles of the norm gains that accompany the maps in families with a post-branch norm."""
        return tuple(GAIN_ROLES[b] for b in self.map_branches)

    def tensor_shape(self, role: str, hidden: int) -> tuple[int, ...]:
        """The shape of a side-car tensor of this rule: the map is [hidden, hidden], every other role [hidden]."""
        return (hidden, hidden) if self.fit_map and role in (MAP_ROLE, ATTN_MAP_ROLE) else (hidden,)

    def __call__(self, states: Sequence[State], kinds: Kinds, **args) -> dict[str, torch.Tensor]:
        if len(states) < 2:
            raise ValueError("a merge window needs at least two layers")
        self.check_args(args, len(states))
        return self.fn(states, kinds, **args)

    def check_args(self, args: Mapping, window_size: int) -> None:
        """Validate a merge op's ``args`` for this rule (rules without a ``check`` take none)."""
        if self.check is not None:
            self.check(args, window_size)
        elif args:
            raise PlanError(f"merge rule {self.name!r} takes no args, got {sorted(args)}")

    def anchor_index(self, low: int, high: int) -> int:
        return high if self.anchor == "top" else low


def merge_official(states: Sequence[State], kinds: Kinds, weight_factor: float = 1.0) -> dict[str, torch.Tensor]:
    """The official SLM.py ``merge_layers_return_model``: an in-place running update of the projections only."""
    out: dict[str, torch.Tensor] = {}
    for name, kind in kinds.items():
        if kind == PROJECTION:
            c = states[0][name].clone()
            for s in states:  # the official loop starts at i = low, a no-op step, kept for exactness
                c = c + (s[name] - c) * weight_factor
            out[name] = c
        else:
            out[name] = states[0][name].clone()
    return out


def merge_paper(states: Sequence[State], kinds: Kinds) -> dict[str, torch.Tensor]:
    """θ_l + Σ_{i>l}(θ_i − θ_l) on projections; norms and biases of the bottom layer."""
    out: dict[str, torch.Tensor] = {}
    for name, kind in kinds.items():
        base = states[0][name]
        if kind == PROJECTION:
            acc = base.clone()
            for s in states[1:]:
                acc = acc + (s[name] - base)
            out[name] = acc
        else:
            out[name] = base.clone()
    return out


def _check_linear(args: Mapping, window_size: int) -> None:
    coefficients = args.get("coefficients")
    if set(args) != {"coefficients"} or not isinstance(coefficients, (list, tuple)):
        raise PlanError("merge rule 'linear' needs args {'coefficients': [one number per window layer]}")
    if len(coefficients) != window_size or not all(
        isinstance(c, (int, float)) and not isinstance(c, bool) for c in coefficients
    ):
        raise PlanError(f"merge rule 'linear': {window_size}-layer window needs {window_size} numeric coefficients")
    if not all(math.isfinite(c) for c in coefficients):
        raise PlanError(f"merge rule 'linear': coefficients must be finite numbers, got {list(coefficients)}")


def merge_linear(states: Sequence[State], kinds: Kinds, coefficients: Sequence[float]) -> dict[str, torch.Tensor]:
    """Σ_i c_i·θ_i on projections (accumulated in float64, cast back); norms and biases of the bottom layer."""
    out: dict[str, torch.Tensor] = {}
    for name, kind in kinds.items():
        base = states[0][name]
        if kind == PROJECTION:
            acc = torch.zeros(base.shape, dtype=torch.float64, device=base.device)
            for c, s in zip(coefficients, states):
                if c:
                    acc += float(c) * s[name].double()
            out[name] = acc.to(base.dtype)
        else:
            out[name] = base.clone()
    return out


def merge_mean(states: Sequence[State], kinds: Kinds) -> dict[str, torch.Tensor]:
    """Element-wise mean of every tensor over the window (computed in float32, cast back)."""
    out: dict[str, torch.Tensor] = {}
    for name in kinds:
        stack = torch.stack([s[name].float() for s in states])
        out[name] = stack.mean(0).to(states[0][name].dtype)
    return out


def merge_keep_bottom(states: Sequence[State], kinds: Kinds) -> dict[str, torch.Tensor]:
    """The bottom layer unchanged."""
    return {name: states[0][name].clone() for name in kinds}


def merge_keep_top(states: Sequence[State], kinds: Kinds) -> dict[str, torch.Tensor]:
    """The top layer unchanged (its norms too)."""
    return {name: states[-1][name].clone() for name in kinds}


def _fold_scales(adapter, module, tensors: Mapping[str, torch.Tensor]) -> None:
    adapter.fold_branch_scales(module, tensors)


def _fold_map(adapter, module, tensors: Mapping[str, torch.Tensor]) -> None:
    # plan-time order: the attention map (when the rule has one) was fitted first, the MLP map on top of it; a
    # family with post-branch norms has each map's refitted norm gain beside it
    for branch in ("attn", "mlp"):
        if BRANCH_ROLES[branch] in tensors:
            adapter.fold_output_map(module, tensors[BRANCH_ROLES[branch]], branch, tensors.get(GAIN_ROLES[branch]))


def _fold_scales_then_map(adapter, module, tensors: Mapping[str, torch.Tensor]) -> None:
    # the order of plan time: the scales were fitted first and the map fitted on the scaled layer
    adapter.fold_branch_scales(module, tensors)
    _fold_map(adapter, module, tensors)


def _fit_scales(engine, module, type_index: int, low: int, high: int) -> dict[str, torch.Tensor]:
    from .calibrated import calibrate_window

    return calibrate_window(engine, module, type_index, low, high)


#: the built-in rules (``merge_rules()`` adds those of plugins)
MERGE_RULES: dict[str, MergeRule] = {
    r.name: r
    for r in (
        MergeRule("official", merge_official, "bottom", "official SLM.py: top layer's projections, bottom layer's norms"),
        MergeRule("paper", merge_paper, "bottom", "paper formula θ_l + Σ(θ_i − θ_l) on projections"),
        MergeRule("mean", merge_mean, "bottom", "mean of all window tensors"),
        MergeRule("keep-bottom", merge_keep_bottom, "bottom", "bottom layer unchanged (delete the rest)"),
        MergeRule("keep-top", merge_keep_top, "top", "top layer unchanged, norms included (delete the rest)"),
        MergeRule(
            "linear", merge_linear, "bottom", "Σ c_i θ_i on projections (op args.coefficients)", check=_check_linear
        ),
        MergeRule(
            "calibrated", merge_keep_top, "top",
            "top layer with per-channel branch output scales fitted by least squares (side-car tensors)",
            tensor_roles=("attn", "mlp"), finish=_fold_scales, fit=_fit_scales,
        ),
        MergeRule(
            "lstsq", merge_keep_bottom, "bottom",
            "bottom layer kept, the rest deleted; a least-squares map on its MLP output stands in for them (ReplaceMe)",
            tensor_roles=(MAP_ROLE,), finish=_fold_map, fit_map=True,
        ),
        MergeRule(
            "lstsq-attn", merge_keep_bottom, "bottom",
            "lstsq with a second least-squares map on the kept layer's attention output (fitted first)",
            tensor_roles=(ATTN_MAP_ROLE, MAP_ROLE), finish=_fold_map, fit_map=True,
        ),
        MergeRule(
            "keep-top-lstsq", merge_keep_top, "top",
            "top layer kept, the rest deleted; a least-squares map on its MLP output",
            tensor_roles=(MAP_ROLE,), finish=_fold_map, fit_map=True,
        ),
        MergeRule(
            "calibrated-lstsq", merge_keep_top, "top",
            "calibrated (top layer, fitted branch scales), then a least-squares map on its MLP output",
            tensor_roles=("attn", "mlp", MAP_ROLE), finish=_fold_scales_then_map, fit=_fit_scales, fit_map=True,
        ),
    )
}

def merge_rules() -> dict[str, MergeRule]:
    """Every registered merge rule by name: the built-ins and those of plugins (``register_merge_rules`` hook)."""
    from ..plugins import collect

    return collect("register_merge_rules", MergeRule, "merge rule", PassError)


def get_merge_rule(name: str) -> MergeRule:
    from ..plugins import lookup

    return lookup("register_merge_rules", MergeRule, "merge rule", name, PassError)


__all__ = [
    "MergeRule",
    "MERGE_RULES",
    "BRANCH_ROLES",
    "GAIN_ROLES",
    "merge_rules",
    "get_merge_rule",
    "merge_official",
    "merge_paper",
    "merge_mean",
    "merge_keep_bottom",
    "merge_keep_top",
    "merge_linear",
    "NORM",
]
