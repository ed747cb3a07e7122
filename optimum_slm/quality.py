"""The quality check that ends every compression: a few seconds that tell a good model from a broken one.

On text the pass never saw (documents of the calibration corpus the sampling did not reach), it measures the
base's and the compressed model's perplexity and the per-token cosine of their final hidden states. The result is
printed, stored in the plan's trace (``quality_check``) and in the model card; a compressed model whose perplexity
exceeds ``WARN_RATIO`` × the base's gets a loud one-line warning naming a better choice. A base whose own perplexity
is not finite (a float16 load that overflows) gets a warning about the base instead: the check cannot judge the pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .arch import ArchAdapter
from .engine.budget import MemoryBudget
from .errors import CalibrationError
from .metrics import mean_token_cosine, next_token_nll, perplexity_of

#: a compressed model this many times the base's perplexity is called out
WARN_RATIO = 5.0
#: the check's text: windows × tokens
CHECK_WINDOWS = 8
CHECK_SEQ_LEN = 128
RECOMMENDED = "slm-plus"


def check_ids(tokenizer, documents: list[str], n_windows: int = CHECK_WINDOWS, seq_len: int = CHECK_SEQ_LEN
              ) -> torch.Tensor:
    """``[n, seq_len]`` ids from ``documents`` joined by the tokenizer's EOS (fewer windows when the text is short)."""
    sep = tokenizer.eos_token or "\n\n"
    need = n_windows * seq_len
    ids: list[int] = []
    for doc in documents:
        ids.extend(tokenizer(doc + sep, add_special_tokens=False)["input_ids"])
        if len(ids) >= need:
            break
    n = min(n_windows, len(ids) // seq_len)
    if n < 1:
        raise CalibrationError(f"the quality check needs {seq_len} tokens of unseen text, the corpus has "
                               f"{len(ids)} left")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@torch.inference_mode()
def _measure(model: nn.Module, ids: torch.Tensor, batch_size: int = 4, budget: MemoryBudget | None = None
             ) -> tuple[float, list[torch.Tensor]]:
    """Perplexity of ``model`` on ``ids`` and its final post-norm hidden states per batch (``budget``: the memory a
    lazy model's sequential engine may use)."""
    from .engine import SequentialEngine, is_lazy_model

    if is_lazy_model(model):  # layers read from the checkpoint one at a time
        engine = SequentialEngine(model, ids, batch_size=batch_size, budget=budget)
        try:
            engine.record_layer_inputs()
            total, count = engine.token_nll(engine.base_final)
        finally:
            engine.close()
        return perplexity_of(total / count), [h.float().cpu() for h in engine.base_final]
    adapter = ArchAdapter(model)
    device = next(model.parameters()).device
    total, count, finals = 0.0, 0, []
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start : start + batch_size].to(device)
        hidden = adapter.decoder(input_ids=batch, use_cache=False).last_hidden_state
        batch_total, batch_count = next_token_nll(adapter.logits(hidden[:, :-1]), batch)
        total += batch_total
        count += batch_count
        finals.append(hidden.float().cpu())
    return perplexity_of(total / count), finals


@dataclass
class QualityCheck:
    """The base model's side of the check, measured once before the model is compressed."""

    ids: torch.Tensor
    source: str
    base_ppl: float
    base_final: list[torch.Tensor]
    budget: MemoryBudget | None = None

    @classmethod
    def prepare(cls, model: nn.Module, tokenizer, documents: list[str], source: str,
                budget: MemoryBudget | None = None) -> "QualityCheck":
        ids = check_ids(tokenizer, documents)
        ppl, finals = _measure(model, ids, budget=budget)
        return cls(ids, source, ppl, finals, budget)

    def run(self, compressed: nn.Module) -> dict[str, Any]:
        """The check's result for the compressed model (JSON-ready; no timings, so plans stay reproducible)."""
        ppl, finals = _measure(compressed, self.ids, budget=self.budget)
        base_ok = math.isfinite(self.base_ppl)
        ratio = ppl / self.base_ppl if base_ok and self.base_ppl > 0 else float("inf")
        result = {
            "text": f"{self.source} (documents the calibration did not read)",
            "tokens": int(self.ids.numel()),
            "base_ppl": round(self.base_ppl, 4) if base_ok else str(self.base_ppl),
            "ppl": round(ppl, 4) if math.isfinite(ppl) else str(ppl),
            "ppl_ratio": (round(ratio, 3) if ratio != float("inf") else "inf") if base_ok else "n/a",
            "final_cosine": round(mean_token_cosine(finals, self.base_final), 4),
        }
        if not base_ok:  # the base itself is broken (in the dtype it was loaded in): say so, not "the pass"
            result["base_dtype"] = str(next(compressed.parameters()).dtype).replace("torch.", "")
        return result


def describe(result: dict[str, Any]) -> str:
    """One line: the check's numbers."""
    ratio = result["ppl_ratio"]
    ratio_text = f"{ratio:.2f}×" if isinstance(ratio, float) else str(ratio)
    return (f"quality check on {result['tokens']:,} unseen tokens of {result['text'].split(' (')[0]}: perplexity "
            f"{_num(result['ppl'])} (base {_num(result['base_ppl'])}, {ratio_text}), final-state cosine "
            f"{result['final_cosine']:.3f}")


def warning(result: dict[str, Any], method: str) -> str | None:
    """The loud line for a result past ``WARN_RATIO``, naming a better choice; None when the result is fine."""
    base = result.get("base_ppl")
    if base is not None and not (isinstance(base, (int, float)) and math.isfinite(base)):
        dtype = result.get("base_dtype")
        where = f" in {dtype}" if dtype else ""
        return (f"WARNING: the base model's own perplexity is {base}{where}: the base is already broken in this "
                f"dtype (not by {method}), so the check cannot judge the pass; load it in float32 or bfloat16 "
                "(--dtype)")
    ratio = result["ppl_ratio"]
    if isinstance(ratio, (int, float)) and ratio <= WARN_RATIO:
        return None
    better = (f"try --method {RECOMMENDED} (the recommended pass)" if RECOMMENDED not in method.split(" + ")
              else "try a smaller --ratio")
    times = f"{ratio:,.1f}×" if isinstance(ratio, (int, float)) else "infinitely"
    return (f"WARNING: the compressed model's perplexity is {times} the base's (> {WARN_RATIO:g}×): it is likely "
            f"to produce gibberish; {better}")


def _num(value: Any) -> str:
    return f"{value:,.2f}" if isinstance(value, (int, float)) else str(value)
