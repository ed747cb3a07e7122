"""``linearpatch``: LinearPatch (Chen et al., NeurIPS 2025, "A Simple Linear Patch Revives Layer-Pruned Large Language
Models"), the training-free variant, faithful to the official code (chenxinrui-tsinghua/LinearPatch,
``layer_select.py`` + ``block_scaling.py`` + ``rotate_utils/hadamard_utils.py``, run as its scripts run it:
``--insert_type rotate --distill_type train_free``).

What the official code does, with x_l the hidden state entering layer l (a forward hook's ``input[0]``):

1. Block choice (``get_pruned_layer_with_cosine``): for l = 1..L−n−1, score(l) = the mean over calibration samples
   of ``torch.cosine_similarity(x_l, x_{l+n}).mean()``. The cosine takes torch's default ``dim=1`` of a
   [batch, tokens, hidden] state: the **token** axis, i.e. per sample and per channel the cosine between that
   channel's time series before and after the block, then the mean over channels. Start 0 is never scored (its slot
   stays 0.0) and neither is L−n (a block that ends at the last layer). The block [s, s+n) with the highest score
   goes (ties: the lower s, as ``list.index(max)`` gives).
2. The scale (``get_scale_params``): with H the Hadamard matrix of the hidden size (``hadamard.py``), per sample
   D = mean_tokens |x_{s+n}·H| / mean_tokens |x_s·H| per channel, averaged over samples (a mean of per-sample ratios).
   ``insert_type=diag`` uses H = I; ``none`` no patch.
3. The patch (``block_scaling.py``): P = H·diag(D)·Hᵀ (symmetric), applied by a forward hook on the output of layer
   s−1 of the pruned model, the last layer before the cut: the whole residual stream y there becomes y·P. The
   official model keeps this as an extra d×d GEMM (its parameter counts include it; ``scales.pt`` is saved beside
   the checkpoint and ``run_eval.py`` hooks it in again): it is **not** folded into any weight.
4. Optionally the patch is trained by offline top-K logit distillation (``--distill_type output_kl``); not
   implemented here (the training-free variant, the one the README's tables compare training-free methods with).

What no vanilla checkpoint can do is multiply the residual stream by a non-scalar matrix: the skip connection
carries y to every later layer and every norm reads it. The fold splits P exactly in two, P = c·R with
c = tr(P)/d = mean(D) (so R = H·diag(D/c)·Hᵀ has unit mean eigenvalue, and R = I when D is uniform):

* the scalar c is folded **exactly** (up to the norms' ε): multiplying the stream by c where it enters the layers
  above the cut computes the same as leaving it and multiplying every branch output of those layers by 1/c, because
  each of their norms, and the final norm, is blind to a scalar. Plan op ``scale_branches`` (layers s+n..L−1,
  factor 1/c): the rows of ``o_proj``/``down_proj`` (Gemma-2/3: the post-branch norms' gains);
* the remainder R is approximated, by the least-squares map on layer s−1's MLP output that best makes its output
  y·R (float64 sums over the fit set, T = (MᵀM)⁻¹MᵀB, no ridge), folded exactly into its ``down_proj`` (Gemma-2/3:
  before the post-MLP norm, whose gain is refitted; ``merge/lstsq.py``). Plan op ``merge`` [s−1, s+n−1], rule
  ``lstsq``, the machinery ReplaceMe's map uses, fitted to the patched stream instead of the base's. T = R and
  T = I (no remainder) are both candidates of the fit: on the fit set it is never worse than either.

On SmolLM2-135M at 6/30 layers (the default fit set picks block 13..18; held-out ``wiki-leads-test``, 16 × 512
tokens) this fold gives perplexity 28.78, the official hooked patch 28.80, its scalar part alone 28.86 (hooked or
folded: the same to 6 digits), the scalar folded with T = R 28.83, plain deletion of the block 30.86; folding the
whole P by least squares instead (no exact scalar) gives 30.37: a layer's MLP output cannot carry c·y.

Quirks kept: the token-axis cosine and the unscored starts 0 and L−n; a mean of per-sample ratios for D; when no
start beats the unscored 0.0 (or n ≥ L−1 leaves no candidate) the official block starts at 0 and its hook goes to
layer −1, which never fires: the first n layers are deleted with no patch (a ``drop`` op). Differences, all
documented: every statistic is read from the **fit set** (the official code reads its first 128 training crops of
2,048 tokens, hard-coded, from wikitext2; ``--fit-samples 128 --fit-seq-len 2048`` gives the same amount), in the
model's dtype with float64 sums (the official model runs in float16); Hadamard matrices of order 52·2^k, 156·2^k
and 172·2^k are refused (``hadamard.py``); ``scale_params`` are averaged over the samples read (the official divides
by 128 whatever it read).
"""

