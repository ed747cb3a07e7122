"""Compression plans (format v2): JSON round trip, stages, side-car tensors, validation errors, fingerprints,
atomic apply."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import calib_ids, make_model, plan_of
from optimum_slm import CompressionPlan, PlanError, apply_plan, get_pass, model_fingerprint
from optimum_slm.merge import MergeRule
from optimum_slm.merge.rules import merge_keep_top
from optimum_slm.plan import Stage, drop_op, fingerprint_files, merge_op
from weights import weights_digest


@pytest.fixture
def model():
    return make_model("llama", 6)


def test_save_load_roundtrip_and_byte_identical(model, tmp_path):
    plan = CompressionPlan.for_model(model, "test", [merge_op(3, 4), drop_op([1])], params={"a": 1}, trace={"x": [0.5]})
    plan.save(tmp_path / "a.json")
    plan.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    loaded = CompressionPlan.load(tmp_path / "a.json")
    assert loaded.to_dict() == plan.to_dict()
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["format"] == "optimum-slm.plan" and data["version"] == 2
    (stage,) = data["stages"]
    assert stage["method"] == "test" and stage["params"] == {"a": 1} and stage["trace"] == {"x": [0.5]}
    assert stage["ops"] == [{"op": "merge", "layers": [3, 4], "rule": "official"}, {"op": "drop", "layers": [1]}]
    assert data["num_layers_after"] == 4 and data["shape_after"] == {"num_layers": 4, "layers": [0, 2, 3, 5]}
    assert data["tensors"] == {} and not (tmp_path / "a.tensors").exists()  # small plans need no side-car
    assert data["base"]["num_layers"] == 6 and len(data["base"]["fingerprint"]) == 64
    assert data["base"]["fingerprint_scheme"] == "v3" and data["base"]["hidden_size"] == 64
    assert data["created_with"].startswith("optimum-slm ")


def _plan_dict(model, ops=None, **over):
    d = CompressionPlan.for_model(model, "t", [merge_op(2, 3)]).to_dict()
    d.pop("shape_after")
    if ops is not None:
        d["stages"][0]["ops"] = ops
    d.update(over)
    return d


@pytest.mark.parametrize(
    "ops, change, message",
    [
        (None, {"version": 3}, "unsupported plan version 3"),
        (None, {"format": "other"}, "not an optimum-slm plan"),
        ([{"op": "merge", "layers": [2, 9]}], {"num_layers_after": 0}, "out of range"),
        ([{"op": "merge", "layers": [3, 2]}], {"num_layers_after": 5}, "start < end"),
        ([{"op": "merge", "layers": [1, 3]}, {"op": "drop", "layers": [3]}], {"num_layers_after": 2}, "overlap"),
        ([{"op": "drop", "layers": [2]}, {"op": "merge", "layers": [1, 3]}], {"num_layers_after": 3}, "overlap"),
        ([{"op": "merge", "layers": "1-3"}], {}, "list of integers"),
        ([{"op": "explode", "layers": [1]}], {}, "unknown op 'explode'"),
        ([{"op": "merge", "layers": [1, 2], "rule": "nope"}], {}, "unknown merge rule 'nope'"),
        ([{"op": "merge", "layers": [1, 3], "rule": "linear", "args": {"coefficients": [1, 2, 1e999]}}], {},
         "finite"),
        ([{"op": "merge", "layers": [1, 2], "rule": "calibrated", "tensors": {"attn": "a", "mlp": "m"}}], {},
         "not in the plan's tensors"),
        (None, {"num_layers_after": 3}, "num_layers_after=3 but its ops leave 5"),
        (None, {"num_layers_after": "5"}, "must be an integer"),
        (None, {"shape_after": {"num_layers": 5, "layers": [0, 1, 2, 3, 4]}}, "shape_after does not match"),
        (None, {"stages": []}, "non-empty list"),
        (None, {"base": {"num_layers": 10**18, "model_type": "llama", "fingerprint": "x"}}, "num_layers must be"),
    ],
)
def test_invalid_plans_raise_one_line(model, tmp_path, ops, change, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_plan_dict(model, ops, **change)))
    with pytest.raises(PlanError) as err:
        CompressionPlan.load(path)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_not_json_and_missing_file(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        CompressionPlan.load(tmp_path / "x.json")
    with pytest.raises(PlanError, match="not found"):
        CompressionPlan.load(tmp_path / "missing.json")


def test_apply_refuses_other_base_unless_not_strict(model):
    plan = CompressionPlan.for_model(model, "t", [drop_op([2])])
    other = make_model("llama", 6, seed=1)
    with pytest.raises(PlanError, match="another base"):
        apply_plan(other, plan)
    apply_plan(other, plan, strict=False)
    assert other.config.num_hidden_layers == 5
    with pytest.raises(PlanError, match="6-layer base"):
        apply_plan(make_model("llama", 4), plan, strict=False)


def test_fingerprint_stable_across_dtype_and_sensitive_to_weights(model):
    fp = model_fingerprint(model)
    assert fp == model_fingerprint(make_model("llama", 6))
    assert fp == model_fingerprint(make_model("llama", 6).to(torch.bfloat16))
    assert fp != model_fingerprint(make_model("llama", 6, seed=3))
    assert fp != model_fingerprint(make_model("llama", 5))


def test_drop_pass_removes_exact_layers_and_plan_leaves_model_unchanged(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_of(get_pass("drop", layers=[1, 4]), model, None)
    assert plan.ops == [{"op": "drop", "layers": [1, 4]}]
    assert model.config.num_hidden_layers == 6
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    layers = list(model.model.layers)
    apply_plan(model, plan)
    assert list(model.model.layers) == [layers[i] for i in (0, 2, 3, 5)]


def test_apply_merge_uses_original_weights_for_each_window(model):
    ids = calib_ids(2, 8)
    base_layers = [{k: v.clone() for k, v in l.state_dict().items()} for l in model.model.layers]
    plan = CompressionPlan.for_model(model, "t", [merge_op(4, 5, "keep-top"), merge_op(1, 2, "mean")])
    apply_plan(model, plan)
    layers = model.model.layers
    assert len(layers) == 4
    assert torch.equal(layers[3].mlp.up_proj.weight, base_layers[5]["mlp.up_proj.weight"])
    mean = (base_layers[1]["mlp.up_proj.weight"] + base_layers[2]["mlp.up_proj.weight"]) / 2
    assert torch.allclose(layers[1].mlp.up_proj.weight, mean)
    assert model(ids).logits.shape == (2, 8, 320)


def test_summary_mentions_windows(model):
    plan = CompressionPlan.for_model(model, "slm", [merge_op(3, 4)])
    text = plan.summary()
    assert "merge 3-4" in text and "6 -> 5" in text


def test_nan_in_a_plan_file_is_refused(model, tmp_path):
    text = CompressionPlan.for_model(model, "t", [merge_op(2, 3)], trace={"sim": 0.5}).to_json()
    path = tmp_path / "nan.json"
    path.write_text(text.replace('"sim": 0.5', '"sim": NaN'))
    with pytest.raises(PlanError, match="non-finite"):
        CompressionPlan.load(path)


def test_infinite_trace_values_are_written_as_text(model, tmp_path):
    plan = CompressionPlan.for_model(model, "t", [drop_op([1])], trace={"ppl": float("inf")})
    plan.save(tmp_path / "p.json")
    assert CompressionPlan.load(tmp_path / "p.json").trace == {"ppl": "inf"}


# ------------------------------------------------------------------------------------------------ stages
def test_a_later_stage_replays_on_what_the_earlier_left(model):
    stages = [Stage("a", ops=[merge_op(3, 5, "keep-top")]), Stage("b", ops=[drop_op([1, 3])])]
    plan = CompressionPlan(base=CompressionPlan.for_model(model, "x", []).base, stages=stages)
    assert plan.method == "a + b" and plan.shape_after.layers == (0, 2) and plan.num_layers_after == 2
    assert plan.ops == [merge_op(3, 5, "keep-top"), drop_op([1, 3])]
    base_layers = list(model.model.layers)
    apply_plan(model, plan)
    assert list(model.model.layers) == [base_layers[0], base_layers[2]]  # merged slot 3 was dropped by stage b


def test_a_merged_layer_cannot_be_merged_again(model):
    base = CompressionPlan.for_model(model, "x", []).base
    with pytest.raises(PlanError, match="no longer a base layer"):
        CompressionPlan(base=base, stages=[Stage("a", ops=[merge_op(3, 4)]), Stage("b", ops=[merge_op(2, 3)])])


def test_multi_stage_pipeline_plans_on_the_compressed_model(model):
    ids = calib_ids(3, 12)
    plan = optimum_slm_compress(model, [{"method": "drop", "layers": [0]}, {"method": "sleb", "num_layers": 1}], ids)
    assert [s.method for s in plan.stages] == ["drop", "sleb"]
    # sleb ran on the 5-layer model; its choice is recorded in base numbering
    dropped_second = plan.stages[1].ops[0]["layers"]
    assert len(dropped_second) == 1 and dropped_second[0] != 0
    sequential = copy.deepcopy(model)
    apply_plan(sequential, CompressionPlan.for_model(model, "drop", [drop_op([0])]))
    alone = plan_of(get_pass("sleb", num_layers=1), sequential, ids)
    assert dropped_second == [alone.ops[0]["layers"][0] + 1]


def optimum_slm_compress(*args, **kwargs):
    from optimum_slm import compress

    return compress(*args, cache=False, **kwargs)


# ------------------------------------------------------------------------------------------------ side-car
@pytest.fixture
def calibrated_plan(model, tmp_path):
    plan = plan_of(get_pass("slm", num_layers=2, search="global", merge="calibrated"), model, calib_ids(3, 12))
    plan.save(tmp_path / "slm_plan.json")
    return tmp_path / "slm_plan.json"


def test_calibrated_plan_keeps_scales_in_the_side_car(calibrated_plan):
    data = json.loads(calibrated_plan.read_text())
    (name, entry), *_ = data["tensors"].items()
    assert entry["dtype"] == "float32" and entry["shape"] == [64] and len(entry["sha256"]) == 64
    assert "scales" not in calibrated_plan.read_text()
    plan = CompressionPlan.load(calibrated_plan)
    assert plan.ops[0]["rule"] == "calibrated" and "merge" in plan.summary() and "calibrated" in plan.summary()


def _rewrite_sidecar(path, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.__setitem__(next(iter(t)), torch.full_like(next(iter(t.values())), float("nan"))), "sha256"),
        (lambda t: t.__setitem__(next(iter(t)), next(iter(t.values()))[:10].clone()), "shape"),
        (lambda t: t.__setitem__(next(iter(t)), next(iter(t.values())) * 1.001), "sha256"),
        (lambda t: t.__delitem__(next(iter(t))), "lacks the tensor"),
        (lambda t: t.__setitem__("extra", torch.ones(3)), "does not list"),
    ],
)
def test_changed_side_car_is_refused(calibrated_plan, change, message):
    _rewrite_sidecar(calibrated_plan.with_suffix(".tensors"), change)
    with pytest.raises(PlanError, match=message) as err:
        CompressionPlan.load(calibrated_plan)
    assert "\n" not in str(err.value)


def test_missing_or_broken_side_car_is_refused(calibrated_plan):
    side = calibrated_plan.with_suffix(".tensors")
    side.write_bytes(b"garbage")
    with pytest.raises(PlanError, match="not a readable safetensors"):
        CompressionPlan.load(calibrated_plan)
    side.unlink()
    with pytest.raises(PlanError, match="side-car .* is missing"):
        CompressionPlan.load(calibrated_plan)


def test_nan_tensors_are_refused_even_with_a_matching_hash(calibrated_plan):
    """A side-car and manifest both rewritten around NaN values: the hash matches, the values are still refused."""
    from optimum_slm.plan.tensors import describe

    side = calibrated_plan.with_suffix(".tensors")
    data = json.loads(calibrated_plan.read_text())
    name = next(iter(data["tensors"]))
    bad = {}
    _rewrite_sidecar(side, lambda t: bad.setdefault("t", t.__setitem__(name, torch.full_like(t[name], float("nan")))
                                                    or t[name]))
    data["tensors"][name] = describe(bad["t"])
    calibrated_plan.write_text(json.dumps(data))
    with pytest.raises(PlanError, match="NaN"):
        CompressionPlan.load(calibrated_plan)


def test_wrong_width_tensors_are_refused_at_load(model, tmp_path):
    plan = plan_of(get_pass("slm", num_layers=1, search="global", merge="calibrated"), model, calib_ids(3, 12))
    name = next(iter(plan.tensors))
    plan.tensors[name] = plan.tensors[name][:32].clone()
    with pytest.raises(PlanError, match=r"shape \[32\], hidden size is 64"):
        plan.validate()


# ------------------------------------------------------------------------------------------------ atomic apply
def _failing_rule_plugin():
    from optimum_slm import hookimpl

    def explode(states, kinds):
        raise RuntimeError("boom")

    class Plugin:
        @hookimpl
        def register_merge_rules(self, register):
            register(MergeRule("explode-on-apply", merge_keep_top, "top", "test rule that fails at apply",
                               finish=lambda adapter, module, tensors: explode(None, None)))

    return Plugin()


def test_a_plan_failing_on_its_last_op_leaves_the_model_bit_identical(model):
    from optimum_slm.registry import register_plugin, unregister_plugin

    plugin = _failing_rule_plugin()
    register_plugin(plugin)
    try:
        plan = CompressionPlan.for_model(model, "t", [drop_op([0]), merge_op(1, 2, "paper"),
                                                      merge_op(4, 5, "explode-on-apply")])
        before = weights_digest(model)
        layers = list(model.model.layers)
        with pytest.raises(RuntimeError, match="boom"):
            apply_plan(model, plan)
        assert weights_digest(model) == before and list(model.model.layers) == layers
    finally:
        unregister_plugin(plugin)


def test_wrong_width_tensor_fails_before_any_change(model):
    """A v1 plan records no hidden size: its scale vectors are checked against the model, before any change."""
    import base64

    from optimum_slm.plan import fingerprint_v1

    short = base64.b64encode(torch.ones(48).numpy().astype("<f4").tobytes()).decode()
    data = {"format": "optimum-slm.plan", "version": 1, "method": "slm", "num_layers_after": 4,
            "base": {"model_type": "llama", "num_layers": 6, "fingerprint": fingerprint_v1(model)},
            "ops": [{"op": "drop", "layers": [0]},
                    {"op": "merge", "layers": [4, 5], "rule": "keep-top", "scales": {"attn": short, "mlp": short}}]}
    plan = CompressionPlan.from_dict(data)
    before = weights_digest(model)
    with pytest.raises(PlanError, match=r"shape \[48\], hidden size is 64"):
        apply_plan(model, plan)
    assert weights_digest(model) == before and model.config.num_hidden_layers == 6


# ------------------------------------------------------------------------------------------------ fingerprints
def test_a_checkpoint_differing_in_any_single_tensor_is_refused(model):
    plan = CompressionPlan.for_model(model, "t", [drop_op([2])])
    names = [name for name, _ in model.named_parameters()]
    assert len(names) > 50
    for name in names:
        other = make_model("llama", 6)
        with torch.no_grad():
            p = other.get_parameter(name)
            p.add_(torch.randn_like(p) * (p.std() if p.numel() > 1 else 1.0) + 0.1)
        with pytest.raises(PlanError, match="another base"):
            apply_plan(other, plan)


def test_fingerprint_from_files_equals_the_loaded_models(model, tmp_path):
    import transformers

    for tied in (False, True):
        path = tmp_path / f"ckpt-{tied}"
        m = make_model("llama", 6)
        m.config.tie_word_embeddings = tied
        m = transformers.AutoModelForCausalLM.from_config(m.config)
        m.save_pretrained(path)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(path)
        assert fingerprint_files(path) == model_fingerprint(loaded)
        bf16 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        assert model_fingerprint(bf16) == model_fingerprint(loaded)


def test_v1_plans_are_checked_with_the_v1_fingerprint(model):
    from optimum_slm.plan import fingerprint_v1

    data = {"format": "optimum-slm.plan", "version": 1, "method": "t", "ops": [drop_op([1])], "num_layers_after": 5,
            "base": {"model_type": "llama", "num_layers": 6, "fingerprint": fingerprint_v1(model)}}
    plan = CompressionPlan.from_dict(data)
    assert plan.base["fingerprint_scheme"] == "v1"
    apply_plan(copy.deepcopy(model), plan)
    with pytest.raises(PlanError, match="another base"):
        apply_plan(make_model("llama", 6, seed=4), plan)
