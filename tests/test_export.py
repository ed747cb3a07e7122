"""``slm export --format gguf``: the GGUF file read back with gguf's reader (metadata, tensor names and shapes as
llama.cpp's architectures declare them) and loaded by transformers' GGUF loader, whose logits must equal the
checkpoint's (which checks the renaming, llama's q/k permutation and Gemma's norm shift, since that loader undoes
them as llama.cpp's converter does them); per-layer widths as llama.cpp's ``deci``; every refusal one line."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner

from conftest import calib_ids, make_config
from optimum_slm.cli import cli

gguf = pytest.importorskip("gguf")

from optimum_slm.io.gguf_export import (  # noqa: E402 - after the importorskip
    ExportError,
    Layout,
    choose_arch,
    export_gguf,
    structural_pre,
)
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor  # noqa: E402

#: model_type -> what transformers' GGUF loader cannot read from the metadata (llama.cpp reads key_length and
#: infers Gemma's attention scale; the loader takes config defaults), given to from_pretrained
LOADER_KWARGS = {
    "qwen3": {"head_dim": 16},
    "gemma2": {"query_pre_attn_scalar": 16},
    "gemma3_text": {"query_pre_attn_scalar": 16, "layer_types": ["sliding_attention", "sliding_attention",
                                                                 "full_attention"]},
}
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
             "gemma3_text": "gemma3", "phi3": "phi3"}


def model_of(family: str, n_layers: int = 3, seed: int = 0):
    """A tiny model (conftest's configs; Gemma's attention scaled by 1/sqrt(head_dim), as llama.cpp scales it)."""
    cfg = make_config(family, n_layers)
    if family.startswith("gemma"):
        cfg.query_pre_attn_scalar = cfg.head_dim
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def save(model, tokenizer, path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def fields(path) -> tuple[dict, dict]:
    """(metadata key -> value, tensor name -> (numpy shape, type name)) of a GGUF file."""
    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type.name) for t in reader.tensors}
    return meta, tensors


def tensor(path, name: str) -> np.ndarray:
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)
    return np.array(t.data, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape.tolist())))


def expected_tensors(arch: str, n_layers: int, *, output: bool, extra: tuple[str, ...] = ()) -> set[str]:
    """The tensor names an export of ``arch`` must hold: the layer tensors the family has, named by gguf's own table
    (``gguf.TENSOR_NAMES``), each of which llama.cpp's architecture declares (``gguf.MODEL_TENSORS``)."""
    t = gguf.MODEL_TENSOR
    per_layer = {
        "llama": [t.ATTN_NORM, t.ATTN_Q, t.ATTN_K, t.ATTN_V, t.ATTN_OUT, t.FFN_NORM, t.FFN_GATE, t.FFN_UP, t.FFN_DOWN],
        "qwen2": [t.ATTN_NORM, t.ATTN_Q, t.ATTN_K, t.ATTN_V, t.ATTN_OUT, t.FFN_NORM, t.FFN_GATE, t.FFN_UP, t.FFN_DOWN],
        "qwen3": [t.ATTN_NORM, t.ATTN_Q, t.ATTN_K, t.ATTN_V, t.ATTN_OUT, t.ATTN_Q_NORM, t.ATTN_K_NORM, t.FFN_NORM,
                  t.FFN_GATE, t.FFN_UP, t.FFN_DOWN],
        "gemma2": [t.ATTN_NORM, t.ATTN_Q, t.ATTN_K, t.ATTN_V, t.ATTN_OUT, t.ATTN_POST_NORM, t.FFN_NORM, t.FFN_GATE,
                   t.FFN_UP, t.FFN_DOWN, t.FFN_POST_NORM],
        "gemma3": [t.ATTN_NORM, t.ATTN_Q, t.ATTN_K, t.ATTN_V, t.ATTN_OUT, t.ATTN_Q_NORM, t.ATTN_K_NORM,
                   t.ATTN_POST_NORM, t.FFN_NORM, t.FFN_GATE, t.FFN_UP, t.FFN_DOWN, t.FFN_POST_NORM],
        "phi3": [t.ATTN_NORM, t.ATTN_QKV, t.ATTN_OUT, t.FFN_NORM, t.FFN_UP, t.FFN_DOWN],
    }[arch]
    declared = {gguf.TENSOR_NAMES[k] for k in gguf.MODEL_TENSORS[gguf.MODEL_ARCH[arch.upper()]]}
    assert {gguf.TENSOR_NAMES[k] for k in per_layer} <= declared
    names = {gguf.TENSOR_NAMES[t.TOKEN_EMBD] + ".weight", gguf.TENSOR_NAMES[t.OUTPUT_NORM] + ".weight"}
    if output:
        names.add(gguf.TENSOR_NAMES[t.OUTPUT] + ".weight")
    names |= {gguf.TENSOR_NAMES[k].format(bid=i) + ".weight" for i in range(n_layers) for k in per_layer}
    return names | set(extra)


