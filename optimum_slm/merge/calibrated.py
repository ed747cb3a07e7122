"""Calibrated merging: fit per-channel branch scales so one layer reproduces a whole window's output.

A window l..h of the base maps x_in (the recorded input of layer l) to x_out (the recorded input of layer h + 1). The
merged layer (``keep-top``: layer h's weights in h's slot) adds an attention branch a(x) and an MLP branch m(·) to
the residual stream. Two closed-form least-squares steps, per output channel c, over every calibration token:

1. s_a[c] = argmin_s Σ (r_c − s·a_c − m_c)² + α·Σa_c²·(s − 1)², with r = x_out − x_in and m from the unscaled pass;
2. after folding s_a, rerun to get m' (the MLP now sees the scaled attention) and
   s_m[c] = argmin_s Σ (r_c − s_a·a_c − s·m'_c)² + α·Σm'_c²·(s − 1)².

The scales are folded into the rows of ``o_proj`` / ``down_proj`` (Gemma: into the post-branch norms), so the
checkpoint stays a vanilla one; the plan stores them as side-car tensors so ``apply_plan`` needs no calibration data
(plan format v1 stored them inline as base64 float32: ``decode_vector`` reads those).
α (``shrink``) pulls each scale towards 1, which guards channels with little signal.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np
import torch
from torch import nn

from ..engine import ForwardEngine, Slot


def decode_vector(s: str) -> torch.Tensor:
    """A v1 plan's base64 little-endian float32 vector; ``ValueError`` when it is not one."""
    if not isinstance(s, str):
        raise ValueError("not a base64 string")
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None
    if len(raw) % 4:
        raise ValueError("not a whole number of float32 values")
    return torch.from_numpy(np.frombuffer(raw, dtype="<f4").copy())


def _capture(engine: ForwardEngine, module: nn.Module, type_index: int, low: int) -> dict[str, list[torch.Tensor]]:
    """Branch outputs of ``module`` run on the recorded input of base layer ``low``, per batch."""
    captured: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, sub in engine.adapter.branch_modules(module).items():
        captured[name] = []

        def hook(_m, _inp, out, name=name):
            captured[name].append((out[0] if isinstance(out, tuple) else out).detach().float())

        handles.append(sub.register_forward_hook(hook))
    try:
        engine.run_layers([Slot(module, type_index)], low, final_norm=False)
    finally:
        for h in handles:
            h.remove()
    return captured


def _fit(branch: list[torch.Tensor], target: list[torch.Tensor], shrink: float) -> torch.Tensor:
    num = sum((b * t).reshape(-1, b.shape[-1]).sum(0).double() for b, t in zip(branch, target))
    den = sum(b.pow(2).reshape(-1, b.shape[-1]).sum(0).double() for b in branch)
    scale = (num + shrink * den) / ((1.0 + shrink) * den).clamp_min(1e-12)
    return scale.float()


@torch.inference_mode()
def calibrate_window(
    engine: ForwardEngine, module: nn.Module, type_index: int, low: int, high: int, shrink: float = 0.05
) -> dict[str, torch.Tensor]:
    """Fit and fold the branch scales of ``module`` (in place) for window low..high; returns the scales."""
    adapter = engine.adapter
    engine.record_layer_inputs()
    x_in, x_out = engine.inputs[low], engine.inputs[high + 1]
    residual = [(o.float() - i.float()).to(engine.device) for i, o in zip(x_in, x_out)]
    first = _capture(engine, module, type_index, low)
    attn, mlp = first["attn"], first["mlp"]
    s_attn = _fit(attn, [r - m for r, m in zip(residual, mlp)], shrink)
    adapter.fold_branch_scales(module, {"attn": s_attn})
    second = _capture(engine, module, type_index, low)
    s_mlp = _fit(second["mlp"], [r - a for r, a in zip(residual, second["attn"])], shrink)
    adapter.fold_branch_scales(module, {"mlp": s_mlp})
    return {"attn": s_attn, "mlp": s_mlp}
