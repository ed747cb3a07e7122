"""What a lazy model keeps on disk instead of in memory, in temporary folders under ``TMPDIR``:

- recorded activations: when a lazy model's calibration activations, (layers + 1) × tokens × hidden, would not fit
  in what the memory budget leaves, the sequential engine keeps them in files, one per layer and batch, read back
  when a pass touches them (the page cache keeps hot ones fast); raw tensor bytes, never pickles; the folder is
  removed with the engine;
- spilled layers (``SpillStore``): layers built while a plan is applied to a lazy model, read back like the base's.

Both folders are named ``slm-activations-<run>-*`` / ``slm-spill-<run>-*`` (``<run>``: the owning process's pid and
start time) and carry the marker ``.slm-temp``; making one removes those of runs that were killed (SIGKILL leaves
them), and nothing else.
"""

from __future__ import annotations

import math
import os
import tempfile
import weakref
from collections.abc import Sequence
from typing import Iterator

import torch
from torch import nn

from ..io.output import make_marked_dir, remove_dead_marked, remove_marked_dir
from ..io.shards import _LAZY, LazyState, TensorStore, read_raw, register_lazy

#: the names of this module's temp folders under TMPDIR (``<prefix><run token>-<random>``)
SPILL_PREFIXES = ("slm-activations-", "slm-spill-")


class _TempFolder:
    """A marked temp folder under TMPDIR, removed with its owner (or at exit); stale ones of dead runs go first."""

    def __init__(self, prefix: str) -> None:
        parent = tempfile.gettempdir()
        remove_dead_marked(parent, SPILL_PREFIXES, "streamed run")
        # the clean-up is registered before the folder exists: a stop signal at any point leaves nothing
        self.name = make_marked_dir(prefix, parent, register=self._register)

    def _register(self, path: str) -> None:
        if getattr(self, "_finalizer", None) is not None:
            self._finalizer.detach()  # a name that was taken meanwhile: not ours to remove
        self._finalizer = weakref.finalize(self, remove_marked_dir, path)

    def cleanup(self) -> None:
        self._finalizer()


def available_memory() -> int | None:
    """The memory the machine has available now (``MemAvailable``), in bytes; None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class ActivationFolder:
    """A temporary folder of tensors written once and read many times (one file per tensor)."""

    def __init__(self) -> None:
        self._dir = _TempFolder("slm-activations-")
        self._count = 0
        self.bytes_written = 0

    def write(self, tensor: torch.Tensor) -> "_Stored":
        self._count += 1
        path = os.path.join(self._dir.name, f"{self._count:07d}.bin")
        t = tensor.detach().contiguous().cpu()
        with open(path, "wb") as fh:
            fh.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        self.bytes_written += t.numel() * t.element_size()
        return _Stored(path, tuple(t.shape), t.dtype)

    def cleanup(self) -> None:
        """Remove the folder and its files now (otherwise they go with the owner)."""
        self._dir.cleanup()

    def batches(self, tensors: Sequence[torch.Tensor], device: torch.device) -> "DiskBatches":
        """``tensors`` (one per calibration batch) written here; reads come back on ``device``."""
        return DiskBatches([self.write(t) for t in tensors], device)


class _Stored:
    __slots__ = ("path", "shape", "dtype")

    def __init__(self, path: str, shape: tuple[int, ...], dtype: torch.dtype):
        self.path, self.shape, self.dtype = path, shape, dtype

    def read(self) -> torch.Tensor:
        return read_raw(self.path, 0, self.shape, self.dtype, "spilled activations")

    def read_row(self, row: int) -> torch.Tensor:
        """``tensor[row]`` alone, read from its offset (a training step reads a few rows of many files)."""
        shape = self.shape[1:]
        size = math.prod(shape) * self.dtype.itemsize
        return read_raw(self.path, row * size, shape, self.dtype, "spilled activations")


class DiskBatches(Sequence):
    """A list over calibration batches of hidden states kept on disk: ``batches[b]`` reads batch ``b``."""

    def __init__(self, stored: list[_Stored], device: torch.device):
        self._stored, self.device = stored, device

    def __len__(self) -> int:
        return len(self._stored)

    def __getitem__(self, b):  # type: ignore[override]
        if isinstance(b, slice):
            return [s.read().to(self.device) for s in self._stored[b]]
        return self._stored[b].read().to(self.device)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (s.read().to(self.device) for s in self._stored)


class SpillStore:
    """A temporary folder that layers built while applying a plan to a lazy model (narrowed, merged, fitted) are
    written to, one file each, and then read from like the base's layers: applying a plan never holds more than the
    layers of one op. The folder is made under ``TMPDIR`` and removed with the model."""

    def __init__(self) -> None:
        self._dir = _TempFolder("slm-spill-")
        self._count = 0

    def spill(self, module: nn.Module) -> None:
        """Write ``module``'s parameters to a new file and make it a lazy layer reading them from there."""
        from safetensors.torch import save_file

        self._count += 1
        path = os.path.join(self._dir.name, f"layer-{self._count:05d}.safetensors")
        save_file({name: p.detach().contiguous().cpu() for name, p in module.named_parameters()}, path)
        register_lazy(module, TensorStore(path), "")
        module.to("meta")

    def restore(self, module: nn.Module) -> None:
        """Read a spilled ``module`` back into memory for a later op to change it; its file is removed."""
        store, _ = _LAZY.pop(module)
        module.load_state_dict(dict(LazyState(store, "", [n for n, _ in module.named_parameters()])), strict=False,
                               assign=True)
        os.remove(store.folder)

    @staticmethod
    def of(model: nn.Module) -> "SpillStore":
        """The model's spill store (made on first use, kept as long as the model)."""
        store = getattr(model, "slm_spill", None)
        if store is None:
            store = model.slm_spill = SpillStore()
        return store
