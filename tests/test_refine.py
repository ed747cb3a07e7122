"""Refined merges (slm-plus refine_epochs=N): block reconstruction of each merged layer, the set_weights op."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import calib_ids, make_model
from transformers import AutoModelForCausalLM

from optimum_slm import apply_plan, compress, get_pass
from optimum_slm.errors import PassError, PlanError
from optimum_slm.merge.refine import relative_error
from optimum_slm.plan import CompressionPlan
from optimum_slm.plan.refine_ops import set_weights_op


def _window_relative_error(model, compressed, ids, top: int, kept: int) -> float:
    """The refinement's measure between the base's state after base layer ``top`` and the compressed model's after
    its layer ``kept``."""
    with torch.no_grad():
        base = model.model(ids, output_hidden_states=True).hidden_states[top + 1]
        ours = compressed.model(ids, output_hidden_states=True).hidden_states[kept + 1]
    return float(relative_error(ours, base))


#: a fit set large enough for a layer of a tiny model to learn from (on a few hundred tokens it over-fits, and the
#: held-out selection keeps the fitted merge)
FIT = dict(num_layers=4, cache=False, max_window=5)


def _plans(family: str = "llama", epochs: int = 8):
    model = make_model(family, 8, seed=4)
    fit = calib_ids(256, 32, seed=6)
    fitted = compress(model, "slm-plus", calib_ids(4, 16), fit=fit, **FIT)
    refined = compress(model, "slm-plus", calib_ids(4, 16), fit=fit, refine_epochs=epochs, refine_lr=1e-3, **FIT)
    return model, fit, fitted, refined


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_refinement_lowers_the_window_error_the_fitted_merge_leaves(family):
    model, fit, fitted, refined = _plans(family)
    merges = [op for op in refined.stages[0].ops if op["op"] == "merge"]
    assert merges == [op for op in fitted.stages[0].ops]  # the same windows and maps, then the refined weights
    sets = [op for op in refined.stages[0].ops if op["op"] == "set_weights"]
    assert [op["layer"] for op in sets] == [op["layers"][0] for op in merges]
    layer = make_model(family, 8).model.layers[0]
    assert set(sets[0]["tensors"]) == {n for n, _ in layer.named_parameters()}  # every parameter of the layer
    low, high = sorted(op["layers"] for op in merges)[0]  # the lowest window sees the base's own input
    a, b = apply_plan(copy.deepcopy(model), refined), apply_plan(copy.deepcopy(model), fitted)
    # held-out sequences: refinement keeps the epoch with the lowest held-out error, so it generalises
    unseen = calib_ids(32, 32, seed=11)
    assert _window_relative_error(model, a, unseen, high, low) < 0.95 * _window_relative_error(model, b, unseen,
                                                                                                high, low)
    record = refined.stages[0].trace["refine"][f"{low}-{high}"]
    assert record["after"] < record["before"] and record["best_epoch"] >= 1
    assert refined.stages[0].params["refine_epochs"] == 8 and "refine_epochs" not in fitted.stages[0].params
    # the summary a user reads after `slm compress` reports what refinement bought
    assert (f"refine {low}-{high}: held-out relative error {record['before']:.4g} -> {record['after']:.4g} "
            f"(best epoch {record['best_epoch']} of 8") in refined.summary()
    assert "refine" not in fitted.summary()


def test_refinement_keeps_its_states_on_disk_under_a_budget(tmp_path, monkeypatch):
    """A lazy model's budget also bounds refinement: the window's input and output states (2 x fit tokens x hidden)
    go to temp files, are read back row by row, give the in-memory plan's weights, and are removed afterwards."""
    from optimum_slm.engine import load_lazy_model, spill
    from optimum_slm.engine.budget import MemoryBudget

    make_model("llama", 8, seed=4).save_pretrained(tmp_path / "m", max_shard_size="100KB")
    written: list[str] = []
    original = spill.ActivationFolder.write

    def spy(folder, tensor):
        stored = original(folder, tensor)
        written.append(stored.path)
        return stored

    monkeypatch.setattr(spill.ActivationFolder, "write", spy)
    search, fit = calib_ids(4, 16), calib_ids(128, 32, seed=6)
    # the in-memory reference is the same checkpoint loaded whole, with the same (sdpa) attention as the lazy model:
    # the test models are built with eager attention, which differs in the last bits
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    a = compress(full, "slm-plus", search, fit=fit, refine_epochs=4, refine_lr=1e-3, **FIT)
    assert not written  # in memory: nothing needs the disk

    def streamed(**extra):
        written.clear()
        plan = compress(load_lazy_model(str(tmp_path / "m")), "slm-plus", search, fit=fit, budget=MemoryBudget(1),
                        **FIT, **extra)
        return plan, list(written)

    _, without = streamed()
    b, with_refine = streamed(refine_epochs=4, refine_lr=1e-3)
    assert len(with_refine) > len(without)  # refinement wrote its window states too
    # one window refined (a set_weights op), one kept as fitted: both paths stream
    assert {r["best_epoch"] > 0 for r in a.stages[0].trace["refine"].values()} == {True, False}
    assert a.ops == b.ops and a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert not [p for p in with_refine if os.path.exists(p)]  # every temp file is gone with its folder