def logits_through_transformers(folder, gguf_file, ids, **kwargs) -> torch.Tensor:
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32,
                                                               **kwargs).eval()
    with torch.no_grad():
        return loaded(ids).logits


def run(*args: str):
    return CliRunner().invoke(cli, ["--quiet", *args], catch_exceptions=False)


def fails(*args: str, message: str) -> None:
    result = run(*args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]


# ------------------------------------------------------------------------------------------------ the file
def test_cli_export_of_a_llama_checkpoint_metadata_tensors_and_f16(tiny_checkpoint, tmp_path):
    out = tmp_path / "tiny.gguf"
    result = run("export", "--model", tiny_checkpoint, "--format", "gguf", "--output", str(out))
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "llama" in result.output
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp file left beside it
    meta, tensors = fields(out)
    cfg = transformers.AutoConfig.from_pretrained(tiny_checkpoint)
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == cfg.num_hidden_layers == 6
    assert meta["llama.attention.head_count"] == 4 and meta["llama.attention.head_count_kv"] == 2
    assert meta["llama.feed_forward_length"] == 128 and meta["llama.embedding_length"] == 64
    assert meta["llama.context_length"] == 256 and meta["llama.rope.dimension_count"] == 16
    assert meta["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert len(meta["tokenizer.ggml.tokens"]) == len(meta["tokenizer.ggml.token_type"]) == 320
    assert meta["tokenizer.ggml.merges"] and meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.eos_token_id"] == 2
    assert meta["tokenizer.ggml.tokens"][1] == "<s>" and meta["tokenizer.ggml.token_type"][1] == gguf.TokenType.CONTROL
    assert set(tensors) == expected_tensors("llama", 6, output=True)
    assert tensors["token_embd.weight"] == ((320, 64), "F16") and tensors["output.weight"] == ((320, 64), "F16")
    assert tensors["blk.0.attn_k.weight"] == ((32, 64), "F16") and tensors["blk.0.attn_norm.weight"] == ((64,), "F32")
    # llama's q/k are permuted for llama.cpp's RoPE; transformers' loader undoes it back to the checkpoint's rows
    source = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint).state_dict()
    for name, hf, n_kv in (("attn_q", "q_proj", 4), ("attn_k", "k_proj", 2)):
        back = LlamaTensorProcessor()._reverse_permute_weights(tensor(out, f"blk.3.{name}.weight"), 4, n_kv)
        want = source[f"model.layers.3.self_attn.{hf}.weight"].numpy()
        assert not np.allclose(tensor(out, f"blk.3.{name}.weight"), want, atol=1e-2)
        assert np.allclose(back, want, atol=2e-3)


@pytest.mark.parametrize("family", sorted(GGUF_ARCH))
def test_every_family_loads_back_with_the_checkpoints_logits(family, tiny_tokenizer, tmp_path):
    model = model_of(family)
    folder = save(model, tiny_tokenizer, tmp_path / f"tiny-{family}")
    info: dict = {}
    export_gguf(folder, tmp_path / "m.gguf", dtype="f32", info=info)
    arch = GGUF_ARCH[family]
    assert info["arch"] == arch
    meta, tensors = fields(tmp_path / "m.gguf")
    assert meta["general.architecture"] == arch and meta[f"{arch}.block_count"] == 3
    assert meta[f"{arch}.attention.head_count"] == 4 and meta[f"{arch}.attention.head_count_kv"] == 2
    assert meta[f"{arch}.attention.key_length"] == 16
    tied = bool(model.config.tie_word_embeddings)
    assert set(tensors) - expected_tensors(arch, 3, output=not tied) <= {f"blk.{i}.{n}.bias" for i in range(3)
                                                                         for n in ("attn_q", "attn_k", "attn_v")}
    assert expected_tensors(arch, 3, output=not tied) <= set(tensors)
    assert all(kind == "F32" for _, kind in tensors.values())
    ids = calib_ids(2, 7, seed=1)
    with torch.no_grad():
        want = model(ids).logits
    got = logits_through_transformers(tmp_path, "m.gguf", ids, **LOADER_KWARGS.get(family, {}))
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_depth_compressed_checkpoint_exports_with_its_layer_count(tiny_checkpoint, tmp_path):
    dropped = tmp_path / "dropped"
    result = run("compress", "--model", tiny_checkpoint, "--method", "drop", "--param", "layers=1,4",
                 "--output", str(dropped))
    assert result.exit_code == 0, result.output
    result = run("export", "--model", str(dropped), "--output", str(tmp_path / "d.gguf"), "--dtype", "f32")
    assert result.exit_code == 0, result.output
    meta, tensors = fields(tmp_path / "d.gguf")
    assert meta["llama.block_count"] == 4
    assert "blk.3.ffn_down.weight" in tensors and "blk.4.attn_q.weight" not in tensors
    ids = calib_ids(2, 9, seed=2)
    source = transformers.AutoModelForCausalLM.from_pretrained(dropped).eval()
    with torch.no_grad():
        want = source(ids).logits
    assert torch.allclose(logits_through_transformers(tmp_path, "d.gguf", ids), want, atol=1e-4)


