"""Sub-layer removal: ``drop_attn`` / ``drop_mlp`` ops (a per-layer width of zero), on every family — the exact
function of a layer without one branch, generation through the KV cache, save → ``load_model``, ``slm apply``
(in memory and streamed), the lm-eval door, and one-line refusals."""

from __future__ import annotations

import copy
import glob
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import calib_ids, make_model, run
from optimum_slm import CompressionPlan, PlanError, apply_plan, load_model
from optimum_slm.arch import ArchAdapter, param_count
from optimum_slm.plan import drop_op
from optimum_slm.plan.sublayer_ops import drop_branch_op

SUBLAYER = {"attn": "self_attn", "mlp": "mlp"}
#: the plan every family test applies: layer 3 without attention, layer 5 (the last) without MLP
OPS = [drop_branch_op("attn", 3), drop_branch_op("mlp", 5)]


def zeroed_reference(base, removed: dict[int, list[str]], maps: dict[int, tuple[str, torch.Tensor]] | None = None):
    """The dense model with the removed branches' outputs replaced by zeros through forward hooks (an implementation
    independent of the stand-in modules); ``maps``: layer -> (branch, T), that branch's projection output times T."""
    ref = copy.deepcopy(base)

    def zero(_module, _inputs, out):
        return (torch.zeros_like(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else torch.zeros_like(out)

    for layer, branches in removed.items():
        for branch in branches:
            getattr(ref.model.layers[layer], SUBLAYER[branch]).register_forward_hook(zero)
    for layer, (branch, t) in (maps or {}).items():
        proj = ref.model.layers[layer].mlp.down_proj if branch == "mlp" else ref.model.layers[layer].self_attn.o_proj
        proj.register_forward_hook(lambda _m, _i, out, t=t: out @ t)
    return ref


def branch_params(layer, branch: str) -> int:
    return sum(p.numel() for p in getattr(layer, SUBLAYER[branch]).parameters())


def tiny_tokenizer_to(path, tokenizer) -> None:
    tokenizer.save_pretrained(path)


# ------------------------------------------------------------------------------------------------ the function
def test_a_layer_without_attention_or_mlp_computes_the_other_branch_alone(family, tmp_path, tiny_tokenizer):
    base = make_model(family, 6)
    plan = CompressionPlan.for_model(base, "t", OPS)
    model = apply_plan(copy.deepcopy(base), plan)
    probe = calib_ids(2, 12, seed=3)
    ref = zeroed_reference(base, {3: ["attn"], 5: ["mlp"]})
    with torch.no_grad():
        got = model(probe).logits
        # Gemma-2/3: the removed branch's post-branch norm sees zeros and gives zeros (RMSNorm(0) = 0)
        assert torch.allclose(got, ref(probe).logits, atol=1e-6, rtol=0)
        assert not torch.allclose(got, base(probe).logits, atol=1e-3)  # the removal changed something
    # nothing of a removed branch is left: exactly its parameters are gone
    layers = base.model.layers
    assert param_count(base) - param_count(model) == branch_params(layers[3], "attn") + branch_params(layers[5], "mlp")
    assert model.config.num_hidden_layers == 6
    assert model.config.slm_layer_widths[3] == {"num_attention_heads": 0, "num_key_value_heads": 0}
    assert model.config.slm_layer_widths[5] == {"intermediate_size": 0}
    assert plan.describe_ops() == ["drop_attn 3", "drop_mlp 5"]
    assert plan.footprint()["attn_dropped"] == [3] and plan.footprint()["mlp_dropped"] == [5]

    # save -> load_model: the same model, with the removed branches' weights absent from the file
    model.save_pretrained(tmp_path / "out")
    tiny_tokenizer.save_pretrained(tmp_path / "out")
    saved = set()
    for shard in glob.glob(str(tmp_path / "out" / "*.safetensors")):
        saved |= set(load_file(shard))
    assert not any(k.startswith(("model.layers.3.self_attn.", "model.layers.5.mlp.")) for k in saved)
    assert any(k.startswith("model.layers.3.mlp.") for k in saved)
    reloaded, _ = load_model(str(tmp_path / "out"))
    reloaded.config._attn_implementation = "eager"  # as the tiny test models run: then bit-identical
    with torch.no_grad():
        assert torch.equal(reloaded(probe).logits, got)
    assert param_count(reloaded) == param_count(model)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "phi3"])
