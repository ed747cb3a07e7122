"""``MemoryBudget``: how much memory a run may use, and so whether it streams the model's layers from disk.

One object, passed from the request (``Recipe.max_memory``, ``--max-memory``) to the orchestrator (which decides
whether to load the model lazily) and on to the sequential engine (which decides what to keep in memory and what to
spill). Without a limit the run is measured against the memory the machine has available now.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import SLMError
from .spill import available_memory

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}
#: without ``--max-memory``, stream when the weights exceed this fraction of the available memory
AVAILABLE_FRACTION = 0.7


def parse_size(text: str | int) -> int:
    """``2GiB``, ``500MB``, ``1.5GB``, ``4096`` (bytes) -> bytes; one ``SLMError`` line otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise SLMError(f"a memory size must be positive, got {text}")
        return text
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise SLMError(f"expected a size like 2GiB or 500MB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(n: int) -> str | int:
    """``n`` bytes as ``parse_size`` reads it back: ``3GiB`` for whole binary units, else the bytes."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return n


@dataclass(frozen=True)
class MemoryBudget:
    """``limit`` bytes (None: whatever the machine has available when asked)."""

    limit: int | None = None

    @classmethod
    def of(cls, value: "MemoryBudget | str | int | None") -> "MemoryBudget":
        """A budget from a size (``2GiB``, bytes), a budget, or None (no limit)."""
        if isinstance(value, MemoryBudget):
            return value
        return cls(None if value is None else parse_size(value))

    def streams(self, weights_bytes: int | None) -> bool:
        """Whether a model whose weight files take ``weights_bytes`` (None: not a safetensors folder) is planned and
        written with its layers streamed from the shards.

        With a limit: when the weights exceed half of it (applying a plan and the checks make copies); without one:
        when they exceed 70% of the memory available now.
        """
        if weights_bytes is None:
            if self.limit is not None:
                raise SLMError("--max-memory streams layers from safetensors shards: give a checkpoint folder")
            return False
        if self.limit is not None:
            return weights_bytes > self.limit // 2
        available = available_memory()
        return available is not None and weights_bytes > AVAILABLE_FRACTION * available

    def left_after(self, resident_bytes: float) -> float | None:
        """What the budget leaves after ``resident_bytes`` (None: unknown, no limit and no reading of the machine)."""
        if self.limit is not None:
            return self.limit - resident_bytes
        available = available_memory()
        return None if available is None else available - resident_bytes
