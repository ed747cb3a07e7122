"""Fitted maps: one least-squares d×d map, folded into a kept layer's ``down_proj``, stands in for removed layers.

ReplaceMe (arXiv 2505.02819, official ``lstsq.py``): delete a block, let layer i be the last kept layer before it,
and fit T so that the MLP output of layer i, M·T, carries what the block added:

    M·T ≈ target − Y,     Y = (output of layer i) − M   (the residual stream before layer i's MLP),

``target`` being the hidden state the block handed on. T = (MᵀM + αI)⁻¹ MᵀB, accumulated in float64 over the fit
set (only the two d×d sums live in memory: O(d²), whatever the number of tokens), then folded as
``W_down ← Tᵀ·W_down`` (and a ``down_proj`` bias b ← b·T): the checkpoint stays a vanilla one.

Gemma-2/3 put a norm between each branch and the residual add (``out = g ⊙ unit(z)``, z the projection's output,
unit(z) = z / rms(z), g = 1 + w the norm's gain), so a map after the norm has no weight to fold into. There the map
goes before the norm, where it folds exactly (z ← z·T, into ``o_proj``/``down_proj``), and the norm's gain is
refitted, in two least-squares steps over the fit set (``BranchFit``):

1. the map, on directions: unit(z)·T ≈ b·rms(unit(z)) / rms(b), b = (target − Y) / g (rms(unit(z)) is 1 less the
   norm's eps). The norm removes each token's magnitude from z·T, so the map only has to point the branch where
   the removed layers did;
2. the gain, per channel, with the map folded: g′_c = Σ q_c·(target − Y)_c / Σ q_c², q = unit(z·T), shrunk towards
   the old gain by the same relative ridge. It carries the mean magnitude of what the removed layers added.

The map and the gain fold exactly (the checkpoint computes what the fit computed); what no fold can give is a
per-token magnitude other than the gain's, which the norm fixes. The plan stores the gain beside the map (roles
``gain`` / ``attn_gain``).

Outlier-aware fits (``outlier_clip``, off by default; ReplaceMe's official fit weighs every token alike): a few
tokens carry residual states hundreds of times the median's (attention sinks: on SmolLM2-135M the first position of
every sequence enters layer 11 with a norm of 146 and leaves it with ~23,800, against a median of ~200). A window
that spans the layers where such a state forms must add it, so those few rows hold nearly all of AᵀA and AᵀB (99.4%
of the energy for a window over layers 8–14 there) and the map bends to them. With ``outlier_clip`` = k, a row
whose energy ‖a‖² + ‖b‖² exceeds k² × the batch's median row energy is weighted down to that level (rows scaled by
√w, w = min(1, k²·median/energy)): a Huber-like cap, so such tokens still count, as much as a row k times the
median's norm. Too strong a clip breaks the model (the map no longer builds the sink): see OUTLIER_CLIP_SUGGESTED.

Two fit orders for several windows: ``independent`` (every map on the base's own activations, one pass; the
official code fits all blocks from one forward of the base) and ``bottom-up`` (each map on the activations of the
model with the windows below it already merged and fitted, so a map also corrects the error those left).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..engine import ForwardEngine, Slot
from ..errors import PassError
from .rules import BRANCH_ROLES, GAIN_ROLES

logger = logging.getLogger(__name__)

FIT_ORDERS = ("bottom-up", "independent")
#: the clip at which a fit measures how much of its energy sits in outlier rows (its trace's ``outlier_share``)
OUTLIER_PROBE = 4.0
#: above this share of a map's least-squares energy in outlier rows, an unclipped fit warns
OUTLIER_WARN_SHARE = 0.5
#: the clip the warning suggests: the best of 2, 4, 8, 16, 32, 64 on the validation texts for replaceme at 35% on
#: SmolLM2-135M (benchmarks/results/fitted_smollm2.md; the curve is bumpy: 8 and 64 were worse than 4 and 16)
OUTLIER_CLIP_SUGGESTED = 32.0
#: the order in which a layer's branch maps are fitted
BRANCH_ORDER = ("attn", "mlp")


class LeastSquares:
    """Running sums AᵀA and AᵀB (float64) of a linear least-squares problem A·T ≈ B with d columns."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.dim = dim
        self.ata = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.atb = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.rows = 0
        #: rows above OUTLIER_PROBE² x their batch's median energy: their count, their energy; all rows' energy
        self.outlier_rows, self.outlier_energy, self.energy = 0, 0.0, 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor, outlier_clip: float | None = None) -> None:
        """Rows ``a`` → ``b``; with ``outlier_clip`` k, rows above k² × the median row energy are weighted down
        to it (see the module docstring)."""
        a = a.reshape(-1, self.dim).to(self.ata.device, torch.float64)
        b = b.reshape(-1, self.dim).to(self.ata.device, torch.float64)
        energy = row_energy(a, b)
        high = energy > OUTLIER_PROBE ** 2 * energy.median()
        self.outlier_rows += int(high.sum())
        self.outlier_energy += float(energy[high].sum())
        self.energy += float(energy.sum())
        w = row_weights(energy, outlier_clip)
        if w is not None:
            a, b = a * w.sqrt()[:, None], b * w.sqrt()[:, None]
        self.ata += a.T @ a
        self.atb += a.T @ b
        self.rows += a.shape[0]

    @property
    def outlier_share(self) -> float:
        """The share of the (unweighted) energy of the rows added so far that sits in outlier rows."""
        return self.outlier_energy / self.energy if self.energy > 0 else 0.0

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