def test_generation_through_the_kv_cache_matches_the_full_forward(family):
    """Layer 0 without attention: transformers reads the cache's length from layer 0 (positions) and the first
    full-attention / sliding layer (masks); the stand-in keeps those lengths, so a cached step equals a full pass."""
    from transformers import DynamicCache

    base = make_model(family, 6)
    model = apply_plan(copy.deepcopy(base), CompressionPlan.for_model(base, "t", [drop_branch_op("attn", 0),
                                                                                   drop_branch_op("mlp", 2)]))
    ids = calib_ids(1, 12, seed=3)
    with torch.no_grad():
        full = model(ids).logits[:, -3:]
        cache = DynamicCache(config=model.config)
        model(ids[:, :-3], cache=cache, use_cache=True)
        steps = torch.cat([model(ids[:, k:k + 1], cache=cache, use_cache=True).logits for k in range(9, 12)], 1)
    assert torch.allclose(steps, full, atol=1e-5)
    assert model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0).shape == (1, 16)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_a_bridge_map_folds_into_the_kept_branch(family):
    """``drop_attn`` with a map: the MLP's output times T (Gemma: T before the post-branch norm, with its gain)."""
    base = make_model(family, 6)
    torch.manual_seed(1)
    hidden = base.config.hidden_size
    t = torch.eye(hidden) + 0.05 * torch.randn(hidden, hidden)
    tensors = {"m": t}
    refs = {"map": "m"}
    gemma = family == "gemma2"
    if gemma:
        tensors["g"] = 1.0 + base.model.layers[2].post_feedforward_layernorm.weight.detach().clone()
        refs["gain"] = "g"
    plan = CompressionPlan.for_model(base, "t", [drop_branch_op("attn", 2, refs)], tensors=tensors)
    model = apply_plan(copy.deepcopy(base), plan)
    ref = zeroed_reference(base, {2: ["attn"]}, {2: ("mlp", t)})
    probe = calib_ids(2, 12, seed=3)
    with torch.no_grad():
        assert torch.allclose(model(probe).logits, ref(probe).logits, atol=1e-5)
    assert plan.describe_ops() == ["drop_attn 2 (map on the MLP output)"]


def test_other_ops_compose_with_removed_branches():
    base = make_model("llama", 6)
    ops = [drop_branch_op("mlp", 1), {"op": "scale_branches", "layers": [1, 2], "factor": 0.5}, drop_op([4]),
           {"op": "merge", "layers": [2, 3], "rule": "keep-top"}]
    with pytest.raises(PlanError, match="no longer a base layer"):  # scaled and then merged: refused as before
        CompressionPlan.for_model(base, "t", ops).validate()
    plan = CompressionPlan.for_model(base, "t", ops[:3])
    model = apply_plan(copy.deepcopy(base), plan)
    assert model.config.num_hidden_layers == 5 and model.config.slm_layer_widths[1] == {"intermediate_size": 0}
    # a narrowed attention may still be removed whole; its widths then say "removed"
    keep = torch.arange(64)
    narrowed = CompressionPlan.for_model(base, "t", [{"op": "narrow_mlp", "layer": 2, "keep": "k"},
                                                     drop_branch_op("mlp", 2)], tensors={"k": keep})
    assert narrowed.shape_after.to_dict()["widths"] == {"2": {"intermediate_size": 0}}


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("ops, message", [
    ([{"op": "drop_attn", "layer": 6}], "layer index 6 out of range 0..5"),
    ([{"op": "drop_mlp", "layer": "3"}], "'layer' must be an integer"),
    ([drop_branch_op("attn", 3), drop_branch_op("attn", 3)], "layer 3's attention was already removed"),
    ([drop_branch_op("mlp", 3), drop_branch_op("attn", 3)], "layer 3 would keep neither attention nor MLP; remove "
                                                            "the whole layer with a drop op"),
    ([drop_op([3]), drop_branch_op("mlp", 3)], "base layer 3 was removed by an earlier op"),
    ([drop_branch_op("attn", 3), {"op": "narrow_attn", "layer": 3, "groups": [0]}],
     "layer 3's attention was removed by an earlier op; there is nothing to narrow"),
    ([drop_branch_op("attn", 2), {"op": "merge", "layers": [1, 2]}], "no longer a base layer"),
    ([{"op": "drop_mlp", "layer": 1, "extra": 1}], "unknown keys ['extra']"),
    ([drop_branch_op("attn", 1, {"attn_map": "m"})], "'tensors' must be {map} for a llama model"),
    ([drop_branch_op("attn", 1, {"map": "nope"})], "tensor 'nope' (map) is not in the plan's tensors"),
    ([drop_branch_op("mlp", 1, {"attn_map": "v"})], "must be a 2-D float32 matrix"),
])
def test_bad_sublayer_ops_are_refused_in_one_line(ops, message):
    base = make_model("llama", 6)
    tensors = {"v": torch.zeros(64), "m": torch.eye(64)}
    tensors = {k: v for k, v in tensors.items() if any(k in json.dumps(op) for op in ops)}
    with pytest.raises(PlanError) as err:
        apply_plan(copy.deepcopy(base), CompressionPlan.for_model(base, "t", ops, tensors=tensors))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_gemma_bridge_needs_its_norm_gain():
    base = make_model("gemma2", 6)
    with pytest.raises(PlanError, match=r"'tensors' must be \{map, gain\} for a gemma2 model"):
        CompressionPlan.for_model(base, "t", [drop_branch_op("attn", 1, {"map": "m"})], tensors={"m": torch.eye(64)})


