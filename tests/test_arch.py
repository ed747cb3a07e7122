"""Layer surgery on every supported family: forward, cached generate, save/reload all match a clean build."""

from __future__ import annotations

import pytest
import torch
import transformers

from conftest import FAMILIES, calib_ids, make_config, make_model
from optimum_slm import ArchAdapter, CompressionPlan, SUPPORTED_MODEL_TYPES, UnsupportedArchitectureError, apply_plan
from optimum_slm.plan import drop_op, merge_op


def _clean_build(family: str, base, kept: list[int]):
    """Ground truth: a model constructed from the pruned config, with the kept layers' weights copied in."""
    cfg = make_config(family, 6)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in kept]
    if getattr(cfg, "max_window_layers", None) is not None:
        cfg.max_window_layers = sum(1 for i in kept if i < cfg.max_window_layers)
    cfg.num_hidden_layers = len(kept)
    clean = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    state = base.state_dict()
    new_state = {}
    for name in clean.state_dict():
        if ".layers." in name:
            prefix, rest = name.split(".layers.", 1)
            idx, tail = rest.split(".", 1)
            new_state[name] = state[f"{prefix}.layers.{kept[int(idx)]}.{tail}"]
        else:
            new_state[name] = state[name]
    clean.load_state_dict(new_state)
    return clean


@pytest.mark.parametrize("family", FAMILIES)
def test_drop_roundtrip_matches_clean_build(family, tmp_path):
    base = make_model(family, 6)
    clean = _clean_build(family, make_model(family, 6), kept=[0, 1, 3, 5])
    plan = CompressionPlan.for_model(base, "drop", [drop_op([2, 4])])
    apply_plan(base, plan)
    assert base.config.num_hidden_layers == 4
    ids = calib_ids(2, 20)
    with torch.no_grad():
        ref = clean(ids).logits
        got = base(ids).logits
    assert torch.equal(ref, got)

    # greedy generate with KV cache equals the clean model's and the no-cache run
    prompt = ids[:1, :12]
    gen = base.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
    assert torch.equal(gen, clean.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True))
    assert torch.equal(gen, base.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False))

    base.save_pretrained(tmp_path)
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"]
    assert reloaded.config.num_hidden_layers == 4
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(ids).logits, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_keeps_slot_config_consistent(family):
    model = make_model(family, 6)
    types_before = ArchAdapter(model).layer_types()
    plan = CompressionPlan.for_model(model, "t", [merge_op(1, 3, "official")])
    apply_plan(model, plan)
    adapter = ArchAdapter(model)
    assert adapter.num_layers == 4
    assert [m.layer_idx for m in adapter.layers if hasattr(m, "layer_idx")] in ([], [0, 1, 2, 3])
    for new_idx, layer in enumerate(adapter.layers):
        assert layer.self_attn.layer_idx == new_idx
    if types_before is not None:
        assert adapter.layer_types() == [types_before[i] for i in (0, 1, 4, 5)]
    ids = calib_ids(2, 12)
    out = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert out.shape[1] == 16


def test_qwen_max_window_layers_remapped():
    model = make_model("qwen2", 6)  # max_window_layers=3
    plan = CompressionPlan.for_model(model, "drop", [drop_op([0, 4])])
    apply_plan(model, plan)
    assert model.config.max_window_layers == 2  # kept originals 1, 2 are below 3


def test_tensor_kinds_cover_every_parameter(family):
    model = make_model(family, 2)
    adapter = ArchAdapter(model)
    layer = adapter.layers[0]
    kinds = adapter.tensor_kinds(layer)
    assert set(kinds) == {n for n, _ in layer.named_parameters()}
    assert "projection" in kinds.values() and "norm" in kinds.values()


def test_unsupported_architecture_is_one_line():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedArchitectureError) as err:
        ArchAdapter(model)
    msg = str(err.value)
    assert "gpt2" in msg and "llama" in msg and "\n" not in msg
    assert set(SUPPORTED_MODEL_TYPES) >= {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"}
