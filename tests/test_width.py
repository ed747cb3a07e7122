"""Width passes and width op kinds: every family with GQA, reloaded by vanilla transformers, equal to a model built
cleanly at the pruned config from independently sliced base weights; depth ∘ width in one plan."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from conftest import calib_ids, make_model
from optimum_slm import CompressionPlan, PlanError, apply_plan, compress

WIDTH_PASSES = ("flap", "taylor-width", "minitron-width")


def _rows(weight, idx):
    return weight[idx]


def clean_model(base, plan: CompressionPlan):
    """The pruned model built from scratch: a config at the plan's widths, base weights sliced by the plan's kept
    channels / groups / heads (an implementation independent of the adapter's)."""
    cfg = copy.deepcopy(base.config)
    w = plan.base["widths"]
    hd, kv, heads = w["head_dim"], w["num_key_value_heads"], w["num_attention_heads"]
    rep = heads // kv
    widths = plan.shape_after.to_dict().get("widths", {})
    first = next(iter(widths.values()), {})
    cfg.head_dim = hd
    cfg.intermediate_size = first.get("intermediate_size", w["intermediate_size"])
    cfg.num_attention_heads = first.get("num_attention_heads", heads)
    cfg.num_key_value_heads = first.get("num_key_value_heads", kv)
    if first.get("mlp_bias"):
        cfg.mlp_bias = True
    if first.get("attention_bias"):
        cfg.attention_bias = True
    clean = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    fused = base.config.model_type == "phi3"
    for op in plan.ops:
        p = f"model.layers.{op['layer']}."
        if op["op"] == "narrow_mlp":
            keep = plan.tensors[op["keep"]]
            size = w["intermediate_size"]
            if fused:
                state[p + "mlp.gate_up_proj.weight"] = state[p + "mlp.gate_up_proj.weight"][torch.cat([keep, keep + size])]
            else:
                for name in ("gate_proj", "up_proj"):
                    state[p + f"mlp.{name}.weight"] = state[p + f"mlp.{name}.weight"][keep]
                    if op.get("bias"):
                        state[p + f"mlp.{name}.bias"] = torch.zeros(len(keep))
            state[p + "mlp.down_proj.weight"] = state[p + "mlp.down_proj.weight"][:, keep]
            if op.get("bias"):
                state[p + "mlp.down_proj.bias"] = plan.tensors[op["bias"]]
        elif op["op"] == "narrow_attn":
            groups, kept_heads = op["groups"], op.get("heads")
            qh = [g * rep + j for n, g in enumerate(groups) for j in (kept_heads[n] if kept_heads else range(rep))]
            q = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in qh])
            k = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in groups])
            if fused:
                rows = torch.cat([q, heads * hd + k, heads * hd + kv * hd + k])
                state[p + "self_attn.qkv_proj.weight"] = state[p + "self_attn.qkv_proj.weight"][rows]
            else:
                for name, rows in (("q_proj", q), ("k_proj", k), ("v_proj", k)):
                    state[p + f"self_attn.{name}.weight"] = state[p + f"self_attn.{name}.weight"][rows]
                    if p + f"self_attn.{name}.bias" in state:
                        state[p + f"self_attn.{name}.bias"] = state[p + f"self_attn.{name}.bias"][rows]
                    elif op.get("bias"):
                        state[p + f"self_attn.{name}.bias"] = torch.zeros(len(rows))
            state[p + "self_attn.o_proj.weight"] = state[p + "self_attn.o_proj.weight"][:, q]
            if op.get("bias"):
                state[p + "self_attn.o_proj.bias"] = plan.tensors[op["bias"]]
    missing, unexpected = clean.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m or "lm_head" in m for m in missing), (missing, unexpected)
    clean.tie_weights()
    return clean


