"""Fitted maps: one least-squares d×d map, folded into a kept layer's ``down_proj``, stands in for removed layers.

ReplaceMe (arXiv 2505.02819, official ``lstsq.py``): delete a block, let layer i be the last kept layer before it,
and fit T so that the MLP output of layer i, M·T, carries what the block added:

    M·T ≈ target − Y,     Y = (output of layer i) − M   (the residual stream before layer i's MLP),

``target`` being the hidden state the block handed on. T = (MᵀM + αI)⁻¹ MᵀB, accumulated in float64 over the fit
set (only the two d×d sums live in memory: O(d²), whatever the number of tokens), then folded as
``W_down ← Tᵀ·W_down`` (and a ``down_proj`` bias b ← b·T): the checkpoint stays a vanilla one.

The fold is exact only where the MLP output enters the residual stream linearly. Gemma-2/3 put a norm between the
MLP and the residual add; there ``ArchAdapter.fold_output_map`` refuses rather than fold silently wrong.

Two fit orders for several windows: ``independent`` (every map on the base's own activations, one pass; the
official code fits all blocks from one forward of the base) and ``bottom-up`` (each map on the activations of the
model with the windows below it already merged and fitted, so a map also corrects the error those left).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..engine import ForwardEngine, Slot
from ..errors import PassError

logger = logging.getLogger(__name__)

FIT_ORDERS = ("bottom-up", "independent")
#: the order in which a layer's branch maps are fitted
BRANCH_ORDER = ("attn", "mlp")


class LeastSquares:
    """Running sums AᵀA and AᵀB (float64) of a linear least-squares problem A·T ≈ B with d columns."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.dim = dim
        self.ata = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.atb = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a = a.reshape(-1, self.dim).to(self.ata.device, torch.float64)
        b = b.reshape(-1, self.dim).to(self.ata.device, torch.float64)
        self.ata += a.T @ a
        self.atb += a.T @ b
        self.rows += a.shape[0]

    def add_branch(self, part: torch.Tensor, out: torch.Tensor, target: torch.Tensor) -> None:
        """Rows for a map on one residual branch: its output ``part`` should add what the layer output ``out`` lacks
        to reach ``target`` beyond everything else it holds, i.e. part·T ≈ target − (out − part)."""
        self.add(part, target.double() - (out.double() - part.double()))

    def solve(self, ridge: float = 0.0, what: str = "map", prior: str = "zero") -> torch.Tensor:
        """argmin ‖A·T − B‖² + α‖T − P‖² as float32, α = ``ridge`` × the mean diagonal of AᵀA:
        T = (AᵀA + αI)⁻¹ (AᵀB + αP). ``prior`` P: ``zero`` (ReplaceMe's ridge; α = 0, plain least squares, is the
        official default) or ``identity`` (shrink towards leaving the branch unchanged). A problem with fewer rows
        than columns and no ridge is refused (T would be arbitrary)."""
        if self.rows < self.dim and ridge <= 0:
            raise PassError(f"{what}: {self.rows:,} fit tokens cannot determine a {self.dim}x{self.dim} map; give a "
                            f"fit set of more than {self.dim:,} tokens (--fit-samples) or a ridge")
        ata, atb = self.ata, self.atb
        if ridge > 0:
            eye = torch.eye(self.dim, dtype=ata.dtype, device=ata.device)
            alpha = ridge * ata.diagonal().mean()
            ata = ata + alpha * eye
            if prior == "identity":
                atb = atb + alpha * eye
        try:
            t = torch.linalg.solve(ata, atb)
        except RuntimeError:  # torch raises _LinAlgError (a RuntimeError) on a singular system
            raise PassError(f"{what}: the fit set's branch outputs are rank-deficient; give a larger fit set or a "
                            "ridge") from None
        if not torch.isfinite(t).all():
            raise PassError(f"{what}: the least-squares map is not finite; give a larger fit set or a ridge")
        return t.float().cpu()


@dataclass
class MapSite:
    """A kept layer that receives a fitted map: ``module`` runs in base slot ``type_index`` on the hidden state
    entering base layer ``input_at``; its output must match the base's hidden state entering base layer
    ``target_at``."""

    name: str
    module: nn.Module
    type_index: int
    input_at: int
    target_at: int
    #: the residual branches that get a map, fitted in this order (attention first: the MLP then sees its effect)
    branches: tuple[str, ...] = ("mlp",)