# ------------------------------------------------------------------------------------------------ front doors
@pytest.fixture
def sublayer_plan(tiny_checkpoint, tmp_path):
    base, _ = load_model(tiny_checkpoint)
    plan = CompressionPlan.for_model(base, "t", OPS + [drop_op([1])])
    plan.save(tmp_path / "plan" / "slm_plan.json")
    return plan, str(tmp_path / "plan" / "slm_plan.json")


def _weights(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in glob.glob(os.path.join(folder, "*.safetensors")):
        out.update(load_file(f))
    return out


def test_slm_apply_in_memory_and_streamed_and_the_lm_eval_door(tiny_checkpoint, sublayer_plan, tmp_path):
    plan, plan_file = sublayer_plan
    base, _ = load_model(tiny_checkpoint)
    expected = apply_plan(base, plan)
    probe = calib_ids(2, 10, seed=3)
    for name, extra in (("mem", []), ("streamed", ["--max-memory", "1KB"])):
        result = run("apply", "--model", tiny_checkpoint, "--plan", plan_file, *extra, "--output", str(tmp_path / name))
        assert result.exit_code == 0, result.output
        reloaded, _ = load_model(str(tmp_path / name))
        with torch.no_grad():
            assert torch.allclose(reloaded(probe).logits, expected(probe).logits, atol=1e-5)
    mem, streamed = _weights(tmp_path / "mem"), _weights(tmp_path / "streamed")
    assert mem.keys() == streamed.keys() and all(torch.equal(mem[k], streamed[k]) for k in mem)
    assert ArchAdapter(reloaded).has_sublayer(reloaded.model.layers[2], "attn") is False  # base layer 3 at position 2

    pytest.importorskip("lm_eval")
    from lm_eval_slm.model import SLMLM

    lm = SLMLM(base=tiny_checkpoint, plan=plan_file, device="cpu", batch_size=1)
    with torch.no_grad():
        assert torch.allclose(lm.model(probe).logits, expected(probe).logits, atol=1e-5)


def test_gguf_export_refuses_a_removed_branch_in_one_line(tiny_checkpoint, sublayer_plan, tmp_path):
    pytest.importorskip("gguf")
    plan, plan_file = sublayer_plan
    assert run("apply", "--model", tiny_checkpoint, "--plan", plan_file, "--output", str(tmp_path / "o")).exit_code == 0
    result = run("export", "--model", str(tmp_path / "o"), "--output", str(tmp_path / "m.gguf"))
    assert result.exit_code != 0
    line = result.stderr.strip()
    assert "without attention" in line and "\n" not in line


# ------------------------------------------------------------------------------------------------ the search
def _token_cosine(model, base, ids) -> float:
    from optimum_slm.metrics import mean_token_cosine

    with torch.no_grad():
        return mean_token_cosine([model.model(ids).last_hidden_state], [base.model(ids).last_hidden_state])


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_sublayer_search_spends_the_parameter_budget_and_its_maps_fit(family):
    from optimum_slm import compress

    base = make_model(family, 8)
    fit = calib_ids(16, 24, seed=1)
    plan = compress(base, "slm-plus", calib_ids(4, 16), fit=fit, ratio=0.3, granularity="sublayer", cache=False)
    assert "unit_rank" not in compress(base, "slm-plus", calib_ids(4, 16), fit=fit, num_layers=1,
                                       cache=False).params  # a window plan records no sub-layer parameter
    trace = plan.trace
    layers = base.model.layers
    attn, mlp = branch_params(layers[0], "attn"), branch_params(layers[0], "mlp")
    per_layer = sum(p.numel() for p in layers[0].parameters())
    # round(0.3 x 8) = 2 layers' parameters; units fit in it, and no unit was left that would still fit
    assert trace["param_budget"] == 2 * per_layer
    assert trace["param_budget"] - min(attn, mlp) < trace["params_removed"] <= trace["param_budget"]
    assert trace["params_removed"] == attn * len(trace["attn_removed"]) + mlp * len(trace["mlp_removed"])
    assert len(trace["rounds"]) == len(trace["attn_removed"]) + len(trace["mlp_removed"])
    assert plan.params["granularity"] == "sublayer" and "merge" not in plan.params and "search" not in plan.params
    assert plan.params["unit_rank"] == "per-param"
    model = apply_plan(copy.deepcopy(base), plan)
    dropped_norms = sum(p.numel() for i in trace["layers_dropped"] for n, p in layers[i].named_parameters()
                        if "norm" in n)
    assert param_count(base) - param_count(model) == trace["params_removed"] + dropped_norms
    # every single removal carries a map fitted on the fit set: it brings the fit set closer to the base
    assert all(op.get("tensors") for op in plan.ops if op["op"] != "drop")
    bare = CompressionPlan.for_model(base, "t", [{k: v for k, v in op.items() if k != "tensors"} for op in plan.ops])
    assert _token_cosine(model, base, fit) > _token_cosine(apply_plan(copy.deepcopy(base), bare), base, fit)
    assert "sub-layers:" in plan.summary()


def test_a_layer_that_loses_both_units_is_dropped_whole():
    from optimum_slm import compress

    base = make_model("llama", 6)
    plan = compress(base, "slm-plus", calib_ids(4, 16), fit=calib_ids(8, 20, seed=1), num_layers=1,
                    protect=[0, 1, 2, 3, 4], granularity="sublayer", cache=False)
    assert plan.ops == [{"op": "drop", "layers": [5]}] and plan.trace["layers_dropped"] == [5]
    assert plan.num_layers_after == 5


def test_the_default_granularity_leaves_slm_plus_plans_as_they_were():
    from optimum_slm import get_pass

    assert "granularity" not in get_pass("slm-plus", ratio=0.2).public_params()
    assert get_pass("slm-plus", ratio=0.2, granularity="layer").public_params() == \
        get_pass("slm-plus", ratio=0.2).public_params()


@pytest.mark.parametrize("params, message", [
    ({"merge": "calibrated"}, "merge applies to slm-plus granularity=layer"),
    ({"search": "global"}, "search applies to slm-plus granularity=layer"),
    ({"max_window": 3}, "max_window applies to slm-plus granularity=layer"),
    ({"granularity": "head"}, "parameter 'granularity' must be one of layer, sublayer"),
    ({"granularity": "layer", "unit_rank": "change"}, "unit_rank applies to slm-plus granularity=sublayer"),
    ({"unit_rank": "size"}, "parameter 'unit_rank' must be one of change, per-param"),
])
def test_bad_sublayer_parameters_are_refused_in_one_line(params, message):
    from optimum_slm import PassError, get_pass

    with pytest.raises(PassError) as err:
        get_pass("slm-plus", ratio=0.2, **{"granularity": "sublayer", **params})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_slm_compress_granularity_sublayer_writes_a_checkpoint_load_model_reads(tiny_checkpoint, corpus, tmp_path):
    out = tmp_path / "out"
    result = run("compress", "--model", tiny_checkpoint, "--method", "slm-plus", "--ratio", "0.34", "--param",
                 "granularity=sublayer", "--calib-data", corpus, "--calib-samples", "4", "--calib-seq-len", "16",
                 "--fit-samples", "8", "--fit-seq-len", "16", "--output", str(out))
    assert result.exit_code == 0, result.output
    assert "sub-layers:" in result.stdout and "note: some layers are without their attention or MLP" in result.stdout
    plan = CompressionPlan.load(out / "slm_plan.json")
    reloaded, _ = load_model(str(out))
    base, _ = load_model(tiny_checkpoint)
    probe = calib_ids(2, 10, seed=3)
    with torch.no_grad():
        assert torch.allclose(reloaded(probe).logits, apply_plan(base, plan)(probe).logits, atol=1e-5)


def test_later_stages_on_removed_sublayers_run_or_are_refused_in_one_line():
    from optimum_slm import SLMError, compress, get_pass

    base = make_model("llama", 8)
    ids, fit = calib_ids(4, 16), calib_ids(16, 24, seed=1)
    first = get_pass("slm-plus", ratio=0.3, granularity="sublayer")
    for second in (get_pass("shortgpt", num_layers=1), get_pass("slm-plus", ratio=0.25, granularity="sublayer")):
        plan = compress(base, [first, second], ids, fit=fit, cache=False)
        model = apply_plan(copy.deepcopy(base), plan)  # a second sub-layer stage never touches a removed unit again
        with torch.no_grad():
            assert torch.isfinite(model(calib_ids(2, 10, seed=3)).logits).all()
    for second in (get_pass("flap", ratio=0.2), get_pass("slm-plus", num_layers=2)):
        with pytest.raises(SLMError) as err:
            compress(base, [first, second], ids, fit=fit, cache=False)
        assert "cannot run on layers without their attention or MLP" in str(err.value)
        assert "\n" not in str(err.value)
