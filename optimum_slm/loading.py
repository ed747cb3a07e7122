"""Model loading: offline first, ``trust_remote_code`` off unless asked, GGUF through transformers' loader.

A GGUF base is converted once to a plain safetensors checkpoint in the user cache (``OPTIMUM_SLM_CACHE`` or
``~/.cache/optimum-slm``), so later loads take well under a second and the result is savable as a vanilla checkpoint
(transformers refuses to ``save_pretrained`` a GGUF-loaded model).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from typing import Any

import torch

from .assets import resolve_model_alias
from .errors import ModelLoadError
from .fileio import follow_umask

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir(*parts: str) -> str:
    """A folder in the optimum-slm user cache (created)."""
    root = os.environ.get("OPTIMUM_SLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "optimum-slm")
    path = os.path.join(root, *parts)
    os.makedirs(path, exist_ok=True)
    return path


def resolve_dtype(dtype: Any) -> Any:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ModelLoadError(f"unknown dtype {dtype!r}; use one of: auto, {', '.join(DTYPES)}")


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    return device


def _gguf_cache_key(path: str) -> str:
    st = os.stat(path)
    return hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]


def convert_gguf(directory: str, gguf_file: str) -> str:
    """Convert a GGUF file to a plain fp32 checkpoint in the cache (once); returns the checkpoint folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.join(directory, gguf_file)
    if not os.path.exists(path):
        raise ModelLoadError(f"GGUF file not found: {path}")
    target = os.path.join(cache_dir("converted"), f"{os.path.splitext(gguf_file)[0]}-{_gguf_cache_key(path)}")
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    logger.info("converting %s to a plain checkpoint (once) in %s", gguf_file, target)
    try:
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    except ImportError as exc:
        raise ModelLoadError(f"loading GGUF needs the gguf package (pip install 'optimum-slm[gguf]'): {exc}") from None
    cfg = gguf_model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.tie_weights()
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=os.path.dirname(target))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        follow_umask(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model_path(name_or_path: str, gguf_file: str | None = None) -> str:
    """A loadable checkpoint folder or hub id for a path, alias or GGUF file."""
    alias = resolve_model_alias(name_or_path)
    if alias is not None:
        name_or_path, gguf_file = alias
    if gguf_file is None and name_or_path.endswith(".gguf") and os.path.isfile(name_or_path):
        name_or_path, gguf_file = os.path.split(os.path.abspath(name_or_path))
    if gguf_file is not None:
        return convert_gguf(name_or_path, gguf_file)
    return name_or_path


def load_model(
    name_or_path: str,
    gguf_file: str | None = None,
    dtype: Any = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
):
    """Load ``(model, tokenizer)`` for a checkpoint folder, hub id (offline cache), GGUF file or alias.

    ``dtype``: None/"auto" keeps the checkpoint's dtype (GGUF bases are fp32); ``device``: cpu, cuda or auto.
    The tokenizer gets ``pad_token = eos_token`` when it has none, as the official SLM code sets.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path, gguf_file)
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    if not os.path.isdir(path) and os.path.exists(path):
        raise ModelLoadError(f"{path} is a file, not a checkpoint folder (for GGUF use --gguf-file)")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, trust_remote_code=trust_remote_code, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, EnvironmentError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {first}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(dev)
    model.eval()
    model.name_or_path = name_or_path if resolve_model_alias(name_or_path) else getattr(model, "name_or_path", path)
    return model, tokenizer