from __future__ import annotations

import time

import torch

from ...engine import Slot
from ...errors import PassError
from ...merge.lstsq import BranchFit, fit_cost
from ...plan import drop_op, merge_op, scale_branches_op
from ..base import NUM_LAYERS, RATIO, CompressionPass, PassParam, PassResult
from .common import round_scores
from .hadamard import hadamard_matrix, hadamard_order

INSERT_TYPES = ("rotate", "diag", "none")


class LinearPatchPass(CompressionPass):
    name = "linearpatch"
    streams = True  # runs on a lazy model through the sequential engine
    description = ("LinearPatch (NeurIPS 2025): delete the block whose ends are most alike (token-axis cosine), "
                   "patch the cut with H·diag(D)·Hᵀ (fit set; its scalar part exact, the rest least-squares)")
    params = (
        RATIO,
        NUM_LAYERS,
        PassParam("insert_type", "str", "rotate", "the patch: rotate = H·diag(D)·Hᵀ (official scripts), diag = "
                  "diag(D) unrotated, none = plain deletion", choices=INSERT_TYPES),
    )

    @property
    def needs_fit_set(self) -> bool:
        return True

    @torch.inference_mode()
    def block_statistics(self, engine, n: int, rotation: torch.Tensor | None, want_scale: bool):
        """One stream of the fit set: per candidate start l = 1..L−n−1 the summed per-sample score (mean over channels
        of the token-axis cosine between x_l and x_{l+n}) and, when ``want_scale``, the summed per-sample ratios
        mean_t|x_{l+n}·H| / mean_t|x_l·H|; and the number of samples."""
        L = engine.num_layers
        starts = list(range(1, L - n))
        cos_sum = {s: 0.0 for s in starts}
        ratio_sum = {s: torch.zeros(engine.adapter.config.hidden_size, dtype=torch.float64) for s in starts}
        rows = 0
        if not starts:
            return cos_sum, ratio_sum, rows
        points = sorted({*starts, *(s + n for s in starts)})
        rot = rotation.to(engine.device, torch.float32) if rotation is not None else None
        for batch in engine.stream_fit(points, desc="linearpatch: block and scale"):
            states = {p: batch.inputs[p].to(engine.device).float() for p in points}
            # per sample (the official batch is one sample) and channel: mean |x·H| over the tokens
            magnitude = {}
            if want_scale:
                for p, x in states.items():
                    magnitude[p] = (x @ rot if rot is not None else x).abs().double().mean(1).cpu()
            for s in starts:
                # dim=1 of [batch, tokens, hidden]: torch's default, the token axis (official quirk, kept)
                cos = torch.cosine_similarity(states[s], states[s + n], dim=1)
                cos_sum[s] += float(cos.double().mean(-1).sum())
                if want_scale:
                    ratio_sum[s] += (magnitude[s + n] / magnitude[s]).sum(0)
            rows += batch.ids.shape[0]
        return cos_sum, ratio_sum, rows

    @torch.inference_mode()
    def fit_remainder(self, engine, start: int, remainder: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict]:
        """The least-squares map on layer start−1's MLP output (and, under a post-MLP norm, that norm's gain) that
        makes the layer's output closest to the base's output times ``remainder``; folded into a copy of the layer."""
        module = engine.copy_layer(start - 1)
        fit = BranchFit(engine.adapter, module, "mlp", engine.device)
        ids = engine.fit_set(self.name)
        r = remainder.to(engine.device, torch.float64)
        started, layer_tokens = time.perf_counter(), engine.fit_layer_tokens
        try:
            while fit.phase:  # one pass for the map, a second for a post-MLP norm's gain (Gemma-2/3)
                desc = "linearpatch: fitting the patch's remainder" + ("" if fit.phase == "map" else " (norm gain)")
                for batch in engine.stream_fit([start - 1, start], desc=desc, reuse=True):
                    with fit.capture() as captured:
                        out = batch.run([Slot(module, start - 1)], batch.inputs[start - 1].to(engine.device))
                    target = batch.inputs[start].to(engine.device).double() @ r
                    fit.add(captured, out, target)
                fit.solve(0.0, f"{self.name} {start - 1}", "zero")
        finally:
            engine.release_fit_replay()
        return fit.tensors, fit_cost(engine, ids, started, layer_tokens)

    def run(self, engine) -> PassResult:
        engine.require_calibration(self.name)
        L = engine.num_layers
        n = self.target_count(L)
        insert = self.config["insert_type"]
        hidden = engine.adapter.config.hidden_size
        engine.fit_set(self.name, min_tokens=16 * hidden)  # warns when it falls back to the small search set
        rotation = None
        if insert == "rotate":
            hadamard_order(hidden)  # a hidden size with no official Hadamard matrix is refused before any work
            rotation = hadamard_matrix(hidden)
        if insert != "none":
            engine.adapter.check_output_map()
        cos_sum, ratio_sum, rows = self.block_statistics(engine, n, rotation, insert != "none")
        # the official list: slot 0 is never scored and keeps 0.0; the first maximum wins
        scores = [0.0] + [cos_sum[s] / rows for s in range(1, L - n)] if rows else [0.0]
        start = scores.index(max(scores))
        end = start + n
        trace = {
            "block_size": n,
            "score_by_start": round_scores(dict(enumerate(scores))),
            "start": start,
            "removed": [start, end - 1],
            "insert_type": insert,
        }
        if rotation is not None:
            trace["hadamard_order"] = hadamard_order(hidden)
        if insert == "none" or start == 0:
            # start 0: the official hook goes to layer −1 and never fires, so the block is deleted unpatched
            trace["patch"] = None
            return PassResult([drop_op(range(start, end))], trace)
        scale = ratio_sum[start] / rows
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise PassError(f"linearpatch: the channel scales of block {start}..{end - 1} are not finite and positive "
                            "(a channel is zero on every fit token); give another fit set or insert_type=none")
        c = float(scale.mean())
        h = rotation if rotation is not None else torch.eye(hidden, dtype=torch.float64)
        remainder = h @ torch.diag(scale / c) @ h.T
        tensors_by_role, cost = self.fit_remainder(engine, start, remainder)
        tensors, refs = {}, {}
        for role, value in tensors_by_role.items():
            refs[role] = f"linearpatch.{start - 1}-{end - 1}.{role}"
            tensors[refs[role]] = value
        ops = [merge_op(start - 1, end - 1, "lstsq", tensors=refs), scale_branches_op(range(end, L), 1.0 / c)]
        trace["patch"] = {
            "scale_mean": round(c, 6),
            "scale_min": round(float(scale.min()), 6),
            "scale_max": round(float(scale.max()), 6),
            "remainder_fit": {k: v for k, v in cost.items() if k != "fit_seconds"},
        }
        return PassResult(ops, trace, tensors, timings={"fit_seconds": cost["fit_seconds"]})
