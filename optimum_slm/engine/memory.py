"""The in-memory forward engine: record every decoder layer's input once, then run any stack of layers from there.

One full forward pass of the decoder is run with pre-hooks that capture, for every layer, its input hidden state and
the exact keyword arguments the model passes it (attention mask for its layer type, position embeddings for its
RoPE table, position ids). Passes then re-run arbitrary layer sequences from any recorded point with
``run_layers``, without re-running the layers below, and without knowing anything about the architecture.

The calibration set is split into batches; all stored tensors are lists over batches. ``run_layers`` moves a layer
to the compute device only for the time it runs (``offload``), so a later backend can stream layers from CPU or
disk to a GPU without changing the passes.
"""

from __future__ import annotations

from dataclasses import dataclass
import warnings
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..arch import ArchAdapter
from ..errors import PassError
from ..metrics import Batches, next_token_nll
from ..progress import progress_bar

#: fit-set rows per streamed batch: big enough for fast matmuls, small enough that one batch's activations are cheap
DEFAULT_FIT_BATCH = 16

_DROP_KWARGS = {"cache", "past_key_values", "past_key_value", "use_cache", "output_attentions"}


def call_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of a decoder layer's call worth keeping to re-run it (no cache, no hidden state)."""
    return {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS and k != "hidden_states"}


@dataclass
class Slot:
    """One layer of a stack to run: the module and the ORIGINAL index whose recorded kwargs it uses."""

    module: nn.Module
    type_index: int


