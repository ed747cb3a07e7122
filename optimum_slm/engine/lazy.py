"""Lazy models: every decoder layer stays on the meta device and is read from the checkpoint's safetensors shards
(memory-mapped) only while something needs its weights; the rest of the model (embeddings, final norm, ``lm_head``,
rotary tables) is loaded for real.

The read sites are few and central: ``arch.layer_state`` (what merges, fits and plan ops read), the engines'
``materialized`` (a layer run on calibration data) and ``ApplyContext.writable`` (a layer an op changes in place).
A copy of a lazy layer (``copy.deepcopy``) is an ordinary module, never lazy.
"""

from __future__ import annotations

import json
import math
import os
import struct
import weakref
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..errors import ModelLoadError

#: lazy layers: module -> (store, the prefix of its tensors in the checkpoint, e.g. "model.layers.7.")
_LAZY: "weakref.WeakKeyDictionary[nn.Module, tuple[TensorStore, str]]" = weakref.WeakKeyDictionary()


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
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(folder):  # one file (a spilled layer)
            folder, files = os.path.dirname(folder), [os.path.basename(folder)]
        elif os.path.isfile(index):
            with open(index, encoding="utf-8") as fh:
                files = sorted(set((json.load(fh).get("weight_map") or {}).values()))
        elif os.path.isfile(os.path.join(folder, "model.safetensors")):
            files = ["model.safetensors"]
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


def register_lazy(layer: nn.Module, store: TensorStore, prefix: str) -> None:
    _LAZY[layer] = (store, prefix)


class SpillStore:
    """A temporary folder that layers built while applying a plan to a lazy model (narrowed, merged, fitted) are
    written to, one file each, and then read from like the base's layers: applying a plan never holds more than the
    layers of one op. The folder is made under ``TMPDIR`` and removed with the model."""

    def __init__(self) -> None:
        import tempfile

        self._dir = tempfile.TemporaryDirectory(prefix="slm-spill-")
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


def lazy_copy(model: nn.Module) -> nn.Module:
    """A copy of a lazy model sharing its loaded tensors (embeddings, norm, head); its layers read the same files."""
    import copy

    from ..arch import ArchAdapter

    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers()) if not t.is_meta}
    spill = getattr(model, "slm_spill", None)
    if spill is not None:
        memo[id(spill)] = spill
    store = getattr(model, "slm_store", None)
    if store is not None:
        memo[id(store)] = store
    clone = copy.deepcopy(model, memo)
    for original, copied in zip(ArchAdapter(model).layers, ArchAdapter(clone).layers):
        if original in _LAZY:
            _LAZY[copied] = _LAZY[original]
    return clone


def is_lazy(module: nn.Module) -> bool:
    return module in _LAZY


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


@contextmanager
def materialized(module: nn.Module, device: torch.device | str | None = None) -> Iterator[nn.Module]:
    """The module with real weights for the duration of the block: a lazy layer is read in (on ``device``) and
    released after; any other module is yielded as it is."""
    if module not in _LAZY or not any(p.is_meta for p in module.parameters()):
        yield module
        return
    read_in(module, device)
    try:
        yield module
    finally:
        module.to("meta")


def read_in(module: nn.Module, device: torch.device | str | None = None) -> None:
    """Give a lazy layer its weights from the checkpoint (on ``device``); ``module.to("meta")`` releases them."""
    # ordinary tensors even when read during an inference-mode recording: a layer kept resident may later be
    # back-propagated through (Taylor gradients)
    with torch.inference_mode(False):
        state = {k: (v.to(device) if device is not None else v) for k, v in lazy_state(module).items()}
        module.load_state_dict(state, strict=False, assign=True)


def materialized_copy(module: nn.Module) -> nn.Module:
    """A real (not lazy) copy of ``module``; for a lazy layer its weights are read from the checkpoint."""
    import copy

    clone = copy.deepcopy(module)
    if module in _LAZY and any(p.is_meta for p in module.parameters()):
        clone.load_state_dict(dict(lazy_state(module)), strict=False, assign=True)
    return clone


def check_not_offloaded(model: nn.Module) -> None:
    """Refuse (one line) a model whose layers accelerate offloaded to the CPU or disk (``device_map`` with
    ``max_memory`` too small): its weights are on the meta device and appear only inside a forward."""
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is not None and getattr(hook, "offload", False) and module not in _LAZY:
            raise ModelLoadError("the model's layers were offloaded by accelerate (device_map with CPU/disk offload); "
                                 "compress it from its checkpoint with --max-memory (layers streamed from the "
                                 "shards), or load it with enough max_memory for every layer")


