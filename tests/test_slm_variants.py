"""SLM variants: similarity criteria, calibrated merge, global (DP) and greedy window search."""

from __future__ import annotations

import copy
import itertools
import math
import random

import pytest
import torch

from conftest import calib_ids, make_model, plan_of
from optimum_slm import ArchAdapter, CompressionPlan, apply_plan, compress, get_pass
from optimum_slm.merge.calibrated import calibrate_window
from optimum_slm.engine import ForwardEngine, Slot
from optimum_slm.merge import MERGE_RULES
from optimum_slm.passes.depth.slm import best_window_set
from optimum_slm.metrics import linear_cka
from optimum_slm.similarity import SIMILARITIES


def test_similarities_are_one_for_the_base_and_lower_for_a_broken_model():
    model = make_model("llama", 6)
    engine = ForwardEngine(model, calib_ids(3, 12)).record_layer_inputs()
    base = engine.run_layers(engine.base_slots(0), 0)
    broken = engine.run_layers(engine.base_slots(0)[:2] + engine.base_slots(5), 0)
    for name, fn in SIMILARITIES.items():
        assert fn(engine, base) == pytest.approx(1.0, abs=1e-6), name
        assert fn(engine, broken) < 0.999, name


def test_linear_cka_formula_and_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g, dtype=torch.float64)
    y = torch.randn(50, 6, generator=g, dtype=torch.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    direct = (torch.linalg.norm(yc.T @ xc) ** 2 / (torch.linalg.norm(xc.T @ xc) * torch.linalg.norm(yc.T @ yc))).item()
    assert linear_cka(x, y) == pytest.approx(direct, rel=1e-9)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0, abs=1e-9)


def test_logit_kl_similarity_is_exp_of_minus_kl():
    model = make_model("llama", 6)
    engine = ForwardEngine(model, calib_ids(2, 8)).record_layer_inputs()
    cand = engine.run_layers(engine.base_slots(0)[:1] + engine.base_slots(3), 0)
    p = torch.log_softmax(torch.cat(engine.logits(engine.base_final)).float(), -1)
    q = torch.log_softmax(torch.cat(engine.logits(cand)).float(), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert SIMILARITIES["logit-kl"](engine, cand) == pytest.approx(math.exp(-kl), rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_folded_scales_scale_the_branch_outputs(family):
    model = make_model(family, 4)
    adapter = ArchAdapter(model)
    layer = adapter.layers[1]
    engine = ForwardEngine(model, calib_ids(2, 8)).record_layer_inputs()
    hidden = adapter.config.hidden_size
    scales = {"attn": torch.rand(hidden) + 0.5, "mlp": torch.rand(hidden) + 0.5}

    def branch_outputs(module):
        out = {}
        hooks = [
            sub.register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, (o[0] if isinstance(o, tuple) else o)))
            for n, sub in adapter.branch_modules(module).items()
        ]
        engine.run_layers([Slot(module, 1)], 1, final_norm=False)
        for h in hooks:
            h.remove()
        return out

    before = branch_outputs(layer)
    scaled = copy.deepcopy(layer)
    adapter.fold_branch_scales(scaled, {"attn": scales["attn"]})
    after = branch_outputs(scaled)
    assert torch.allclose(after["attn"], before["attn"] * scales["attn"], atol=1e-5)
    mlp_only = copy.deepcopy(layer)
    adapter.fold_branch_scales(mlp_only, {"mlp": scales["mlp"]})
    after = branch_outputs(mlp_only)
    assert torch.allclose(after["attn"], before["attn"])
    assert torch.allclose(after["mlp"], before["mlp"] * scales["mlp"], atol=1e-5)


