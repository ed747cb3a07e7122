"""LinearPatch (``linearpatch``): the official computation transcribed step by step, the Hadamard matrices, the exact
fold of the patch's scalar part, the least-squares remainder, plans on disk and the vanilla reload."""

from __future__ import annotations

import copy
import hashlib
import math

import numpy as np
import pytest
import scipy.linalg
import torch
import transformers

from conftest import CLI_CALIB, FAMILIES, calib_ids, make_model, run
from optimum_slm.errors import PlanError, UnsupportedArchitectureError
from optimum_slm.passes.depth.hadamard import hadamard_matrix, hadamard_order, small_hadamard
from optimum_slm.pipeline import compress
from optimum_slm.plan import CompressionPlan, Stage, apply_plan, drop_op, merge_op, scale_branches_op


# ------------------------------------------------------------------ the official computation, literally
def _input_hook(store: dict, index: int):
    # the official hooks read ``input[0]``; transformers 5 may pass the hidden state as a keyword
    def hook(module, args, kwargs, output):
        store[index] = args[0] if args else kwargs["hidden_states"]

    return hook


def official_linearpatch(model, fit: torch.Tensor, n: int, insert_type: str = "rotate"):
    """chenxinrui-tsinghua/LinearPatch ``layer_select.py`` + ``block_scaling.py`` as ``main_distill.py`` runs them
    (train_free), transcribed: one sample per forward (batch size 1), hooks on every layer's input, the cosine along
    torch's default dim=1, the scale as a mean of per-sample ratios, then the pruned model with the patch hooked
    onto the output of layer start−1. The Hadamard matrix of hidden size 64 is Sylvester's / 8 (scipy), as the
    official ``get_hadamard_matrix`` gives for a power of two."""
    model = copy.deepcopy(model)
    layers = model.model.layers
    L, d = len(layers), model.config.hidden_size
    max_start = L - n
    act: dict[int, torch.Tensor] = {}
    handles = [layer.register_forward_hook(_input_hook(act, i), with_kwargs=True) for i, layer in enumerate(layers)]
    cosine_sim = [0.0 for _ in range(max_start)]
    num_samples = fit.shape[0]
    with torch.no_grad():
        for sample in fit:
            model(sample[None], use_cache=False)
            for i in range(1, max_start):
                cosine_sim[i] += float(torch.cosine_similarity(act[i], act[i + n]).mean())
    for h in handles:
        h.remove()
    cosine_sim = [c / num_samples for c in cosine_sim]
    start = cosine_sim.index(max(cosine_sim))
    end = start + n
    rotate = insert_type == "rotate"
    H = torch.tensor(scipy.linalg.hadamard(d), dtype=torch.float64) / math.sqrt(d)
    clip: dict[int, torch.Tensor] = {}
    handles = [layers[k].register_forward_hook(_input_hook(clip, k), with_kwargs=True) for k in (start, end)]
    scale_params = torch.zeros(d, dtype=torch.float64)
    with torch.no_grad():
        for sample in fit:
            model(sample[None], use_cache=False)
            xi, xj = clip[start].double(), clip[end].double()
            if rotate:
                xi, xj = xi @ H, xj @ H
            scale_params += (xj.abs().mean(dim=0, keepdim=True).mean(dim=1, keepdim=True)
                             / xi.abs().mean(dim=0, keepdim=True).mean(dim=1, keepdim=True))[0, 0]
    for h in handles:
        h.remove()
    D = scale_params / num_samples
    P = H @ torch.diag(D) @ H.T if rotate else torch.diag(D)
    model.model.layers = torch.nn.ModuleList([m for i, m in enumerate(layers) if i < start or i >= end])
    model.config.num_hidden_layers = len(model.model.layers)
    if start >= 1:  # the official hook goes on layer start−1 of the pruned model (none when start is 0)
        patch = P.float()
        model.model.layers[start - 1].register_forward_hook(lambda m, a, out: out @ patch)
    return cosine_sim, start, end, D, P, model


def _plan(model, fit, n, **params):
    return compress(model, "linearpatch", calib_ids(2, 8), fit=fit, cache=False, num_layers=n, **params)


def _cut_parts(model, fit, start):
    """Base activations at the cut on ``fit``: layer start−1's MLP output M and output Y, per token (float64)."""
    got = {}
    layer = model.model.layers[start - 1]
    h1 = layer.mlp.register_forward_hook(lambda m, a, o: got.__setitem__("m", o))
    h2 = layer.register_forward_hook(lambda m, a, o: got.__setitem__("y", o))
    with torch.no_grad():
        model(fit)
    h1.remove(), h2.remove()
    d = model.config.hidden_size
    return got["m"].reshape(-1, d).double(), got["y"].reshape(-1, d).double()


