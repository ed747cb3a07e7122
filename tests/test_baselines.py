"""Baseline depth passes: plans, metric formulas, SLEB fast == naive, protect, LaCo merges, bad parameters."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import calib_ids, make_model, plan_of
from optimum_slm import get_pass, list_passes
from optimum_slm.arch import ArchAdapter, layer_state
from optimum_slm.engine import ForwardEngine
from optimum_slm.metrics import per_sample_cosine
from optimum_slm.errors import PassError, PlanError
from optimum_slm.merge import get_merge_rule
from optimum_slm.passes.depth.angular import angular_distance
from optimum_slm.passes.depth.laco import Unit, rdsc_coefficients
from optimum_slm.metrics import block_influence
from optimum_slm.passes.depth.shortened import magnitude_scores, taylor_scores
from optimum_slm.passes.depth.sleb import sleb_fast, sleb_naive
from optimum_slm.plan import CompressionPlan, apply_plan, merge_op, model_fingerprint

L = 8
# parameters that let each pass act on an 8-layer toy model (Shortened's "+" heuristic keeps 6 blocks by default)
PASS_KWARGS = {
    "shortgpt": {},
    "angular": {},
    "sleb": {},
    "shortened-ppl": {"keep_first": 1, "keep_last": 1},
    "shortened-taylor": {"keep_first": 1, "keep_last": 1},
    "shortened-magnitude": {"keep_first": 1, "keep_last": 1},
    "laco": {"merge_layers": 3},
    "laco-paper": {"merge_layers": 3, "merge": "paper"},
}


def _pass(key: str, **params):
    name = "laco" if key == "laco-paper" else key
    return get_pass(name, **PASS_KWARGS[key], **params)


@pytest.fixture(scope="module")
def model():
    return make_model("llama", L)


@pytest.fixture(scope="module")
def ids():
    return calib_ids(4, 16)


def removed_layers(plan: CompressionPlan) -> set[int]:
    out: set[int] = set()
    for op in plan.ops:
        if op["op"] == "drop":
            out.update(op["layers"])
        else:
            out.update(range(op["layers"][0] + 1, op["layers"][1] + 1))
    return out


def consumed_layers(plan: CompressionPlan) -> set[int]:
    out: set[int] = set()
    for op in plan.ops:
        out.update(op["layers"] if op["op"] == "drop" else range(op["layers"][0], op["layers"][1] + 1))
    return out


def test_all_baselines_registered_with_descriptions():
    passes = list_passes()
    for name in ("shortgpt", "angular", "sleb", "shortened-ppl", "shortened-taylor", "shortened-magnitude", "laco"):
        assert name in passes and passes[name] and "\n" not in passes[name]


@pytest.mark.parametrize("key", sorted(PASS_KWARGS))
@pytest.mark.parametrize("size", [{"num_layers": 3}, {"ratio": 0.25}])
def test_pass_returns_valid_plan_with_exact_count(model, ids, key, size):
    before = model_fingerprint(model)
    flags = [p.requires_grad for p in model.parameters()]
    plan = plan_of(_pass(key, **size), model, ids)
    want = size.get("num_layers") or round(size["ratio"] * L)
    assert plan.removed_layers == want and plan.num_layers_after == L - want
    assert plan.method == ("laco" if key == "laco-paper" else key)
    assert plan.trace
    # the pass left the model alone and the plan survives a JSON round trip and rebuilds a model
    assert model_fingerprint(model) == before
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    again = CompressionPlan.from_dict(plan.to_dict())
    small = apply_plan(copy.deepcopy(model), again)
    assert ArchAdapter(small).num_layers == L - want
    with torch.no_grad():
        assert torch.isfinite(small(ids).logits).all()


# ------------------------------------------------------------------------------------------- metric formulas
def test_block_influence_matches_formula():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]])
    y = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [-3.0, -4.0]]])
    # cosines 1, 0, -1 -> (1 - 1) + (1 - 0) + (1 + 1)
    assert block_influence(x, y) == pytest.approx(3.0)
    # an overflowed (inf) state gives a NaN cosine, which the official code counts as 0.5
    assert block_influence(torch.tensor([[[math.inf, 1.0]]]), torch.tensor([[[1.0, 1.0]]])) == pytest.approx(0.5)


def test_angular_distance_matches_formula():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, 0.0]])
    d = angular_distance(a, b)
    assert torch.allclose(d, torch.tensor([0.0, 0.5, 1.0, 0.25], dtype=d.dtype), atol=1e-6)


def test_shortgpt_scores_match_hf_hidden_states(model, ids):
    plan = plan_of(get_pass("shortgpt", num_layers=2), model, ids)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states  # hs[L] is after the final norm
    for i in range(L):
        cos = torch.nn.functional.cosine_similarity(hs[i].double(), hs[i + 1].double(), dim=-1)
        assert plan.trace["block_influence"][str(i)] == pytest.approx(float((1 - cos).sum()), rel=1e-4)
    scores = {int(k): v for k, v in plan.trace["block_influence"].items()}
    assert removed_layers(plan) == set(sorted(scores, key=scores.get)[:2])


def test_angular_distances_match_hf_hidden_states(model, ids):
    n = 3
    plan = plan_of(get_pass("angular", num_layers=n), model, ids)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    dist = {}
    for start in range(L - n + 1):
        cos = torch.nn.functional.cosine_similarity(hs[start][:, -1].double(), hs[start + n][:, -1].double(), dim=-1)
        dist[start] = float((torch.arccos(cos.clamp(-1, 1)) / math.pi).mean())
        assert plan.trace["distance_by_start"][str(start)] == pytest.approx(dist[start], rel=1e-4, abs=1e-6)
    best = min(dist, key=dist.get)
    assert removed_layers(plan) == set(range(best, best + n))


def test_shortened_ppl_scores_match_rebuilt_models(model, ids):
    plan = plan_of(get_pass("shortened-ppl", num_layers=2, keep_first=1, keep_last=1), model, ids)
    for b in (0, 3, L - 1):
        small = copy.deepcopy(model)
        ArchAdapter(small).remove_layers([b])
        with torch.no_grad():
            logits = small(ids).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        assert plan.trace["scores"][str(b)] == pytest.approx(math.exp(float(nll)), rel=1e-4)
    assert not removed_layers(plan) & {0, L - 1}


def test_taylor_and_magnitude_scores_match_formulas(model, ids):
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.requires_grad_(True)
    twin(input_ids=ids, labels=ids).loss.backward()
    layers = ArchAdapter(twin).layers
    expect = {i: sum(float((p.detach() * p.grad).abs().sum()) for p in layer.parameters()) for i, layer in enumerate(layers)}
    got = taylor_scores(ForwardEngine(model, ids))
    for i in range(L):
        assert got[i] == pytest.approx(expect[i], rel=1e-4)
    mags = magnitude_scores(ForwardEngine(model, None))
    for i, layer in enumerate(ArchAdapter(model).layers):
        assert mags[i] == pytest.approx(sum(float(p.detach().abs().sum()) for p in layer.parameters()), rel=1e-6)


# ------------------------------------------------------------------------------------------- SLEB
def test_sleb_fast_equals_naive(model, ids):
    engine = ForwardEngine(model, ids)
    fast_removed, fast_rounds = sleb_fast(engine, 3)
    naive_removed, naive_rounds = sleb_naive(model, ids, 3, per_sample=True)
    assert fast_removed == naive_removed
    for fr, nr in zip(fast_rounds, naive_rounds):
        assert set(map(int, fr["loss"])) == set(nr)
        for block, loss in nr.items():
            assert fr["loss"][str(block)] == pytest.approx(loss, rel=1e-5)
    # the naive loop restored the model, and its batched variant agrees
    assert sleb_naive(model, ids, 3, per_sample=False)[0] == fast_removed
    plan = plan_of(get_pass("sleb", num_layers=3), model, ids)
    assert plan.trace["removal_order"] == fast_removed


def test_sleb_barriers(model, ids):
    plan = plan_of(get_pass("sleb", num_layers=3, early_barrier=2, latter_barrier=2), model, ids)
    assert not removed_layers(plan) & {0, 1, L - 2, L - 1}
    assert {int(k) for k in plan.trace["rounds"][0]["loss"]} == set(range(2, L - 2))


# ------------------------------------------------------------------------------------------- LaCo
def test_rdsc_coefficients_and_linear_rule_reproduce_paper(model):
    assert rdsc_coefficients([Unit(2, 2), Unit(3, 3), Unit(4, 4)]) == (-1.0, 1.0, 1.0)
    # RDSC again on a merged layer: θ2 + (M − θ2) = M with M over 3..5
    chained = rdsc_coefficients([Unit(2, 2), Unit(3, 5, (-1.0, 1.0, 1.0))])
    assert chained == (0.0, -1.0, 1.0, 1.0)
    layers = ArchAdapter(model).layers
    kinds = ArchAdapter(model).tensor_kinds(layers[0])
    states = [layer_state(layers[i]) for i in range(2, 5)]
    paper = get_merge_rule("paper")(states, kinds)
    linear = get_merge_rule("linear")(states, kinds, coefficients=[-1.0, 1.0, 1.0])
    for name in kinds:
        assert torch.allclose(paper[name], linear[name], atol=1e-6)
    with pytest.raises(PlanError):
        CompressionPlan.for_model(model, "x", [merge_op(2, 4, "linear", args={"coefficients": [1.0, 0.0]})])
    with pytest.raises(PlanError):
        CompressionPlan.for_model(model, "x", [merge_op(2, 4, "official", args={"coefficients": [1, 0, 0]})])


@pytest.mark.parametrize("mode", ["official", "paper"])
def test_laco_plan_rebuilds_the_scored_model(model, ids, mode):
    plan = plan_of(get_pass("laco", num_layers=3, merge_layers=3, merge=mode), model, ids)
    accepted = [t for t in plan.trace["tried"] if t["passed"]]
    assert accepted and plan.trace["merges"]
    small = apply_plan(copy.deepcopy(model), plan)
    base = ForwardEngine(model, ids).record_layer_inputs()
    with torch.no_grad():
        final = [ArchAdapter(small).decoder(input_ids=ids).last_hidden_state]
    assert float(per_sample_cosine(final, base.base_final).mean()) == pytest.approx(accepted[-1]["sim"], abs=1e-5)


def test_laco_official_chain_is_official_on_union(model, ids):
    plan = plan_of(get_pass("laco", num_layers=3, merge_layers=3, threshold=-1.0), model, ids)
    # first window [H−C, H−1] = [4, 6] folds 2; then position 3 folds 1 more: one op over [3, 6]
    assert plan.trace["tried"][0]["window"] == [L - 1 - 3, L - 2]
    assert plan.ops == [merge_op(3, 6, "official")]


def test_laco_lowers_threshold_to_reach_target(model, ids):
    plan = plan_of(get_pass("laco", num_layers=3, merge_layers=3, threshold=0.9999), model, ids)
    assert plan.removed_layers == 3
    assert plan.params["threshold"] < 0.9999
    assert len(plan.trace["search"]) > 1


def test_laco_threshold_only_mode(model, ids):
    plan = plan_of(get_pass("laco", merge_layers=3, threshold=-1.0), model, ids)
    assert plan.removed_layers >= 2 and "target_removed" not in plan.trace


# ------------------------------------------------------------------------------------------- protect, errors
@pytest.mark.parametrize("key", sorted(PASS_KWARGS))
def test_protect_is_honoured(model, ids, key):
    first = plan_of(_pass(key, num_layers=2), model, ids)
    protect = sorted(consumed_layers(first))
    second = plan_of(_pass(key, num_layers=2, protect=protect), model, ids)
    assert second.removed_layers == 2
    assert not consumed_layers(second) & set(protect)


@pytest.mark.parametrize(
    "name,params",
    [
        ("shortgpt", {"ratio": 1.5}),
        ("shortgpt", {"ratio": 0.2, "num_layers": 2}),
        ("angular", {"bogus": 1}),
        ("sleb", {"num_layers": 2, "early_barrier": -1}),
        ("laco", {"num_layers": 2, "merge": "mean"}),
        ("laco", {"num_layers": 2, "merge_layers": 1}),
        ("laco", {"num_layers": 2, "interval": 0}),
        ("shortened-ppl", {"num_layers": 2, "keep_first": -1}),
        ("shortgpt", {"protect": "x"}),
    ],
)
def test_bad_params_raise_pass_error(name, params):
    with pytest.raises(PassError):
        get_pass(name, **params)


@pytest.mark.parametrize(
    "name,params",
    [
        ("shortgpt", {"num_layers": L}),
        ("angular", {"num_layers": 2, "protect": list(range(L))}),
        ("sleb", {"num_layers": L - 1}),
        ("shortened-magnitude", {"num_layers": 2}),  # the default '+' heuristic keeps 6 of 8 blocks: 2 removable
        ("shortened-ppl", {"num_layers": 3}),
        ("laco", {"num_layers": 2, "merge_layers": L}),
        ("laco", {"num_layers": 2, "highest_layer": L}),
        ("shortgpt", {"num_layers": 2, "protect": [L]}),
    ],
)
def test_infeasible_requests_raise_pass_error(model, ids, name, params):
    if name == "shortened-magnitude":  # removing the 2 removable blocks works, a third does not
        assert plan_of(get_pass(name, **params), model, None).removed_layers == 2
        params = {"num_layers": 3}
    with pytest.raises(PassError):
        plan_of(get_pass(name, **params), model, ids)


@pytest.mark.parametrize("name", ["shortgpt", "angular", "sleb", "shortened-ppl", "shortened-taylor", "laco"])
def test_data_passes_need_calibration(model, name):
    with pytest.raises(PassError):
        plan_of(get_pass(name, num_layers=1), model, None)