def is_lazy_model(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` lives on the meta device (a model loaded by ``load_lazy_model``)."""
    return any(p.is_meta for p in model.parameters())


def layers_prefix(model: nn.Module) -> str:
    """The state-dict prefix of the decoder layer list (``model.layers``)."""
    from ..arch import ArchAdapter

    layers = ArchAdapter(model).layers
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise ModelLoadError("cannot locate the decoder layers in the model")  # pragma: no cover


def load_lazy_model(path: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    trust_remote_code: bool = False, memory_budget: int | None = None) -> nn.Module:
    """The model of checkpoint folder ``path`` with lazy decoder layers (see the module docstring).

    ``memory_budget`` (bytes; ``--max-memory``): the sequential engine records calibration activations to disk when
    they would not fit in it (without one: when they would not fit in the memory available)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..arch import ArchAdapter

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    store = TensorStore(path)
    file_dtype = next((store.dtype_of(n) for n in store.names() if "layers." in n), torch.float32)
    store.dtype = dtype or (file_dtype if file_dtype.is_floating_point else torch.float32)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=store.dtype, trust_remote_code=trust_remote_code)
    prefix = layers_prefix(model)
    rest = {name: store.read(name).to(device) for name in store.names() if not name.startswith(prefix + ".")}
    _, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    if unexpected:
        raise ModelLoadError(f"{path}: unexpected tensors {sorted(unexpected)[:3]}")
    model.tie_weights()
    left = [name for name, p in model.named_parameters() if p.is_meta and not name.startswith(prefix + ".")]
    if left:
        raise ModelLoadError(f"{path}: the checkpoint lacks {left[:3]}")
    for j, layer in enumerate(ArchAdapter(model).layers):
        register_lazy(layer, store, f"{prefix}.{j}.")
    model.eval()
    model.slm_store = store
    model.slm_memory_budget = memory_budget
    return model


def _shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def write_weights(model: nn.Module, folder: str, max_shard_bytes: int = 512 << 20, dtype: torch.dtype | None = None
                  ) -> None:
    """Write ``model``'s weights into ``folder`` as ``save_pretrained`` names them (tied parameters once, under their
    first name; ``model.safetensors`` or shards with ``model.safetensors.index.json``), tensor by tensor: a lazy
    layer's tensors are copied from its checkpoint under the layer's new index, so the whole model never exists
    in memory. At most one shard (``max_shard_bytes``) is held at a time."""
    from safetensors.torch import save_file

    from ..arch import ArchAdapter

    prefix = layers_prefix(model)
    layers = ArchAdapter(model).layers
    persistent = set(model.state_dict())
    named = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if n in persistent]

    def tensor(name: str, value: torch.Tensor) -> torch.Tensor:
        if value.is_meta and name.startswith(prefix + "."):
            index, _, rel = name[len(prefix) + 1 :].partition(".")
            layer = layers[int(index)]
            if layer in _LAZY:
                store, lazy_prefix = _LAZY[layer]
                value = store.read(lazy_prefix + rel)
        if value.is_meta:
            raise ModelLoadError(f"cannot write {name}: it has no weights")  # pragma: no cover - a bug
        value = value.detach()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        return value.contiguous().cpu()

    shards: list[list[str]] = [[]]
    sizes = [0]
    nbytes = {name: value.numel() * (dtype.itemsize if dtype is not None and value.is_floating_point()
                                     else value.element_size()) for name, value in named}
    for name, _ in named:  # plan the shards by size first, then read and write one shard at a time
        if shards[-1] and sizes[-1] + nbytes[name] > max_shard_bytes:
            shards.append([])
            sizes.append(0)
        shards[-1].append(name)
        sizes[-1] += nbytes[name]
    values = dict(named)
    weight_map = {}
    for k, names in enumerate(shards, 1):
        file = "model.safetensors" if len(shards) == 1 else _shard_name(k, len(shards))
        save_file({name: tensor(name, values[name]) for name in names}, os.path.join(folder, file),
                  metadata={"format": "pt"})
        weight_map.update({name: file for name in names})
    if len(shards) > 1:
        with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
            json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, fh, indent=2, sort_keys=True)
            fh.write("\n")


def save_model(model: nn.Module, folder: str, dtype: torch.dtype | None = None) -> None:
    """``save_pretrained`` for an ordinary model; config, generation config and streamed weights for a lazy one."""
    if not is_lazy_model(model):
        if dtype is not None:
            model.to(dtype)
        model.save_pretrained(folder)
        return
    if dtype is not None:
        model.config.dtype = dtype
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    write_weights(model, folder, dtype=dtype)
