"""``replaceme``: ReplaceMe (Shopkhoev et al., NeurIPS 2025), faithful to the official code (mts-ai/ReplaceMe,
``distance.py`` + ``lstsq.py`` + ``utils.py``, the LS variant the paper recommends).

1. Block choice (``profile_distances``): on the calibration data, the hidden state of the last non-padded token
   after every layer (HF ``hidden_states[1:]``: outputs of layers 0..L−1, the last one after the final norm), and
   for every l in 0..L−n−1 the angular distance arccos(cos(h_l, h_{l+n}))/π, averaged per batch, then over batches.
   ``select_non_overlapping_blocks``: blocks (l+1, l+n+1) sorted by distance (ties: lower l), taken while they do not
   overlap, ``num_blocks`` of them (official ``num_A``, default 1), consecutive ones merged. Layers l+1..l+n go.
2. The map (``lstsq``): for each block [s, e), M = the MLP output of layer s−1 in the base model, target
   a2 = h_{e−1} + M − h_{s−1} (h: HF hidden states, so a block that ends at the last layer targets the post-norm
   state: a quirk we keep), T = (MᵀM + αI)⁻¹ MᵀA2 in float64 over every token, all blocks from the base's own
   activations (one forward). Folded as ``down_proj.weight ← Tᵀ·W`` of layer s−1.

Both steps read the fit set (the official code uses one dataset for both; our packed sequences have no padding, so
"last non-padded" is the last token). The plan expresses a block as a ``merge`` op of window [s−1, e−1] with rule
``lstsq`` (keep the bottom layer, fold the map): the same model. Differences, all documented: ``ridge`` is relative
(× mean diagonal of MᵀM, towards zero as the official α; 0, the official default, is identical); batch means are
over our fit batches (16 rows; the official config uses 8 samples of different lengths); ``fit_order=bottom-up`` is
an option the official code lacks.
"""

from __future__ import annotations


import numpy as np
import torch

from ...errors import PassError
from ...merge.lstsq import MapSite, fit_output_maps
from ...plan import merge_op
from ..base import FIT_ORDER, NUM_LAYERS, OUTLIER_CLIP, RATIO, RIDGE, CompressionPass, PassParam, PassResult
from .angular import angular_distance
from .common import round_scores


def select_non_overlapping_blocks(distances: list[float], block: int, num_blocks: int) -> list[tuple[int, int]]:
    """The official selection: ``(start, end)`` removed ranges [start, end), smallest distance first (stable), non
    overlapping, at most ``num_blocks``, consecutive ones merged (``merge_consecutive=True``, lstsq's default)."""
    candidates = sorted(((i + 1, i + block + 1, d) for i, d in enumerate(distances)), key=lambda b: b[2])
    chosen, used = [], set()
    for start, end, _ in candidates:
        layers = set(range(start, end))
        if not layers & used:
            chosen.append((start, end))
            used |= layers
            if len(chosen) >= num_blocks:
                break
    chosen.sort()
    merged = [list(chosen[0])]
    for start, end in chosen[1:]:
        if start == merged[-1][1]:
            merged[-1][1] = end
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


class ReplaceMePass(CompressionPass):
    name = "replaceme"
    streams = True  # runs on a lazy model through the sequential engine
    description = ("ReplaceMe (NeurIPS 2025): delete the block of least angular distance, fold one least-squares "
                   "map into down_proj of the layer below (fit set)")
    params = (
        RATIO,
        NUM_LAYERS,
        PassParam("num_blocks", "int", 1, "blocks to remove (official num_A); the removed count is split evenly"),
        FIT_ORDER,
        RIDGE,
        OUTLIER_CLIP,
    )

    @property
    def needs_fit_set(self) -> bool:
        return True

    def validate(self) -> None:
        super().validate()
        if self.config["num_blocks"] < 1:
            raise PassError(f"num_blocks must be >= 1, got {self.config['num_blocks']}")

    @torch.inference_mode()
    def block_distances(self, engine, block: int) -> list[float]:
        """Mean angular distance between the last-token outputs of layers l and l+block, l = 0..L−block−1."""
        L = engine.num_layers
        per_batch: list[list[float]] = [[] for _ in range(L - block)]
        for batch in engine.stream_fit(range(1, L + 1), desc="replaceme: distances", reduce=lambda h: h[:, -1]):
            outs = [batch.inputs[j + 1] for j in range(L)]  # outputs of layers 0..L-1 at the last token
            outs[-1] = engine.adapter.final_norm(outs[-1])  # HF hidden_states[-1] is post-norm
            for l in range(L - block):
                per_batch[l].append(float(angular_distance(outs[l].float(), outs[l + block].float()).mean()))
        return [float(np.mean(d)) for d in per_batch]

    def run(self, engine) -> PassResult:
        engine.require_calibration(self.name)
        L = engine.num_layers
        target = self.target_count(L)
        num_blocks = self.config["num_blocks"]
        if target % num_blocks:
            raise PassError(f"replaceme: {target} layers do not split into {num_blocks} equal blocks")
        size = target // num_blocks
        if L - size < num_blocks:
            raise PassError(f"replaceme: {num_blocks} blocks of {size} layers do not fit in {L} layers")
        engine.adapter.check_output_map()
        distances = self.block_distances(engine, size)
        blocks = select_non_overlapping_blocks(distances, size, num_blocks)
        removed = sum(e - s for s, e in blocks)
        if removed != target:
            raise PassError(f"replaceme: only {removed} of {target} layers fit in non-overlapping blocks")
        layers = engine.adapter.layers
        sites = [MapSite(f"{s - 1}-{e - 1}", engine.copy_layer(s - 1), s - 1, s - 1, e) for s, e in blocks]

        def stack_below(k: int):
            # bottom-up option: the base layers from the first site's input, with the lower blocks replaced
            from ...engine import Slot

            slots, i = [], sites[0].input_at
            while i < sites[k].input_at:
                site = next((x for x in sites if x.input_at == i), None)
                if site is None:
                    slots.append(Slot(layers[i], i))
                    i += 1
                else:
                    slots.append(Slot(site.module, site.type_index))
                    i = site.target_at
            return slots

        maps, cost = fit_output_maps(engine, sites, stack_below, self.config["fit_order"] or "independent",
                                     self.config["ridge"] or 0.0, final_norm_target=True, what=self.name,
                                     prior="zero", outlier_clip=self.config["outlier_clip"])
        tensors, ops = {}, []
        for (s, e), site in zip(blocks, sites):
            refs = {}
            for role, value in maps[site.name].items():
                refs[role] = f"replaceme.{site.name}.{role}"
                tensors[refs[role]] = value
            ops.append(merge_op(s - 1, e - 1, "lstsq", tensors=refs))
        timings = {"fit_seconds": cost.pop("fit_seconds")}
        trace = {
            "block_size": size,
            "distance_by_start": round_scores({i + 1: d for i, d in enumerate(distances)}),
            "removed_blocks": [[s, e - 1] for s, e in blocks],
            "fit": {"order": self.config["fit_order"] or "independent", "ridge": self.config["ridge"] or 0.0, **cost},
        }
        return PassResult(ops, trace, tensors, timings=timings)
