"""Forward engines: record each decoder layer's inputs on calibration data once, then run any stack of layers from
any recorded point. The pipeline builds one engine per compression stage and hands it to the pass; passes never
build their own. ``ForwardEngine`` keeps the model in memory; ``SequentialEngine`` serves a lazy model
(``load_lazy_model``: decoder layers read from the checkpoint's shards while they run) behind the same interface;
``engine_for`` picks the one a model needs."""

from ..metrics import Batches
from .lazy import is_lazy_model, load_lazy_model
from .memory import FitBatch, ForwardEngine, Slot
from .sequential import SequentialEngine

__all__ = ["Batches", "FitBatch", "ForwardEngine", "SequentialEngine", "Slot", "engine_for", "is_lazy_model",
           "load_lazy_model"]


def engine_for(model) -> type[ForwardEngine]:
    """The engine class for ``model``: sequential for a lazy model, in-memory otherwise."""
    return SequentialEngine if is_lazy_model(model) else ForwardEngine
