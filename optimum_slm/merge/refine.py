"""Gradient refinement of a merged layer: block reconstruction on the fit set (``slm-plus refine_epochs=N``).

A least-squares map is the best LINEAR correction of a merged layer's output; the layer's own weights stay those of
the window's bottom layer. Refinement trains every parameter of the merged layer (attention, MLP, norms) so that, fed
the base's hidden state entering the window, it reproduces the base's hidden state leaving it — a block
reconstruction, as GPTQ/BRECQ-style post-training methods do for quantisation and LLM-Streamline for a pruned block.
It starts from the fitted merge, so it can only improve the held-out error it is selected on.

Data: the fit set, streamed once through the base up to the window's top (or replayed from the states the map fit
kept, when it kept the window's points). The window's input and output states (2 x fit tokens x hidden x 4 bytes:
0.3 GB for SmolLM2's 256 x 256 tokens, 0.8 GB at hidden 1536) are kept in memory, or in temp files where they would
take more than the engine gives fit states (half the memory available; a lazy model's ``--max-memory`` budget), and
every epoch goes over them in shuffled batches of ``BATCH_ROWS`` sequences, read back row by row. The last eighth of
the sequences (at least one batch) is held out: after each epoch the held-out error is measured and the weights of
the best epoch (the fitted merge itself counts as epoch 0) are kept; an epoch that ends far above the fitted merge's
error (``DIVERGED``) lowers the rate (``RATE_BACKOFF``) and goes on from the best weights. The loss is the per-token
relative squared error ‖f(x) − y‖² / ‖y‖², averaged over tokens, so a few attention-sink tokens with huge states do
not decide it (the reason ``outlier_clip`` exists for the maps). Adam at a constant rate (lowered only that way), a
fixed shuffling seed: the same fit set gives the same weights.

Each window is refined on the base's own states (the ``independent`` fit order). The result is a ``set_weights`` op
(``plan/refine_ops.py``) after the window's merge: the plan holds the merged layer's weights (a decoder layer's
parameters per refined window: 14 MB for SmolLM2, 190 MB for a 1.5 B Qwen2 layer), not a rule to rebuild them.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from ..engine.memory import call_layer, read_kept_row
from ..errors import PassError
from ..progress import progress_bar

#: sequences per optimisation step
BATCH_ROWS = 8
#: the shuffling seed (a plan is a function of its inputs)
SEED = 0
#: an epoch that leaves the held-out error above DIVERGED x the fitted merge's means the rate is too high for the
#: layer (the rate chosen on SmolLM2, 4e-3, diverges on a 1.5 B Qwen2 layer: 0.148 -> 3.6 after 7 epochs): the best
#: weights come back and Adam restarts at RATE_BACKOFF x the rate, at most MAX_BACKOFFS times; the diverged epoch
#: counts among the N, so the cost stays N epochs. Above 1x rather than at it: Adam's first steps may overshoot for
#: an epoch and recover
DIVERGED = 2.0
RATE_BACKOFF = 0.25
MAX_BACKOFFS = 3


def _plain(value: Any) -> Any:
    """``value`` with every tensor cloned outside inference mode (the engine records under ``inference_mode``, and
    autograd cannot save inference tensors for the backward)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def relative_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ‖out − target‖² / ‖target‖² (the refinement's loss and its held-out measure)."""
    return (((out - target) ** 2).sum(-1) / (target ** 2).sum(-1).clamp_min(1e-12)).mean()


def refine_layer(engine, module: nn.Module, type_index: int, input_at: int, target_at: int, epochs: int, lr: float,
                 what: str = "refine") -> dict[str, Any]:
    """Train ``module`` (a merged layer, changed in place) to map the base's state entering layer ``input_at`` to
    the one entering layer ``target_at`` on the engine's fit set; keeps the weights of the best held-out epoch.

    ``type_index``: the layer whose call kwargs (attention type, position embeddings) ``module`` runs with. Returns
    a record: ``epochs`` run, ``best_epoch`` (0: the fitted merge was best), held-out relative error ``before`` and
    ``after``, ``holdout_rows``, ``seconds``.
    """
    started = time.perf_counter()
    # the window's input and output states: in memory, or (a lazy model's budget, or too little memory) in temp files
    # read back row by row (``fit_keeper``)
    tokens = engine.fit_set(what).numel()
    store, folder = engine.fit_keeper(2 * tokens * engine.adapter.config.hidden_size * 4)
    try:
        return _refine(engine, module, type_index, input_at, target_at, epochs, lr, what, store, started)
    finally:
        if folder is not None:
            folder.cleanup()


def _refine(engine, module: nn.Module, type_index: int, input_at: int, target_at: int, epochs: int, lr: float,
            what: str, store, started: float) -> dict[str, Any]:
    x, y, first_kwargs = _KeptRows(), _KeptRows(), None
    points = [input_at, target_at]
    # the fit's kept base states when it left them (``fit_output_maps(keep_replay=True)``): no base forward
    for batch in engine.stream_fit(points, desc=f"{what}: recording", reuse=engine.can_replay(points)):
        x.add(store(batch.inputs[input_at].detach()))
        y.add(store(batch.inputs[target_at].detach()))
        if first_kwargs is None:
            first_kwargs = batch.kwargs[type_index]
    # every fit batch has the same length: one row of the first batch's kwargs serves a batch of any row count
    one_row = {key: _one_row(value) for key, value in _plain(first_kwargs).items()}
    rows = len(x)
    hold = max(1, min(BATCH_ROWS, rows // 2), rows // 8) if rows > 1 else 0
    train = torch.arange(rows - hold)
    held = torch.arange(rows - hold, rows)
    params = [p for p in module.parameters()]
    flags = [p.requires_grad for p in params]
    device = engine.device

    def run(idx: torch.Tensor) -> torch.Tensor:
        return call_layer(module, {key: _expand(value, len(idx)) for key, value in one_row.items()},
                          x.gather(idx).to(device))

    def held_error() -> float:
        if hold == 0:
            return float("nan")
        with torch.no_grad():
            chunks = [held[i:i + BATCH_ROWS] for i in range(0, hold, BATCH_ROWS)]
            total = sum(float(relative_error(run(c), y.gather(c).to(device))) * len(c) for c in chunks)
        return total / hold

    generator = torch.Generator().manual_seed(SEED)
    with engine.loaded(module):
        before = best = held_error()
        best_state, best_epoch = copy.deepcopy(module.state_dict()), 0
        for p in params:
            p.requires_grad_(True)
        rate, backoffs = lr, 0
        optimizer = torch.optim.Adam(params, lr=rate)
        steps = -(-len(train) // BATCH_ROWS)
        try:
            with progress_bar(desc=f"{what}: refining", unit="step", total=epochs * steps) as bar:
                for epoch in range(1, epochs + 1):
                    order = train[torch.randperm(len(train), generator=generator)]
                    for i in range(0, len(order), BATCH_ROWS):
                        idx = order[i:i + BATCH_ROWS]
                        optimizer.zero_grad(set_to_none=True)
                        loss = relative_error(run(idx), y.gather(idx).to(device))
                        loss.backward()
                        optimizer.step()
                        bar.update(1)
                    error = held_error()
                    bar.set_postfix(held_out=f"{error:.4g}", lr=f"{rate:.2g}")
                    if hold == 0 or error < best:
                        best, best_state, best_epoch = error, copy.deepcopy(module.state_dict()), epoch
                    elif not error <= DIVERGED * before and backoffs < MAX_BACKOFFS:
                        # far worse than the fitted merge it started from (or not finite): the rate is too high
                        # for this layer; back to the best weights, a fresh optimizer at a lower rate
                        backoffs, rate = backoffs + 1, rate * RATE_BACKOFF
                        module.load_state_dict(best_state)
                        optimizer = torch.optim.Adam(params, lr=rate)
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
                p.grad = None
        module.load_state_dict(best_state)
    record = {"epochs": epochs, "lr": lr, "best_epoch": best_epoch, "before": round(before, 6),
              "after": round(best, 6), "holdout_rows": hold, "seconds": round(time.perf_counter() - started, 2)}
    if backoffs:
        record.update(rate_backoffs=backoffs, final_lr=rate)
    return record


class _KeptRows:
    """Sequences of fit states kept batch by batch (tensors, or ``ActivationFolder`` entries on disk); ``gather``
    stacks any rows of them into one tensor outside inference mode (autograd saves it for the backward)."""

    def __init__(self) -> None:
        self._where: list[tuple[Any, int]] = []  # row -> (kept batch, row within it)

    def add(self, kept: Any) -> None:
        self._where += [(kept, r) for r in range(kept.shape[0])]

    def __len__(self) -> int:
        return len(self._where)

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.stack([read_kept_row(*self._where[int(i)]) for i in idx])


def _one_row(value: Any) -> Any:
    """One call-kwarg value cut to its first row: a tensor whose first dimension is a batch of identical rows
    (position embeddings of packed sequences) keeps one; checked once, before training."""
    if isinstance(value, tuple):
        return tuple(_one_row(v) for v in value)
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] > 1:
        first = value[:1]
        if not torch.equal(value, first.expand_as(value)):
            raise PassError("refine: the fit batches' call kwargs differ from row to row (padding?); refinement "
                            "needs packed fit sequences of one length")
        return _PerRow(first)
    return value


class _PerRow:
    """A one-row tensor that stood for a batch of identical rows (``_expand`` gives it the batch's row count back;
    tensors that had one row, shared by broadcasting, stay as they were)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def _expand(value: Any, rows: int) -> Any:
    """A ``_one_row`` value for a batch of ``rows`` sequences (a view: nothing is copied)."""
    if isinstance(value, tuple):
        return tuple(_expand(v, rows) for v in value)
    if isinstance(value, _PerRow):
        return value.tensor.expand(rows, *value.tensor.shape[1:])
    return value