def test_calibrated_merge_fits_the_window_better_than_keep_top():
    model = make_model("llama", 8)
    engine = ForwardEngine(model, calib_ids(4, 16)).record_layer_inputs()
    adapter = engine.adapter
    low, high = 3, 5
    kinds = adapter.tensor_kinds(adapter.layers[0])
    states = [dict(adapter.layers[i].named_parameters()) for i in range(low, high + 1)]
    keep_top = copy.deepcopy(adapter.layers[high])
    keep_top.load_state_dict(MERGE_RULES["keep-top"]([{k: v.detach() for k, v in s.items()} for s in states], kinds))
    calibrated = copy.deepcopy(keep_top)
    scales = calibrate_window(engine, calibrated, high, low, high)
    target = torch.cat(engine.inputs[high + 1])

    def err(module):
        out = torch.cat(engine.run_layers([Slot(module, high)], low, final_norm=False))
        return (out - target).pow(2).mean().item()

    assert err(calibrated) < err(keep_top)
    assert set(scales) == {"attn", "mlp"} and scales["mlp"].shape == (64,) and scales["mlp"].dtype == torch.float32


def test_calibrated_plan_rebuilds_without_calibration_data(tmp_path):
    model = make_model("llama", 8)
    ids = calib_ids(3, 12)
    plan = plan_of(get_pass("slm", num_layers=2, search="global", merge="calibrated"), model, ids)
    assert all(op["rule"] == "calibrated" and set(op["tensors"]) == {"attn", "mlp"} for op in plan.ops)
    plan.save(tmp_path / "p.json")
    assert (tmp_path / "p.tensors").exists()  # the scales live in the side-car, not the JSON
    a = apply_plan(copy.deepcopy(model), plan)
    b = apply_plan(copy.deepcopy(model), CompressionPlan.load(tmp_path / "p.json"))
    keep_top = copy.deepcopy(plan.to_dict())
    for op in keep_top["stages"][0]["ops"]:
        op.pop("tensors")
        op["rule"] = "keep-top"
    keep_top["tensors"] = {}
    c = apply_plan(copy.deepcopy(model), CompressionPlan.from_dict(keep_top))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
        assert not torch.equal(a(ids).logits, c(ids).logits)


def _brute_force(costs, n, target):
    best, best_set = float("inf"), None
    windows = list(costs)
    for r in range(1, target + 1):
        for combo in itertools.combinations(windows, r):
            layers = [i for lo, hi in combo for i in range(lo, hi + 1)]
            if len(layers) != len(set(layers)) or sum(hi - lo for lo, hi in combo) != target:
                continue
            total = sum(costs[w] for w in combo)
            if total < best:
                best, best_set = total, combo
    return best, best_set


def test_dynamic_programming_matches_brute_force():
    rng = random.Random(0)
    for _ in range(20):
        n, target = 7, rng.randint(1, 4)
        costs = {(lo, hi): rng.random() for lo in range(n) for hi in range(lo + 1, min(n, lo + 4))}
        expect, _ = _brute_force(costs, n, target)
        got = best_window_set(costs, n, target)
        assert got is not None
        assert sum(hi - lo for lo, hi in got) == target
        assert sum(costs[w] for w in got) == pytest.approx(expect)


@pytest.mark.parametrize("search", ["global", "greedy"])
def test_searches_remove_the_target_and_respect_protect(search):
    model = make_model("llama", 8)
    ids = calib_ids(3, 12)
    plan = plan_of(get_pass("slm", num_layers=3, search=search, similarity="token-cosine", merge="keep-top",
                            protect=[0, 7], max_window=3), model, ids)
    assert plan.removed_layers == 3
    for lo, hi in plan.windows:
        assert hi - lo + 1 <= 3 and lo > 0 and hi < 7
    assert plan.trace["similarity_evaluations"] > 0 and "threshold" not in plan.params


def test_greedy_first_round_picks_the_best_single_window():
    model = make_model("llama", 8)
    ids = calib_ids(3, 12)
    greedy = get_pass("slm", num_layers=1, search="greedy", similarity="token-cosine", merge="keep-top")
    plan = plan_of(greedy, model, ids)
    engine = ForwardEngine(model, ids).record_layer_inputs()
    best = None
    for i in range(7):  # keep-top window [i, i+1] == deleting layer i
        slots = [s for s in engine.base_slots(0) if s.type_index != i]
        s = SIMILARITIES["token-cosine"](engine, engine.run_layers(slots, 0))
        best = max(best or (s, i), (s, i))
    assert plan.windows == [(best[1], best[1] + 1)]


def test_searches_need_a_target():
    with pytest.raises(Exception, match="needs ratio or num_layers"):
        get_pass("slm", search="global")


