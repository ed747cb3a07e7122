"""The sequential engine: the ``ForwardEngine`` interface for a lazy model (``engine.lazy.load_lazy_model``), whose
decoder layers are read from the checkpoint only while they run.

* Recording runs layer-outer: every calibration batch goes through layer ``i`` before layer ``i + 1`` is read, so
  each layer is read once per sweep. The call kwargs of every layer (masks by layer type, position embeddings) come
  from one cheap forward of the decoder with each layer replaced by a probe that records its arguments and returns
  its input.
* ``run_layers`` is layer-outer too (the same computations as the in-memory engine, in another order: results are
  bit-identical); each slot's module is read in once for all batches.
* ``stream_fit`` runs the fit set batch by batch (memory does not grow with it); each layer is read once per batch.

Recorded activations stay on ``storage_device`` (the CPU by default), never the weights of more than one base layer
at a time (a window being merged reads its layers together).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..metrics import Batches
from ..progress import progress_bar
from .lazy import materialized
from .memory import FitBatch, ForwardEngine, Slot, call_kwargs, call_layer


class _Probe(nn.Module):
    """Stands in for decoder layer ``index`` during a probing forward: records the call, returns the input."""

    def __init__(self, index: int, sink: Callable[[int, torch.Tensor, dict[str, Any]], None], real: nn.Module):
        super().__init__()
        self.index, self.sink = index, sink
        if hasattr(real, "attention_type"):  # some decoders pick the mask by the layer's attribute
            self.attention_type = real.attention_type

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.sink(self.index, hidden_states, kwargs)
        return hidden_states


def probe_calls(adapter, ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """The hidden state entering layer 0 for ``ids`` and every layer's call kwargs, without running any layer."""
    layers = adapter.decoder.layers
    first: list[torch.Tensor] = []
    kwargs: list[dict[str, Any]] = [{} for _ in range(len(layers))]

    def sink(i: int, hidden: torch.Tensor, kw: dict[str, Any]) -> None:
        if i == 0:
            first.append(hidden.detach())
        kwargs[i] = call_kwargs(kw)

    adapter.decoder.layers = nn.ModuleList([_Probe(i, sink, layer) for i, layer in enumerate(layers)])
    try:
        adapter.decoder(input_ids=ids.to(device), use_cache=False)
    finally:
        adapter.decoder.layers = layers
    return first[0], kwargs


class SequentialEngine(ForwardEngine):
    """``ForwardEngine`` for lazy models: layers are read in while they run (see the module docstring)."""

    def _record(self, n: int) -> None:
        """Layer-outer: the probe gives every batch's embeddings and kwargs, then each layer runs on all batches."""
        hidden: Batches = []
        for ids in self.batches():
            h, kwargs = probe_calls(self.adapter, ids, self.device)
            hidden.append(h)
            for i in range(n):
                self.layer_kwargs[i].append(kwargs[i])
        layers = self.adapter.layers
        with progress_bar(desc="recording layers", unit="layer", total=n) as bar:
            for i in range(n):
                self.inputs[i] = [h.to(self.storage_device) for h in hidden]
                with self._on_device(layers[i]):
                    hidden = [self._call(layers[i], i, b, hidden[b]) for b in range(len(hidden))]
                bar.update(1)
        self.inputs[n] = [h.to(self.storage_device) for h in hidden]
        # count the recording as the in-memory engine does (its decoder forward is not counted, only the last layer's
        # re-run), so a plan's trace is the same whichever engine made it
        self.layer_tokens -= (n - 1) * self.input_ids.numel()
        self.base_final = [self.adapter.final_norm(h.to(self.device)).to(self.storage_device) for h in hidden]

    @torch.inference_mode()
    def run_layers(self, slots: Sequence[Slot | tuple[nn.Module, int]], start: int | Batches, final_norm: bool = True,
                   slot_inputs: list[Batches] | None = None) -> Batches:
        self.record_layer_inputs()
        slots = [s if isinstance(s, Slot) else Slot(*s) for s in slots]
        hidden = [h.to(self.device) for h in (self.inputs[start] if isinstance(start, int) else start)]
        if slot_inputs is not None:
            slot_inputs[:] = [[] for _ in range(len(slots) + 1)]
        for k, slot in enumerate(slots):
            if slot_inputs is not None:
                slot_inputs[k] = [h.to(self.storage_device) for h in hidden]
            with self._on_device(slot.module):
                hidden = [self._call(slot.module, slot.type_index, b, hidden[b]) for b in range(len(hidden))]
        if slot_inputs is not None:
            slot_inputs[-1] = [h.to(self.storage_device) for h in hidden]
        return [self.adapter.final_norm(h) for h in hidden] if final_norm else hidden

    def _capture_fit(self, batch: FitBatch, wanted: set[int], top: int, keep: Callable) -> None:
        """Fill ``batch`` layer by layer, each layer read in for this batch (memory stays one batch's)."""
        n, layers = self.num_layers, self.adapter.layers
        h, kwargs = probe_calls(self.adapter, batch.ids, self.device)
        batch.kwargs = dict(enumerate(kwargs))
        for i in range(min(top, n) + 1):
            if i in wanted:
                batch.inputs[i] = keep(h.detach())
            if i == min(top, n):
                break
            with self._on_device(layers[i]):
                h = call_layer(layers[i], kwargs[i], h)

    def _on_device(self, module: nn.Module):
        """A lazy layer read in (onto the compute device) for the duration of a call; any other module moved to the
        compute device as the in-memory engine does."""
        if any(p.is_meta for p in module.parameters()):
            return materialized(module, self.device)
        return super()._on_device(module)
