"""Base-model fingerprints: a plan names its base by one, and ``apply`` refuses a model that does not match.

Three schemes, tagged in the plan's ``base.fingerprint_scheme``:

* ``v3`` (written from 0.4.0 on): sha256 over the text config (load-dependent keys left out), then, for every
  parameter in name order (tied parameters once, under their first name), its name, shape and EVERY value, rounded
  to bfloat16 (round to nearest even through float32). So float32 and bfloat16 loads of one checkpoint match, and a
  float16 checkpoint matches in all three dtypes; a float16 load of a float32 or bfloat16 checkpoint rounds values
  twice (and narrows their range), and may not match (as in v2). Any value change that survives bfloat16 rounding
  changes it.
  Computable from the safetensors files alone, tensor by tensor in chunks (``fingerprint_files``); that value is
  remembered in the user cache by the files' identity (path, size, mtime_ns, inode, ctime_ns: see
  ``io.manifest.remembered``), a shortcut only: any difference and it is computed again in full. An in-memory
  model's is computed once per call site (SmolLM2-135M: about 0.5 s on two CPU cores, v2 0.06 s; values
  are converted in a worker thread while the previous chunk is hashed).
* ``v2`` (0.2.0): as v3 but only a strided sample of each tensor's values: up to 8 evenly spaced rows (first
  dimension) and up to 64 evenly spaced columns of each. Kept to check v2 plans.
* ``v1`` (0.1.0): names and shapes of every parameter, but values of only four tensors. Kept to check v1 plans.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import math
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from ..arch import text_config
from ..errors import PlanError
from ..io.names import CONFIG_FILE, PLAN_TENSORS_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE

SCHEME = "v3"
SCHEMES = ("v1", "v2", "v3")
SAMPLE_ROWS = 8
SAMPLE_COLS = 64

# Config keys that differ between equivalent loads of one checkpoint (GGUF vs converted, dtype, attention backend).
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "quantization_config",
    "architectures",
    "use_cache",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "_experts_implementation",
    "tie_word_embeddings",
}


def jsonable(value: Any) -> Any:
    """``value`` with tuples as lists, dtypes as strings and anything unknown as its repr (for JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.dtype):
        return str(value)
    return repr(value)