def test_qwen2_with_narrowed_heads_is_written_as_llama(tiny_tokenizer, tmp_path):
    """llama.cpp's qwen2 needs heads x head_dim = hidden_size; a qwen2 layer is a llama layer with q/k/v biases, so
    narrowed heads go out as llama (q/k and their biases permuted)."""
    from optimum_slm import apply_plan, compress

    base = model_of("qwen2", 3)
    model = apply_plan(copy.deepcopy(base), compress(base, "flap", calib_ids(3, 12), ratio=0.5, cache=False))
    assert model.config.num_attention_heads == 2
    folder = save(model, tiny_tokenizer, tmp_path / "flap-qwen2")
    info: dict = {}
    export_gguf(folder, tmp_path / "q.gguf", dtype="f32", info=info)
    assert info["arch"] == "llama"
    meta, tensors = fields(tmp_path / "q.gguf")
    assert meta["llama.attention.head_count"] == 2 and meta["llama.attention.key_length"] == 16
    assert tensors["blk.0.attn_q.weight"][0] == (32, 64) and "blk.0.attn_q.bias" in tensors
    ids = calib_ids(2, 7, seed=1)
    with torch.no_grad():
        want = model(ids).logits
    got = logits_through_transformers(tmp_path, "q.gguf", ids, attention_bias=True)  # o_proj's bias: zeros
    assert torch.allclose(got, want, atol=1e-4)