def test_refinement_replays_the_base_states_the_fit_streamed():
    """The map fit already ran the base over the fit set and kept each window's input and output: refinement trains
    on those (no second base forward over the fit set), so the base's first layer runs as often with as without."""
    model = make_model("llama", 8, seed=4)
    calls = []
    model.model.layers[0].register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))

    def rows_through_layer_0(**extra) -> int:
        calls.clear()
        compress(model, "slm-plus", calib_ids(4, 16), fit=calib_ids(64, 32, seed=6), **FIT, **extra)
        return sum(calls)

    without = rows_through_layer_0()
    assert without >= 64  # the fit's pass over the fit set is among them
    assert rows_through_layer_0(refine_epochs=2, refine_lr=1e-3) == without


def test_a_rate_too_high_for_the_layer_is_lowered_until_refinement_improves():
    """At 16x the rate this layer trains at, every epoch ends far above the fitted merge's error: the rate comes down
    (x 1/4, from the best weights) twice, to 1e-3, and the epochs left improve on the fitted merge."""
    model = make_model("qwen2", 8, seed=4)
    plan = compress(model, "slm-plus", calib_ids(4, 16), fit=calib_ids(128, 32, seed=6), refine_epochs=4,
                    refine_lr=0.016, **FIT)
    (window, record), = plan.stages[0].trace["refine"].items()
    assert record["rate_backoffs"] == 2 and record["final_lr"] == pytest.approx(1e-3)
    assert record["after"] < record["before"] and record["best_epoch"] == 4
    assert any(op["op"] == "set_weights" for op in plan.stages[0].ops)
    assert f"refine {window}: " in plan.summary() and "lowered 2x to 0.001" in plan.summary()
    # a rate that trains well is never lowered
    calm = compress(model, "slm-plus", calib_ids(4, 16), fit=calib_ids(128, 32, seed=6), refine_epochs=4,
                    refine_lr=1e-3, **FIT)
    assert all("rate_backoffs" not in r for r in calm.stages[0].trace["refine"].values())


def test_a_refinement_that_does_not_beat_the_fitted_merge_keeps_the_merge_alone():
    """A rate so large that every epoch diverges: the fitted merge (epoch 0) stays best, and the plan is the fitted
    plan (same ops, same side-car tensors) instead of a copy of the merged layer's weights that changes nothing."""
    model = make_model("llama", 8, seed=4)
    fit = calib_ids(64, 32, seed=6)
    fitted = compress(model, "slm-plus", calib_ids(4, 16), fit=fit, **FIT)
    kept = compress(model, "slm-plus", calib_ids(4, 16), fit=fit, refine_epochs=2, refine_lr=50.0, **FIT)
    records = kept.stages[0].trace["refine"]
    assert records and all(r["best_epoch"] == 0 and r["after"] == r["before"] for r in records.values())
    assert all(r["rate_backoffs"] == 2 for r in records.values())  # both epochs diverged, each lowered the rate
    assert kept.stages[0].ops == fitted.stages[0].ops
    assert kept.tensors.keys() == fitted.tensors.keys()
    assert all(torch.equal(kept.tensors[k], fitted.tensors[k]) for k in kept.tensors)
    assert "kept the fitted merge" in kept.summary()


