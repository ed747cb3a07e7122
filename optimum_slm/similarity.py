"""Similarity criteria between the base model's output and a compressed candidate's, higher = more similar.

Every criterion gets the engine (for the base model's recorded final states, ``engine.base_final``) and the
candidate's final post-norm hidden state per batch, and returns one float. Built-ins are registered through the
``register_similarities`` plugin hook like third-party criteria.

* ``final-cosine`` (official): per sample, cosine of the flattened [seq × hidden] final states; mean over samples.
* ``token-cosine``: cosine of every token's hidden vector; mean over all tokens.
* ``logit-kl``: exp(−KL(p_base ‖ p_candidate)) of the next-token distributions, KL averaged over tokens; in (0, 1].
* ``cka``: linear CKA between the base and candidate final states, tokens pooled (columns centred).
* ``nll``: exp(NLL_base − NLL_candidate) of the calibration tokens' next-token loss (SLEB's criterion as a
  similarity; 1 for the base, can exceed 1 for a candidate with a lower loss).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .engine import Batches, ForwardEngine
from .errors import PassError
from .metrics import linear_cka, mean_token_cosine, per_sample_cosine

Similarity = Callable[[ForwardEngine, Batches], float]


def final_cosine(engine: ForwardEngine, candidate: Batches) -> float:
    return float(per_sample_cosine(candidate, engine.base_final).mean())


def token_cosine(engine: ForwardEngine, candidate: Batches) -> float:
    return mean_token_cosine(candidate, engine.base_final)


def _of_base(engine: ForwardEngine, key: str, compute: Callable[[], Any]) -> Any:
    """``compute()``, once per engine: a quantity of the base model's final states, reused by every candidate."""
    if key not in engine.derived:
        engine.derived[key] = compute()
    return engine.derived[key]


def _reference_logprobs(engine: ForwardEngine) -> Batches:
    def compute() -> Batches:
        with torch.inference_mode():
            return [torch.log_softmax(engine.adapter.logits(h.to(engine.device)).float(), -1) for h in engine.base_final]

    return _of_base(engine, "logprobs", compute)


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


def cka(engine: ForwardEngine, candidate: Batches) -> float:
    x = torch.cat([h.reshape(-1, h.shape[-1]) for h in engine.base_final])
    y = torch.cat([h.reshape(-1, h.shape[-1]).to(x.device) for h in candidate])
    return linear_cka(x, y)


def nll(engine: ForwardEngine, candidate: Batches) -> float:
    def mean_nll(states: Batches) -> float:
        total, count = engine.token_nll(states)
        return total / count

    base = _of_base(engine, "nll", lambda: mean_nll(engine.base_final))
    return math.exp(min(base - mean_nll(candidate), 700.0))


#: the built-in criteria (``similarities()`` adds those of plugins)
SIMILARITIES: dict[str, Similarity] = {
    "final-cosine": final_cosine,
    "token-cosine": token_cosine,
    "logit-kl": logit_kl,
    "cka": cka,
    "nll": nll,
}


def similarities() -> dict[str, Similarity]:
    """Every registered similarity criterion by name (built-ins and plugins)."""
    from .plugins import collect

    return collect("register_similarities", None, "similarity", PassError)


def get_similarity(name: str) -> Similarity:
    from .plugins import lookup

    return lookup("register_similarities", None, "similarity", name, PassError)
