"""Layer-redundancy analysis: the paper's "patch-like" CKA picture and the per-layer profiles the passes rank by.

* **Linear CKA between every pair of layer outputs**, computed as the official ``cka.py`` does: each example's
  output of layer i is flattened to one vector (seq × hidden); per minibatch the linear Gram K = X Xᵀ is centred
  (H K H, H = I − 11ᵀ/n) and HSIC(K, L) = tr(K_c L_c) / (n (n − 3)); CKA(i, j) = Σ_b HSIC(K_i, K_j) /
  sqrt(Σ_b HSIC(K_i, K_i) · Σ_b HSIC(K_j, K_j)), summed over minibatches. Two deliberate differences from the
  official script: HSIC values are not truncated to integers (``.long()`` there), and minibatches smaller than 4
  use the biased normaliser (n − 1)² since n (n − 3) is not positive. With equal minibatches the normaliser cancels,
  so this is standard linear CKA of the flattened outputs.
* **Adjacent-layer cosine**: cosine between the flattened outputs of layers i and i + 1 per example (the official
  SLM ``cal_sim`` measure), averaged over examples.
* **Block influence** (ShortGPT): BI_i = 1 − mean over tokens of cos(input of layer i, output of layer i).

All of it comes from one ``ForwardEngine`` recording: the output of layer i is ``engine.inputs[i + 1]``. The plots
and the written files are in reports/plots.py; the formulas in metrics.py.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .calibration import CalibrationSet, describe_calibration
from .engine import Batches, ForwardEngine
from .errors import PlanError
from .metrics import block_influence, minibatch_cka, per_sample_cosine, token_cosines
from .plan import CompressionPlan

CKA_DEFINITION = (
    "minibatch linear CKA of per-example flattened layer outputs (official cka.py formula, HSIC not truncated)"
)


# ------------------------------------------------------------------------------------------------ CKA
def cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two [n, ...] representations of the same n examples (one minibatch, official formula)."""
    return float(minibatch_cka([[x], [y]])[0, 1])


# ------------------------------------------------------------------------------------------------ profiles
def adjacent_cosine(outputs: Sequence[Batches]) -> list[float]:
    """Mean per-example cosine of flattened outputs of layers i and i + 1, for i = 0 .. L − 2."""
    return [float(per_sample_cosine(outputs[i], outputs[i + 1]).mean()) for i in range(len(outputs) - 1)]


def block_influence_profile(inputs: Sequence[Batches]) -> list[float]:
    """ShortGPT's block influence per layer as a token mean, 1 − mean cos(input_i, output_i); ``inputs`` has L + 1
    entries (engine.inputs)."""
    scores = []
    for i in range(len(inputs) - 1):
        total = sum(block_influence(a, b) for a, b in zip(inputs[i], inputs[i + 1]))
        count = sum(token_cosines(a, b).numel() for a, b in zip(inputs[i], inputs[i + 1]))
        scores.append(total / count)
    return scores


@torch.inference_mode()
def analyze_layers(model: nn.Module, ids: torch.Tensor | CalibrationSet, batch_size: int | None = 16,
                   patch_threshold: float = 0.95) -> dict[str, Any]:
    """CKA matrix and per-layer profiles of ``model`` on calibration ids ``[n, seq]`` (or a ``CalibrationSet``, whose
    provenance is recorded); a JSON-ready dict.

    ``batch_size`` is the CKA minibatch (16 as the official script; None = all samples in one batch).
    ``patches`` lists the maximal runs of consecutive layers whose pairwise CKA is at least ``patch_threshold``.
    """
    calibration = ids.describe() if isinstance(ids, CalibrationSet) else describe_calibration(ids)
    ids = ids.ids if isinstance(ids, CalibrationSet) else ids
    engine = ForwardEngine(model, ids, batch_size=batch_size).record_layer_inputs()  # analysis is no pass: it owns one
    outputs = [engine.inputs[i + 1] for i in range(engine.num_layers)]
    matrix = minibatch_cka(outputs)
    adjacent_cka = [float(matrix[i, i + 1]) for i in range(engine.num_layers - 1)]
    return {
        "model": getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None),
        "model_type": engine.adapter.config.model_type,
        "num_layers": engine.num_layers,
        "calibration": calibration,
        "cka_batch_size": engine.batch_size,
        "cka_definition": CKA_DEFINITION,
        "cka": [[round(float(v), 6) for v in row] for row in matrix],
        "adjacent_cka": adjacent_cka,
        "adjacent_cosine": adjacent_cosine(outputs),
        "block_influence": block_influence_profile(engine.inputs),
        "patch_threshold": patch_threshold,
        "patches": top_patches(matrix.tolist(), patch_threshold),
    }


# ------------------------------------------------------------------------------------------------ plans
def plan_overlay(plan: CompressionPlan | None, num_layers: int) -> dict[str, Any] | None:
    """Merge windows ``[(lo, hi)]`` and dropped layers of a plan in base numbering, checked against the model."""
    if plan is None:
        return None
    if plan.num_layers != num_layers:
        raise PlanError(f"plan is for a {plan.num_layers}-layer base, the analysed model has {num_layers} layers")
    marks = plan.footprint()
    return {"method": plan.method, "windows": [list(w) for w in sorted(marks["merged"])], "dropped": marks["dropped"]}


def top_patches(matrix: Iterable[Iterable[float]], threshold: float = 0.9) -> list[tuple[int, int]]:
    """Maximal runs of consecutive layers whose every pair has CKA ≥ ``threshold`` (the "patches")."""
    m = torch.tensor([list(r) for r in matrix])
    n, runs, start = m.shape[0], [], 0
    while start < n:
        end = start
        while end + 1 < n and bool((m[start : end + 2, start : end + 2] >= threshold).all()):
            end += 1
        if end > start:
            runs.append((start, end))
        start = end + 1
    return runs