def _config_bytes(config) -> bytes:
    cfg = text_config(config).to_dict()
    cfg = {k: v for k, v in cfg.items() if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")}
    return json.dumps(jsonable(cfg), sort_keys=True).encode()


def _bf16_bytes(values: torch.Tensor) -> bytes:
    return values.to("cpu", torch.float32).to(torch.bfloat16).view(torch.int16).numpy().tobytes()


def _spread(n: int, k: int) -> list[int]:
    """Up to ``k`` evenly spaced indices in 0..n-1 (all of them when n <= k)."""
    k = min(k, n)
    return [i * n // k for i in range(k)]


def sample_values(rows: Iterable[torch.Tensor]) -> torch.Tensor:
    """The fingerprint sample of already selected rows: up to ``SAMPLE_COLS`` evenly spaced values of each."""
    picked = []
    for row in rows:
        flat = row.reshape(-1)
        picked.append(flat[_spread(flat.numel(), SAMPLE_COLS)])
    return torch.cat(picked) if picked else torch.zeros(0)


def _tensor_sample(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.dim() == 0:
        t = t.reshape(1)
    return sample_values(t[i] for i in _spread(t.shape[0], SAMPLE_ROWS)) if t.numel() else torch.zeros(0)


def _lazy_folder(model: nn.Module) -> str | None:
    """The checkpoint folder a lazy model (``load_lazy_model``) reads its layers from (None for others)."""
    store = getattr(model, "slm_store", None)
    if store is not None and any(p.is_meta for p in model.parameters()):
        return store.folder
    return None


def fingerprint(model: nn.Module) -> str:
    """The v3 fingerprint of a loaded model (every value of every parameter; tied ones once, under their first
    name); a lazy model's (``load_lazy_model``) from its files."""
    folder = _lazy_folder(model)
    if folder is not None:
        return fingerprint_files(folder, "v3")
    state = dict(model.named_parameters())

    def parts() -> Iterator[bytes | Callable[[], memoryview]]:
        yield _config_bytes(model)
        for name in sorted(state):
            t = state[name].detach()
            yield f"{name}:{tuple(t.shape)};".encode()
            flat = t.reshape(-1)
            for i in range(0, flat.numel(), _CHUNK):
                yield functools.partial(_bf16_all, flat[i : i + _CHUNK])

    return _sha256_of(b"optimum-slm fingerprint v3\n", parts())


def _sha256_of(prefix: bytes, parts: Iterable[bytes | Callable[[], memoryview]]) -> str:
    """sha256 of ``prefix`` and ``parts`` in order; a callable part (read and convert one chunk) runs in a worker
    thread while the chunk before it is hashed (both release the GIL), at most two chunks ahead."""
    h = hashlib.sha256(prefix)
    pending: deque = deque()

    def take() -> None:
        part = pending.popleft()
        h.update(part.result() if isinstance(part, Future) else part)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="slm-fingerprint") as pool:
        try:
            for part in parts:
                pending.append(pool.submit(part) if callable(part) else part)
                while len(pending) > 2:
                    take()
            while pending:
                take()
        finally:
            for part in pending:
                if isinstance(part, Future):
                    part.cancel()
    return h.hexdigest()


def fingerprint_v2(model: nn.Module) -> str:
    """The v2 fingerprint of a loaded model (sampled values; tied parameters once); a lazy model's from its files."""
    folder = _lazy_folder(model)
    if folder is not None:
        return fingerprint_files(folder, "v2")
    h = hashlib.sha256(b"optimum-slm fingerprint v2\n")
    h.update(_config_bytes(model))
    state = dict(model.named_parameters())
    for name in sorted(state):
        t = state[name]
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(_bf16_bytes(_tensor_sample(t)))
    return h.hexdigest()


#: values converted and hashed at a time (bounds the temporary float32 copy at 16 MiB)
_CHUNK = 1 << 22


def _bf16_all(values: torch.Tensor) -> memoryview:
    """The bfloat16 bytes of ``values`` (rounded through float32, as ``_bf16_bytes``; converted on their device)."""
    return memoryview(values.to(torch.float32).to(torch.bfloat16).cpu().view(torch.int16).numpy()).cast("B")


def _weight_files(directory: str) -> list[str]:
    """The safetensors files holding a checkpoint's weights: those its index names, else ``model.safetensors``, else
    every ``*.safetensors`` file but a plan's side-car."""
    index = os.path.join(directory, WEIGHTS_INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as fh:
                names = sorted(set((json.load(fh).get("weight_map") or {}).values()))
        except (OSError, ValueError, AttributeError):
            raise PlanError(f"{index} is not a readable shard index") from None
        files = [os.path.join(directory, n) for n in names]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise PlanError(f"{directory}: the index names {os.path.basename(missing[0])}, which is missing")
        return files
    if os.path.isfile(os.path.join(directory, WEIGHTS_FILE)):
        return [os.path.join(directory, WEIGHTS_FILE)]
    return [f for f in sorted(glob.glob(os.path.join(directory, "*.safetensors")))
            if os.path.basename(f) != PLAN_TENSORS_FILE]


def fingerprint_files(directory: str | os.PathLike, scheme: str = SCHEME, remember: bool = True) -> str:
    """The fingerprint (``scheme``: v3 or v2) of a saved checkpoint folder, from ``config.json`` and its safetensors
    files only: equals ``fingerprint(from_pretrained(directory))`` without building the model.

    v3 reads every tensor in chunks (never a whole tensor in memory); its value is remembered in the user cache by
    the identity of ``config.json`` and the weight files (``remember=False``: computed in full regardless).
    """
    directory = os.fspath(directory)
    if scheme == "v2":
        return _fingerprint_files_v2(directory)
    if scheme != "v3":
        raise PlanError(f"fingerprint scheme {scheme!r} cannot be computed from files (known: v2, v3)")
    files = _weight_files(directory)
    if not files:
        raise PlanError(f"{directory} holds no .safetensors files to fingerprint")
    if not os.path.isfile(os.path.join(directory, CONFIG_FILE)):
        raise PlanError(f"{directory} has no {CONFIG_FILE} to fingerprint")
    from ..io.manifest import remembered
    from ..loading import cache_dir

    inputs = files + [os.path.join(directory, CONFIG_FILE)]
    try:
        memo = cache_dir("fingerprints") if remember else None
    except OSError:
        memo = None
    return remembered(memo, "fingerprint-v3", inputs, lambda: _fingerprint_files_v3(directory, files))


def _fingerprint_files_v3(directory: str, files: list[str]) -> str:
    from transformers import AutoConfig

    from ..io.shards import _DTYPES, _header

    config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    where: dict[str, tuple[str, int, dict]] = {}
    for path in files:
        start, header = _header(path)
        for name, entry in header.items():
            where[name] = (path, start, entry)
    embeddings = [n for n in where if n.endswith("embed_tokens.weight")]
    if getattr(config, "tie_word_embeddings", False) and embeddings and "lm_head.weight" in where:
        del where["lm_head.weight"]  # tied: the model has it once, under the embedding's name

    def parts() -> Iterator[bytes | Callable[[], memoryview]]:
        yield _config_bytes(config)
        for name in sorted(where):
            path, start, entry = where[name]
            dtype = _DTYPES.get(entry.get("dtype"))
            if dtype is None:
                raise PlanError(f"{path}: tensor {name!r} has dtype {entry.get('dtype')!r}, which cannot be "
                                "fingerprinted")
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            count = math.prod(shape)
            if end - begin != count * dtype.itemsize:
                raise PlanError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {list(shape)}")
            yield f"{name}:{shape};".encode()
            for i in range(0, count, _CHUNK):
                yield functools.partial(_read_bf16, path, start + begin + i * dtype.itemsize, min(_CHUNK, count - i),
                                        dtype, name)

    return _sha256_of(b"optimum-slm fingerprint v3\n", parts())


def _read_bf16(path: str, offset: int, count: int, dtype: torch.dtype, name: str) -> memoryview:
    """``count`` values of ``dtype`` at ``offset`` of ``path`` (a plain read), as ``_bf16_all`` bytes."""
    buf = bytearray(count * dtype.itemsize)
    with open(path, "rb") as fh:
        fh.seek(offset)
        if fh.readinto(buf) != len(buf):
            raise PlanError(f"{path} is truncated (tensor {name!r})")
    return _bf16_all(torch.frombuffer(buf, dtype=dtype))


def _fingerprint_files_v2(directory: str) -> str:
    from safetensors import safe_open
    from transformers import AutoConfig

    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise PlanError(f"{directory} holds no .safetensors files to fingerprint")
    config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    h = hashlib.sha256(b"optimum-slm fingerprint v2\n")
    h.update(_config_bytes(config))
    where: dict[str, str] = {}
    for path in files:
        with safe_open(path, framework="pt") as fh:
            for name in fh.keys():
                where[name] = path
    for name in sorted(where):
        with safe_open(where[name], framework="pt") as fh:
            view = fh.get_slice(name)
            shape = tuple(view.get_shape())
            h.update(f"{name}:{shape};".encode())
            if not shape:
                values = fh.get_tensor(name).reshape(1)
            elif shape[0] == 0 or 0 in shape:
                values = torch.zeros(0)
            else:
                values = sample_values(view[i : i + 1] for i in _spread(shape[0], SAMPLE_ROWS))
            h.update(_bf16_bytes(values))
    return h.hexdigest()


def fingerprint_v1(model: nn.Module) -> str:
    """The 0.1.0 fingerprint: every parameter's name and shape, values of four tensors (bfloat16-rounded)."""
    h = hashlib.sha256()
    h.update(_config_bytes(model))
    state = dict(model.named_parameters())
    for name in sorted(state):
        h.update(f"{name}:{tuple(state[name].shape)};".encode())
    names = sorted(state)
    probes = [names[0], names[len(names) // 2], names[-1]] + [n for n in names if ".layers.0." in n][:1]
    for name in probes:
        flat = state[name].detach().reshape(-1)[:4096].to("cpu", torch.float32).to(torch.bfloat16)
        h.update(flat.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def fingerprint_with(scheme: str, model: nn.Module) -> str:
    """The fingerprint of ``model`` under ``scheme`` (``v1``, ``v2`` or ``v3``)."""
    if scheme == "v3":
        return fingerprint(model)
    if scheme == "v2":
        return fingerprint_v2(model)
    if scheme == "v1":
        return fingerprint_v1(model)
    raise PlanError(f"unknown fingerprint scheme {scheme!r}; known: {', '.join(SCHEMES)}")
