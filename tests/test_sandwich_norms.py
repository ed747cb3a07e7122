"""Fitted maps under Gemma-2/3's sandwich norms (a norm between each branch and the residual add): the fold is
exact, the fit recovers what a map and a gain can express, plans carry the gains, and the default method runs end to
end through the CLI on every supported family."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
import transformers
from conftest import FAMILIES, assert_one_line, calib_ids, make_model, run

from optimum_slm import CompressionPlan, apply_plan, compress
from optimum_slm.arch import ArchAdapter, families
from optimum_slm.arch.families import SUPPORTED_MODEL_TYPES
from optimum_slm.errors import PlanError, UnsupportedArchitectureError
from optimum_slm.merge.lstsq import BranchFit

GEMMAS = ("gemma2", "gemma3_text")
BRANCHES = {"attn": ("self_attn.o_proj", "post_attention_layernorm"),
            "mlp": ("mlp.down_proj", "post_feedforward_layernorm")}


def _layer_io(model, ids):
    """(input hidden states of layer 1, the layer's position embeddings and mask kwargs) via a pre-hook."""
    seen = {}

    def hook(_m, args, kwargs):
        seen["x"], seen["kwargs"] = args[0], kwargs

    handle = model.model.layers[1].register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(ids, use_cache=False)  # a cache in the kwargs would grow with every rerun of the layer
    handle.remove()
    return seen["x"], seen["kwargs"]


def _branch_output(layer, name: str, x, kwargs):
    """(the layer's output, its post-branch norm's input and output) for one run of ``layer``."""
    proj, norm = BRANCHES[name]
    got = {}
    h = layer.get_submodule(norm).register_forward_hook(lambda m, i, o: got.update(z=i[0], out=o))
    with torch.no_grad():
        out = layer(x, **kwargs)
    h.remove()
    return (out[0] if isinstance(out, tuple) else out), got["z"], got["out"]


def _by_hand(z, t, gain, eps):
    """gain ⊙ unit(z·T), written out without the adapter."""
    y = z.double() @ t.double()
    return gain.double() * y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("family", GEMMAS)
@pytest.mark.parametrize("branch", ["attn", "mlp"])
def test_a_folded_map_and_gain_compute_what_the_unfolded_formula_does(family, branch):
    model = make_model(family, 4)
    adapter = ArchAdapter(model)
    x, kwargs = _layer_io(model, calib_ids(2, 12))
    layer = model.model.layers[1]
    _, z, _ = _branch_output(layer, branch, x, kwargs)
    torch.manual_seed(3)
    t = torch.eye(64) + 0.3 * torch.randn(64, 64)
    gain = 1.0 + 0.5 * torch.rand(64)
    folded = copy.deepcopy(layer)
    adapter.fold_output_map(folded, t, branch, gain)
    _, _, out = _branch_output(folded, branch, x, kwargs)
    eps = layer.get_submodule(BRANCHES[branch][1]).eps
    torch.testing.assert_close(out.double(), _by_hand(z, t, gain, eps), rtol=1e-4, atol=1e-5)
    # the fold touched only the branch's projection and its norm
    changed = {n for n, p in folded.named_parameters() if not torch.equal(p, layer.get_parameter(n))}
    assert changed == {f"{BRANCHES[branch][0]}.weight", f"{BRANCHES[branch][1]}.weight"}


def test_a_map_under_a_post_norm_needs_its_gain_and_a_plain_branch_takes_none():
    gemma, llama = make_model("gemma2", 2), make_model("llama", 2)
    with pytest.raises(PlanError, match="needs a refitted norm gain"):
        ArchAdapter(gemma).fold_output_map(gemma.model.layers[0], torch.eye(64), "mlp")
    with pytest.raises(PlanError, match="takes no norm gain"):
        ArchAdapter(llama).fold_output_map(llama.model.layers[0], torch.eye(64), "mlp", torch.ones(64))


def _fit(layer, adapter, branch, x, kwargs, target, ridge=0.0):
    fit = BranchFit(adapter, layer, branch)
    assert fit.phases == ("map", "gain")
    while fit.phase:
        with fit.capture() as captured:
            with torch.no_grad():
                out = layer(x, **kwargs)
        fit.add(captured, out[0] if isinstance(out, tuple) else out, target)
        fit.solve(ridge, "test", "identity")
    return fit


@pytest.mark.parametrize("family", GEMMAS)
def test_the_fit_recovers_a_map_that_exists_exactly(family):
    """A target made by the same layer with an orthogonal map folded before its MLP's norm (the norm keeps that
    map's effect linear): the fit finds a layer whose output equals it."""
    branch = "mlp"
    model = make_model(family, 4, seed=1)
    adapter = ArchAdapter(model)
    x, kwargs = _layer_io(model, calib_ids(8, 32, seed=2))
    layer = model.model.layers[1]
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(5)))
    truth = copy.deepcopy(layer)
    adapter.fold_output_map(truth, q, branch, adapter.norm_gain(adapter.post_norm(layer, branch)))
    target, _, _ = _branch_output(truth, branch, x, kwargs)
    before, _, _ = _branch_output(layer, branch, x, kwargs)
    fitted = copy.deepcopy(layer)
    fit = _fit(fitted, adapter, branch, x, kwargs, target)
    after, _, _ = _branch_output(fitted, branch, x, kwargs)
    assert (after - target).norm() < 1e-4 * (before - target).norm()
    assert set(fit.tensors) == {"map", "gain"}