@pytest.mark.parametrize("insert_type", ["rotate", "diag"])
def test_block_scale_and_map_match_the_official_computation(insert_type):
    model = make_model("llama", 8, seed=3)
    fit = calib_ids(40, 24, seed=5)
    scores, start, end, D, P, _ = official_linearpatch(model, fit, 2, insert_type)
    plan = _plan(model, fit, 2, insert_type=insert_type)
    stage = plan.stages[0]
    assert stage.trace["start"] == start and stage.trace["removed"] == [start, end - 1]
    ours = [stage.trace["score_by_start"][str(i)] for i in range(len(scores))]
    np.testing.assert_allclose(ours, scores, rtol=1e-5, atol=1e-6)
    merge, scale = stage.ops
    assert merge["op"] == "merge" and merge["layers"] == [start - 1, end - 1] and merge["rule"] == "lstsq"
    assert scale == scale_branches_op(range(end, 8), scale["factor"])
    c = float(D.mean())
    assert scale["factor"] == pytest.approx(1 / c, rel=1e-6)
    # the map: least squares on layer start−1's MLP output towards its output times R = P / c
    m, y = _cut_parts(model, fit, start)
    target = y @ (P / c) - (y - m)
    expected = torch.linalg.solve(m.T @ m, m.T @ target)
    torch.testing.assert_close(plan.tensors[merge["tensors"]["map"]], expected.float(), rtol=2e-3, atol=2e-4)


