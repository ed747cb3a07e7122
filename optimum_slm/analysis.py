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

All of it comes from one ``ForwardEngine`` recording: the output of layer i is ``engine.inputs[i + 1]``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from .calibration import describe_calibration
from .engine import Batches, ForwardEngine, per_sample_cosine
from .errors import PlanError, SLMError
from .plan import CompressionPlan

CKA_DEFINITION = (
    "minibatch linear CKA of per-example flattened layer outputs (official cka.py formula, HSIC not truncated)"
)
PLOTS_INSTALL = "pip install 'optimum-slm[plots]'"


# ------------------------------------------------------------------------------------------------ CKA
def centered_gram(x: torch.Tensor) -> torch.Tensor:
    """H (X Xᵀ) H for ``x`` of shape [n, ...] (each example flattened), in float64."""
    x = x.reshape(x.shape[0], -1).double()
    gram = x @ x.T
    n = gram.shape[0]
    h = torch.eye(n, dtype=gram.dtype, device=gram.device) - 1.0 / n
    return h @ gram @ h


def hsic(k_centered: torch.Tensor, l_centered: torch.Tensor) -> float:
    """The official HSIC of two centred Grams: tr(K_c L_c) / (n (n − 3)); (n − 1)² when n < 4."""
    n = k_centered.shape[0]
    norm = n * (n - 3) if n > 3 else (n - 1) ** 2 or 1
    return float((k_centered * l_centered).sum()) / norm


def minibatch_cka(outputs: Sequence[Batches]) -> torch.Tensor:
    """CKA matrix [L, L] between layers, ``outputs[i]`` being layer i's output as a list over minibatches."""
    grams = [[centered_gram(b) for b in layer] for layer in outputs]
    num = len(grams)
    cross = torch.zeros(num, num, dtype=torch.float64)
    for i in range(num):
        for j in range(i, num):
            value = sum(hsic(ki, kj) for ki, kj in zip(grams[i], grams[j]))
            cross[i, j] = cross[j, i] = value
    diag = cross.diagonal().clamp_min(1e-300).sqrt()
    return cross / (diag[:, None] * diag[None, :])


def cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two [n, ...] representations of the same n examples (one minibatch)."""
    return float(minibatch_cka([[x], [y]])[0, 1])


# ------------------------------------------------------------------------------------------------ profiles
def adjacent_cosine(outputs: Sequence[Batches]) -> list[float]:
    """Mean per-example cosine of flattened outputs of layers i and i + 1, for i = 0 .. L − 2."""
    return [float(per_sample_cosine(outputs[i], outputs[i + 1]).mean()) for i in range(len(outputs) - 1)]


def block_influence(inputs: Sequence[Batches]) -> list[float]:
    """ShortGPT BI_i = 1 − token-mean cos(input_i, output_i); ``inputs`` has L + 1 entries (engine.inputs)."""
    scores = []
    for i in range(len(inputs) - 1):
        total, count = 0.0, 0
        for a, b in zip(inputs[i], inputs[i + 1]):
            cos = torch.nn.functional.cosine_similarity(a.double(), b.to(a.device).double(), dim=-1)
            total += float(cos.sum())
            count += cos.numel()
        scores.append(1.0 - total / count)
    return scores


@torch.inference_mode()
def analyze_layers(model: nn.Module, ids: torch.Tensor, batch_size: int | None = 16,
                   patch_threshold: float = 0.95) -> dict[str, Any]:
    """CKA matrix and per-layer profiles of ``model`` on calibration ids ``[n, seq]``; a JSON-ready dict.

    ``batch_size`` is the CKA minibatch (16 as the official script; None = all samples in one batch).
    ``patches`` lists the maximal runs of consecutive layers whose pairwise CKA is at least ``patch_threshold``.
    """
    engine = ForwardEngine(model, ids, batch_size=batch_size).record_layer_inputs()
    outputs = [engine.inputs[i + 1] for i in range(engine.num_layers)]
    matrix = minibatch_cka(outputs)
    adjacent_cka = [float(matrix[i, i + 1]) for i in range(engine.num_layers - 1)]
    return {
        "model": getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None),
        "model_type": engine.adapter.config.model_type,
        "num_layers": engine.num_layers,
        "calibration": describe_calibration(ids),
        "cka_batch_size": engine.batch_size,
        "cka_definition": CKA_DEFINITION,
        "cka": [[round(float(v), 6) for v in row] for row in matrix],
        "adjacent_cka": adjacent_cka,
        "adjacent_cosine": adjacent_cosine(outputs),
        "block_influence": block_influence(engine.inputs),
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
    dropped = sorted(i for op in plan.ops if op["op"] == "drop" for i in op["layers"])
    return {"method": plan.method, "windows": [list(w) for w in sorted(plan.windows)], "dropped": dropped}


# ------------------------------------------------------------------------------------------------ plots
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SLMError(f"plots need matplotlib: {PLOTS_INSTALL}") from None
    return plt


def _calibration_label(result: Mapping[str, Any]) -> str:
    c = result.get("calibration") or {}
    seed = f", seed {c['seed']}" if c.get("seed") is not None else ""
    return f"calibration: {c.get('source', '?')}, {c.get('n_samples')}×{c.get('seq_len')} tokens{seed}"


def _layer_ticks(ax, num_layers: int, axis: str = "both") -> None:
    step = 1 if num_layers <= 16 else 2 if num_layers <= 40 else 4
    ticks = list(range(0, num_layers, step))
    if axis in ("both", "x"):
        ax.set_xticks(ticks)
    if axis in ("both", "y"):
        ax.set_yticks(ticks)


def plot_cka(result: Mapping[str, Any], path: str, overlay: Mapping[str, Any] | None = None,
             vmin: float | None = None) -> str:
    """Heatmap of the CKA matrix (layer 0 at the bottom left) with an optional plan overlay; returns ``path``.

    ``vmin``: bottom of the colour range (default: the matrix minimum rounded down, at most 0.9).
    """
    import numpy as np

    plt = _pyplot()
    from matplotlib.patches import Rectangle

    matrix = torch.tensor(result["cka"]).numpy()
    n = matrix.shape[0]
    # residual-stream CKA is often > 0.9 everywhere; a fixed 0-1 scale would hide the patches, so the colour range
    # starts at the matrix minimum (rounded down) and the colour bar says so
    vmin = min(0.9, float(np.floor(matrix.min() * 50) / 50)) if vmin is None else vmin
    fig, ax = plt.subplots(figsize=(7.5, 6.5), dpi=130)
    image = ax.imshow(matrix, origin="lower", cmap="viridis", vmin=vmin, vmax=1.0, interpolation="nearest")
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label(f"linear CKA (colour range {vmin:.2f}–1)")
    ax.set_xlabel("layer j (output of decoder layer j)")
    ax.set_ylabel("layer i (output of decoder layer i)")
    _layer_ticks(ax, n)
    ax.set_title(f"Layer-output CKA — {result.get('model')}\n{_calibration_label(result)}", fontsize=10)
    if overlay:
        for k, (lo, hi) in enumerate(overlay["windows"]):
            ax.add_patch(Rectangle((lo - 0.5, lo - 0.5), hi - lo + 1, hi - lo + 1, fill=False, edgecolor="red",
                                   linewidth=2.0, label=f"merge window ({overlay['method']})" if k == 0 else None))
        for k, i in enumerate(overlay["dropped"]):
            ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="magenta", linewidth=2.0,
                                   label=f"dropped layer ({overlay['method']})" if k == 0 else None))
        if overlay["windows"] or overlay["dropped"]:
            ax.legend(loc="upper left", fontsize=8, framealpha=0.85)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _shade(ax, overlay: Mapping[str, Any] | None) -> None:
    if not overlay:
        return
    for k, (lo, hi) in enumerate(overlay["windows"]):
        ax.axvspan(lo - 0.5, hi + 0.5, color="red", alpha=0.12,
                   label=f"merge window ({overlay['method']})" if k == 0 else None)
    for k, (lo, hi) in enumerate(_runs(overlay["dropped"])):
        ax.axvspan(lo - 0.5, hi + 0.5, color="grey", alpha=0.3, linewidth=0,
                   label=f"dropped ({overlay['method']})" if k == 0 else None)


def _runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted layer indices as inclusive (lo, hi) pairs."""
    runs: list[tuple[int, int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def plot_profile(result: Mapping[str, Any], path: str, overlay: Mapping[str, Any] | None = None) -> str:
    """Two panels: adjacent-layer cosine and CKA (top), ShortGPT block influence (bottom); returns ``path``."""
    plt = _pyplot()
    n = int(result["num_layers"])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), dpi=130, sharex=True)
    pairs = [i + 0.5 for i in range(n - 1)]  # a pair (i, i+1) sits between the two layers
    top.plot(pairs, result["adjacent_cosine"], marker="o", markersize=3, label="cosine(out$_i$, out$_{i+1}$)")
    top.plot(pairs, result["adjacent_cka"], marker="s", markersize=3, label="CKA(out$_i$, out$_{i+1}$)")
    top.set_ylabel("similarity of adjacent layers")
    top.set_ylim(min(0.0, min(result["adjacent_cosine"]) - 0.05), 1.02)
    _shade(top, overlay)
    top.legend(loc="lower right", fontsize=8)
    top.grid(alpha=0.3)
    bottom.bar(range(n), result["block_influence"], color="tab:green", label="block influence (ShortGPT)")
    bottom.set_ylabel("BI = 1 − cos(in$_i$, out$_i$)")
    bottom.set_xlabel("decoder layer")
    _shade(bottom, overlay)
    bottom.legend(loc="upper right", fontsize=8)
    bottom.grid(alpha=0.3)
    _layer_ticks(bottom, n, axis="x")
    fig.suptitle(f"Layer redundancy profile — {result.get('model')}\n{_calibration_label(result)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_analysis(result: Mapping[str, Any], output_dir: str, plan: CompressionPlan | None = None) -> dict[str, str]:
    """Write ``cka.png``, ``profile.png`` and ``analysis.json`` into ``output_dir``; returns their paths."""
    overlay = plan_overlay(plan, int(result["num_layers"]))
    _pyplot()  # fail before writing anything when matplotlib is missing
    os.makedirs(output_dir, exist_ok=True)
    paths = {
        "cka": plot_cka(result, os.path.join(output_dir, "cka.png"), overlay),
        "profile": plot_profile(result, os.path.join(output_dir, "profile.png"), overlay),
        "json": os.path.join(output_dir, "analysis.json"),
    }
    with open(paths["json"], "w", encoding="utf-8") as fh:
        json.dump({**result, "plan": overlay}, fh, indent=1)
    return paths


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
