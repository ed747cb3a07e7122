"""Base-model fingerprints: a plan names its base by one, and ``apply`` refuses a model that does not match.

Two schemes, tagged in the plan's ``base.fingerprint_scheme``:

* ``v2`` (written from 0.2.0 on): sha256 over the text config (load-dependent keys left out), then, for every
  parameter in name order, its name, shape and a strided sample of its values — up to 8 evenly spaced rows of the
  tensor (first dimension) and up to 64 evenly spaced columns of each (the other dimensions flattened). Values are
  rounded to bfloat16 before hashing, so a checkpoint loaded in float32 or bfloat16 matches itself. Computable from
  the safetensors files alone (``fingerprint_files``), reading only the sampled rows.
* ``v1`` (0.1.0): names and shapes of every parameter, but values of only four tensors. Kept to check v1 plans.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Any, Iterable

import torch
from torch import nn

from ..arch import text_config
from ..errors import PlanError

SCHEME = "v2"
SCHEMES = ("v1", "v2")
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


def fingerprint(model: nn.Module) -> str:
    """The v2 fingerprint of a loaded model (parameters; tied ones once, under their first name); a lazy model's
    (``load_lazy_model``) from its files."""
    store = getattr(model, "slm_store", None)
    if store is not None and any(p.is_meta for p in model.parameters()):
        return fingerprint_files(store.folder)
    h = hashlib.sha256(b"optimum-slm fingerprint v2\n")
    h.update(_config_bytes(model))
    state = dict(model.named_parameters())
    for name in sorted(state):
        t = state[name]
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(_bf16_bytes(_tensor_sample(t)))
    return h.hexdigest()


def fingerprint_files(directory: str | os.PathLike) -> str:
    """The v2 fingerprint of a saved checkpoint folder, from ``config.json`` and its safetensors shards only.

    Equals ``fingerprint(from_pretrained(directory))`` without building the model.
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    directory = os.fspath(directory)
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
    """The fingerprint of ``model`` under ``scheme`` (``v1`` or ``v2``)."""
    if scheme == "v2":
        return fingerprint(model)
    if scheme == "v1":
        return fingerprint_v1(model)
    raise PlanError(f"unknown fingerprint scheme {scheme!r}; known: {', '.join(SCHEMES)}")
