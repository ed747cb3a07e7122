"""One backward pass of the causal-LM loss over the calibration ids, for the Taylor criteria (Shortened LLaMA's
Taylor+ and LLM-Pruner's first-order importance): gradients of the decoder layers' weights, the model left as found."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..arch import ArchAdapter


@contextmanager
def layer_gradients(model: nn.Module, ids: torch.Tensor, batch_size: int | None = None) -> Iterator[None]:
    """Inside the block, every decoder-layer parameter's ``.grad`` holds ∂L/∂W summed over batches of ``ids``.

    Only layer weights get gradients (saves the embedding's). On exit gradients are freed and ``requires_grad``
    flags restored.
    """
    adapter = ArchAdapter(model)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    old_grads = [p.grad for p in params]
    device = params[0].device
    batch_size = batch_size or ids.shape[0]
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for layer in adapter.layers:
            for p in layer.parameters():
                p.requires_grad_(True)
        with torch.enable_grad():
            for start in range(0, ids.shape[0], batch_size):
                batch = ids[start : start + batch_size].to(device)
                model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        yield
    finally:
        for p, flag, grad in zip(params, flags, old_grads):
            p.grad = grad
            p.requires_grad_(flag)