@pytest.mark.parametrize("method", WIDTH_PASSES)
def test_width_pass_output_reloads_and_equals_a_clean_build(family, method, tmp_path):
    base = make_model(family, 3)
    assert base.config.num_key_value_heads < base.config.num_attention_heads
    ids = calib_ids(3, 12)
    plan = compress(base, method, ids, ratio=0.5, cache=False)
    assert plan.trace["removed_fraction"] > 0.3
    compressed = apply_plan(copy.deepcopy(base), plan)
    compressed.save_pretrained(tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    clean = clean_model(base, plan)
    probe = calib_ids(2, 10, seed=3)
    with torch.no_grad():
        expected = clean(probe).logits
        assert torch.allclose(reloaded(probe).logits, expected, atol=1e-5)
        assert torch.allclose(compressed(probe).logits, expected, atol=1e-5)
    n_params = sum(p.numel() for p in reloaded.parameters())
    assert n_params < sum(p.numel() for p in base.parameters())


def test_flap_bias_compensation_on_llama_and_refused_elsewhere():
    ids = calib_ids(3, 12)
    plan = compress(make_model("llama", 3), "flap", ids, ratio=0.5, cache=False)
    assert plan.trace["bias_compensation"] and any(op.get("bias") for op in plan.ops)
    assert not compress(make_model("qwen2", 3), "flap", ids, ratio=0.5, cache=False).trace["bias_compensation"]
    with pytest.raises(Exception, match="bias compensation needs mlp_bias/attention_bias"):
        compress(make_model("qwen2", 3), "flap", ids, ratio=0.5, bias_compensation=True, cache=False)


def test_compensation_recovers_the_mean_output():
    """With FLAP's bias, the narrowed MLP's output equals the full one when the removed channels sit at their mean."""
    base = make_model("llama", 3)
    ids = calib_ids(3, 12)
    plan = compress(base, "flap", ids, ratio=0.5, cache=False, prune_attention=False)
    op = next(o for o in plan.ops if o["op"] == "narrow_mlp" and o["layer"] == 0)
    down = base.model.layers[0].mlp.down_proj.weight.detach().double()
    keep = plan.tensors[op["keep"]]
    removed = torch.ones(down.shape[1], dtype=torch.bool)
    removed[keep] = False
    assert removed.any() and plan.tensors[op["bias"]].shape == (64,)


def test_depth_then_width_in_one_plan(tmp_path):
    base = make_model("llama", 6)
    ids = calib_ids(3, 12)
    plan = compress(base, [{"method": "slm-plus", "num_layers": 2}, {"method": "flap", "ratio": 0.3}], ids,
                    cache=False)
    assert [s.method for s in plan.stages] == ["slm-plus", "flap"]
    merged = [w[0] for w in plan.windows]
    narrowed = {op["layer"] for op in plan.stages[1].ops}
    assert set(plan.shape_after.layers) == narrowed and set(merged) <= narrowed  # a merged layer is narrowed too
    plan.save(tmp_path / "p.json")
    loaded = CompressionPlan.load(tmp_path / "p.json")
    compressed = apply_plan(copy.deepcopy(base), loaded)
    compressed.save_pretrained(tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.num_hidden_layers == 4 and reloaded.config.intermediate_size < 128
    probe = calib_ids(2, 10, seed=3)
    with torch.no_grad():
        assert torch.allclose(reloaded(probe).logits, compressed(probe).logits, atol=1e-5)


def test_double_narrowing_and_partial_bias_are_refused():
    base = make_model("llama", 3)
    plan = compress(base, "taylor-width", calib_ids(3, 12), ratio=0.5, cache=False)
    mlp_ops = [o for o in plan.ops if o["op"] == "narrow_mlp"]
    twice = copy.deepcopy(plan.stages)
    twice[0].ops = twice[0].ops + [mlp_ops[0]]
    with pytest.raises(PlanError, match="already narrowed"):
        CompressionPlan(base=plan.base, stages=twice, tensors=plan.tensors)
    flap = compress(base, "flap", calib_ids(3, 12), ratio=0.5, cache=False)
    partial = copy.deepcopy(flap.stages)
    first = next(o for o in partial[0].ops if o["op"] == "narrow_mlp")
    first.pop("bias")
    tensors = {k: v for k, v in flap.tensors.items() if k != f"narrow_mlp.{first['layer']}.bias"}
    with pytest.raises(PlanError, match="bias compensation must narrow every layer"):
        CompressionPlan(base=flap.base, stages=partial, tensors=tensors)


# ------------------------------------------------------------------------------------------------ recipes
RECIPE = "stages:\n  - method: slm-plus\n    num_layers: 2\n  - method: flap\n    ratio: 0.3\n"


def test_recipe_through_the_cli_and_lm_eval(tiny_checkpoint, corpus, tmp_path):
    from click.testing import CliRunner

    from optimum_slm.cli import cli

    (tmp_path / "r.yaml").write_text(RECIPE)
    out = tmp_path / "o"
    result = CliRunner().invoke(cli, ["-q", "compress", "--model", tiny_checkpoint, "--recipe", str(tmp_path / "r.yaml"),
                                      "--calib-data", corpus, "--calib-samples", "4", "--calib-seq-len", "16",
                                      "--output", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "stage 1: method: slm-plus" in result.stdout and "stage 2: method: flap" in result.stdout
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_layers == 4 and reloaded.config.intermediate_size < 128
    card = (out / "README.md").read_text()
    assert "| stage 1 | `slm-plus`" in card and "| stage 2 | `flap`" in card
    shown = CliRunner().invoke(cli, ["inspect", str(out / "slm_plan.json")])
    assert "stage 2: method: flap" in shown.stdout and "narrow_mlp" in shown.stdout

    pytest.importorskip("lm_eval")
    from lm_eval_slm.model import SLMLM

    plan_lm = SLMLM(base=tiny_checkpoint, plan=str(out / "slm_plan.json"), device="cpu", batch_size=1)
    recipe_lm = SLMLM(base=tiny_checkpoint, recipe=str(tmp_path / "r.yaml"), calib=corpus, calib_samples=4,
                      calib_seq_len=16, device="cpu", batch_size=1)
    assert recipe_lm.slm_plan_reused  # the CLI run cached it
    probe = calib_ids(2, 10, seed=3)
    with torch.no_grad():
        expected = reloaded(probe).logits
        assert torch.allclose(plan_lm.model(probe).logits, expected, atol=1e-5)
        assert torch.allclose(recipe_lm.model(probe).logits, expected, atol=1e-5)


@pytest.mark.parametrize("text, message", [
    ("stages: []\n", "'stages' must be a non-empty list"),
    ("stages:\n  - method: nope\n", "stage 1 (nope): unknown pass 'nope'"),
    ("stages:\n  - method: slm-plus\n    ratio: 0.2\n  - method: flap\n    ratio: 1.5\n",
     "stage 2 (flap): ratio must be in (0, 1)"),
    ("stages:\n  - method: flap\n    ratioo: 0.2\n", "stage 1 (flap): pass 'flap' has no parameter 'ratioo'"),
    ("steps: []\n", "unknown key 'steps'"),
    ("stages: [\n", "is not valid YAML/JSON"),
])
def test_bad_recipes_fail_before_the_model_loads(tmp_path, text, message):
    from click.testing import CliRunner

    from optimum_slm.cli import cli

    (tmp_path / "r.yaml").write_text(text)
    result = CliRunner().invoke(cli, ["-q", "compress", "--model", str(tmp_path / "no-model"), "--recipe",
                                      str(tmp_path / "r.yaml"), "--output", str(tmp_path / "o")])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output


def test_recipe_and_method_together_are_refused(tmp_path, tiny_checkpoint):
    from click.testing import CliRunner

    from optimum_slm.cli import cli

    (tmp_path / "r.yaml").write_text(RECIPE)
    result = CliRunner().invoke(cli, ["-q", "compress", "--model", tiny_checkpoint, "--recipe", str(tmp_path / "r.yaml"),
                                      "--ratio", "0.2", "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and "drop --method" in result.stderr


# ------------------------------------------------------------------------------------------------ per-layer widths
@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_adaptive_widths_rebuild_and_reload_through_load_model(family, tmp_path, tiny_tokenizer):
    from optimum_slm import load_model

    base = make_model(family, 4)
    ids = calib_ids(3, 12)
    plan = compress(base, "flap", ids, ratio=0.4, structure="AL-AM", cache=False)
    widths = plan.trace["layer_widths"]
    assert len({tuple(sorted(w.items())) for w in widths}) > 1  # the layers really differ
    compressed = apply_plan(copy.deepcopy(base), plan)
    compressed.save_pretrained(tmp_path / "out")
    tiny_tokenizer.save_pretrained(tmp_path / "out")
    reloaded, _ = load_model(str(tmp_path / "out"))
    probe = calib_ids(2, 10, seed=3)
    with torch.no_grad():
        assert torch.allclose(reloaded(probe).logits, compressed(probe).logits, atol=1e-5)
    with pytest.raises(Exception):  # vanilla transformers cannot hold per-layer widths in a config
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_taylor_layer_range_prunes_only_that_range():
    base = make_model("llama", 5)
    plan = compress(base, "taylor-width", calib_ids(3, 12), ratio=0.5, layer_start=1, layer_end=4, cache=False)
    assert {op["layer"] for op in plan.ops} == {1, 2, 3}
    widths = plan.shape_after.to_dict()["widths"]
    assert set(widths) == {"1", "2", "3"}
    model = apply_plan(copy.deepcopy(base), plan)
    assert model.config.slm_layer_widths[0] == {} and model.config.slm_layer_widths[1]["intermediate_size"] < 128
    with pytest.raises(Exception, match="layer range"):
        compress(base, "taylor-width", calib_ids(3, 12), ratio=0.5, layer_start=3, layer_end=2, cache=False)
