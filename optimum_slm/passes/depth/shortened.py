"""``shortened-ppl``, ``shortened-taylor``, ``shortened-magnitude``: Shortened LLaMA (Kim et al. 2024), one shot.

Official code (Nota-NetsPresso/shortened-llm ``src/anal_block_sensitivity_*.py``, ``src/block_prune.py``): a score per
block on the dense model, blocks ranked ascending, the "+" heuristic drops blocks {0, 1, 2, 3, L−2, L−1} from the order
(``keep_first=4``, ``keep_last=2`` here; 0 and 0 is ``--no_plus_heuristic``), then the first N blocks are removed.

* PPL: calibration perplexity exp(mean token NLL) of the model without block b. The official code rebuilds an L−1
  layer model per block; here the trial runs the base layers above b from the recorded input of b (same numbers).
* Taylor+: one forward+backward of the causal-LM loss (labels = inputs); per block Σ over all its tensors of
  Σ|W ⊙ ∂L/∂W| (``norm_power=1``, ``weight_reduction=sum``, ``block_reduction=sum``).
* magnitude: the same aggregation of |W|; no data.
"""

from __future__ import annotations

import torch
from ...engine import ForwardEngine
from ...metrics import perplexity_of
from ...errors import PassError
from ...plan import drop_op
from ...progress import progress_bar
from ..base import NUM_LAYERS, PROTECT, RATIO, CompressionPass, PassParam, PassResult
from .common import round_scores, select_lowest


def ppl_scores(engine: ForwardEngine, progress=None) -> dict[int, float]:
    """Calibration perplexity of the base model with each block removed, by block."""
    engine.record_layer_inputs()
    scores: dict[int, float] = {}
    for b in range(engine.num_layers):
        total, count = engine.token_nll(engine.run_layers(engine.base_slots(b + 1), b))
        scores[b] = perplexity_of(total / count)
        if progress is not None:
            progress.update(1)
    return scores


def magnitude_scores(engine: ForwardEngine, power: float = 1.0) -> dict[int, float]:
    """Σ over each block's tensors of Σ|W|^power, by block (one layer's weights read at a time)."""
    scores = {}
    with torch.no_grad():
        for i, layer in enumerate(engine.adapter.layers):
            with engine.loaded(layer):
                scores[i] = float(sum(p.detach().double().abs().pow(power).sum() for p in layer.parameters()))
    return scores


def taylor_scores(engine: ForwardEngine, power: float = 1.0) -> dict[int, float]:
    """Σ over each block's tensors of Σ|W ⊙ ∂L/∂W|^power, L the causal-LM loss on the engine's calibration ids
    (gradients summed over its batches: ``engine.layer_gradients``)."""
    scores = {}
    for i, layer in engine.layer_gradients():
        with torch.no_grad():
            scores[i] = float(sum((p.detach().double() * p.grad.double()).abs().pow(power).sum()
                                  for p in layer.parameters() if p.grad is not None))
    return dict(sorted(scores.items()))


class _ShortenedPass(CompressionPass):
    """Shared selection: one-shot removal of the lowest-scoring blocks outside the "+" heuristic's kept blocks."""
    streams = True  # runs on a lazy model through the sequential engine

    criterion = ""
    params = (
        RATIO,
        NUM_LAYERS,
        PROTECT,
        PassParam("keep_first", "int", 4, "the '+' heuristic: the first N blocks are never removed (official 4)"),
        PassParam("keep_last", "int", 2, "the '+' heuristic: the last N blocks are never removed (official 2)"),
    )

    def validate(self) -> None:
        super().validate()
        for key in ("keep_first", "keep_last"):
            if self.config[key] < 0:
                raise PassError(f"{key} must be >= 0, got {self.config[key]}")

    def scores(self, engine: ForwardEngine) -> dict[int, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, engine: ForwardEngine) -> PassResult:
        n = engine.num_layers
        count = self.target_count(n)
        kept = set(range(min(self.config["keep_first"], n))) | set(range(max(n - self.config["keep_last"], 0), n))
        excluded = kept | self.protected(n)
        if n - len(excluded) < count:
            raise PassError(
                f"{self.name}: only {n - len(excluded)} of {n} blocks are removable "
                f"(keep_first={self.config['keep_first']}, keep_last={self.config['keep_last']}, protect), "
                f"cannot remove {count}"
            )
        scores = self.scores(engine)
        removed = select_lowest(self.name, scores, count, excluded)
        order = sorted(scores, key=lambda i: (scores[i], i))
        trace = {
            "criterion": self.criterion,
            "scores": round_scores(scores),
            "block_order": order,
            "excluded": sorted(excluded),
        }
        return PassResult([drop_op(removed)], trace)


class ShortenedPPLPass(_ShortenedPass):
    name = "shortened-ppl"
    description = "Shortened LLaMA PPL criterion: remove the blocks whose absence raises calibration PPL least."
    criterion = "ppl"

    def scores(self, engine: ForwardEngine) -> dict[int, float]:
        engine.require_calibration(self.name)
        with progress_bar(total=engine.num_layers, desc="shortened-ppl: blocks", unit="block") as bar:
            return ppl_scores(engine, progress=bar)


class ShortenedTaylorPass(_ShortenedPass):
    name = "shortened-taylor"
    description = "Shortened LLaMA Taylor+ criterion: remove the blocks with the lowest Σ|W ⊙ ∇W| (one backward)."
    criterion = "taylor"
    params = _ShortenedPass.params + (
        PassParam("batch_size", "int", None, "calibration samples per backward batch (official: all 10 at once)"),
    )

    def scores(self, engine: ForwardEngine) -> dict[int, float]:
        engine.require_calibration(self.name)
        return taylor_scores(engine)


class ShortenedMagnitudePass(_ShortenedPass):
    name = "shortened-magnitude"
    description = "Shortened LLaMA magnitude criterion: remove the blocks with the lowest Σ|W| (no data needed)."
    criterion = "magnitude"
    needs_calibration = False

    def scores(self, engine: ForwardEngine) -> dict[int, float]:
        return magnitude_scores(engine)