def test_the_checkpoint_computes_the_patch_it_stands_for():
    # exactness of the fold: the checkpoint's logits are the pruned model's with, hooked, the map on layer start−1's
    # MLP output and the scalar c on that layer's output (the official patch with R replaced by the fitted map)
    model = make_model("llama", 8, seed=3)
    fit = calib_ids(40, 24, seed=5)
    plan = _plan(model, fit, 2)
    merge, scale = plan.stages[0].ops
    start, end = merge["layers"][0] + 1, merge["layers"][1] + 1
    t, c = plan.tensors[merge["tensors"]["map"]], 1 / scale["factor"]
    hooked = copy.deepcopy(model)
    layers = hooked.model.layers
    layers[start - 1].mlp.register_forward_hook(lambda m, a, o: o @ t)
    layers[start - 1].register_forward_hook(lambda m, a, o: o * c)
    hooked.model.layers = torch.nn.ModuleList([m for i, m in enumerate(layers) if i < start or i >= end])
    hooked.config.num_hidden_layers = len(hooked.model.layers)
    folded = apply_plan(copy.deepcopy(model), plan)
    probe = calib_ids(3, 12, seed=9)
    with torch.no_grad():
        # the hooked reference keeps its base layer indices: no KV cache
        want = hooked(probe, use_cache=False).logits
        torch.testing.assert_close(folded(probe).logits, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_scale_branches_is_the_scalar_on_the_stream_exactly(family):
    # the scalar part of the patch: y·c after layer 2 (hooked) = every branch above it scaled by 1/c (folded)
    model = make_model(family, 6, seed=2)
    # the one inexactness is each norm's ε (x / sqrt(mean x² + ε) is blind to a scalar only for ε = 0), large next to
    # a random tiny model's small residual stream: without it the two must agree to float precision
    for module in model.modules():
        for attr in ("variance_epsilon", "eps"):
            if "Norm" in type(module).__name__ and isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    c = 1.7
    plan = CompressionPlan.for_model(model, "t", [drop_op([3]), scale_branches_op([4, 5], 1 / c)])
    folded = apply_plan(copy.deepcopy(model), plan)
    hooked = copy.deepcopy(model)
    hooked.model.layers[2].register_forward_hook(lambda m, a, o: (o[0] * c, *o[1:]) if isinstance(o, tuple) else o * c)
    del_plan = CompressionPlan.for_model(model, "t", [drop_op([3])])
    hooked = apply_plan(hooked, del_plan)  # the same deletion, through the same code, keeps the hook on layer 2
    probe = calib_ids(2, 12, seed=4)
    with torch.no_grad():
        want, got = hooked(probe).logits, folded(probe).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # and the scalar is not a no-op: without the scale op the logits differ
        plain = apply_plan(copy.deepcopy(model), del_plan)(probe).logits
        assert (plain - want).abs().max() > 1e-2


def test_the_remainder_fit_beats_the_identity_and_r_itself_at_the_cut():
    # least squares on the fit set: T = I (no remainder) and T = R are both candidates, so the fit is no worse
    model = make_model("llama", 8, seed=3)
    fit = calib_ids(40, 24, seed=5)
    _, start, _, D, P, _ = official_linearpatch(model, fit, 2)
    plan = _plan(model, fit, 2)
    t = plan.tensors[plan.stages[0].ops[0]["tensors"]["map"]].double()
    R = P / D.mean()
    m, y = _cut_parts(model, fit, start)

    def error(T):
        return float(((y - m) + m @ T - y @ R).pow(2).sum())

    assert error(t) < 0.99 * min(error(torch.eye(R.shape[0], dtype=R.dtype)), error(R))


def test_start_zero_is_a_plain_deletion_as_the_official_hook_never_fires():
    # n = L−1 leaves no scored start: the official block starts at 0 and its patch hook goes to layer −1
    model = make_model("llama", 6, seed=1)
    fit = calib_ids(8, 16, seed=2)
    scores, start, end, *_ = official_linearpatch(model, fit, 5)
    assert (start, end) == (0, 5) and scores == [0.0]
    plan = _plan(model, fit, 5)
    assert plan.stages[0].ops == [drop_op(range(5))] and plan.stages[0].trace["patch"] is None
    assert not plan.tensors


def test_insert_type_none_deletes_the_chosen_block():
    model = make_model("llama", 8, seed=3)
    fit = calib_ids(40, 24, seed=5)
    _, start, end, *_ = official_linearpatch(model, fit, 2)
    plan = _plan(model, fit, 2, insert_type="none")
    assert plan.stages[0].ops == [drop_op(range(start, end))] and not plan.tensors


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_sandwich_norm_families_carry_the_refitted_gain(family):
    model = make_model(family, 6, seed=2)
    plan = _plan(model, calib_ids(24, 20, seed=3), 2)
    merge, scale = plan.stages[0].ops
    assert set(merge["tensors"]) == {"map", "gain"} and scale["op"] == "scale_branches"
    out = apply_plan(copy.deepcopy(model), plan)
    with torch.no_grad():
        assert torch.isfinite(out(calib_ids(1, 8)).logits).all()


# ------------------------------------------------------------------ Hadamard matrices
#: sha256 of the sign pattern (1 for +1, row-major uint8) of the official table's H_K (``get_hadK``), computed once
#: from the official ``rotate_utils/hadamard_utils.py``; ours are built from their definitions
OFFICIAL_SIGN_DIGESTS = {
    12: "c1be30fecbc13e7e475b0deabb92352b7210407fe494be276878be3e43ba69bb",
    20: "cff143e84622972bf8fffa0759340640c046ec5879deeb8d95d038282ef1cdda",
    28: "90e9b61e93164eb5aede6c0a5f5539ba418b69484589748c7c3119b351cd0d85",
    36: "147097e41d5a37076143c1be0f028b10754a72ad3f1f7f72c81b5f8aa76342f7",
    40: "09c4022b9b0bdfd17e93a7e7ec69229985b4e95a9a7100efc987754ee9761bcd",
    60: "e0d3fe922af47d1e588204a355745f282f46828441471a07ec961431c76d2403",
    108: "f2515b85a3163765111b92720629458e3f38e241dd83224b10852eed89535b1f",
    140: "2b20c54cd8c49cdc0a36c9d323380c5c9c95c16538d7c9eeb7e69b23f1ab944d",
}


@pytest.mark.parametrize("k", sorted(OFFICIAL_SIGN_DIGESTS))
def test_small_hadamard_is_the_official_table_entry(k):
    h = small_hadamard(k)
    assert torch.equal(h @ h.T, k * torch.eye(k, dtype=h.dtype))  # a Hadamard matrix
    signs = (h > 0).numpy().astype(np.uint8).tobytes()
    assert hashlib.sha256(signs).hexdigest() == OFFICIAL_SIGN_DIGESTS[k]


def _official_butterfly(n: int) -> torch.Tensor:
    """``matmul_hadU(eye(n))`` transcribed: Walsh–Hadamard butterflies on each row until K values are left per
    group, then the order-K table matrix on them, over √n."""
    k = hadamard_order(n)
    x = torch.eye(n, dtype=torch.float64).view(-1, n, 1)
    while x.shape[1] > k:
        x = x.view(x.shape[0], x.shape[1] // 2, 2, x.shape[2])
        x = torch.stack([x[:, :, 0, :] + x[:, :, 1, :], x[:, :, 0, :] - x[:, :, 1, :]], dim=2)
        x = x.reshape(x.shape[0], x.shape[1], -1)
    if k > 1:
        x = small_hadamard(k).view(1, k, k) @ x
    return x.reshape(n, n) / math.sqrt(n)


@pytest.mark.parametrize("n, k", [(64, 1), (576, 36), (1536, 12), (896, 28), (960, 60), (2560, 40), (20, 20)])
def test_hadamard_matrix_is_the_official_construction(n, k):
    assert hadamard_order(n) == k
    h = hadamard_matrix(n)
    torch.testing.assert_close(h, _official_butterfly(n), rtol=0, atol=1e-12)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=h.dtype), rtol=0, atol=1e-10)
    assert torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(n)))


