"""Safetensors checkpoints read tensor by tensor (``TensorStore``), and the registry of lazy decoder layers: layers
kept on the meta device whose tensors are read from a store when something needs them.

The registry lives here, below ``arch``, because ``arch.layer_state`` reads a lazy layer's tensors; loading lazy
models and running their layers is ``engine.lazy``'s.
"""

from __future__ import annotations

import json
import math
import os
import struct
import weakref
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import ModelLoadError
from .names import WEIGHTS_FILE, WEIGHTS_INDEX_FILE

#: safetensors dtype names
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _header(path: str) -> tuple[int, dict]:
    """A safetensors file's data offset and header (tensor name -> dtype, shape, data_offsets)."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ModelLoadError(f"{path} is not a safetensors file")
        n = struct.unpack("<Q", raw)[0]
        if n > 100_000_000:
            raise ModelLoadError(f"{path} is not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            raise ModelLoadError(f"{path} has a corrupt safetensors header") from None
    header.pop("__metadata__", None)
    return 8 + n, header


class TensorStore:
    """The tensors of a safetensors checkpoint folder (one file or shards with an index), read on demand.

    Tensors are read with plain file reads into private buffers, not through a memory map: pages of a mapped file
    count in the process's resident memory once touched, so a map would end up holding every layer that ran.
    ``read`` returns a private tensor cast to ``dtype``.
    """

    def __init__(self, folder: str, dtype: torch.dtype | None = None):
        self.folder = folder
        self.dtype = dtype
        index = os.path.join(folder, WEIGHTS_INDEX_FILE)
        if os.path.isfile(folder):  # one file (a spilled layer)
            folder, files = os.path.dirname(folder), [os.path.basename(folder)]
        elif os.path.isfile(index):
            with open(index, encoding="utf-8") as fh:
                files = sorted(set((json.load(fh).get("weight_map") or {}).values()))
        elif os.path.isfile(os.path.join(folder, WEIGHTS_FILE)):
            files = [WEIGHTS_FILE]
        else:
            raise ModelLoadError(f"{folder}: streaming needs safetensors weights (model.safetensors or an index)")
        self._entries: dict[str, tuple[str, int, dict]] = {}
        for f in files:
            path = os.path.join(folder, f)
            if not os.path.isfile(path):
                raise ModelLoadError(f"{folder}: the index names {f}, which is missing")
            start, header = _header(path)
            for name, entry in header.items():
                self._entries[name] = (path, start, entry)
        self.files = [os.path.join(folder, f) for f in files]

    def names(self) -> list[str]:
        return list(self._entries)

    def dtype_of(self, name: str) -> torch.dtype:
        """The dtype a tensor has in the file (from the header; nothing is read)."""
        return _DTYPES.get(self._entries[name][2].get("dtype"), torch.float32)

    def read(self, name: str) -> torch.Tensor:
        if name not in self._entries:
            raise ModelLoadError(f"{self.folder}: the checkpoint has no tensor {name!r}")
        path, start, entry = self._entries[name]
        dtype = _DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise ModelLoadError(f"{path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
        begin, end = entry["data_offsets"]
        shape = list(entry["shape"])
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ModelLoadError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape}")
        t = read_raw(path, start + begin, shape, dtype, f"tensor {name!r}")
        want = self.dtype if self.dtype is not None and t.is_floating_point() else dtype
        return t.to(want) if want != dtype else t

    def nbytes(self) -> int:
        """Size of the weight files on disk."""
        return sum(os.path.getsize(f) for f in self.files)


def read_raw(path: str, offset: int, shape: list[int] | tuple[int, ...], dtype: torch.dtype, what: str) -> torch.Tensor:
    """A private tensor of ``shape`` and ``dtype`` from the bytes of ``path`` at ``offset`` (a plain read into a
    buffer of our own, not a memory map); ``what`` names it when the file is too short."""
    buf = bytearray(math.prod(shape) * dtype.itemsize)
    with open(path, "rb") as fh:
        fh.seek(offset)
        if fh.readinto(buf) != len(buf):
            raise ModelLoadError(f"{path} is truncated ({what})")
    return torch.frombuffer(buf, dtype=dtype).view(shape) if buf else torch.empty(shape, dtype=dtype)


# ------------------------------------------------------------------------------------------------ lazy layers
#: lazy layers: module -> (store, the prefix of its tensors in the checkpoint, e.g. "model.layers.7.")
_LAZY: "weakref.WeakKeyDictionary[nn.Module, tuple[TensorStore, str]]" = weakref.WeakKeyDictionary()


def register_lazy(layer: nn.Module, store: TensorStore, prefix: str) -> None:
    """Make ``layer`` (on the meta device) read its tensors ``prefix + name`` from ``store``."""
    _LAZY[layer] = (store, prefix)


def is_lazy(module: nn.Module) -> bool:
    return module in _LAZY


def is_lazy_model(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` lives on the meta device (a model loaded by ``load_lazy_model``)."""
    return any(p.is_meta for p in model.parameters())


class LazyState(Mapping):
    """A lazy layer's parameters by relative name, each read from the checkpoint when it is looked up: a merge rule
    that walks tensor by tensor holds one tensor of each window layer at a time, never whole layers."""

    def __init__(self, store: "TensorStore", prefix: str, names: list[str]):
        self.store, self.prefix, self.names = store, prefix, names

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        return self.store.read(self.prefix + name)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def lazy_state(layer: nn.Module) -> LazyState:
    """A lazy layer's parameters by relative name, read from its checkpoint on lookup."""
    store, prefix = _LAZY[layer]
    return LazyState(store, prefix, [name for name, _ in layer.named_parameters()])