def test_refinement_is_deterministic_and_round_trips(tmp_path):
    model, _, _, refined = _plans(epochs=2)
    again = compress(model, "slm-plus", calib_ids(4, 16), fit=calib_ids(256, 32, seed=6), refine_epochs=2,
                     refine_lr=1e-3, **FIT)
    for name, tensor in refined.tensors.items():
        torch.testing.assert_close(again.tensors[name], tensor, rtol=0, atol=0)
    refined.save(tmp_path / "plan.json")
    loaded = CompressionPlan.load(tmp_path / "plan.json")
    ids = calib_ids(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(apply_plan(copy.deepcopy(model), loaded)(ids).logits,
                                   apply_plan(copy.deepcopy(model), refined)(ids).logits)


def test_set_weights_replaces_exactly_the_listed_parameters_and_refuses_bad_ones():
    model = make_model("llama", 4, seed=1)
    base = copy.deepcopy(model)
    q = model.model.layers[2].self_attn.q_proj.weight
    new = torch.randn_like(q)
    from optimum_slm.plan import CompressionPlan as Plan
    from optimum_slm.plan.ops import drop_op

    plan = compress(model, "drop", layers=[0], cache=False)
    stage = plan.stages[0]
    ok = Plan(base=plan.base, stages=[type(stage)(**{**stage.__dict__, "ops": [
        *stage.ops, set_weights_op(2, {"self_attn.q_proj.weight": "q"})]})], tensors={"q": new})
    out = apply_plan(copy.deepcopy(model), ok)
    torch.testing.assert_close(out.model.layers[1].self_attn.q_proj.weight, new)  # base layer 2 is now at 1
    torch.testing.assert_close(out.model.layers[1].self_attn.k_proj.weight, base.model.layers[2].self_attn.k_proj.weight)

    def plan_with(op, tensors):
        return Plan(base=plan.base, stages=[type(stage)(**{**stage.__dict__, "ops": [drop_op([0]), op]})],
                    tensors=tensors)

    with pytest.raises(PlanError, match="was removed"):
        plan_with(set_weights_op(0, {"self_attn.q_proj.weight": "q"}), {"q": new})
    with pytest.raises(PlanError, match="not in the plan's tensors"):
        plan_with(set_weights_op(2, {"self_attn.q_proj.weight": "missing"}), {"q": new})
    with pytest.raises(PlanError, match="float32"):
        plan_with(set_weights_op(2, {"self_attn.q_proj.weight": "q"}), {"q": new.double()})
    # names and shapes are checked against the model when applied, before the model changes
    for refs, tensors, message in (({"self_attn.nope.weight": "q"}, {"q": new}, "no parameter"),
                                   ({"self_attn.q_proj.weight": "q"}, {"q": new[:, :3].contiguous()}, "is \\[")):
        target = copy.deepcopy(model)
        with pytest.raises(PlanError, match=message):
            apply_plan(target, plan_with(set_weights_op(2, refs), tensors))
        for (n, p), (_, p0) in zip(target.named_parameters(), model.named_parameters()):
            assert torch.equal(p, p0), n  # atomic: nothing changed
    # a refined layer no longer holds its base weights: a later merge over it is refused
    with pytest.raises(PlanError, match="no longer a base layer"):
        Plan(base=plan.base, stages=[type(stage)(**{**stage.__dict__, "ops": [
            set_weights_op(2, {"self_attn.q_proj.weight": "q"}), {"op": "merge", "layers": [1, 3],
                                                                   "rule": "official"}]})], tensors={"q": new})


@pytest.mark.parametrize("params, message", [
    ({"refine_epochs": 0}, "refine_epochs must be >= 1"),
    ({"refine_epochs": 2, "refine_lr": 0.0}, "refine_lr must be"),
    ({"refine_epochs": 2, "refine_lr": float("nan")}, "refine_lr.*finite"),
    ({"refine_lr": 1e-3}, "refine_lr applies with refine_epochs"),
    ({"refine_epochs": 2, "merge": "calibrated"}, "needs a merge rule that fits"),
    ({"refine_epochs": 2, "granularity": "sublayer"}, "granularity=layer"),
])
def test_bad_refine_parameters_are_refused(params, message):
    with pytest.raises(PassError, match=message):
        get_pass("slm-plus", ratio=0.25, **params)