def row_energy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a‖² + ‖b‖² per row: what one row of a least-squares problem adds to its sums."""
    return a.pow(2).sum(-1) + b.pow(2).sum(-1)


def row_weights(energy: torch.Tensor, outlier_clip: float | None) -> torch.Tensor | None:
    """Per-row weights min(1, k²·median(e)/e) of rows with energies e (None: no clip, every row 1)."""
    if not outlier_clip:
        return None
    cap = outlier_clip ** 2 * energy.median()
    return torch.where(energy > cap, cap / energy.clamp_min(1e-300), torch.ones_like(energy))


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


class BranchFit:
    """The fitted map of one residual branch of a kept layer, folded into it when solved.

    Rows come from runs of ``module`` inside ``capture()``: ``add(captured, layer_output, target)``. A branch that
    reaches the residual stream linearly takes one pass (``phases`` = ``("map",)``); one under a Gemma post-branch
    norm takes two, the map then the norm gain (``("map", "gain")``, see the module docstring): after ``solve``,
    ``phase`` names the next pass, or None when done.
    """

    def __init__(self, adapter, module: nn.Module, branch: str, device: torch.device | str = "cpu",
                 outlier_clip: float | None = None):
        adapter.check_output_map(module, branch)
        self.adapter, self.module, self.branch = adapter, module, branch
        self.outlier_clip = outlier_clip
        self.norm = adapter.post_norm(module, branch)
        self.hidden = adapter.config.hidden_size
        self.system = LeastSquares(self.hidden, device)
        self.phases = ("map",) if self.norm is None else ("map", "gain")
        self.phase: str | None = "map"
        self.tensors: dict[str, torch.Tensor] = {}
        if self.norm is not None:
            self._gain_sums = torch.zeros(2, self.hidden, dtype=torch.float64, device=device)

    def capture(self):
        """A context: while open, every run of the module appends (branch projection output, branch output)."""
        sub = self.adapter.branch_modules(self.module)[self.branch]
        sink: list[tuple[torch.Tensor, torch.Tensor]] = []

        def hook(_m, inp, out):
            out = out[0] if isinstance(out, tuple) else out
            sink.append((inp[0].detach() if self.norm is not None else out.detach(), out.detach()))

        return _Hooked(sub.register_forward_hook(hook), sink)

    def add(self, captured: list, out: torch.Tensor, target: torch.Tensor) -> None:
        """Rows of one batch: the branch's last captured run, the layer's output, the hidden state to reach."""
        z, part = captured[-1]
        # what the branch should add: the target minus everything else the layer's output holds
        want = target.double() - (out.double() - part.double())
        if self.norm is None:
            self.system.add(part, want, self.outlier_clip)
            return
        unit = self.adapter.norm_unit(self.norm, z).double().reshape(-1, self.hidden)
        want = want.reshape(-1, self.hidden).to(unit.device)
        if self.phase == "map":
            gain = self.adapter.norm_gain(self.norm).double().to(unit.device)
            # a channel the norm zeroes cannot be steered: keep its own direction there
            safe = gain.abs() > 1e-6
            b = torch.where(safe, want / torch.where(safe, gain, torch.ones_like(gain)), unit)
            # aim at the target's direction with the rms the input rows have (1, less the norm's eps): the norm
            # discards each token's magnitude, so fitting it would only bend the map
            rms_in = unit.pow(2).mean(-1, keepdim=True).sqrt()
            b = b * rms_in * torch.rsqrt(b.pow(2).mean(-1, keepdim=True) + 1e-30)
            self.system.add(unit, b, self.outlier_clip)
        else:
            w = row_weights(row_energy(unit, want), self.outlier_clip)
            w = torch.ones(unit.shape[0], dtype=unit.dtype, device=unit.device) if w is None else w
            self._gain_sums[0] += (w[:, None] * unit * want).sum(0).to(self._gain_sums.device)
            self._gain_sums[1] += (w[:, None] * unit.pow(2)).sum(0).to(self._gain_sums.device)

    def solve(self, ridge: float, what: str, prior: str) -> None:
        """Solve the current phase, fold its result into the module and move to the next phase."""
        if self.phase == "map":
            t = self.system.solve(ridge, what, prior)
            self.tensors[BRANCH_ROLES[self.branch]] = t
            gain = None if self.norm is None else self.adapter.norm_gain(self.norm)
            self.adapter.fold_output_map(self.module, t, self.branch, gain)
            self.phase = "gain" if self.norm is not None else None
            return
        old = self.adapter.norm_gain(self.norm).double().to(self._gain_sums.device)
        num, den = self._gain_sums
        alpha = ridge * float(den.mean())
        fitted = (num + alpha * old) / (den + alpha)
        # a channel no fit token reached keeps its gain
        gain = torch.where(den + alpha > 0, fitted, old)
        if not torch.isfinite(gain).all():
            raise PassError(f"{what}: the refitted norm gain is not finite; give a larger fit set or a ridge")
        gain = gain.float().cpu()
        self.tensors[GAIN_ROLES[self.branch]] = gain
        self.adapter.set_norm_gain(self.module, self.branch, gain)
        self.phase = None


class _Hooked:
    def __init__(self, handle, sink: list):
        self.handle, self.sink = handle, sink

    def __enter__(self) -> list:
        return self.sink

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@torch.inference_mode()
def fit_search_map(engine: ForwardEngine, module: nn.Module, type_index: int, input_at: int, target_at: int,
                   branches: Sequence[str], ridge: float, what: str, outlier_clip: float | None = None) -> None:
    """Fold maps on ``branches`` of ``module`` fitted on the search set's recorded base activations: ``module`` runs
    in base slot ``type_index`` on the base's input of layer ``input_at`` and must reach the base's input of layer
    ``target_at``; ridge towards the identity; ``outlier_clip`` as in the module docstring. What a search scores a
    candidate with, so it sees what a map can recover (the final maps are fitted on the fit set afterwards)."""
    for branch in branches:
        fit = BranchFit(engine.adapter, module, branch, engine.device, outlier_clip)
        while fit.phase:
            with fit.capture() as captured:
                outs = engine.run_layers([Slot(module, type_index)], input_at, final_norm=False)
            for i, (out, target) in enumerate(zip(outs, engine.inputs[target_at])):
                fit.add(captured[: i + 1], out, target.to(engine.device))
            fit.solve(ridge, what, "identity")


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
    outlier_clip: float | None = None,
    keep_replay: bool = False,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, float]]:
    """Fit (and fold into each site's module) one map per site and branch, streaming the engine's fit set.

    ``sites`` bottom to top. ``stack_below(k)``: the slots from base layer ``sites[0].input_at`` up to site k's
    module (the compressed model, whose lower sites already hold their maps) — used by the ``bottom-up`` order.
    ``prior``: what a ridge shrinks the map towards (see ``LeastSquares.solve``). ``final_norm_target``: a target at
    the stack's output (base layer ``num_layers``) is the post-norm state (the official ReplaceMe reads
    ``hidden_states[-1]``, which HF returns after the final norm). ``outlier_clip``: weight down rows of outlier
    energy (the module docstring; None: every row alike). Returns the fitted tensors by site name and role
    (``map`` / ``attn_map``, with ``gain`` / ``attn_gain`` under post-branch norms), and a cost record:
    ``fit_tokens``, ``fit_layer_passes`` (decoder-layer runs in passes over the fit set), ``outlier_share`` (the
    largest share of a map's least-squares energy in rows above ``OUTLIER_PROBE``² x the median; above
    ``OUTLIER_WARN_SHARE`` an unclipped fit warns) and ``fit_seconds`` (wall time: a timing, kept out of plan files).
    ``keep_replay``: leave the base states the fit kept (each site's input and target) for the caller to replay
    (``engine.stream_fit(points, reuse=True)``, e.g. refinement on the same windows) and free
    (``engine.release_fit_replay``); on an error they are freed here.
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
    # every pass asks for the same base states (each site's input and target, or the first site's input): the first
    # pass keeps them and the later ones (one per branch map and norm gain) replay them without the base forward
    points = sorted({s.target_at for s in sites} | ({sites[0].input_at} if order == "bottom-up"
                                                    else {s.input_at for s in sites}))
    systems: dict[str, LeastSquares] = {}
    try:
        _fit_groups(engine, sites, groups, points, stack_below, order, ridge, final_norm_target, what, prior, maps,
                    outlier_clip, systems)
    except BaseException:
        engine.release_fit_replay()
        raise
    if not keep_replay:
        engine.release_fit_replay()
    cost = fit_cost(engine, fit, started, layer_tokens)
    label, system = max(systems.items(), key=lambda kv: kv[1].outlier_share)
    cost["outlier_share"] = round(system.outlier_share, 4)
    if not outlier_clip and system.outlier_share > OUTLIER_WARN_SHARE:
        warnings.warn(f"{what}: {system.outlier_share:.0%} of the least-squares energy of map {label} sits in "
                      f"{system.outlier_rows / max(1, system.rows):.2%} of the fit tokens (attention sinks?), which "
                      f"decide the map; outlier_clip={OUTLIER_CLIP_SUGGESTED:g} weights them down (check it on "
                      "validation texts)", stacklevel=3)
    return maps, cost


def fit_cost(engine: ForwardEngine, fit: torch.Tensor, started: float, layer_tokens: int) -> dict[str, float]:
    """A fit's cost record since ``started`` (``perf_counter``) and ``layer_tokens`` (``engine.fit_layer_tokens``
    then): ``fit_tokens``, ``fit_seconds`` (a timing, kept out of plan files) and ``fit_layer_passes``
    (decoder-layer runs in passes over the fit set ``fit``)."""
    return {
        "fit_tokens": int(fit.numel()),
        "fit_seconds": round(time.perf_counter() - started, 2),
        "fit_layer_passes": round((engine.fit_layer_tokens - layer_tokens) / fit.numel(), 2),
    }


def _fit_groups(engine, sites, groups, points, stack_below, order, ridge, final_norm_target, what, prior, maps,
                outlier_clip, systems) -> None:
    """The passes of ``fit_output_maps``: per group of sites and branch, one pass over the fit set per phase;
    ``systems`` receives each map's least-squares system by label (for its outlier share)."""
    first = sites[0].input_at
    for group in groups:
        for branch in [b for b in BRANCH_ORDER if any(b in s.branches for s in group)]:
            members = [s for s in group if branch in s.branches]
            fits = [BranchFit(engine.adapter, s.module, branch, engine.device, outlier_clip) for s in members]
            label = ", ".join(s.name for s in members) + ("" if branch == "mlp" else f" ({branch})")
            # one pass over the fit set per phase: the map, then (post-branch norms only) the norm gain
            while any(f.phase for f in fits):
                active = [(site, f) for site, f in zip(members, fits) if f.phase]
                phase = active[0][1].phase
                desc = f"{what}: fitting {label}" + ("" if phase == "map" else " (norm gain)")
                for batch in engine.stream_fit(points, desc=desc, reuse=True):
                    for site, f in active:
                        if order == "bottom-up":
                            x = batch.run(stack_below(sites.index(site)), batch.inputs[first].to(engine.device))
                        else:
                            x = batch.inputs[site.input_at].to(engine.device)
                        with f.capture() as captured:
                            out = batch.run([Slot(site.module, site.type_index)], x)
                        target = batch.inputs[site.target_at].to(engine.device)
                        if final_norm_target and site.target_at == engine.num_layers:
                            target = engine.adapter.final_norm(target)
                        f.add(captured, out, target)
                for site, f in active:
                    f.solve(ridge, f"{what} {site.name}", prior)
            for site, f in zip(members, fits):
                maps[site.name].update(f.tensors)
                systems[site.name + ("" if branch == "mlp" else f" ({branch})")] = f.system
