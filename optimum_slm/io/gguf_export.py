"""``slm export --format gguf``: a checkpoint folder (what ``slm compress`` writes) as one GGUF file for llama.cpp.

It does what llama.cpp's own converter (``convert_hf_to_gguf.py``) does for the families it handles, restated for the
checkpoints this project writes, with nothing from llama.cpp installed (only the ``gguf`` package):

* the architecture: ``llama`` (Llama, Mistral), ``qwen2``, ``qwen3``, ``gemma2``, ``gemma3`` (``gemma3_text``),
  ``phi3``; per-layer widths (``slm_layer_widths``, written by width passes with per-layer ratios) of the llama-like
  families as ``deci``, llama.cpp's llama with per-layer head counts and FFN widths. A Qwen2 checkpoint that the
  ``qwen2`` architecture cannot hold (heads narrowed below the hidden size, or FLAP's o/MLP biases) is written as
  ``llama``, which is Qwen2's layer plus optional biases once q/k are permuted;
* the hyper-parameters from ``config.json`` and the widths from the tensors' shapes (the source of truth);
* the tensors one at a time (never the whole model in memory), renamed, q/k permuted from HF's rotate-half layout to
  GGUF's interleaved one for ``llama``/``deci``, Gemma's norms shifted by one, 2-D weights in f16 (or f32) and norms
  and biases in f32;
* the vocabulary of byte-level BPE tokenizers (``tokenizer.ggml.model = gpt2``), the pre-tokenizer named as llama.cpp
  names it (the converter's fingerprint of the tokenizer, else the pre-tokenizer's structure, else the caller's
  ``pre``), merges, special ids, ``add_bos`` and the chat template.

What llama.cpp cannot run as the checkpoint does is refused in one line (``ExportError``), never written wrong.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Any, Callable

import numpy as np
import torch

from ..errors import SLMError
from .gguf_pretokenizers import CHKTXT, KNOWN_PRE, PRE_BY_HASH
from .names import CONFIG_FILE, LAYER_WIDTHS_KEY, WEIGHTS_FILE, WEIGHTS_INDEX_FILE

logger = logging.getLogger(__name__)


class ExportError(SLMError):
    """A checkpoint that cannot be written as GGUF (its family, tokenizer or layout), or an output that is refused."""


#: the tensor types an export writes its 2-D weights in
DTYPES = ("f16", "f32")
#: model_type -> the llama.cpp architecture it is written as (uniform widths)
GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
              "gemma3_text": "gemma3", "phi3": "phi3"}
#: the families whose per-layer widths are written as llama.cpp's ``deci``
DECI_FAMILIES = ("llama", "mistral", "qwen2")
#: llama.cpp runs these with RoPE on interleaved pairs: q/k rows are permuted from HF's rotate-half layout
PERMUTED_ARCHS = ("llama", "deci")
#: what the architectures load beyond their projections' weights: ``qkv`` (q/k/v biases), ``o`` (o_proj's bias),
#: ``mlp`` (the MLP's biases); anything else in the file would fail llama.cpp's tensor count check
ARCH_BIASES = {"llama": {"qkv", "o", "mlp"}, "deci": {"qkv", "o", "mlp"}, "qwen2": {"qkv"}, "qwen3": {"qkv"},
               "gemma2": {"qkv"}, "gemma3": {"qkv"}, "phi3": {"qkv"}}

# ------------------------------------------------------------------------------------------------ tensor names
_ATTN = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output"}
_MLP = {"mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_LLAMA_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_QK_NORMS = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
_GEMMA_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
_PHI3 = {"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output", "mlp.gate_up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}
#: model_type -> decoder-layer module (relative to ``model.layers.N.``) -> GGUF tensor base name (``blk.N.`` + it)
LAYER_NAMES = {
    "llama": {**_LLAMA_NORMS, **_ATTN, **_MLP},
    "mistral": {**_LLAMA_NORMS, **_ATTN, **_MLP},
    "qwen2": {**_LLAMA_NORMS, **_ATTN, **_MLP},
    "qwen3": {**_LLAMA_NORMS, **_QK_NORMS, **_ATTN, **_MLP},
    "gemma2": {**_GEMMA_NORMS, **_ATTN, **_MLP},
    "gemma3_text": {**_GEMMA_NORMS, **_QK_NORMS, **_ATTN, **_MLP},
    "phi3": {**_LLAMA_NORMS, **_PHI3},
}
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
_LAYER_TENSOR = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")

# ------------------------------------------------------------------------------------------------ pre-tokenizers
#: the split regexes of tokenizer.json pre-tokenizers (Split + ByteLevel without its own regex), as llama.cpp's
#: llama-vocab.cpp quotes them, -> the llama.cpp pre-tokenizer that runs the same regex
_SPLIT_REGEX_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen35",
}


def _byte_level(node: dict | None, *, regex: bool) -> bool:
    return bool(node) and node.get("type") == "ByteLevel" and not node.get("add_prefix_space", False) and \
        bool(node.get("use_regex", True)) == regex


def structural_pre(tokenizer_json: dict) -> str | None:
    """The llama.cpp pre-tokenizer that splits text as ``tokenizer_json``'s pre-tokenizer does, None when none is
    known to: GPT-2's ByteLevel regex (``gpt-2``), digits split one by one before it (``smollm``: SmolLM, StarCoder),
    or a Split regex before a regex-less ByteLevel (``llama-bpe``, ``qwen2``, ``qwen35``)."""
    if (tokenizer_json.get("normalizer") or {}).get("type") not in (None, "NFC"):
        return None
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    steps = [s for s in (steps or []) if s]
    if len(steps) == 1 and _byte_level(steps[0], regex=True):
        return "gpt-2"
    if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") \
            and _byte_level(steps[1], regex=True):
        return "smollm"
    if len(steps) == 2 and steps[0].get("type") == "Split" and _byte_level(steps[1], regex=False) \
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
        return _SPLIT_REGEX_PRE.get((steps[0].get("pattern") or {}).get("Regex"))
    return None


def fingerprint(tokenizer) -> str:
    """llama.cpp's fingerprint of a tokenizer (a ``tokenizers.Tokenizer``): the SHA-256 of its ids for ``CHKTXT``,
    special tokens included (``get_vocab_base_pre``)."""
    return sha256(str(tokenizer.encode(CHKTXT).ids).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ layout
@dataclass
class Layout:
    """What the tensors say about the decoder: per-layer widths, the biases present, tied embeddings."""

    n_layers: int
    hidden: int
    head_dim: int
    vocab_rows: int
    heads: list[int] = field(default_factory=list)
    kv_heads: list[int] = field(default_factory=list)
    ffn: list[int] = field(default_factory=list)
    biases: set[str] = field(default_factory=set)
    tied: bool = True

    @property
    def uniform(self) -> bool:
        return len(set(self.heads)) == 1 and len(set(self.kv_heads)) == 1 and len(set(self.ffn)) == 1


def _shape_of(shapes: dict[str, list[int]], name: str) -> list[int]:
    if name not in shapes:
        raise ExportError(f"the checkpoint has no tensor {name!r}")
    return shapes[name]


def _whole(n: int, d: int, what: str) -> int:
    if d <= 0 or n % d:
        raise ExportError(f"{what}: {n} rows are not a whole number of heads of {d}")
    return n // d


def read_layout(model_type: str, cfg: Any, shapes: dict[str, list[int]]) -> Layout:
    """The decoder's widths from the tensors' shapes, checked against ``config.json`` where it states them."""
    n_layers = int(cfg.num_hidden_layers)
    hidden = int(cfg.hidden_size)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // int(cfg.num_attention_heads))
    embed = _shape_of(shapes, "model.embed_tokens.weight")
    if embed[1] != hidden:
        raise ExportError(f"model.embed_tokens.weight is {embed}, config.json's hidden_size is {hidden}")
    layout = Layout(n_layers, hidden, head_dim, embed[0])
    for i, widths in enumerate(getattr(cfg, LAYER_WIDTHS_KEY, None) or []):
        # a removed attention / MLP (drop_attn / drop_mlp ops) is a width of zero, which no exported
        # architecture here writes
        gone = [what for key, what in (("num_key_value_heads", "attention"), ("intermediate_size", "MLP"))
                if isinstance(widths, dict) and widths.get(key) == 0]
        if gone:
            raise ExportError(f"layer {i} is without {gone[0]} (a removed sub-layer), which the GGUF export does not "
                              "write; compress without sub-layer removal (e.g. slm-plus granularity=layer) for GGUF")
    present = {int(m.group(1)) for m in map(_LAYER_TENSOR.match, shapes) if m}
    if present != set(range(n_layers)):
        raise ExportError(f"the checkpoint's layers {sorted(present)[:8]}... do not match num_hidden_layers="
                          f"{n_layers}")
    for i in range(n_layers):
        p = f"model.layers.{i}."
        if model_type == "phi3":
            o_in = _shape_of(shapes, p + "self_attn.o_proj.weight")[1]
            heads = _whole(o_in, head_dim, f"layer {i}'s o_proj")
            qkv = _shape_of(shapes, p + "self_attn.qkv_proj.weight")[0]
            kv = _whole(qkv - o_in, 2 * head_dim, f"layer {i}'s qkv_proj")
            ffn = _shape_of(shapes, p + "mlp.gate_up_proj.weight")[0] // 2
        else:
            heads = _whole(_shape_of(shapes, p + "self_attn.q_proj.weight")[0], head_dim, f"layer {i}'s q_proj")
            kv = _whole(_shape_of(shapes, p + "self_attn.k_proj.weight")[0], head_dim, f"layer {i}'s k_proj")
            ffn = _shape_of(shapes, p + "mlp.gate_proj.weight")[0]
        if heads <= 0 or kv <= 0 or ffn <= 0 or heads % kv:
            raise ExportError(f"layer {i} has {heads} query heads, {kv} key/value heads and an FFN of {ffn}: "
                              "llama.cpp needs at least one of each and whole query groups")
        layout.heads.append(heads)
        layout.kv_heads.append(kv)
        layout.ffn.append(ffn)
    for name in shapes:
        m = _LAYER_TENSOR.match(name)
        if m and m.group(3) == "bias":
            module = m.group(2)
            layout.biases.add("o" if module.endswith("o_proj") else "mlp" if module.startswith("mlp.") else "qkv")
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    if not tied and "lm_head.weight" not in shapes:
        raise ExportError("config.json says the output layer is not tied to the embeddings, but the checkpoint has "
                          "no lm_head.weight")
    layout.tied = tied
    if not getattr(cfg, LAYER_WIDTHS_KEY, None) and not (
            set(layout.heads) == {int(cfg.num_attention_heads)}
            and set(layout.kv_heads) == {int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)}
            and set(layout.ffn) == {int(cfg.intermediate_size)}):
        raise ExportError("the tensors' shapes disagree with config.json's head counts or intermediate_size")
    return layout


def choose_arch(model_type: str, layout: Layout) -> str:
    """The llama.cpp architecture the checkpoint is written as; ``ExportError`` when none can run it."""
    extra = layout.biases - {"qkv"}
    if not layout.uniform:
        if model_type not in DECI_FAMILIES:
            raise ExportError(f"per-layer widths ({LAYER_WIDTHS_KEY}) can be exported only for "
                              f"{', '.join(DECI_FAMILIES)} (as llama.cpp's deci architecture), not {model_type}; "
                              "compress it with uniform widths instead")
        return "deci"
    arch = GGUF_ARCHS[model_type]
    full_width = layout.heads[0] * layout.head_dim == layout.hidden
    if arch == "qwen2" and (extra or not full_width):
        return "llama"  # a qwen2 layer is a llama layer with q/k/v biases; llama also loads o/MLP biases
    if extra - ARCH_BIASES[arch]:
        raise ExportError(f"llama.cpp's {arch} architecture has no {' or '.join(sorted(extra))} biases (added by "
                          "FLAP's bias compensation); compress without them")
    if arch == "phi3" and not full_width:
        raise ExportError(f"llama.cpp's phi3 architecture needs num_attention_heads x head_dim = hidden_size "
                          f"({layout.heads[0]} x {layout.head_dim} != {layout.hidden}); prune only the MLP of "
                          "Phi-3 for GGUF")
    return arch


# ------------------------------------------------------------------------------------------------ rope
def rope_parameters(cfg: Any) -> tuple[dict, dict | None]:
    """(the full-attention layers' RoPE parameters, the sliding layers' or None), from transformers 5's
    ``rope_parameters`` (flat or per layer type) or the older ``rope_theta``/``rope_scaling``."""
    rp = getattr(cfg, "rope_parameters", None)
    if rp is None:
        rp = getattr(cfg, "rope_scaling", None)
    rp = dict(rp or {})
    if "full_attention" in rp or "sliding_attention" in rp:
        full, swa = dict(rp.get("full_attention") or {}), dict(rp.get("sliding_attention") or {}) or None
    else:
        full, swa = rp, None
    if full.get("rope_theta") is None and getattr(cfg, "rope_theta", None) is not None:
        full["rope_theta"] = cfg.rope_theta
    local = getattr(cfg, "rope_local_base_freq", None)
    if swa is None and local is not None:
        swa = {"rope_theta": local}
    full.setdefault("rope_type", full.get("type") or "default")
    return full, swa


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """The ``rope_freqs`` tensor of Llama 3.x's RoPE scaling (as llama.cpp's converter computes it)."""
    base = rope.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _write_rope_scaling(w, gguf, arch: str, rope: dict, head_dim: int, extra: list) -> None:
    kind = str(rope.get("rope_type") or "default").lower()
    factor = rope.get("factor")
    if kind == "default":
        return
    if kind == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif kind == "yarn" and factor is not None and arch in ("llama", "deci", "qwen2", "qwen3"):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        if rope.get("original_max_position_embeddings") is not None:
            w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(rope[key])
    elif kind == "llama3" and arch in PERMUTED_ARCHS:
        factors = llama3_rope_factors(rope, head_dim)
        extra.append(("rope_freqs.weight", lambda f=factors: f))
    else:
        raise ExportError(f"RoPE scaling {kind!r} cannot be exported for llama.cpp's {arch} architecture")


# ------------------------------------------------------------------------------------------------ metadata
def _layer_types(cfg: Any, n_layers: int) -> list[str]:
    types = getattr(cfg, "layer_types", None)
    if types and len(types) == n_layers:
        return list(types)
    pattern = getattr(cfg, "sliding_window_pattern", None) or getattr(cfg, "_sliding_window_pattern", None)
    if pattern:
        return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)]
    return ["full_attention"] * n_layers


def _gemma_checks(arch: str, cfg: Any, layout: Layout) -> None:
    """llama.cpp fixes Gemma's attention scale by model size (a 46-layer Gemma 2 or a 62-layer Gemma 3 is a 27B,
    scaled by hidden/heads; every other one by head_dim); refuse a checkpoint whose query_pre_attn_scalar differs."""
    big = layout.n_layers == (46 if arch == "gemma2" else 62)
    cpp = layout.hidden / layout.heads[0] if big else layout.head_dim
    ours = float(getattr(cfg, "query_pre_attn_scalar", None) or layout.head_dim)
    if not math.isclose(cpp, ours, rel_tol=1e-6):
        raise ExportError(f"llama.cpp scales a {layout.n_layers}-layer {arch}'s attention by 1/sqrt({cpp:g}), the "
                          f"checkpoint by 1/sqrt(query_pre_attn_scalar={ours:g}): the GGUF would compute another "
                          "model (llama.cpp infers the scale from the layer count)")
    if arch == "gemma2" and not layout.tied:
        raise ExportError("llama.cpp's gemma2 architecture always ties the output layer to the embeddings; this "
                          "checkpoint has its own lm_head")


def write_hparams(w, gguf, arch: str, model_type: str, cfg: Any, layout: Layout, extra: list) -> None:
    """The architecture's hyper-parameters (``{arch}.*``), as llama.cpp's converter writes them."""
    full, swa = rope_parameters(cfg)
    theta = full.get("rope_theta")
    hd = layout.head_dim
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(layout.hidden)
    w.add_block_count(layout.n_layers)
    if arch == "deci":
        w.add_feed_forward_length(layout.ffn)
        w.add_head_count(layout.heads)
        w.add_head_count_kv(layout.kv_heads)
    else:
        w.add_feed_forward_length(layout.ffn[0])
        w.add_head_count(layout.heads[0])
        w.add_head_count_kv(layout.kv_heads[0])
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    if theta is not None:
        w.add_rope_freq_base(float(theta))
    # llama.cpp takes head_dim = hidden / heads (of layer 0) unless told: always tell it
    w.add_key_length(hd)
    w.add_value_length(hd)
    if arch in ("llama", "deci"):
        w.add_vocab_size(layout.vocab_rows)
        w.add_rope_dimension_count(hd)
    if arch == "phi3":
        partial = float(full.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None) or 1.0))
        rope_dims = int(partial * hd)
        w.add_rope_dimension_count(rope_dims)
        orig = full.get("original_max_position_embeddings", getattr(cfg, "original_max_position_embeddings", None))
        if orig is not None:
            w.add_rope_scaling_orig_ctx_len(int(orig))
        w.add_sliding_window(int(getattr(cfg, "sliding_window", None) or 0))
        _phi3_rope(w, full, cfg, rope_dims, extra)
    elif arch in ("gemma2", "gemma3"):
        _gemma_checks(arch, cfg, layout)
        types = _layer_types(cfg, layout.n_layers)
        sliding = [t == "sliding_attention" for t in types]
        if arch == "gemma2":
            default = [i % 2 == 0 for i in range(layout.n_layers)]
            w.add_attn_logit_softcapping(float(getattr(cfg, "attn_logit_softcapping", None) or 0.0))
            w.add_final_logit_softcapping(float(getattr(cfg, "final_logit_softcapping", None) or 0.0))
            w.add_sliding_window(int(cfg.sliding_window))
            w.add_rope_freq_base_swa(float((swa or {}).get("rope_theta", theta or 10000.0)))
        else:
            default = [i % 6 < 5 for i in range(layout.n_layers)]
            if getattr(cfg, "final_logit_softcapping", None):
                w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
            if getattr(cfg, "attn_logit_softcapping", None):
                raise ExportError("llama.cpp's gemma3 architecture has no attention logit soft-capping")
            if any(sliding):
                w.add_sliding_window(int(cfg.sliding_window))
                w.add_rope_freq_base_swa(float((swa or {}).get("rope_theta", 10000.0)))
            _write_rope_scaling(w, gguf, arch, full, hd, extra)
        if any(sliding) and sliding != default:
            # depth compression breaks Gemma's every-n-th-layer pattern: the layers' own kinds, one bool each
            w.add_sliding_window_pattern(sliding)
    else:
        _write_rope_scaling(w, gguf, arch, full, hd, extra)
        if getattr(cfg, "use_sliding_window", True) and getattr(cfg, "sliding_window", None) and \
                "sliding_attention" in _layer_types(cfg, layout.n_layers):
            logger.warning("llama.cpp runs every layer of a %s with full attention; the checkpoint's sliding window "
                           "of %s tokens only changes what longer contexts see", model_type, cfg.sliding_window)


def _phi3_rope(w, rope: dict, cfg: Any, rope_dims: int, extra: list) -> None:
    kind = str(rope.get("rope_type") or "default").lower()
    if kind == "default":
        return
    if kind not in ("longrope", "su"):
        raise ExportError(f"RoPE scaling {kind!r} cannot be exported for llama.cpp's phi3 architecture")
    long_f, short_f = rope.get("long_factor"), rope.get("short_factor")
    if not long_f or not short_f or len(long_f) != len(short_f) or len(long_f) * 2 != rope_dims:
        raise ExportError(f"Phi-3's longrope needs long_factor and short_factor of {rope_dims // 2} entries each")
    orig = rope.get("original_max_position_embeddings", getattr(cfg, "original_max_position_embeddings", None))
    scale = int(cfg.max_position_embeddings) / int(orig)
    w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0)
    extra.append(("rope_factors_long.weight", lambda: np.asarray(long_f, dtype=np.float32)))
    extra.append(("rope_factors_short.weight", lambda: np.asarray(short_f, dtype=np.float32)))


# ------------------------------------------------------------------------------------------------ vocabulary
def write_vocab(w, gguf, folder: str, arch: str, n_rows: int, pre: str | None) -> str:
    """The tokenizer (``tokenizer.ggml.*``) of a byte-level BPE ``tokenizer.json``; returns the pre-tokenizer."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        raise ExportError(f"{folder} has no tokenizer.json: llama.cpp needs the vocabulary inside the GGUF; save the "
                          "tokenizer beside the model")
    with open(path, encoding="utf-8") as fh:
        tokenizer_json = json.load(fh)
    model = tokenizer_json.get("model") or {}
    pre_tok, decoder = tokenizer_json.get("pre_tokenizer") or {}, tokenizer_json.get("decoder") or {}
    steps = pre_tok.get("pretokenizers") if pre_tok.get("type") == "Sequence" else [pre_tok]
    if model.get("type") != "BPE" or not (any((s or {}).get("type") == "ByteLevel" for s in steps or [])
                                          or decoder.get("type") == "ByteLevel"):
        kind = "SentencePiece-style BPE" if model.get("type") == "BPE" else model.get("type") or "unknown"
        raise ExportError(f"only byte-level BPE tokenizers (GPT-2 style: SmolLM2, Qwen2/3, Llama 3) can be "
                          f"exported; {folder}'s is {kind} (llama.cpp's convert_hf_to_gguf.py converts the folder "
                          "once the base model's tokenizer.model is copied into it)")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(path)  # the checkpoint's own pipeline, whatever class its config would pick
    if pre is None:
        digest = fingerprint(tokenizer)
        pre = PRE_BY_HASH.get(digest) or structural_pre(tokenizer_json)
        if pre is None:
            raise ExportError(f"cannot tell which llama.cpp pre-tokenizer splits text as {folder}'s tokenizer does "
                              f"(fingerprint {digest[:12]}); name one with --tokenizer-pre (gpt-2, llama-bpe, qwen2, "
                              "smollm, ... or default, at a cost in tokenization fidelity)")
    elif pre not in KNOWN_PRE:
        raise ExportError(f"llama.cpp knows no pre-tokenizer {pre!r}; known: {', '.join(sorted(KNOWN_PRE))}")

    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= n_rows:
        raise ExportError(f"the tokenizer has ids up to {max(vocab.values())}, the embeddings only {n_rows} rows")
    reverse = {i: t for t, i in vocab.items()}
    added = {int(t["id"]): t for t in tokenizer_json.get("added_tokens") or []}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_rows):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if i in added:
            if not added[i].get("normalized", True):  # llama.cpp takes added tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False).ids,
                                         skip_special_tokens=False)
            looks_special = token.startswith("<|") and token.endswith("|>")
            types.append(gguf.TokenType.CONTROL if added[i].get("special") or looks_special
                         else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise ExportError(f"{folder}'s tokenizer.json has no BPE merges")
    # whether a BOS / EOS is added: what the tokenizer does, always written (llama.cpp's default depends on the
    # pre-tokenizer, SpecialVocab's reading of the post-processor on the template's shape)
    plain = tokenizer.encode(CHKTXT, add_special_tokens=False).ids
    full = tokenizer.encode(CHKTXT).ids
    special.add_special_token["bos"] = bool(full) and full[:1] != plain[:1]
    special.add_special_token["eos"] = bool(full) and full[-1:] != plain[-1:]
    special.add_to_gguf(w, quiet=True)
    config_path = os.path.join(folder, "tokenizer_config.json")
    if arch in ("llama", "deci") and os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as fh:
            prefix = json.load(fh).get("add_prefix_space")
        if prefix is not None:
            w.add_add_space_prefix(bool(prefix))
    return pre


# ------------------------------------------------------------------------------------------------ tensors
def permute_rope(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """q/k rows (or biases) from HF's rotate-half layout to the interleaved pairs llama.cpp's ``llama`` RoPE reads
    (``LlamaModel.permute`` of llama.cpp's converter; ``n_head`` = the key/value heads for k)."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


@dataclass
class _Item:
    name: str
    shape: tuple[int, ...]
    dtype: Any
    produce: Callable[[], np.ndarray]


def _tensor_files(folder: str) -> dict[str, str]:
    """Tensor name -> the safetensors file that holds it."""
    from safetensors import safe_open

    index = os.path.join(folder, WEIGHTS_INDEX_FILE)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            weight_map = json.load(fh).get("weight_map") or {}
        return {name: os.path.join(folder, f) for name, f in weight_map.items()}
    single = os.path.join(folder, WEIGHTS_FILE)
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as fh:
            return {name: single for name in fh.keys()}
    raise ExportError(f"{folder} has no safetensors weights ({WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE})")


def _gguf_name(model_type: str, hf_name: str) -> str | None:
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    m = _LAYER_TENSOR.match(hf_name)
    if m and m.group(2) in LAYER_NAMES[model_type]:
        return f"blk.{m.group(1)}.{LAYER_NAMES[model_type][m.group(2)]}.{m.group(3)}"
    return None


def plan_tensors(model_type: str, arch: str, layout: Layout, shapes: dict[str, list[int]],
                 read: Callable[[str], torch.Tensor], dtype: str) -> list[_Item]:
    """Every tensor of the GGUF, in writing order, with how to make it from the checkpoint."""
    items: list[_Item] = []
    gemma = model_type in ("gemma2", "gemma3_text")
    names = sorted(shapes, key=lambda n: (0, -1, n) if n.startswith("model.embed") else
                   (1, int(_LAYER_TENSOR.match(n).group(1)), n) if _LAYER_TENSOR.match(n) else (2, 0, n))
    for hf_name in names:
        if "rotary_emb" in hf_name:
            continue
        if hf_name == "lm_head.weight" and layout.tied:
            continue
        name = _gguf_name(model_type, hf_name)
        if name is None:
            raise ExportError(f"no GGUF tensor for the checkpoint's {hf_name!r} ({model_type} -> {arch})")
        shape = tuple(shapes[hf_name])
        layer = int(name.split(".")[1]) if name.startswith("blk.") else None
        n_perm = None
        if arch in PERMUTED_ARCHS and layer is not None:
            if ".attn_q." in name:
                n_perm = layout.heads[layer]
            elif ".attn_k." in name:
                n_perm = layout.kv_heads[layer]
        shift = gemma and hf_name.endswith("norm.weight")
        f32 = dtype == "f32" or len(shape) <= 1 or name.endswith("_norm.weight")

        def produce(hf_name=hf_name, n_perm=n_perm, shift=shift, f32=f32) -> np.ndarray:
            t = read(hf_name).to(torch.float32)
            if not bool(torch.isfinite(t).all()):
                raise ExportError(f"the checkpoint's {hf_name} holds NaN or infinite values")
            if n_perm is not None:
                t = permute_rope(t, n_perm)
            if shift:
                t = t + 1.0  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp's by w
            a = np.ascontiguousarray(t.numpy())
            if f32:
                return a
            with np.errstate(over="ignore"):
                half = a.astype(np.float16)
            if not np.isfinite(half).all():
                raise ExportError(f"{hf_name} has values beyond float16's range (largest |value| "
                                  f"{float(np.abs(a).max()):.4g} > 65504); export with --dtype f32")
            return half

        items.append(_Item(name, shape, np.float32 if f32 else np.float16, produce))
    return items


# ------------------------------------------------------------------------------------------------ the export
def _check_output(out_path: str, overwrite: bool) -> str:
    out = os.path.abspath(os.fspath(out_path))
    if os.path.isdir(out):
        raise ExportError(f"{out} is a folder; give the path of the .gguf file to write")
    if os.path.lexists(out) and not overwrite:
        raise ExportError(f"{out} exists (use --overwrite to replace it)")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise ExportError(f"the output's folder {parent} does not exist")
    return out


def export_gguf(folder: str | os.PathLike, out_path: str | os.PathLike, *, dtype: str = "f16",
                overwrite: bool = False, pre: str | None = None, name: str | None = None,
                info: dict | None = None) -> str:
    """Write the checkpoint ``folder`` as one GGUF file at ``out_path`` (atomically: a temp file beside it, renamed at
    the end, nothing left on failure); returns the file's absolute path.

    ``dtype``: ``f16`` (2-D weights in float16; norms, biases and RoPE factors stay float32, as llama.cpp's converter
    keeps them) or ``f32``. ``pre``: the llama.cpp pre-tokenizer name, when it cannot be told from the tokenizer.
    ``name``: ``general.name`` (default: the folder's name). ``info``, when given, is filled with what was written
    (arch, layers, dtype, pre, tensors).
    """
    folder = os.fspath(folder)
    if dtype not in DTYPES:
        raise ExportError(f"unknown GGUF dtype {dtype!r}; use one of: {', '.join(DTYPES)}")
    if not os.path.isfile(os.path.join(folder, CONFIG_FILE)):
        raise ExportError(f"{folder} is not a checkpoint folder (no {CONFIG_FILE})")
    out = _check_output(out_path, overwrite)
    try:
        import gguf
    except ImportError:
        raise ExportError("GGUF export needs the gguf package: pip install 'optimum-slm[gguf]'") from None
    from safetensors import safe_open
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(folder)
        get_text = getattr(cfg, "get_text_config", None)  # a multimodal wrapper nests the decoder's config
        cfg = get_text(decoder=True) if get_text is not None else cfg
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"cannot read {folder}'s {CONFIG_FILE}: {str(exc).splitlines()[0]}") from None
    model_type = getattr(cfg, "model_type", None)
    if model_type not in GGUF_ARCHS:
        raise ExportError(f"GGUF export supports {', '.join(GGUF_ARCHS)}; {folder} is model_type={model_type!r}")

    files = _tensor_files(folder)
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(f, framework="pt")) for f in sorted(set(files.values()))}
        shapes = {n: list(handles[f].get_slice(n).get_shape()) for n, f in files.items()}
        layout = read_layout(model_type, cfg, shapes)
        arch = choose_arch(model_type, layout)
        if arch != GGUF_ARCHS[model_type] and arch != "deci":
            logger.info("%s written as llama.cpp's %s architecture (its widths or biases do not fit %s)",
                        model_type, arch, GGUF_ARCHS[model_type])

        w = gguf.GGUFWriter(path=None, arch=arch)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name or os.path.basename(os.path.abspath(folder)))
        extra: list[tuple[str, Callable[[], np.ndarray]]] = []
        write_hparams(w, gguf, arch, model_type, cfg, layout, extra)
        w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        used_pre = write_vocab(w, gguf, folder, arch, layout.vocab_rows, pre)

        items = plan_tensors(model_type, arch, layout, shapes, lambda n: handles[files[n]].get_tensor(n), dtype)
        for extra_name, produce in extra:
            first = produce()
            items.insert(1, _Item(extra_name, first.shape, np.float32, produce))
        for item in items:
            nbytes = int(np.prod(item.shape)) * np.dtype(item.dtype).itemsize
            w.add_tensor_info(item.name, item.shape, np.dtype(item.dtype), nbytes)

        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
        os.close(fd)
        try:
            from pathlib import Path

            from ..progress import progress_bar

            w.write_header_to_file(path=Path(tmp))
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            with progress_bar(total=len(items), desc="writing GGUF", unit="tensor") as bar:
                for item in items:
                    w.write_tensor_data(item.produce())
                    bar.update(1)
            w.close()
            _follow_umask(tmp)
            if os.path.lexists(out) and not overwrite:  # appeared meanwhile
                raise ExportError(f"{out} exists (use --overwrite to replace it)")
            os.replace(tmp, out)
        except BaseException:
            with contextlib.suppress(Exception):
                w.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    if info is not None:
        info.update(arch=arch, model_type=model_type, layers=layout.n_layers, dtype=dtype, pre=used_pre,
                    tensors=len(items), uniform=layout.uniform)
    return out


def _follow_umask(path: str) -> None:
    """mkstemp makes the file 0600; give it what an ordinary ``open`` would (0666 minus the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