@pytest.mark.parametrize("branch", ["attn", "mlp"])
def test_the_fit_lowers_the_error_of_a_gain_and_map_it_cannot_express_exactly(branch):
    model = make_model("gemma2", 4, seed=3)
    adapter = ArchAdapter(model)
    x, kwargs = _layer_io(model, calib_ids(8, 32, seed=4))
    layer = model.model.layers[1]
    # the target: the next layer's output, as when layer 2 is removed and layer 1 must stand in for both
    with torch.no_grad():
        mid = layer(x, **kwargs)
        target = model.model.layers[2](mid[0] if isinstance(mid, tuple) else mid, **kwargs)
        target = target[0] if isinstance(target, tuple) else target
    before, _, _ = _branch_output(layer, branch, x, kwargs)
    fitted = copy.deepcopy(layer)
    fit = _fit(fitted, adapter, branch, x, kwargs, target)
    after, _, _ = _branch_output(fitted, branch, x, kwargs)
    assert (after - target).norm() < 0.9 * (before - target).norm()
    assert set(fit.tensors) == ({"map", "gain"} if branch == "mlp" else {"attn_map", "attn_gain"})


@pytest.mark.parametrize("family", GEMMAS)
def test_slm_plus_and_replaceme_plan_gemma_by_default_and_the_saved_plan_rebuilds_the_model(family, tmp_path):
    model = make_model(family, 8, seed=2)
    ids = calib_ids(3, 16, seed=9)
    for method, roles in (("slm-plus", {"attn_map", "attn_gain", "map", "gain"}), ("replaceme", {"map", "gain"})):
        plan = compress(model, method, calib_ids(8, 16), fit=calib_ids(96, 16, seed=1), cache=False, num_layers=2)
        (op,) = plan.stages[0].ops
        assert set(op["tensors"]) == roles
        plan.save(tmp_path / f"{method}.json")
        again = CompressionPlan.load(tmp_path / f"{method}.json")
        with torch.no_grad():
            a = apply_plan(copy.deepcopy(model), plan)(ids).logits
            b = apply_plan(copy.deepcopy(model), again)(ids).logits
        torch.testing.assert_close(a, b)


def test_slm_plus_lowers_the_window_error_on_gemma_against_deleting_the_same_layers():
    model = make_model("gemma3_text", 8, seed=4)
    fit = calib_ids(96, 24, seed=6)
    kw = dict(search="greedy", num_layers=2, cache=False, fit=fit)
    fitted = compress(model, "slm-plus", calib_ids(4, 16), **kw)
    (low, high), = [op["layers"] for op in fitted.stages[0].ops]
    plain_plan = compress(model, "drop", layers=list(range(low + 1, high + 1)), cache=False)
    a, b = apply_plan(copy.deepcopy(model), fitted), apply_plan(copy.deepcopy(model), plain_plan)
    with torch.no_grad():
        base = model.model(fit, output_hidden_states=True).hidden_states[high + 1]
        err = [float((m.model(fit, output_hidden_states=True).hidden_states[low + 1] - base).pow(2).sum())
               for m in (a, b)]
    assert err[0] < 0.9 * err[1]


