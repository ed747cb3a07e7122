"""The sequential engine: the ``ForwardEngine`` interface for a lazy model (``engine.lazy.load_lazy_model``), whose
decoder layers are read from the checkpoint only while they run.

* Recording runs layer-outer: every calibration batch goes through layer ``i`` before layer ``i + 1`` is read, so
  each layer is read once per sweep. The call kwargs of every layer (masks by layer type, position embeddings) come
  from one cheap forward of the decoder with each layer replaced by a probe that records its arguments and returns
  its input.
* ``run_layers`` is layer-outer too (the same computations as the in-memory engine, in another order: results are
  bit-identical); each slot's module is read in once for all batches.
* ``stream_fit`` is layer-outer as well: each layer is read once per pass over the fit set (not once per batch);
  the fit set's running states are kept in memory or, beyond the budget's room, in a temp folder.

Memory follows the engine's ``MemoryBudget`` (``budget=``, from ``--max-memory``; without a limit, the memory
available):
recorded activations stay on ``storage_device`` (the CPU by default), or go to disk (``engine.activations``) when
they exceed half of what the budget leaves; read layers stay resident in what the activations leave (the highest
layers first), and any other layer is read for its call and released (a window being merged reads its layers
together, tensor by tensor).
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..metrics import Batches
from ..progress import progress_bar
from .budget import MemoryBudget
from .lazy import materialized, read_in
from .spill import ActivationFolder
from .memory import FitBatch, ForwardEngine, Slot, _RecordedFitBatch, call_kwargs, call_layer, read_kept


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


def _nbytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _autograd_ready(value: Any) -> Any:
    """``value`` with its inference-mode tensors (recorded call kwargs: masks, rotary tables) cloned into ordinary
    ones, which autograd may save for the backward."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, dict):
        return {k: _autograd_ready(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_autograd_ready(v) for v in value)
    return value


class SequentialEngine(ForwardEngine):
    """``ForwardEngine`` for lazy models: layers are read in while they run (see the module docstring)."""

    #: where recorded activations went when they did not fit the budget (None: in memory)
    activations: ActivationFolder | None = None

    def __init__(self, *args: Any, budget: MemoryBudget | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        #: what recorded activations and resident layers may take (the request's ``--max-memory``)
        self.budget = budget or MemoryBudget()
        #: bytes of layers that may stay resident (set with the recording, from the budget the activations leave)
        self._cache_budget = 0.0
        self._resident: dict[nn.Module, int] = {}
        self._in_use: Counter = Counter()
        self._index = {id(layer): i for i, layer in enumerate(self.adapter.layers)}

    def _record(self, n: int) -> None:
        """Layer-outer: the probe gives every batch's embeddings and kwargs, then each layer runs on all batches."""
        hidden: Batches = []
        for ids in self.batches():
            h, kwargs = probe_calls(self.adapter, ids, self.device)
            hidden.append(h)
            for i in range(n):
                self.layer_kwargs[i].append(kwargs[i])
        keep = self._activation_keeper(sum(h.numel() * h.element_size() for h in hidden) * (n + 1))
        layers = self.adapter.layers
        desc = "recording layers" + (" (activations to disk)" if self.activations is not None else "")
        with progress_bar(desc=desc, unit="layer", total=n) as bar:
            for i in range(n):
                self.inputs[i] = keep(hidden)
                with self.loaded(layers[i]):
                    hidden = [self._call(layers[i], i, b, hidden[b]) for b in range(len(hidden))]
                bar.update(1)
        self.inputs[n] = keep(hidden)
        # count the recording as the in-memory engine does (its decoder forward is not counted, only the last layer's
        # re-run), so a plan's trace is the same whichever engine made it
        self.layer_tokens -= (n - 1) * self.input_ids.numel()
        self.base_final = [self.adapter.final_norm(h.to(self.device)).to(self.storage_device) for h in hidden]

    def _activation_keeper(self, total: int) -> Callable[[Batches], Batches]:
        """How recorded hidden states are kept: on ``storage_device``, or on disk (``activations``, an
        ``ActivationFolder``) when ``total`` bytes of them exceed half of what the memory budget leaves after the
        loaded tensors and a few layers' weights (``self.budget``; without a limit, the memory available now)."""
        left = self._left_after_weights()
        if left is not None and total > left / 2:
            self.activations = ActivationFolder()
            self._cache_budget = max(0.0, left / 2)
            return lambda hidden: self.activations.batches(hidden, self.storage_device)
        # what the activations leave, halved for the working memory of the computations, keeps layers resident
        self._cache_budget = max(0.0, (left - total) / 2) if left is not None else 0.0
        return lambda hidden: [h.to(self.storage_device) for h in hidden]

    def _left_after_weights(self, extra: float = 0.0) -> float | None:
        """What the memory budget leaves after the loaded tensors, a few layers' weights and ``extra`` bytes (None:
        no limit known)."""
        store = getattr(self.model, "slm_store", None)
        layer_bytes = store.nbytes() / max(self.num_layers, 1) if store is not None else 0
        resident = sum(t.numel() * t.element_size() for t in list(self.model.parameters()) + list(self.model.buffers())
                       if not t.is_meta)
        # with a limit the loaded tensors count against it; the memory available now has them taken already
        return self.budget.left_after((resident if self.budget.limit is not None else 0) + 4 * layer_bytes + extra)

    def _fit_room(self) -> int | None:
        # replayed fit states share the budget with the recorded activations kept in memory and the resident layers
        recorded = 0 if self.activations is not None else sum(
            h.numel() * h.element_size() for hidden in self.inputs for h in hidden if isinstance(h, torch.Tensor))
        left = self._left_after_weights(recorded + self._cache_budget)
        return None if left is None else int(max(0.0, left) / 2)

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
            with self.loaded(slot.module):
                hidden = [self._call(slot.module, slot.type_index, b, hidden[b]) for b in range(len(hidden))]
        if slot_inputs is not None:
            slot_inputs[-1] = [h.to(self.storage_device) for h in hidden]
        return [self.adapter.final_norm(h) for h in hidden] if final_norm else hidden

    @torch.inference_mode()
    def stream_fit(self, points: Sequence[int], desc: str = "fitting",
                   reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   reuse: bool = False) -> Iterator[FitBatch]:
        """``ForwardEngine.stream_fit`` layer-outer: every fit batch goes through layer ``i`` before layer ``i + 1``
        is read, so each layer is read once per pass instead of once per batch (a lazy layer costs a read from disk
        where the in-memory model's is free). The running states of all batches, and the captured ones, are kept like
        replayed fit states (``fit_keeper``: memory, or a temp folder beyond the budget's room); the batches are then
        yielded from them. The same computations as batch by batch, in another order: the states are bit-identical.
        """
        reuse = reuse and reduce is None
        if reuse and self.can_replay(points):
            yield from self._replay_fit(desc)
            return
        keep = (lambda h: reduce(h.to(self.device))) if reduce is not None else (lambda h: h.to(self.device))
        ids_all = self.fit_set("stream_fit")
        n, wanted, layers = self.num_layers, set(points), self.adapter.layers
        stop = min(max(points), n)
        if reuse:
            self.release_fit_replay()
        # room for the running states and, unreduced, the captured ones (a reduced capture is a few rows)
        state_bytes = ids_all.numel() * self.adapter.config.hidden_size * 4
        store, folder = self.fit_keeper(state_bytes * (1 + (len(wanted) if reduce is None else 0)))
        recorded: list[_RecordedFitBatch] = []
        running: list[Any] = []
        try:
            for start in range(0, ids_all.shape[0], self.fit_batch_size):
                batch = FitBatch(self, ids_all[start : start + self.fit_batch_size])
                h, kwargs = probe_calls(self.adapter, batch.ids, self.device)
                batch.kwargs = dict(enumerate(kwargs))
                recorded.append(_RecordedFitBatch(batch, store))
                running.append(store(h))
            with progress_bar(desc=f"{desc} (base states)", unit="layer", total=stop) as bar:
                for i in range(stop + 1):
                    with self.loaded(layers[i]) if i < stop else nullcontext():
                        for b, rec in enumerate(recorded):
                            h = read_kept(running[b]).to(self.device)
                            if i in wanted:
                                rec.inputs[i] = store(keep(h.detach()))
                            if i < stop:
                                h = call_layer(layers[i], rec.kwargs[i], h)
                                running[b] = store(h)
                    if i < stop:
                        bar.update(1)
            running.clear()
            self.fit_layer_tokens += ids_all.numel() * min(stop + 1, n)
            with progress_bar(desc=desc, unit="seq", total=ids_all.shape[0]) as bar:
                for rec in recorded:
                    batch = rec.batch()
                    yield batch
                    bar.update(batch.ids.shape[0])
            if reuse:  # only a pass that ran to its end is replayed; the replay owns the folder from here
                self._fit_replay, self._fit_folder, folder = (frozenset(points), recorded), folder, None
        finally:
            if folder is not None:
                folder.cleanup()

    @contextmanager
    def loaded(self, module: nn.Module) -> Iterator[nn.Module]:
        """A lazy layer read in (onto the compute device) for the block; any other module moved to the compute
        device as the in-memory engine does.

        Read layers stay resident while the budget has room for them (``close`` or the engine's end releases them),
        the highest first: every stack a search runs ends at the top layer, so the top of the model is read most
        often. A lower layer is read for the block and released after."""
        if module in self._resident:
            self._in_use[module] += 1
            try:
                yield module
            finally:
                self._in_use[module] -= 1
            return
        if not any(p.is_meta for p in module.parameters()):
            with super().loaded(module):
                yield module
            return
        if not self._make_room(module):
            with materialized(module, self.device):
                yield module
            return
        read_in(module, self.device)
        self._resident[module] = _nbytes(module)
        self._in_use[module] += 1
        try:
            yield module
        finally:
            self._in_use[module] -= 1

    def _make_room(self, module: nn.Module) -> bool:
        """Whether ``module`` may stay resident, after releasing lower resident layers not in use if it needs it."""
        index = self._index.get(id(module))
        need = _nbytes(module)
        if index is None or need > self._cache_budget:
            return False
        lower = sorted((self._index[id(m)], m) for m in self._resident if self._index[id(m)] < index
                       and not self._in_use[m])
        held = sum(self._resident.values())
        while held + need > self._cache_budget and lower:
            _, victim = lower.pop(0)
            held -= self._resident.pop(victim)
            victim.to("meta")
        return held + need <= self._cache_budget

    def close(self) -> None:
        """Release the resident layers (they go back to reading from the checkpoint)."""
        for module in list(self._resident):
            module.to("meta")
        self._resident.clear()

    def layer_gradients(self, lowest: int = 0) -> Iterator[tuple[int, nn.Module]]:
        """The in-memory engine's gradients (same values), one layer in memory at a time: the loss's gradient with
        respect to the last layer's recorded output, then each layer top-down re-run on its recorded input and
        back-propagated, passing ∂L/∂input down. Parameters accumulate over batches in batch order, as the whole-model
        backward does. Layers below ``lowest`` are not back-propagated through."""
        ids = self.require_calibration("layer gradients")
        before = self.layer_tokens
        self.record_layer_inputs()
        # the recording is this backward's forward: counted, with the re-runs, as one run of every layer
        self.layer_tokens = before + self.num_layers * ids.numel()
        head = [p for p in self.model.parameters() if not p.is_meta]
        flags = [p.requires_grad for p in head]
        try:
            for p in head:
                p.requires_grad_(False)
            grads = self._loss_gradients()
            for i in range(self.num_layers - 1, lowest - 1, -1):
                layer = self.adapter.layers[i]
                with self.loaded(layer):
                    params = list(layer.parameters())
                    layer_flags = [p.requires_grad for p in params]
                    try:
                        for p in params:
                            p.requires_grad_(True)
                            p.grad = None
                        grads = self._backward_layer(layer, i, grads, need_input=i > lowest)
                        yield i, layer
                    finally:
                        for p, flag in zip(params, layer_flags):
                            p.grad = None
                            p.requires_grad_(flag)
        finally:
            for p, flag in zip(head, flags):
                p.requires_grad_(flag)

    def _loss_gradients(self) -> Batches:
        """∂L/∂(last layer's output) per batch, L the model's own causal-LM loss (final norm, head, soft-capping)."""
        grads: Batches = []
        with torch.enable_grad():
            for ids, h in zip(self.batches(), self.inputs[self.num_layers]):
                h = h.to(self.device).clone().requires_grad_(True)
                logits = self.adapter.logits(self.adapter.final_norm(h))
                loss = self.model.loss_function(logits=logits, labels=ids.to(self.device),
                                                vocab_size=logits.shape[-1])
                loss.backward()
                grads.append(h.grad)
        return grads

    def _backward_layer(self, layer: nn.Module, i: int, grads: Batches, need_input: bool) -> Batches:
        """Back-propagate each batch's output gradient through layer ``i`` (re-run on its recorded input); the
        gradients with respect to its input (empty when not ``need_input``)."""
        below: Batches = []
        with torch.enable_grad():
            for b, grad in enumerate(grads):
                x = self.inputs[i][b].to(self.device).clone().requires_grad_(need_input)
                call_layer(layer, _autograd_ready(self.layer_kwargs[i][b]), x).backward(grad)
                if need_input:
                    below.append(x.grad)
        return below
