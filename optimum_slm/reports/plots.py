"""Plots and files of ``slm analyze``: the CKA heatmap, the layer profile, ``analysis.json``, with a plan's windows
and dropped layers drawn on both."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import torch

from ..analysis import plan_overlay
from ..errors import SLMError
from ..plan import CompressionPlan

PLOTS_INSTALL = "pip install 'optimum-slm[plots]'"


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