def test_a_plan_without_the_gains_is_refused_for_gemma_and_one_with_gains_for_llama(tmp_path):
    model = make_model("gemma2", 6)
    plan = compress(model, "replaceme", calib_ids(4, 16), fit=calib_ids(80, 16), cache=False, num_layers=2)
    stage = plan.stages[0]
    op = stage.ops[0]
    gain = op["tensors"]["gain"]
    stripped = dataclasses.replace(stage, ops=[{**op, "tensors": {"map": op["tensors"]["map"]}}])
    with pytest.raises(PlanError, match=r"needs tensors \{map, gain\} for a gemma2 model"):
        CompressionPlan(base=plan.base, stages=[stripped], tensors={k: v for k, v in plan.tensors.items()
                                                                    if k != gain})
    llama = make_model("llama", 6)
    lplan = compress(llama, "replaceme", calib_ids(4, 16), fit=calib_ids(80, 16), cache=False, num_layers=2)
    lop = lplan.stages[0].ops[0]
    extra = dataclasses.replace(lplan.stages[0], ops=[{**lop, "tensors": {**lop["tensors"], "gain": "g"}}])
    with pytest.raises(PlanError, match=r"needs tensors \{map\} for a llama model"):
        CompressionPlan(base=lplan.base, stages=[extra], tensors={**lplan.tensors, "g": torch.ones(64)})


def test_a_family_without_an_exact_fold_gets_calibrated_by_default_and_an_asked_map_is_refused(monkeypatch):
    # a family whose branches reach the residual stream through something no map folds into
    gemma = families.family_for_type("gemma2")
    unfoldable = dataclasses.replace(gemma, branches=tuple(dataclasses.replace(b, projection="")
                                                           for b in gemma.branches))
    monkeypatch.setitem(families._BY_MODEL_TYPE, "gemma2", unfoldable)
    model = make_model("gemma2", 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = compress(model, "slm-plus", calib_ids(4, 16), fit=calib_ids(80, 16), cache=False, num_layers=2)
    assert [op["rule"] for op in plan.stages[0].ops] == ["calibrated"]
    assert plan.stages[0].params["merge"] == "calibrated"
    said = [str(w.message) for w in caught if "slm-plus" in str(w.message)]
    assert said == ["slm-plus: gemma2 has no exact fold for a fitted map; using merge=calibrated"]
    with pytest.raises(UnsupportedArchitectureError, match="cannot be folded exactly"):
        compress(model, "slm-plus", calib_ids(4, 16), fit=calib_ids(80, 16), cache=False, num_layers=2,
                 merge="lstsq-attn")
    assert "no exact fold" in families.map_fold(unfoldable)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_default_command_compresses_every_family_and_vanilla_transformers_loads_it(family, tiny_tokenizer,
                                                                                      tmp_path):
    """``slm compress --model M --ratio 0.2 --output out`` and nothing else: slm-plus on the wiki-leads default."""
    assert family in SUPPORTED_MODEL_TYPES
    model = make_model(family, 10)
    src = tmp_path / family
    model.save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    out = tmp_path / "out"
    result = run("compress", "--model", str(src), "--ratio", "0.2", "--output", str(out))
    assert result.exit_code == 0, result.output
    plan = CompressionPlan.load(out / "slm_plan.json")
    assert plan.method == "slm-plus" and plan.stages[0].params["merge"] == "lstsq-attn"
    assert plan.quality_check["base_ppl"] > 0 and plan.quality_check["ppl"] > 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 8 and reloaded.config.model_type == family
    with torch.no_grad():
        ours = apply_plan(copy.deepcopy(model), plan)(calib_ids(2, 12)).logits
        theirs = reloaded(calib_ids(2, 12)).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_list_shows_how_each_family_gets_its_maps():
    result = run("list")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    start = lines.index("Families (model_type: how the default method's fitted maps reach the checkpoint):")
    shown = {line.split()[0]: line for line in lines[start + 1:] if line.startswith("    ")}
    assert set(shown) == set(SUPPORTED_MODEL_TYPES)
    assert "post-branch norms" in shown["gemma2"] and "post-branch norms" not in shown["llama"]


def test_a_refused_fold_is_one_line_through_the_cli(tiny_tokenizer, tmp_path, monkeypatch):
    gemma = families.family_for_type("gemma2")
    unfoldable = dataclasses.replace(gemma, branches=tuple(dataclasses.replace(b, projection="")
                                                           for b in gemma.branches))
    monkeypatch.setitem(families._BY_MODEL_TYPE, "gemma2", unfoldable)
    src = tmp_path / "g"
    make_model("gemma2", 6).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    result = run("compress", "--model", str(src), "--num-layers", "2", "--merge", "lstsq-attn",
                 "--calib-samples", "4", "--calib-seq-len", "16", "--output", str(tmp_path / "o"))
    assert_one_line(result, 2, "cannot be folded exactly")
    assert not (tmp_path / "o").exists()
