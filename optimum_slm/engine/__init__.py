"""Forward engines: record each decoder layer's inputs on calibration data once, then run any stack of layers from
any recorded point. The pipeline builds one engine per compression stage and hands it to the pass; passes never
build their own. ``ForwardEngine`` keeps everything in memory (a streaming engine can join behind the same
interface)."""

from ..metrics import Batches
from .memory import FitBatch, ForwardEngine, Slot

__all__ = ["Batches", "FitBatch", "ForwardEngine", "Slot"]
