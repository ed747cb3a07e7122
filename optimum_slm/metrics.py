"""The metrics every pass, similarity, analysis and benchmark shares: one definition of each.

* cosine: ``token_cosines`` (one cosine per token vector) and ``per_sample_cosine`` (one per flattened sample, the
  official SLM ``cal_sim``);
* ``block_influence``: ShortGPT's BI of one layer, Σ over tokens of 1 − cos(input, output);
* ``next_token_nll``: summed causal-LM loss of logits against ids, with its token count; ``perplexity_of`` turns a
  mean NLL into a perplexity without overflowing;
* CKA: ``linear_cka`` (feature-space form, rows are examples) and ``minibatch_cka`` (the official ``cka.py`` form:
  HSIC of centred Grams summed over minibatches). With one minibatch the two agree.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

Batches = list[torch.Tensor]

#: mean NLLs above this overflow ``exp``; their perplexity is reported as infinite
_MAX_EXP = 700.0


# ------------------------------------------------------------------------------------------------ cosine
def token_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of every token vector of two ``[..., hidden]`` tensors, in float64 (NaN where a vector is not finite)."""
    return torch.nn.functional.cosine_similarity(a.double(), b.to(a.device).double(), dim=-1)


def mean_token_cosine(a: Batches, b: Batches) -> float:
    """Mean per-token cosine over all tokens of two lists of batches."""
    total, count = 0.0, 0
    for x, y in zip(a, b):
        cos = token_cosines(x, y)
        total += float(cos.sum())
        count += cos.numel()
    return total / count


def per_sample_cosine(a: Batches, b: Batches) -> torch.Tensor:
    """Cosine of each sample's flattened [seq, hidden] state, official ``cal_sim`` style; shape [n_samples]."""
    sims = []
    for x, y in zip(a, b):
        x = x.reshape(x.shape[0], -1).double()
        y = y.reshape(y.shape[0], -1).to(x.device).double()
        sims.append(torch.nn.functional.cosine_similarity(x, y, dim=1))
    return torch.cat(sims)


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> float:
    """ShortGPT: Σ over all tokens of 1 − cos(x_in[t], x_out[t]); NaN cosines count as 0.5 (official)."""
    return float((1.0 - token_cosines(x_in, x_out)).nan_to_num(nan=0.5).sum())


# ------------------------------------------------------------------------------------------------ loss
def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy of ``logits [batch, seq, vocab]`` for ``ids [batch, seq]``, and the count.

    The last position predicts nothing and is left out (callers may leave it out before the vocabulary projection
    and pass ``seq - 1`` positions); logits are scored in float32.
    """
    if logits.shape[1] == ids.shape[1]:
        logits = logits[:, :-1]
    logits = logits.float()
    labels = ids[:, 1:].to(logits.device)
    total = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
    return float(total), labels.numel()


def perplexity_of(mean_nll: float) -> float:
    """exp(mean NLL), infinite where it would overflow."""
    return math.exp(mean_nll) if mean_nll < _MAX_EXP else float("inf")


# ------------------------------------------------------------------------------------------------ CKA
def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two [n, d] matrices (rows are examples), feature-space form ‖YᵀX‖² / (‖XᵀX‖ ‖YᵀY‖)."""
    x = x.reshape(x.shape[0], -1).double()
    y = y.reshape(y.shape[0], -1).double()
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    hsic = (y.T @ x).pow(2).sum()
    return float(hsic / ((x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()))


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
    """CKA matrix [L, L] between representations, ``outputs[i]`` being one as a list over minibatches."""
    grams = [[centered_gram(b) for b in layer] for layer in outputs]
    num = len(grams)
    cross = torch.zeros(num, num, dtype=torch.float64)
    for i in range(num):
        for j in range(i, num):
            value = sum(hsic(ki, kj) for ki, kj in zip(grams[i], grams[j]))
            cross[i, j] = cross[j, i] = value
    diag = cross.diagonal().clamp_min(1e-300).sqrt()
    return cross / (diag[:, None] * diag[None, :])