def capture_branch(engine: ForwardEngine, module: nn.Module, branch: str, sink: list):
    """A forward hook appending the output of ``module``'s residual branch (``attn`` / ``mlp``) to ``sink``; returns
    its handle."""
    sub = engine.adapter.branch_modules(module)[branch]

    def hook(_m, _inp, out):
        sink.append((out[0] if isinstance(out, tuple) else out).detach())

    return sub.register_forward_hook(hook)


@torch.inference_mode()
def fit_output_maps(
    engine: ForwardEngine,
    sites: Sequence[MapSite],
    stack_below,
    order: str = "bottom-up",
    ridge: float = 0.0,
    final_norm_target: bool = False,
    what: str = "lstsq",
    prior: str = "identity",
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, float]]:
    """Fit (and fold into each site's module) one map per site and branch, streaming the engine's fit set.

    ``sites`` bottom to top. ``stack_below(k)``: the slots from base layer ``sites[0].input_at`` up to site k's
    module (the compressed model, whose lower sites already hold their maps) — used by the ``bottom-up`` order.
    ``prior``: what a ridge shrinks the map towards (see ``LeastSquares.solve``). ``final_norm_target``: a target at
    the stack's output (base layer ``num_layers``) is the post-norm state (the official ReplaceMe reads
    ``hidden_states[-1]``, which HF returns after the final norm). Returns the maps by site name and branch, and a
    cost record: ``fit_tokens``, ``fit_layer_passes`` (decoder-layer runs in passes over the fit set) and
    ``fit_seconds`` (wall time: a timing, kept out of plan files).
    """
    if order not in FIT_ORDERS:
        raise PassError(f"fit order must be one of {', '.join(FIT_ORDERS)}, got {order!r}")
    for site in sites:
        for branch in site.branches:
            engine.adapter.check_output_map(site.module, branch)
    hidden = engine.adapter.config.hidden_size
    fit = engine.fit_set(what, min_tokens=16 * hidden)
    started, layer_tokens = time.perf_counter(), engine.fit_layer_tokens
    maps: dict[str, dict[str, torch.Tensor]] = {site.name: {} for site in sites}
    groups = [list(sites)] if order == "independent" else [[s] for s in sites]
    for group in groups:
        for branch in [b for b in BRANCH_ORDER if any(b in s.branches for s in group)]:
            members = [s for s in group if branch in s.branches]
            systems = [LeastSquares(hidden, engine.device) for _ in members]
            first = sites[0].input_at
            points = {s.target_at for s in members} | (
                {first} if order == "bottom-up" else {s.input_at for s in members})
            label = ", ".join(s.name for s in members) + ("" if branch == "mlp" else f" ({branch})")
            for batch in engine.stream_fit(sorted(points), desc=f"{what}: fitting {label}"):
                for site, system in zip(members, systems):
                    if order == "bottom-up":
                        x = batch.run(stack_below(sites.index(site)), batch.inputs[first].to(engine.device))
                    else:
                        x = batch.inputs[site.input_at].to(engine.device)
                    captured: list[torch.Tensor] = []
                    handle = capture_branch(engine, site.module, branch, captured)
                    try:
                        out = batch.run([Slot(site.module, site.type_index)], x)
                    finally:
                        handle.remove()
                    target = batch.inputs[site.target_at].to(engine.device)
                    if final_norm_target and site.target_at == engine.num_layers:
                        target = engine.adapter.final_norm(target)
                    system.add_branch(captured[-1], out, target)
            for site, system in zip(members, systems):
                t = system.solve(ridge, f"{what} {site.name}", prior)
                engine.adapter.fold_output_map(site.module, t, branch)
                maps[site.name][branch] = t
    cost = {
        "fit_tokens": int(fit.numel()),
        "fit_seconds": round(time.perf_counter() - started, 2),
        "fit_layer_passes": round((engine.fit_layer_tokens - layer_tokens) / fit.numel(), 2),
    }
    return maps, cost