def test_lazy_greedy_matches_exhaustive_greedy_with_fewer_scores():
    from optimum_slm.engine import ForwardEngine
    from optimum_slm.passes.depth.slm import WindowEvaluator, greedy_window_search

    for seed in (0, 1):
        model = make_model("llama", 8, seed=seed)
        engine = ForwardEngine(model, calib_ids(3, 12)).record_layer_inputs()
        full = greedy_window_search(WindowEvaluator(engine, "keep-top", "token-cosine"), 4, 8, set(), 8, lazy=False)
        lazy = greedy_window_search(WindowEvaluator(engine, "keep-top", "token-cosine"), 4, 8, set(), 8, lazy=True)
        assert lazy[0] == full[0]
        assert sum(r["scored"] for r in lazy[1]) < sum(r["scored"] for r in full[1])


def test_slm_plus_is_the_documented_slm_configuration():
    """slm-plus = slm with the ablations' winning search, criterion, fitted merge and ridges (and nothing else)."""
    from optimum_slm.passes.depth.slm_plus import FIT_ORDER_DEFAULT, RIDGE_DEFAULT, SEARCH_RIDGE_DEFAULT, SLMPlusPass

    model = make_model("llama", 8)
    ids = calib_ids(3, 12)
    fit = calib_ids(48, 16, seed=3)
    plus = compress(model, "slm-plus", ids, fit=fit, cache=False, num_layers=3)
    defaults = {p.name: p.default for p in SLMPlusPass.params if p.name in ("search", "similarity", "merge")}
    assert defaults == {"search": "greedy", "similarity": "token-cosine", "merge": "lstsq-attn"}  # as the README says
    assert plus.params["ridge"] == RIDGE_DEFAULT and plus.params["search_ridge"] == SEARCH_RIDGE_DEFAULT
    assert plus.params["fit_order"] == FIT_ORDER_DEFAULT == "independent"
    same = compress(model, "slm", ids, fit=fit, cache=False, num_layers=3, ridge=RIDGE_DEFAULT,
                    search_ridge=SEARCH_RIDGE_DEFAULT, fit_order=FIT_ORDER_DEFAULT, **defaults)
    assert plus.removed_layers == 3 and plus.ops == same.ops
    assert all(torch.equal(plus.tensors[name], same.tensors[name]) for name in plus.tensors)
    assert all(op["op"] == "merge" and op["rule"] == "lstsq-attn" and set(op["tensors"]) == {"attn_map", "map"}
               for op in plus.ops)
    calibrated = plan_of(get_pass("slm-plus", num_layers=3, merge="calibrated"), model, ids)  # the previous default
    assert "ridge" not in calibrated.params and all(op["rule"] == "calibrated" for op in calibrated.ops)
    with pytest.raises(Exception, match="needs ratio or num_layers"):
        plan_of(get_pass("slm-plus"), model, ids)


def test_greedy_resumes_from_the_winners_recorded_activations(monkeypatch):
    """Each greedy round resumes candidates from the previous winner's scoring run instead of re-running the stack:
    the same windows, scores and fitted tensors as running the new stack explicitly (the fallback), for fewer layer
    evaluations."""
    from optimum_slm.passes.depth import slm as slm_module

    model = make_model("llama", 12, seed=5)
    kw = dict(fit=calib_ids(40, 24, seed=2), cache=False, num_layers=5, max_window=3)
    fast = compress(model, "slm-plus", calib_ids(6, 24), **kw)
    original = slm_module.WindowEvaluator.score_set

    def without_recording(self, windows, start=None, start_hidden=None, record=None):
        return original(self, windows, start, start_hidden, None)

    monkeypatch.setattr(slm_module.WindowEvaluator, "score_set", without_recording)
    explicit = compress(model, "slm-plus", calib_ids(6, 24), **kw)
    assert fast.stages[0].ops == explicit.stages[0].ops and len(fast.stages[0].ops) >= 2
    assert fast.stages[0].trace["tried"] == explicit.stages[0].trace["tried"]
    assert all(torch.equal(fast.tensors[k], explicit.tensors[k]) for k in fast.tensors)
    assert fast.stages[0].trace["layer_evaluations"] < explicit.stages[0].trace["layer_evaluations"]
