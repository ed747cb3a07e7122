"""A deliberately slow, line-by-line port of the official SLM.py loop, used to verify the fast ``slm`` pass.

It does what the official script does for every candidate: deep-copy the whole model, apply the running-copy merge
in place, delete the window's other layers, and run the full model (with labels, as the script does) on each
calibration sample with batch size 1, then compare ``hidden_states[-1]`` (the post-norm final state) with the
original model's by the cosine of the flattened tensors, averaged over samples. Not a registered pass.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ...arch import ArchAdapter, PROJECTION


@torch.inference_mode()
def _final_states(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    outs = []
    for i in range(ids.shape[0]):
        sample = ids[i : i + 1]
        out = model(sample, labels=sample, output_hidden_states=True, use_cache=False)
        outs.append(out.hidden_states[-1])
    return outs


def official_merge(model: nn.Module, low: int, high: int, weight_factor: float = 1.0) -> nn.Module:
    """``merge_layers_return_model``: deep copy, in-place running update of layer ``low``'s projections, delete."""
    model_copy = copy.deepcopy(model)
    src = ArchAdapter(model).layers
    adapter = ArchAdapter(model_copy)
    dst = adapter.layers
    kinds = adapter.tensor_kinds(dst[low])
    with torch.no_grad():
        for i in range(low, high + 1):
            for name, kind in kinds.items():
                if kind != PROJECTION:
                    continue
                target = dst[low].get_parameter(name)
                target += (src[i].get_parameter(name) - target) * weight_factor
    adapter.remove_layers(range(low + 1, high + 1))
    return model_copy


def cal_sim(reference: list[torch.Tensor], model: nn.Module, ids: torch.Tensor) -> float:
    sims = []
    for ref, out in zip(reference, _final_states(model, ids)):
        sims.append(torch.cosine_similarity(ref.reshape(1, -1).double(), out.reshape(1, -1).double()).item())
    return sum(sims) / len(sims)


def official_slm_windows(model: nn.Module, ids: torch.Tensor, threshold: float) -> tuple[list[tuple[int, int]], list]:
    """Run the official loop; returns the committed windows in ORIGINAL numbering (top first) and the trace."""
    reference = _final_states(model, ids)
    current = model
    n = ArchAdapter(model).num_layers
    high = n - 2
    low = high - 1
    committed, tried = [], []
    while low >= 0:
        cand = official_merge(current, low, high)
        s = cal_sim(reference, cand, ids)
        del cand
        if low < high:
            tried.append({"window": [low, high], "sim": round(s, 6), "passed": s > threshold})
        if s > threshold:
            low -= 1
        elif low + 1 != high:
            current = official_merge(current, low + 1, high)
            committed.append((low + 1, high))  # windows are found top-down, so the indices are still the originals
            high = low
        else:
            high -= 1
            low -= 1
    return committed, tried