def test_per_layer_widths_are_written_as_deci(tiny_tokenizer, tmp_path):
    """Per-layer head counts and FFN widths: llama.cpp's deci architecture, q/k permuted with each layer's own head
    counts, which transformers' reverse permutation undoes back to the checkpoint's tensors exactly."""
    from optimum_slm import load_model
    from optimum_slm.arch import ArchAdapter

    model = model_of("llama", 3)
    adapter = ArchAdapter(model)
    widths = [{}, {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 96},
              {"num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 40}]
    adapter.narrow_attention(adapter.layers[1], [1])
    adapter.narrow_mlp(adapter.layers[1], torch.arange(96))
    adapter.narrow_attention(adapter.layers[2], [0, 1], heads=[[1], [0]])
    adapter.narrow_mlp(adapter.layers[2], torch.arange(40, 80))
    adapter.set_layer_widths(widths)
    folder = save(model, tiny_tokenizer, tmp_path / "adaptive")
    reloaded, _ = load_model(folder)
    info: dict = {}
    export_gguf(folder, tmp_path / "a.gguf", dtype="f32", info=info)
    assert info["arch"] == "deci" and not info["uniform"]
    meta, tensors = fields(tmp_path / "a.gguf")
    assert meta["deci.block_count"] == 3
    assert meta["deci.attention.head_count"] == [4, 2, 2] and meta["deci.attention.head_count_kv"] == [2, 1, 2]
    assert meta["deci.feed_forward_length"] == [128, 96, 40] and meta["deci.attention.key_length"] == 16
    assert set(tensors) == expected_tensors("llama", 3, output=True)
    assert tensors["blk.2.attn_q.weight"][0] == (32, 64) and tensors["blk.1.ffn_up.weight"][0] == (96, 64)
    state = reloaded.state_dict()
    heads, kv = meta["deci.attention.head_count"], meta["deci.attention.head_count_kv"]
    for i in range(3):
        for name, hf, n_kv in (("attn_q", "q_proj", heads[i]), ("attn_k", "k_proj", kv[i])):
            written = tensor(tmp_path / "a.gguf", f"blk.{i}.{name}.weight")
            back = LlamaTensorProcessor()._reverse_permute_weights(written, heads[i], n_kv)
            assert np.array_equal(back, state[f"model.layers.{i}.self_attn.{hf}.weight"].numpy())
    assert np.array_equal(tensor(tmp_path / "a.gguf", "blk.2.ffn_down.weight"),
                          state["model.layers.2.mlp.down_proj.weight"].numpy())


def test_per_layer_widths_of_other_families_are_refused():
    layout = Layout(2, 64, 16, 320, heads=[4, 2], kv_heads=[2, 1], ffn=[128, 64])
    assert choose_arch("qwen2", layout) == "deci"
    for family in ("qwen3", "gemma2", "gemma3_text", "phi3"):
        with pytest.raises(ExportError, match="per-layer widths .* only for llama, mistral, qwen2.*uniform widths"):
            choose_arch(family, layout)
    narrowed = Layout(2, 64, 16, 320, heads=[2, 2], kv_heads=[1, 1], ffn=[128, 128])
    with pytest.raises(ExportError, match="phi3 architecture needs num_attention_heads x head_dim = hidden_size"):
        choose_arch("phi3", narrowed)
    with pytest.raises(ExportError, match="gemma2 architecture has no mlp or o biases"):
        choose_arch("gemma2", Layout(2, 64, 16, 320, heads=[4, 4], kv_heads=[2, 2], ffn=[9, 9], biases={"o", "mlp"}))


def test_rope_scaling_llama3_factors_and_linear_keys(tiny_tokenizer, tmp_path):
    """Llama 3.x's RoPE scaling is a ``rope_freqs`` tensor llama.cpp divides the base frequencies by: base / factors
    must be transformers' own llama3 inverse frequencies. Linear scaling is two metadata keys."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model = model_of("llama", 2)
    model.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64}
    folder = save(model, tiny_tokenizer, tmp_path / "l3")
    export_gguf(folder, tmp_path / "l3.gguf")
    meta, tensors = fields(tmp_path / "l3.gguf")
    assert tensors["rope_freqs.weight"] == ((8,), "F32") and meta["llama.rope.freq_base"] == 500000.0
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](transformers.AutoConfig.from_pretrained(folder))
    base = 1.0 / (500000.0 ** (np.arange(0, 16, 2, dtype=np.float32) / 16))
    assert np.allclose(base / tensor(tmp_path / "l3.gguf", "rope_freqs.weight"), inv_freq.numpy(), rtol=1e-5)

    model.config.rope_parameters = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    folder = save(model, tiny_tokenizer, tmp_path / "lin")
    export_gguf(folder, tmp_path / "lin.gguf")
    meta, tensors = fields(tmp_path / "lin.gguf")
    assert meta["llama.rope.scaling.type"] == "linear" and meta["llama.rope.scaling.factor"] == 4.0
    assert "rope_freqs.weight" not in tensors


# ------------------------------------------------------------------------------------------------ the tokenizer
def test_pre_tokenizer_from_the_tokenizers_structure():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert structural_pre({"pre_tokenizer": byte_level}) == "gpt-2"
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert structural_pre({"pre_tokenizer": smollm}) == "smollm"
    qwen2_regex = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                   r"\s*[\r\n]+|\s+(?!\S)|\s+")
    split = {"type": "Split", "pattern": {"Regex": qwen2_regex}, "behavior": "Isolated", "invert": False}
    regexless = dict(byte_level, use_regex=False)
    assert structural_pre({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, regexless]},
                           "normalizer": {"type": "NFC"}}) == "qwen2"
    llama3 = dict(split, pattern={"Regex": qwen2_regex.replace(r"\p{N}|", r"\p{N}{1,3}|")})
    assert structural_pre({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [llama3, regexless]}}) == "llama-bpe"
    assert structural_pre({"pre_tokenizer": dict(byte_level, add_prefix_space=True)}) is None
    assert structural_pre({"pre_tokenizer": {"type": "Metaspace"}}) is None


def test_unknown_pre_tokenizer_is_refused_unless_named(tiny_checkpoint, tmp_path):
    folder = tmp_path / "odd"
    transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint).save_pretrained(folder)
    with open(os.path.join(tiny_checkpoint, "tokenizer.json"), encoding="utf-8") as fh:
        tokenizer = json.load(fh)
    tokenizer["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\d+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False, "trim_offsets": True}]}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    out = tmp_path / "odd.gguf"
    fails("export", "--model", str(folder), "--output", str(out), message="name one with --tokenizer-pre")
    fails("export", "--model", str(folder), "--output", str(out), "--tokenizer-pre", "nope",
          message="llama.cpp knows no pre-tokenizer 'nope'")
    assert not out.exists()
    result = run("export", "--model", str(folder), "--output", str(out), "--tokenizer-pre", "default")
    assert result.exit_code == 0, result.output
    assert fields(out)[0]["tokenizer.ggml.pre"] == "default"


# ------------------------------------------------------------------------------------------------ refusals
def test_unsupported_architecture_is_refused_in_one_line(tiny_tokenizer, tmp_path):
    cfg = transformers.GPT2Config(vocab_size=320, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    folder = save(transformers.GPT2LMHeadModel(cfg), tiny_tokenizer, tmp_path / "gpt2")
    fails("export", "--model", folder, "--output", str(tmp_path / "g.gguf"),
          message="GGUF export supports llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3;")
    fails("export", "--model", str(tmp_path / "nowhere"), "--output", str(tmp_path / "g.gguf"),
          message="is not a checkpoint folder")
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".gguf") or f.startswith(".")]


def test_existing_output_needs_overwrite(tiny_checkpoint, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    fails("export", "--model", tiny_checkpoint, "--output", str(out), message="exists (use --overwrite")
    assert out.read_bytes() == b"keep me"
    fails("export", "--model", tiny_checkpoint, "--output", str(tmp_path), message="is a folder")
    result = run("export", "--model", tiny_checkpoint, "--output", str(out), "--overwrite")
    assert result.exit_code == 0, result.output
    assert fields(out)[0]["general.architecture"] == "llama"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_f16_overflow_is_refused_and_nothing_is_left(tiny_tokenizer, tmp_path):
    model = model_of("llama", 2)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = 1e6
    folder = save(model, tiny_tokenizer, tmp_path / "big")
    fails("export", "--model", folder, "--output", str(tmp_path / "b.gguf"),
          message="model.layers.1.mlp.up_proj.weight has values beyond float16's range")
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".gguf") or f.startswith(".")]
    assert run("export", "--model", folder, "--output", str(tmp_path / "b.gguf"), "--dtype", "f32").exit_code == 0


def test_gemma_whose_attention_scale_llama_cpp_would_change_is_refused(tiny_tokenizer, tmp_path):
    model = transformers.AutoModelForCausalLM.from_config(make_config("gemma2", 2))  # query_pre_attn_scalar=256
    folder = save(model, tiny_tokenizer, tmp_path / "g2")
    with pytest.raises(ExportError, match=r"by 1/sqrt\(16\), the checkpoint by 1/sqrt\(query_pre_attn_scalar=256\)"):
        export_gguf(folder, tmp_path / "g.gguf")


def test_sentencepiece_style_tokenizer_is_refused(tiny_checkpoint, tmp_path):
    folder = tmp_path / "spm"
    transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint).save_pretrained(folder)
    (folder / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "byte_fallback": True, "vocab": {}, "merges": []},
        "pre_tokenizer": {"type": "Metaspace"}, "decoder": {"type": "Sequence"}}), encoding="utf-8")
    with pytest.raises(ExportError, match="only byte-level BPE tokenizers .* SentencePiece-style BPE"):
        export_gguf(str(folder), tmp_path / "s.gguf")


# ------------------------------------------------------------------------------------------------ golden
@pytest.mark.skipif(not os.environ.get("OPTIMUM_SLM_GGUF_GOLDEN"), reason="slow: set OPTIMUM_SLM_GGUF_GOLDEN=1")
def test_smollm2_round_trip_matches_llama_cpps_own_conversion(tmp_path):
    """smollm2-135m is llama.cpp's conversion of SmolLM2-135M-Instruct (Q4_1); converted to a checkpoint and
    exported again, its tensors must equal the original's dequantized ones bit for bit (llama.cpp's permutation)
    and its tokenizer metadata the original's."""
    from optimum_slm.assets import resolve_model_alias
    from optimum_slm.loading import convert_gguf

    directory, name = resolve_model_alias("smollm2-135m")
    out = export_gguf(convert_gguf(directory, name), tmp_path / "smol.gguf", dtype="f32")
    original = gguf.GGUFReader(os.path.join(directory, name))
    ours = gguf.GGUFReader(out)
    for key in ("llama.block_count", "llama.attention.head_count", "llama.attention.head_count_kv",
                "llama.feed_forward_length", "llama.rope.freq_base", "llama.rope.dimension_count", "llama.vocab_size",
                "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert original.fields[key].contents() == ours.fields[key].contents(), key
    mine = {t.name: t for t in ours.tensors}
    assert {t.name for t in original.tensors} == set(mine)
    for t in original.tensors:
        original_values = gguf.dequantize(t.data, t.tensor_type).reshape(-1)
        assert np.array_equal(original_values, np.asarray(mine[t.name].data).reshape(-1)), t.name