class ForwardEngine:
    """Records layer inputs for calibration ids and runs layer stacks from them.

    Attributes after ``record_layer_inputs()``:
    * ``inputs[i]``: list over batches of the input hidden state of base layer ``i`` (``inputs[L]`` is the output of
      the last layer, before the final norm);
    * ``base_final``: list over batches of the model's final post-norm hidden state (``last_hidden_state``), the
      reference every candidate is compared with.

    ``input_ids`` may be None for passes that need no calibration data (``require_calibration`` refuses the others).
    """

    def __init__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor | None,
        batch_size: int | None = None,
        device: str | torch.device | None = None,
        storage_device: str | torch.device | None = None,
        fit_ids: torch.Tensor | None = None,
        fit_batch_size: int | None = None,
    ):
        if input_ids is not None and (input_ids.dim() != 2 or input_ids.shape[0] < 1):
            raise PassError(f"calibration ids must be [n_samples, seq_len], got shape {tuple(input_ids.shape)}")
        if batch_size is not None and batch_size < 1:
            raise PassError(f"batch_size must be >= 1, got {batch_size}")
        if fit_ids is not None and (fit_ids.dim() != 2 or fit_ids.shape[0] < 1):
            raise PassError(f"fit ids must be [n_samples, seq_len], got shape {tuple(fit_ids.shape)}")
        self.model = model
        self.adapter = ArchAdapter(model)
        self.input_ids = input_ids
        self.batch_size = batch_size or (input_ids.shape[0] if input_ids is not None else 1)
        param = next(model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        self.storage_device = torch.device(storage_device) if storage_device is not None else self.device
        self.num_layers = self.adapter.num_layers
        self.inputs: list[Batches] = []
        self.layer_kwargs: list[list[dict[str, Any]]] = []
        self.base_final: Batches = []
        #: quantities derived from ``base_final`` (e.g. the base's next-token log-probs), computed once by whoever needs
        #: them and valid for the engine's lifetime, since the recording happens once
        self.derived: dict[str, Any] = {}
        self._recorded = False
        #: the fit set (None: passes that fit maps fall back to the search set), streamed ``fit_batch_size`` rows at a
        #: time by ``stream_fit``; never recorded whole
        self.fit_ids = fit_ids
        self.fit_batch_size = fit_batch_size or DEFAULT_FIT_BATCH
        #: cost counters: tokens run through one decoder layer, on the search set and on the fit set
        self.layer_tokens = 0
        self.fit_layer_tokens = 0

    # ---------------------------------------------------------------------------------------------- recording
    def require_calibration(self, pass_name: str, min_seq_len: int = 2) -> torch.Tensor:
        """The calibration ids, or a one-line ``PassError`` when a data-driven pass got none."""
        ids = self.input_ids
        if ids is None:
            raise PassError(f"pass {pass_name!r} needs calibration data (--calib-data / calibration=...)")
        if ids.shape[1] < min_seq_len:
            raise PassError(f"pass {pass_name!r}: calibration sequences need >= {min_seq_len} tokens, got "
                            f"{ids.shape[1]}")
        return ids

    def batches(self) -> Iterable[torch.Tensor]:
        for start in range(0, self.input_ids.shape[0], self.batch_size):
            yield self.input_ids[start : start + self.batch_size]

    @torch.inference_mode()
    def record_layer_inputs(self) -> "ForwardEngine":
        """Run the base model once and store every layer's input and call kwargs (idempotent)."""
        if self._recorded:
            return self
        self.require_calibration("the forward engine", 1)
        n = self.num_layers
        self.inputs = [[] for _ in range(n + 1)]
        self.layer_kwargs = [[] for _ in range(n)]
        self._record(n)
        self._recorded = True
        return self

    def _record(self, n: int) -> None:
        """Fill ``inputs``, ``layer_kwargs`` and ``base_final``: one decoder forward with a pre-hook on each layer."""
        handles = []

        def make_hook(i: int) -> Callable:
            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                self.inputs[i].append(hidden.detach().to(self.storage_device))
                self.layer_kwargs[i].append(call_kwargs(kwargs))

            return hook

        for i, layer in enumerate(self.adapter.layers):
            handles.append(layer.register_forward_pre_hook(make_hook(i), with_kwargs=True))
        try:
            decoder = self.adapter.decoder
            for ids in self.batches():
                out = decoder(input_ids=ids.to(self.device), use_cache=False)
                self.base_final.append(out.last_hidden_state.detach().to(self.storage_device))
        finally:
            for h in handles:
                h.remove()
        # the last layer's output is not seen by any hook: recompute it from its recorded input
        last = self.adapter.layers[n - 1]
        self.inputs[n] = [self._call(last, n - 1, b, self.inputs[n - 1][b]) for b in range(self.num_batches)]

    @property
    def num_batches(self) -> int:
        return len(self.base_final)

    # ---------------------------------------------------------------------------------------------- running
    def _call(self, module: nn.Module, type_index: int, batch: int, hidden: torch.Tensor) -> torch.Tensor:
        self.layer_tokens += hidden.shape[0] * hidden.shape[1]
        return call_layer(module, self.layer_kwargs[type_index][batch], hidden.to(self.device)).to(self.device)

    @property
    def layer_evaluations(self) -> float:
        """Decoder-layer runs so far, in passes over the whole search set (load-independent planning cost)."""
        if self.input_ids is None:
            return 0.0
        return self.layer_tokens / self.input_ids.numel()

    # ---------------------------------------------------------------------------------------------- the fit set
    def fit_set(self, pass_name: str, min_tokens: int = 0) -> torch.Tensor:
        """The ids a pass fits maps on: the fit set, or (with a warning) the search set when none was given."""
        if self.fit_ids is not None:
            return self.fit_ids
        ids = self.require_calibration(pass_name)
        if ids.numel() < min_tokens:
            warnings.warn(f"{pass_name}: no fit set; fitting on the {ids.numel():,} search-set tokens, which "
                          f"over-fits a map that needs ~{min_tokens:,} (give --fit-samples / fit=...)", stacklevel=3)
        self.fit_ids = ids
        return ids

    @torch.inference_mode()
    def stream_fit(self, points: Sequence[int], desc: str = "fitting",
                   reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   reuse: bool = False) -> Iterator["FitBatch"]:
        """The fit set batch by batch: for each, the base's hidden state entering every base layer in ``points``
        (``num_layers``: the last layer's output, before the final norm) and every layer's call kwargs up to there.

        The base forward stops at the highest point, and nothing of a batch outlives the next one: memory does not
        grow with the fit set. ``reduce`` (e.g. the last token) is applied to each captured state before it is kept.

        ``reuse``: a fit that streams the same points several times (one pass per branch map, per norm gain) has the
        first full pass keep the captured states (in memory, or on disk where they would take more than half of what
        memory is left; ``fit_keeper``) and the later passes replay them without running the base again, until
        ``release_fit_replay``.
        """
        reuse = reuse and reduce is None
        if reuse and self.can_replay(points):
            yield from self._replay_fit(desc)
            return
        # captured states come to the compute device (a device map leaves each layer's on its own)
        keep = (lambda h: reduce(h.to(self.device))) if reduce is not None else (lambda h: h.to(self.device))
        ids_all = self.fit_set("stream_fit")
        n, top = self.num_layers, max(points)
        kept: list[_RecordedFitBatch] | None = None
        if reuse:
            self.release_fit_replay()
            width = self.adapter.config.hidden_size
            store, self._fit_folder = self.fit_keeper(ids_all.numel() * width * 4 * len(set(points)))
            kept = []
        with progress_bar(desc=desc, unit="seq", total=ids_all.shape[0]) as bar:
            for start in range(0, ids_all.shape[0], self.fit_batch_size):
                ids = ids_all[start : start + self.fit_batch_size]
                batch = FitBatch(self, ids)
                self._capture_fit(batch, set(points), top, keep)
                self.fit_layer_tokens += ids.numel() * min(top + 1, n)
                yield batch
                if kept is not None:
                    kept.append(_RecordedFitBatch(batch, store))
                bar.update(ids.shape[0])
        if kept is not None:  # only a pass that ran to its end is replayed
            self._fit_replay = (frozenset(points), kept)

    def can_replay(self, points: Sequence[int]) -> bool:
        """Whether a ``stream_fit(reuse=True)`` pass kept the base's states at every one of ``points``."""
        return self._fit_replay is not None and set(points) <= self._fit_replay[0]

    def _replay_fit(self, desc: str) -> Iterator["FitBatch"]:
        """The fit batches a ``stream_fit(reuse=True)`` pass kept, read back in order (no base forward)."""
        with progress_bar(desc=desc, unit="seq", total=self.fit_set("stream_fit").shape[0]) as bar:
            for recorded in self._fit_replay[1]:
                batch = recorded.batch()
                yield batch
                bar.update(batch.ids.shape[0])

    #: the states a ``stream_fit(reuse=True)`` pass kept: (points, batches), None when nothing is kept
    _fit_replay: tuple[frozenset, list["_RecordedFitBatch"]] | None = None

    #: the temp folder of replayed fit states written to disk (None: they are in memory)
    _fit_folder = None

    def release_fit_replay(self) -> None:
        """Free what ``stream_fit(reuse=True)`` kept (memory or temp files)."""
        self._fit_replay = None
        folder, self._fit_folder = self._fit_folder, None
        if folder is not None:
            folder.cleanup()

    def _fit_room(self) -> int | None:
        """Bytes replayed fit states may take in memory (None: no limit known)."""
        from .spill import available_memory

        free = available_memory()
        return None if free is None else free // 2

    def fit_keeper(self, total: int) -> tuple[Callable[[torch.Tensor], Any], Any]:
        """How ``total`` bytes of fit states are kept: ``(write, folder)``: as tensors on ``storage_device`` (folder
        None), or written to a temp ``ActivationFolder`` when they would exceed ``_fit_room`` (half the memory
        available now; a lazy model's budget). The caller owns the folder (``cleanup``)."""
        from .spill import ActivationFolder

        room = self._fit_room()
        if room is not None and total > room:
            folder = ActivationFolder()
            return folder.write, folder
        return (lambda t: t.to(self.storage_device)), None

    def _capture_fit(self, batch: "FitBatch", wanted: set[int], top: int, keep: Callable) -> None:
        """Fill ``batch``: one base forward with hooks, cut after the highest point."""
        n, layers = self.num_layers, self.adapter.layers
        handles = []

        def pre(module, args, kwargs, i):
            hidden = args[0] if args else kwargs["hidden_states"]
            batch.kwargs[i] = call_kwargs(kwargs)
            if i in wanted:
                batch.inputs[i] = keep(hidden.detach())
            if i == top:
                raise _StopForward

        def post(module, args, out):
            batch.inputs[n] = keep((out[0] if isinstance(out, tuple) else out).detach())
            raise _StopForward

        for i in range(min(top, n - 1) + 1):
            handles.append(layers[i].register_forward_pre_hook(
                lambda m, a, k, i=i: pre(m, a, k, i), with_kwargs=True))
        if top == n:
            handles.append(layers[n - 1].register_forward_hook(post))
        try:
            self.adapter.decoder(input_ids=batch.ids.to(self.device), use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()

    @torch.inference_mode()
    def run_layers(
        self,
        slots: Sequence[Slot | tuple[nn.Module, int]],
        start: int | Batches,
        final_norm: bool = True,
        slot_inputs: list[Batches] | None = None,
    ) -> Batches:
        """Run ``slots`` bottom to top on the recorded input of base layer ``start`` (or on given hidden states).

        Returns the final post-norm hidden state per batch (``final_norm=False``: the raw residual stream). With an
        empty list as ``slot_inputs`` it also records the input of every slot, then the last slot's output, so a
        pass can later resume a compressed stack from any of its slots.
        """
        self.record_layer_inputs()
        slots = [s if isinstance(s, Slot) else Slot(*s) for s in slots]
        hidden_in = self.inputs[start] if isinstance(start, int) else start
        if slot_inputs is not None:
            slot_inputs[:] = [[] for _ in range(len(slots) + 1)]
        outputs: Batches = []
        for b in range(self.num_batches):
            h = hidden_in[b].to(self.device)
            for k, slot in enumerate(slots):
                if slot_inputs is not None:
                    slot_inputs[k].append(h.to(self.storage_device))
                with self.loaded(slot.module):
                    h = self._call(slot.module, slot.type_index, b, h)
            if slot_inputs is not None:
                slot_inputs[-1].append(h.to(self.storage_device))
            if final_norm:
                h = self.adapter.final_norm(h)
            outputs.append(h.to(self.device))  # a layer placed by a device map returns on its own device
        return outputs

    @torch.inference_mode()
    def token_nll(self, final_hidden: Batches) -> tuple[float, int]:
        """Summed next-token NLL of the calibration ids given a stack's post-norm final states, and the token count.

        The language-model loss of a candidate model (``exp(total / count)`` is its calibration perplexity).
        """
        total, count = 0.0, 0
        for ids, h in zip(self.batches(), final_hidden):
            # the last position predicts nothing: leave it out before the vocabulary projection
            batch_total, batch_count = next_token_nll(self.adapter.logits(h[:, :-1].to(self.device)), ids)
            total += batch_total
            count += batch_count
        return total, count

    def copy_layer(self, index: int) -> nn.Module:
        """A private, real copy of base layer ``index`` (a pass changes it without touching the model)."""
        from .lazy import materialized_copy

        return materialized_copy(self.adapter.layers[index])

    def base_slots(self, start: int, stop: int | None = None) -> list[Slot]:
        """The base model's own layers ``start .. stop-1`` as slots."""
        stop = self.num_layers if stop is None else stop
        return [Slot(self.adapter.layers[i], i) for i in range(start, stop)]

    @torch.inference_mode()
    def logits(self, final_hidden: Batches) -> Batches:
        return [self.adapter.logits(h) for h in final_hidden]

    def loaded(self, module: nn.Module):
        """A context in which ``module`` has real weights on the compute device: a layer offloaded elsewhere is
        moved there for the block and back after (the sequential engine also reads a lazy layer in). Passes read a
        layer's weights inside it, so the same pass runs on every engine."""
        return _OnDevice(module, self.device)

    def close(self) -> None:
        """Release what the engine holds beyond the recording (nothing here; the sequential engine's resident
        layers)."""

    def layer_gradients(self, lowest: int = 0) -> Iterator[tuple[int, nn.Module]]:
        """Decoder layers ``lowest..L-1`` as ``(index, layer)`` with every parameter's ``.grad`` holding ∂L/∂W, L the
        causal-LM loss of the calibration ids (mean per batch, summed over batches), for the Taylor criteria.

        Here: one forward and backward of the whole model per batch, then the layers bottom-up. Consumers must not
        rely on the order (the sequential engine yields top-down). Gradients are freed when the iteration ends; the
        cost counts as one run of every layer over the search set on either engine.
        """
        from .gradients import layer_gradients

        ids = self.require_calibration("layer gradients")
        self.layer_tokens += self.num_layers * ids.numel()
        with layer_gradients(self.model, ids, self.batch_size):
            for i, layer in enumerate(self.adapter.layers):
                if i >= lowest:
                    yield i, layer


def call_layer(module: nn.Module, kwargs: dict[str, Any], hidden: torch.Tensor) -> torch.Tensor:
    """One decoder layer's output hidden state for ``hidden`` with the call kwargs the model gave it."""
    out = module(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class _StopForward(Exception):
    """Raised by a hook once a streamed fit batch has what it needs: the rest of the forward is skipped."""


def read_kept(value: Any) -> torch.Tensor:
    """A kept fit state: the tensor itself, or the ``ActivationFolder`` entry read back."""
    return value if isinstance(value, torch.Tensor) else value.read()


def read_kept_row(value: Any, row: int) -> torch.Tensor:
    """Row ``row`` (one sequence) of a kept fit state, without reading the rest of a spilled one."""
    return value[row] if isinstance(value, torch.Tensor) else value.read_row(row)


class _RecordedFitBatch:
    """A fit batch kept for replay: its ids, call kwargs and captured states (tensors, or files on disk)."""

    def __init__(self, batch: "FitBatch", store: Callable[[torch.Tensor], Any]):
        self.engine, self.ids, self.kwargs = batch.engine, batch.ids, batch.kwargs
        #: point -> the kept state: a tensor, or an ``ActivationFolder`` entry read back by ``batch``
        self.inputs = {point: store(h) for point, h in batch.inputs.items()}

    def batch(self) -> "FitBatch":
        out = FitBatch(self.engine, self.ids)
        out.kwargs = self.kwargs
        device = self.engine.device
        out.inputs = {p: read_kept(v).to(device) for p, v in self.inputs.items()}
        return out


class FitBatch:
    """One batch of the fit set: its ids, the base's hidden states at the requested points, and the per-layer call
    kwargs (attention mask, position embeddings) to run layers on it."""

    def __init__(self, engine: ForwardEngine, ids: torch.Tensor):
        self.engine, self.ids = engine, ids
        self.inputs: dict[int, torch.Tensor] = {}
        self.kwargs: dict[int, dict[str, Any]] = {}

    def run(self, slots: Sequence[Slot], hidden: torch.Tensor) -> torch.Tensor:
        """Run ``slots`` bottom to top on ``hidden`` (raw residual stream out)."""
        engine = self.engine
        for slot in slots:
            engine.fit_layer_tokens += hidden.shape[0] * hidden.shape[1]
            with engine.loaded(slot.module):
                hidden = call_layer(slot.module, self.kwargs[slot.type_index], hidden).to(engine.device)
        return hidden


class _OnDevice:
    """Moves a module to the compute device for the duration of a call when it lives elsewhere (offloading)."""

    def __init__(self, module: nn.Module, device: torch.device):
        self.module, self.device, self.home = module, device, None

    def __enter__(self):
        if hasattr(self.module, "_hf_hook"):  # placed by accelerate (device_map): its hook moves the inputs there
            return self.module
        p = next(self.module.parameters(), None)
        if p is not None and p.device != self.device:
            self.home = p.device
            self.module.to(self.device)
        return self.module

    def __exit__(self, *exc):
        if self.home is not None:
            self.module.to(self.home)
        return False
