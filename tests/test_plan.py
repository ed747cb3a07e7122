"""Compression plans: JSON round trip, validation errors, fingerprints, determinism."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import calib_ids, make_model
from optimum_slm import CompressionPlan, PlanError, apply_plan, get_pass, model_fingerprint
from optimum_slm.plan import drop_op, merge_op


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
    assert data["format"] == "optimum-slm.plan" and data["version"] == 1
    assert data["ops"] == [{"op": "merge", "layers": [3, 4], "rule": "official"}, {"op": "drop", "layers": [1]}]
    assert data["num_layers_after"] == 4
    assert data["base"]["num_layers"] == 6 and len(data["base"]["fingerprint"]) == 64
    assert data["created_with"].startswith("optimum-slm ")


def _plan_dict(model, **over):
    d = CompressionPlan.for_model(model, "t", [merge_op(2, 3)]).to_dict()
    d.update(over)
    return d


@pytest.mark.parametrize(
    "change, message",
    [
        ({"version": 2}, "unsupported plan version 2"),
        ({"format": "other"}, "not an optimum-slm plan"),
        ({"ops": [{"op": "merge", "layers": [2, 9]}], "num_layers_after": 0}, "out of range"),
        ({"ops": [{"op": "merge", "layers": [3, 2]}], "num_layers_after": 5}, "start < end"),
        ({"ops": [{"op": "merge", "layers": [1, 3]}, {"op": "drop", "layers": [3]}], "num_layers_after": 2}, "overlap"),
        ({"ops": [{"op": "merge", "layers": "1-3"}]}, "list of integers"),
        ({"ops": [{"op": "explode", "layers": [1]}]}, "unknown op 'explode'"),
        ({"ops": [{"op": "merge", "layers": [1, 2], "rule": "nope"}]}, "unknown merge rule 'nope'"),
        ({"num_layers_after": 3}, "num_layers_after=3 but its ops leave 5"),
        ({"num_layers_after": "5"}, "must be an integer"),
    ],
)
def test_invalid_plans_raise_one_line(model, tmp_path, change, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_plan_dict(model, **change)))
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
    plan = get_pass("drop", layers=[1, 4]).plan(model, None)
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
