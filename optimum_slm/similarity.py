"""Similarity criteria between the base model's output and a compressed candidate's, higher = more similar.

Every criterion gets the engine (for the base model's recorded reference) and the candidate's final post-norm hidden
state per batch, and returns one float.

* ``final-cosine`` (official): per sample, cosine of the flattened [seq × hidden] final states; mean over samples.
* ``token-cosine``: cosine of every token's hidden vector; mean over all tokens.
* ``logit-kl``: exp(−KL(p_base ‖ p_candidate)) of the next-token distributions, KL averaged over tokens; in (0, 1].
* ``cka``: linear CKA between the base and candidate final states, tokens pooled (columns centred).
* ``nll``: exp(NLL_base − NLL_candidate) of the calibration tokens' next-token loss (SLEB's criterion as a
  similarity; 1 for the base, can exceed 1 for a candidate with a lower loss).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .engine import Batches, ForwardEngine, per_sample_cosine
from .errors import PassError

Similarity = Callable[[ForwardEngine, Batches], float]


def final_cosine(engine: ForwardEngine, candidate: Batches) -> float:
    return float(per_sample_cosine(candidate, engine.reference).mean())


def token_cosine(engine: ForwardEngine, candidate: Batches) -> float:
    total, count = 0.0, 0
    for x, y in zip(candidate, engine.reference):
        cos = torch.nn.functional.cosine_similarity(x.double(), y.to(x.device).double(), dim=-1)
        total += float(cos.sum())
        count += cos.numel()
    return total / count


def _reference_logprobs(engine: ForwardEngine) -> Batches:
    cached = getattr(engine, "_ref_logprobs", None)
    if cached is None:
        with torch.inference_mode():
            cached = [torch.log_softmax(engine.adapter.logits(h.to(engine.device)).float(), -1) for h in engine.reference]
        engine._ref_logprobs = cached
    return cached


def logit_kl(engine: ForwardEngine, candidate: Batches) -> float:
    ref = _reference_logprobs(engine)
    total, count = 0.0, 0
    with torch.inference_mode():
        for h, lp in zip(candidate, ref):
            lq = torch.log_softmax(engine.adapter.logits(h).float(), -1)
            kl = (lp.exp() * (lp - lq)).sum(-1)
            total += float(kl.sum())
            count += kl.numel()
    return float(torch.exp(torch.tensor(-total / count)))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two [n, d] matrices (rows are examples)."""
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    hsic = (y.T @ x).pow(2).sum()
    return float(hsic / ((x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()))


def cka(engine: ForwardEngine, candidate: Batches) -> float:
    x = torch.cat([h.reshape(-1, h.shape[-1]) for h in engine.reference])
    y = torch.cat([h.reshape(-1, h.shape[-1]).to(x.device) for h in candidate])
    return linear_cka(x, y)


def nll(engine: ForwardEngine, candidate: Batches) -> float:
    base = getattr(engine, "_base_nll", None)
    if base is None:
        total, count = engine.token_nll(engine.reference)
        base = engine._base_nll = total / count
    total, count = engine.token_nll(candidate)
    return math.exp(min(base - total / count, 700.0))


SIMILARITIES: dict[str, Similarity] = {
    "final-cosine": final_cosine,
    "token-cosine": token_cosine,
    "logit-kl": logit_kl,
    "cka": cka,
    "nll": nll,
}


def get_similarity(name: str) -> Similarity:
    fn = SIMILARITIES.get(name)
    if fn is None:
        raise PassError(f"unknown similarity {name!r}; available: {', '.join(SIMILARITIES)}")
    return fn