@pytest.mark.parametrize("n, message", [(52 * 128, "order-52"), (172 * 16, "order-172"), (100, "no Hadamard matrix"),
                                        (36 * 5, "no Hadamard matrix")])
def test_hidden_sizes_without_the_official_matrix_are_refused_in_one_line(n, message):
    with pytest.raises(UnsupportedArchitectureError, match=message) as info:
        hadamard_matrix(n)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ the scale_branches op, plans on disk
@pytest.mark.parametrize("op, message", [
    ({"op": "scale_branches", "layers": [4], "factor": 0}, "finite number > 0"),
    ({"op": "scale_branches", "layers": [4], "factor": float("nan")}, "finite number > 0"),
    ({"op": "scale_branches", "layers": [4], "factor": True}, "finite number > 0"),
    ({"op": "scale_branches", "layers": [4], "factor": "2"}, "finite number > 0"),
    ({"op": "scale_branches", "layers": [], "factor": 2.0}, "at least one layer"),
    ({"op": "scale_branches", "layers": [4, 4], "factor": 2.0}, "each once"),
    ({"op": "scale_branches", "layers": [3], "factor": 2.0}, "already removed"),
    ({"op": "scale_branches", "layers": [9], "factor": 2.0}, "out of range"),
    ({"op": "scale_branches", "layers": [4], "factor": 2.0, "bias": 1}, "unknown keys"),
])
def test_bad_scale_branches_ops_are_refused(op, message):
    model = make_model("llama", 6)
    with pytest.raises(PlanError, match=message):
        CompressionPlan.for_model(model, "t", [drop_op([3]), op])


def test_a_scaled_layer_is_no_longer_a_base_layer_to_merge():
    base = CompressionPlan.for_model(make_model("llama", 6), "x", []).base
    with pytest.raises(PlanError, match="no longer a base layer"):
        CompressionPlan(base=base, stages=[Stage("a", ops=[scale_branches_op([4], 0.5)]),
                                           Stage("b", ops=[merge_op(3, 4)])])


def test_plan_round_trip_builds_the_same_weights(tmp_path):
    model = make_model("llama", 8, seed=3)
    plan = _plan(model, calib_ids(40, 24, seed=5), 2)
    plan.save(tmp_path / "p.json")
    loaded = CompressionPlan.load(tmp_path / "p.json")
    assert loaded.to_json() == plan.to_json() and loaded.ops[1]["factor"] == plan.ops[1]["factor"]
    a = apply_plan(copy.deepcopy(model), plan).state_dict()
    b = apply_plan(copy.deepcopy(model), loaded).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_checkpoint_reloads_in_vanilla_transformers(tiny_checkpoint, corpus, tmp_path):
    out = tmp_path / "out"
    result = run("compress", "--model", tiny_checkpoint, "--method", "linearpatch", "--num-layers", "2",
                 "--calib-data", corpus, *CLI_CALIB, "--fit-samples", "24", "--fit-seq-len", "16", "--no-check",
                 "--output", str(out))
    assert result.exit_code == 0, result.output
    plan = CompressionPlan.load(out / "slm_plan.json")
    assert [op["op"] for op in plan.ops] == ["merge", "scale_branches"] and plan.num_layers_after == 4
    vanilla = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert vanilla.config.num_hidden_layers == 4
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    rebuilt = apply_plan(base, plan)
    probe = calib_ids(2, 10, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(vanilla(probe).logits, rebuilt(probe).logits, rtol=1e-5, atol=1e-5)
