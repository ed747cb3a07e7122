"""Prune&Comp (``prune-comp``): the scale formula by hand, the pass against a literal transcription of the official
loop (CosSim_BI.py + magcomp.py), rounds re-measured on the compressed model, the ``rescale`` op (what it scales,
exactly; validation; tied heads; Gemma's post-branch norms), plan round trips, the lazy engine, and the CLI's
checkpoint reloaded by vanilla transformers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from conftest import CLI_CALIB, calib_ids, make_config, make_model, run, write_corpus

from optimum_slm import apply_plan, compress, load_model
from optimum_slm.arch import ArchAdapter
from optimum_slm.errors import PassError, PlanError
from optimum_slm.passes.depth.prune_comp import channel_magnitudes, compensation_scale
from optimum_slm.plan import CompressionPlan, drop_op, merge_op
from optimum_slm.plan.stream_ops import rescale_op

#: branch-output factors that give a 6-layer toy model a layer order worth testing: layer 2 nearly an identity (goes
#: first), layers 4-5 strong (stay); the compensated loop's third choice differs from the uncompensated one's
SHAPE = (1.0, 1.0, 0.3, 1.0, 4.0, 4.0)


def shaped(family: str = "llama", factors=SHAPE, seed: int = 0, **config):
    torch.manual_seed(seed)
    cfg = make_config(family, len(factors))
    for key, value in config.items():
        setattr(cfg, key, value)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    adapter = ArchAdapter(model)
    for layer, f in zip(adapter.layers, factors):
        adapter.scale_branches(layer, f)
    return model.eval()


# ------------------------------------------------------------------ the official computation, literally
def _official_block_influence(x: torch.Tensor, y: torch.Tensor) -> float:
    """CosSim_BI.py ``block_influence``: tokens flattened, cos per token, NaN -> 0.5, Σ(1 − cos)."""
    d = x.shape[-1]
    x, y = x.reshape(-1, d), y.reshape(-1, d)
    cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
    return float((1 - cos.nan_to_num(nan=0.5)).sum())


def _hidden_in(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # transformers 4 returned a tuple, 5 the tensor


def official_prune_comp(model, ids: torch.Tensor, num_to_prune: int, fuse: bool = True):
    """CosSim_BI.py's main loop with magcomp.py, step by step on a copy changed in place: one forward per sample
    with hooks for BI; argsort; hooks on layers p and p+1 for the scale (the top layer's output where p is the last
    layer: the official code raises IndexError there); delete layer p; ``fuse_scale``. Returns (removed base layers,
    scales, BI lists per round, the model)."""
    model = copy.deepcopy(model)
    decoder = model.model
    gone = [False] * len(decoder.layers)
    removed, scales, bis = [], [], []
    samples = [ids[n : n + 1] for n in range(ids.shape[0])]
    for _ in range(num_to_prune):
        layers = decoder.layers
        bi = [0.0] * len(layers)

        def on_layer(k):
            def hook(module, args, kwargs, out):
                bi[k] += _official_block_influence(_hidden_in(args, kwargs), _hidden_out(out))
            return hook

        handles = [layer.register_forward_hook(on_layer(k), with_kwargs=True) for k, layer in enumerate(layers)]
        with torch.no_grad():
            for batch in samples:
                model(batch, use_cache=False)
        for h in handles:
            h.remove()
        order = sorted(range(len(bi)), key=lambda k: bi[k])
        start = order[0]
        seen = {}
        handles = [layers[start].register_forward_pre_hook(
            lambda m, a, k: seen.__setitem__("i", _hidden_in(a, k)), with_kwargs=True)]
        if start + 1 < len(layers):
            handles.append(layers[start + 1].register_forward_pre_hook(
                lambda m, a, k: seen.__setitem__("j", _hidden_in(a, k)), with_kwargs=True))
        else:
            handles.append(layers[start].register_forward_hook(
                lambda m, a, k, o: seen.__setitem__("j", _hidden_out(o)), with_kwargs=True))
        total = torch.zeros(1)
        with torch.no_grad():
            for batch in samples:
                model(batch, use_cache=False)
                magnitude = lambda h: h.abs().mean(dim=0, keepdim=True).mean(dim=1, keepdim=True)  # noqa: E731
                total = total + magnitude(seen["j"]) / magnitude(seen["i"])
        for h in handles:
            h.remove()
        scale = (total / len(samples)).mean()
        decoder.layers = torch.nn.ModuleList([layer for k, layer in enumerate(layers) if k != start])
        if fuse:
            decoder.embed_tokens.weight.data *= scale
            for k, layer in enumerate(decoder.layers):
                if k < start:
                    layer.self_attn.o_proj.weight.data *= scale
                    layer.mlp.down_proj.weight.data *= scale
        alive = [i for i, g in enumerate(gone) if not g]
        gone[alive[start]] = True
        removed.append(alive[start])
        scales.append(float(scale))
        bis.append(bi)
    return removed, scales, bis, model


def official_fuse(model, removed: list[int], scales: list[float]):
    """``fuse_scale`` after each removal with given scales (no measuring): the official fold, by itself."""
    model = copy.deepcopy(model)
    decoder = model.model
    alive = list(range(len(decoder.layers)))
    for base, s in zip(removed, scales):
        p = alive.index(base)
        alive.pop(p)
        decoder.layers = torch.nn.ModuleList([layer for k, layer in enumerate(decoder.layers) if k != p])
        scale = torch.tensor(s, dtype=torch.float32)
        decoder.embed_tokens.weight.data *= scale
        for layer in list(decoder.layers)[:p]:
            layer.self_attn.o_proj.weight.data *= scale
            layer.mlp.down_proj.weight.data *= scale
    return model


def _layer_weights(model) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach() for k, v in layer.state_dict().items()} for layer in ArchAdapter(model).layers]


# ------------------------------------------------------------------ the scale, by hand
def test_scale_formula_on_hand_made_tensors():
    # two samples, two tokens, two channels: |h| averaged over tokens per sample and channel
    before = torch.tensor([[[1.0, -2.0], [-1.0, 2.0]], [[0.5, 1.0], [-1.5, -1.0]]])
    after = torch.tensor([[[2.0, 2.0], [-2.0, 2.0]], [[3.0, 1.0], [-3.0, 1.0]]])
    mb, ma = channel_magnitudes(before), channel_magnitudes(after)
    assert mb.tolist() == [[1.0, 2.0], [1.0, 1.0]] and ma.tolist() == [[2.0, 2.0], [3.0, 1.0]]
    # ratios [[2, 1], [3, 1]] -> over samples [2.5, 1] -> over channels 1.75 (a mean of ratios, not a ratio of means)
    assert compensation_scale(mb, ma) == 1.75
    assert compensation_scale(ma, mb) == pytest.approx((0.5 + 1 + 1 / 3 + 1) / 4)


# ------------------------------------------------------------------ the pass against the official loop
@pytest.mark.parametrize("family", ["llama", "mistral", "phi3"])
def test_pass_matches_the_official_loop(family):
    model = shaped(family)
    ids = calib_ids(4, 16)
    removed, scales, bis, reference = official_prune_comp(model, ids, 3)
    plan = compress(model, "prune-comp", ids, cache=False, num_layers=3)
    trace = plan.stages[0].trace
    assert trace["removal_order"] == removed
    assert trace["scales"] == pytest.approx(scales, rel=1e-5)
    for entry, bi in zip(trace["rounds"], bis):
        alive = sorted(int(i) for i in entry["block_influence"])
        assert [entry["block_influence"][str(i)] for i in alive] == pytest.approx(bi, rel=1e-5)
    # two ops a round: drop the layer, rescale the embedding and every alive layer below it
    alive = list(range(6))
    for k, (b, s) in enumerate(zip(removed, trace["scales"])):
        p = alive.index(b)
        alive.pop(p)
        assert plan.ops[2 * k : 2 * k + 2] == [drop_op([b]), rescale_op(alive[:p], s)]
    ours = apply_plan(copy.deepcopy(model), plan)
    probe = calib_ids(2, 12, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(ours(probe).logits, reference(probe, use_cache=False).logits, rtol=1e-4, atol=1e-5)
    # the fold itself: the official in-place fold with the plan's scales gives the very same tensors
    folded = official_fuse(model, trace["removal_order"], trace["scales"])
    assert torch.equal(ours.model.embed_tokens.weight, folded.model.embed_tokens.weight)
    for a, b in zip(_layer_weights(ours), _layer_weights(folded)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compensate_false_is_the_loop_without_the_fold():
    # gemma2 is not needed: on this llama the compensated loop's third choice (3) differs from the plain loop's (0)
    model = shaped("llama")
    ids = calib_ids(4, 16)
    removed, _, _, _ = official_prune_comp(model, ids, 3, fuse=False)
    plan = compress(model, "prune-comp", ids, cache=False, num_layers=3, compensate=False)
    assert plan.stages[0].trace["removal_order"] == removed == [2, 1, 0]
    assert plan.ops == [drop_op(removed)]
    assert compress(model, "prune-comp", ids, cache=False, num_layers=3).stages[0].trace["removal_order"] == [2, 1, 3]


def test_rounds_are_measured_on_the_compressed_model():
    # round r's BI and scale are those of the model the first r rounds' ops build: measured there with hooks
    model = shaped("llama")
    ids = calib_ids(4, 16)
    plan = compress(model, "prune-comp", ids, cache=False, num_layers=3)
    trace = plan.stages[0].trace
    for r in (1, 2):
        prefix = CompressionPlan.single(plan.base, "prune-comp", plan.ops[: 2 * r])
        partial = apply_plan(copy.deepcopy(model), prefix)
        bi = [0.0] * len(partial.model.layers)
        handles = [layer.register_forward_hook(
            lambda m, a, k, o, i=i: bi.__setitem__(i, bi[i] + _official_block_influence(_hidden_in(a, k),
                                                                                         _hidden_out(o))),
            with_kwargs=True) for i, layer in enumerate(partial.model.layers)]
        with torch.no_grad():
            partial(ids, use_cache=False)
        for h in handles:
            h.remove()
        recorded = trace["rounds"][r]["block_influence"]
        alive = sorted(int(i) for i in recorded)
        assert [recorded[str(i)] for i in alive] == pytest.approx(bi, rel=1e-5)
        # and not the base's BI with the removed layers left out: the earlier rounds changed them
        base = trace["rounds"][0]["block_influence"]
        assert [recorded[str(i)] for i in alive] != pytest.approx([base[str(i)] for i in alive], rel=1e-3)
    # the one-shot order (the base's BI) would remove 0 third; re-measuring after the compensations removes 3
    assert trace["initial_order"][:3] == [2, 1, 0] and trace["removal_order"] == [2, 1, 3]


def test_protect_keeps_layers_out_of_every_round():
    model = shaped("llama")
    plan = compress(model, "prune-comp", calib_ids(4, 16), cache=False, num_layers=3, protect=[1, 2])
    removed = plan.stages[0].trace["removal_order"]
    assert len(removed) == 3 and not {1, 2} & set(removed)
    with pytest.raises(PassError, match="only 2 removable layers"):
        compress(model, "prune-comp", calib_ids(4, 16), cache=False, num_layers=3, protect=[0, 1, 2, 3])


# ------------------------------------------------------------------ the rescale op
@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_rescale_scales_the_stream_entering_the_cut(family):
    # every alive layer below the cut rescaled with the embedding: the stream entering the cut is s times the base's
    # (exactly, but for the norms' ε: made negligible here); gemma2 scales its post-branch norm gains
    model = make_model(family, 6)
    for m in model.modules():
        if hasattr(m, "eps"):
            m.eps = 1e-30
        if hasattr(m, "variance_epsilon"):
            m.variance_epsilon = 1e-30
    ids = calib_ids(2, 12)
    plan = CompressionPlan.for_model(model, "test", [rescale_op([0, 1, 2], 1.75)])
    scaled = apply_plan(copy.deepcopy(model), plan)
    seen = {}
    with torch.no_grad():
        for name, m in (("base", model), ("scaled", scaled)):
            h = m.model.layers[3].register_forward_pre_hook(
                lambda mod, a, k, name=name: seen.__setitem__(name, _hidden_in(a, k)), with_kwargs=True)
            m(ids, use_cache=False)
            h.remove()
    # float32 rounding of the residual sums only (Gemma's stream is √d larger)
    torch.testing.assert_close(seen["scaled"], 1.75 * seen["base"], rtol=1e-5, atol=2e-5)


def test_a_tied_head_keeps_its_logits():
    # the official in-place embedding *= s would scale a tied head's logits too; the final norm takes 1/s instead
    model = shaped("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = shaped("llama")
    untied.load_state_dict(model.state_dict())  # the same weights, the head a separate tensor
    ids = calib_ids(4, 16)
    plan = compress(model, "prune-comp", ids, cache=False, num_layers=2)
    ours = apply_plan(copy.deepcopy(model), plan)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # still tied: the checkpoint stays plain
    trace = plan.stages[0].trace
    reference = official_fuse(untied, trace["removal_order"], trace["scales"])
    probe = calib_ids(2, 12, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(ours(probe).logits, reference(probe, use_cache=False).logits, rtol=1e-5, atol=1e-5)
    product = trace["scales"][0] * trace["scales"][1]
    torch.testing.assert_close(ours.model.norm.weight, model.model.norm.weight / product)


def test_rescale_op_validation_and_numbering():
    model = make_model("llama", 6)
    base = CompressionPlan.for_model(model, "test", [drop_op([3])]).base
    bad = [
        ({"op": "rescale", "layers": [0, 1], "scale": 0}, "finite number > 0"),
        ({"op": "rescale", "layers": [0, 1], "scale": -1.5}, "finite number > 0"),
        ({"op": "rescale", "layers": [0, 1], "scale": True}, "finite number > 0"),
        ({"op": "rescale", "layers": [0, 1], "scale": "1.5"}, "finite number > 0"),
        ({"op": "rescale", "layers": [1, 0], "scale": 1.5}, "increasing"),
        ({"op": "rescale", "layers": [0, 9], "scale": 1.5}, "out of range"),
        ({"op": "rescale", "layers": [0], "scale": 1.5, "factor": 2}, "unknown keys"),
    ]
    for op, message in bad:
        with pytest.raises(PlanError, match=message):
            CompressionPlan.single(base, "test", [op])
    with pytest.raises(PlanError, match="already removed"):
        CompressionPlan.single(base, "test", [drop_op([1]), rescale_op([0, 1], 1.5)])
    # a rescaled layer no longer holds its base weights: a merge (which reads the base's) refuses it
    with pytest.raises(PlanError, match="no longer a base layer"):
        CompressionPlan.single(base, "test", [rescale_op([0, 1], 1.5), merge_op(1, 2, "keep-bottom")])
    plan = CompressionPlan.single(base, "test", [drop_op([3]), rescale_op([], 1.5)])  # the embedding alone
    assert plan.describe_ops() == ["drop 3", "rescale x1.5 (embedding)"]
    assert CompressionPlan.single(base, "t", [rescale_op([0, 1, 2, 4], 1.25)]).describe_ops() == [
        "rescale x1.25 (embedding + layers 0-2, 4)"]
    # a later stage's positions map back to base layers
    from optimum_slm.plan import kind_of

    op = rescale_op([0, 1, 2], 1.5)
    assert kind_of(op).to_base(op, [0, 2, 4, 5]) == rescale_op([0, 2, 4], 1.5)


def test_plan_round_trip_gives_identical_weights(tmp_path):
    model = shaped("gemma2")
    plan = compress(model, "prune-comp", calib_ids(4, 16), cache=False, num_layers=2)
    plan.save(tmp_path / "plan.json")
    loaded = CompressionPlan.load(tmp_path / "plan.json")
    assert loaded.to_json() == plan.to_json()
    a = apply_plan(copy.deepcopy(model), plan).state_dict()
    b = apply_plan(copy.deepcopy(model), loaded).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], model.state_dict()["model.embed_tokens.weight"])


def test_a_lazy_model_gives_the_same_plan_and_checkpoint(tmp_path, tiny_tokenizer):
    from optimum_slm.calibration import CalibrationConfig
    from optimum_slm.engine import load_lazy_model
    from optimum_slm.engine.budget import MemoryBudget
    from optimum_slm.io.checkpoint import save_model
    from safetensors.torch import load_file

    path = tmp_path / "sharded"
    shaped("llama").save_pretrained(path, max_shard_size="100KB")
    tiny_tokenizer.save_pretrained(path)
    cal = CalibrationConfig(write_corpus(tmp_path / "c.txt"), 4, 16)
    full, tok = load_model(str(path))
    lazy = load_lazy_model(str(path))
    a = compress(full, "prune-comp", cal, tokenizer=tok, cache=False, num_layers=2)
    b = compress(lazy, "prune-comp", cal, tokenizer=tok, cache=False, budget=MemoryBudget(1), num_layers=2)
    assert a.ops == b.ops and a.stages[0].trace == b.stages[0].trace
    save_model(apply_plan(full, a), str(tmp_path / "mem"))
    save_model(apply_plan(lazy, b), str(tmp_path / "lazy"))
    x, y = load_file(str(tmp_path / "mem" / "model.safetensors")), load_file(str(tmp_path / "lazy" / "model.safetensors"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_cli_checkpoint_reloads_in_vanilla_transformers(tiny_checkpoint, corpus, tmp_path):
    out = tmp_path / "out"
    result = run("compress", "--model", tiny_checkpoint, "--method", "prune-comp", "--num-layers", "2",
                 "--calib-data", corpus, *CLI_CALIB, "--output", str(out))
    assert result.exit_code == 0, result.output
    plan = CompressionPlan.load(out / "slm_plan.json")
    assert [op["op"] for op in plan.ops] == ["drop", "rescale", "drop", "rescale"]
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and "slm_layer_widths" not in config
    assert "arxiv.org/abs/2507.18212" in (out / "README.md").read_text()  # the card names the paper
    plain = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base, _ = load_model(tiny_checkpoint)
    rebuilt = apply_plan(base, plan)
    probe = calib_ids(2, 12, seed=5)
    with torch.no_grad():
        assert torch.equal(plain(probe).logits, rebuilt(probe).logits)
    # ... and it is not the plain deletion: the embedding carries the scales
    deleted, _ = load_model(tiny_checkpoint)
    ArchAdapter(deleted).remove_layers(plan.stages[0].trace["removal_order"])
    assert not torch.equal(plain.model.embed_tokens.weight, deleted.model.embed_tokens.weight)
    compensated = run("compress", "--model", tiny_checkpoint, "--method", "prune-comp", "--num-layers", "2",
                      "--param", "compensate=false", "--calib-data", corpus, *CLI_CALIB, "--output", str(tmp_path / "n"))
    assert compensated.exit_code == 0, compensated.output
    assert [op["op"] for op in CompressionPlan.load(tmp_path / "n" / "slm_plan.json").ops] == ["drop"]
