"""Perplexity on held-out text: the quick quality signal every benchmark here reports."""

from __future__ import annotations

import torch
from torch import nn

from .calibration import load_documents
from .errors import CalibrationError
from .metrics import next_token_nll, perplexity_of


def heldout_ids(tokenizer, source: str = "wiki-leads-test", n_windows: int = 16, seq_len: int = 512) -> torch.Tensor:
    """``[n_windows, seq_len]`` token ids: the source's documents joined by blank lines, cut into windows.

    The default source is the held-out split of the Wikipedia leads, disjoint from the ``wiki-leads`` calibration
    split.
    """
    docs = load_documents(source)
    ids = tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    need = n_windows * seq_len
    if len(ids) < need:
        raise CalibrationError(f"{source!r} has {len(ids)} tokens; {n_windows} x {seq_len} needs {need}")
    return torch.tensor(ids[:need], dtype=torch.long).view(n_windows, seq_len)


@torch.inference_mode()
def perplexity(model: nn.Module, ids: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over all windows of ``ids`` (each window scored independently)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start : start + batch_size].to(device)
        batch_total, batch_count = next_token_nll(model(batch, use_cache=False).logits, batch)
        total += batch_total
        count += batch_count
    return perplexity_of(total / count)
