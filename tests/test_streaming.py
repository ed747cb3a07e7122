"""The sequential engine and streamed writing: a lazy model (layers read from safetensors shards while they run)
gives the same plans, the same quality check and the same checkpoint tensors as the in-memory path."""

from __future__ import annotations

import glob
import os

import pytest
import torch
from click.testing import CliRunner
from conftest import calib_ids, make_model, write_corpus
from safetensors.torch import load_file

from optimum_slm import CalibrationConfig, apply_plan, compress, load_model
from optimum_slm.cli import cli
from optimum_slm.cli.commands import parse_size
from optimum_slm.engine import SequentialEngine, engine_for, is_lazy_model, load_lazy_model
from optimum_slm.engine.budget import MemoryBudget
from optimum_slm.io.checkpoint import save_model

import click


@pytest.fixture
def sharded(tmp_path, tiny_tokenizer):
    """A 6-layer tiny Llama saved in several shards (with an index), and a corpus."""
    path = tmp_path / "sharded"
    make_model("llama", 6).save_pretrained(path, max_shard_size="100KB")
    tiny_tokenizer.save_pretrained(path)
    assert os.path.isfile(path / "model.safetensors.index.json")
    return str(path)


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in glob.glob(os.path.join(folder, "*.safetensors")):
        if not os.path.basename(f).startswith("slm_plan"):
            out.update(load_file(f))
    return out


def test_lazy_model_holds_no_layer_weights(sharded):
    lazy, _ = load_model(sharded, lazy=True)
    assert is_lazy_model(lazy) and engine_for(lazy) is SequentialEngine
    assert all(p.is_meta for p in lazy.model.layers.parameters())
    assert not lazy.model.embed_tokens.weight.is_meta and not lazy.model.norm.weight.is_meta


@pytest.mark.parametrize("method, params", [
    ("slm-plus", {"ratio": 0.34}),
    ("slm", {"num_layers": 2}),
    ("sleb", {"num_layers": 2}),
    ("shortgpt", {"num_layers": 2}),
    ("angular", {"num_layers": 2}),
    ("replaceme", {"num_layers": 2}),
    ("linearpatch", {"num_layers": 2}),
    ("slm-plus", {"ratio": 0.34, "fit_order": "bottom-up"}),
    ("slm-plus", {"ratio": 0.34, "granularity": "sublayer"}),
    ("slm-plus", {"ratio": 0.5, "granularity": "sublayer", "fit_order": "bottom-up"}),
    ("slm-plus", {"ratio": 0.34, "refine_epochs": 2}),
    ("laco", {"num_layers": 2, "merge_layers": 3}),
    ("shortened-ppl", {"num_layers": 1, "keep_first": 1, "keep_last": 1}),
    ("shortened-taylor", {"num_layers": 1, "keep_first": 1, "keep_last": 1, "batch_size": 2}),
    ("shortened-magnitude", {"num_layers": 1, "keep_first": 1, "keep_last": 1}),
    ("flap", {"ratio": 0.2}),
    ("flap", {"ratio": 0.2, "structure": "AL-AM"}),
    ("minitron-width", {"ratio": 0.2}),
    ("taylor-width", {"ratio": 0.2}),
    ("taylor-width", {"ratio": 0.2, "layer_start": 2, "layer_end": 5, "batch_size": 2}),
])
def test_sequential_plans_equal_in_memory_plans(sharded, tmp_path, method, params):
    corpus = write_corpus(tmp_path / "c.txt")
    cal = CalibrationConfig(corpus, 4, 16, fit_samples=8, fit_seq_len=16)
    full, tok = load_model(sharded)
    lazy = load_lazy_model(sharded)
    a = compress(full, method, cal, tokenizer=tok, cache=False, **params)
    # a 1-byte budget: recorded activations go to disk
    b = compress(lazy, method, cal, tokenizer=tok, cache=False, budget=MemoryBudget(1), **params)
    assert a.base == b.base  # the fingerprint computed from the files equals the loaded model's
    assert a.ops == b.ops
    trace_a, trace_b = a.stages[0].trace, b.stages[0].trace
    for trace in (trace_a, trace_b):  # wall times (sleb records one per round) are not part of what was found
        for entry in trace.get("rounds", []):
            entry.pop("seconds", None)
    assert trace_a == trace_b
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    # the lazy model rebuilt from the plan writes the checkpoint the in-memory model writes
    save_model(apply_plan(full, a), str(tmp_path / "mem"))
    save_model(apply_plan(lazy, b), str(tmp_path / "lazy"))
    x, y = _tensors(tmp_path / "mem"), _tensors(tmp_path / "lazy")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_layer_types_survive_the_probe(tmp_path, tiny_tokenizer):
    """Gemma-3 mixes sliding and full attention: each layer must get its own mask and rotary table."""
    path = tmp_path / "gemma"
    make_model("gemma3_text", 6).save_pretrained(path, max_shard_size="100KB")
    tiny_tokenizer.save_pretrained(path)
    cal = CalibrationConfig(write_corpus(tmp_path / "c.txt"), 4, 32)
    full, tok = load_model(str(path))
    lazy = load_lazy_model(str(path))
    for method in ("slm", "sleb"):
        a = compress(full, method, cal, tokenizer=tok, cache=False, num_layers=2)
        b = compress(lazy, method, cal, tokenizer=tok, cache=False, num_layers=2)
        assert a.ops == b.ops
        for k in ("similarity_by_window", "scores"):
            assert a.stages[0].trace.get(k) == b.stages[0].trace.get(k)


def test_cli_max_memory_writes_the_same_checkpoint(sharded, tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    common = ["-q", "compress", "--model", sharded, "--calib-data", corpus, "--calib-samples", "4",
              "--calib-seq-len", "16", "--fit-samples", "8", "--fit-seq-len", "16", "--ratio", "0.34", "--no-cache"]
    runner = CliRunner()
    mem = runner.invoke(cli, [*common, "--output", str(tmp_path / "mem")], catch_exceptions=False)
    lazy = runner.invoke(cli, [*common, "--max-memory", "1KB", "--output", str(tmp_path / "lazy")],
                         catch_exceptions=False)
    assert mem.exit_code == 0 and lazy.exit_code == 0, (mem.output, lazy.output)
    assert "streaming the decoder layers" in lazy.stderr
    assert _tensors(tmp_path / "mem").keys() == _tensors(tmp_path / "lazy").keys()
    assert all(torch.equal(v, _tensors(tmp_path / "lazy")[k]) for k, v in _tensors(tmp_path / "mem").items())
    check = [line for line in mem.output.splitlines() if line.startswith("quality check")]
    assert check and check == [line for line in lazy.output.splitlines() if line.startswith("quality check")]
    applied = runner.invoke(cli, ["-q", "apply", "--model", sharded, "--plan", str(tmp_path / "lazy" / "slm_plan.json"),
                                  "--max-memory", "1KB", "--output", str(tmp_path / "applied")], catch_exceptions=False)
    assert applied.exit_code == 0, applied.output
    x, y = _tensors(tmp_path / "mem"), _tensors(tmp_path / "applied")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("width", ["flap", "taylor-width"])
def test_a_depth_and_width_recipe_streams_to_the_same_checkpoint(sharded, tmp_path, width):
    """Stages plan on the lazy model the earlier stages produced; the written tensors equal the in-memory run's."""
    corpus = write_corpus(tmp_path / "c.txt")
    (tmp_path / "r.yaml").write_text(f"stages:\n  - method: slm-plus\n    num_layers: 2\n  - method: {width}\n"
                                     "    ratio: 0.3\n")
    common = ["-q", "compress", "--model", sharded, "--recipe", str(tmp_path / "r.yaml"), "--calib-data", corpus,
              "--calib-samples", "4", "--calib-seq-len", "16", "--no-cache"]
    runner = CliRunner()
    mem = runner.invoke(cli, [*common, "--output", str(tmp_path / "mem")], catch_exceptions=False)
    lazy = runner.invoke(cli, [*common, "--max-memory", "1KB", "--output", str(tmp_path / "lazy")],
                         catch_exceptions=False)
    assert mem.exit_code == 0 and lazy.exit_code == 0, (mem.output, lazy.output)
    assert "streaming the decoder layers" in lazy.stderr and f"stage 2: method: {width}" in lazy.stdout
    x, y = _tensors(tmp_path / "mem"), _tensors(tmp_path / "lazy")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    check = [line for line in mem.output.splitlines() if line.startswith("quality check")]
    assert check and check == [line for line in lazy.output.splitlines() if line.startswith("quality check")]


def test_applying_width_ops_to_a_lazy_model_keeps_its_layers_on_disk(sharded, tmp_path):
    """Every narrowed layer goes to the spill store after its op: no decoder layer weights stay in memory."""
    corpus = write_corpus(tmp_path / "c.txt")
    full, tok = load_model(sharded)
    plan = compress(full, "flap", CalibrationConfig(corpus, 4, 16), tokenizer=tok, cache=False, ratio=0.3)
    lazy = apply_plan(load_lazy_model(sharded), plan)
    assert all(p.is_meta for p in lazy.model.layers.parameters())
    assert lazy.model.layers[0].mlp.down_proj.weight.shape[1] < 128
    expected = apply_plan(full, plan)
    ids = calib_ids(2, 8)
    with torch.no_grad():  # the lazy model computes the same function, each layer read from its spill file
        from optimum_slm.engine import ForwardEngine

        a = ForwardEngine(expected, ids).record_layer_inputs().base_final
        b = SequentialEngine(lazy, ids).record_layer_inputs().base_final
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_activations_go_to_disk_when_they_exceed_the_budget(sharded):
    from optimum_slm.engine import ForwardEngine
    from optimum_slm.engine.spill import DiskBatches

    ids = calib_ids(4, 16)
    full, _ = load_model(sharded)
    want = ForwardEngine(full, ids, batch_size=2).record_layer_inputs()
    roomy = SequentialEngine(load_lazy_model(sharded), ids, batch_size=2, budget=MemoryBudget(2**34))
    tight = SequentialEngine(load_lazy_model(sharded), ids, batch_size=2, budget=MemoryBudget(2**16))
    roomy.record_layer_inputs(), tight.record_layer_inputs()
    assert roomy.activations is None and isinstance(roomy.inputs[3], list)
    assert tight.activations is not None and isinstance(tight.inputs[3], DiskBatches)
    assert tight.activations.bytes_written == 7 * 4 * 16 * 64 * 4  # (layers + 1) x tokens x hidden x fp32
    for engine in (roomy, tight):
        assert all(torch.equal(a, b) for i in range(7) for a, b in zip(want.inputs[i], engine.inputs[i]))
    folder = tight.activations._dir.name
    assert len([f for f in os.listdir(folder) if f.endswith(".bin")]) == 7 * 2
    del tight, engine
    import gc

    gc.collect()
    assert not os.path.exists(folder)  # removed with the engine


@pytest.mark.parametrize("method, params", [("slm-plus", {"ratio": 0.34}), ("sleb", {"num_layers": 2}),
                                            ("flap", {"ratio": 0.2}), ("taylor-width", {"ratio": 0.2}),
                                            ("laco", {"num_layers": 2, "merge_layers": 3})])
def test_a_model_dispatched_by_accelerate_gives_the_same_plan_and_model(sharded, tmp_path, method, params):
    """A device-mapped model (accelerate hooks on every layer) is compressed in place like a plain one."""
    from accelerate import dispatch_model

    corpus = write_corpus(tmp_path / "c.txt")
    cal = CalibrationConfig(corpus, 4, 16, fit_samples=8, fit_seq_len=16)
    full, tok = load_model(sharded)
    mapped, _ = load_model(sharded)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "cpu" for i in range(6)}}
    mapped = dispatch_model(mapped, device_map, force_hooks=True)
    assert hasattr(mapped.model.layers[2], "_hf_hook")
    a = compress(full, method, cal, tokenizer=tok, cache=False, **params)
    b = compress(mapped, method, cal, tokenizer=tok, cache=False, **params)
    assert a.ops == b.ops
    ids = calib_ids(2, 10)
    with torch.no_grad():
        assert torch.allclose(apply_plan(full, a)(ids).logits, apply_plan(mapped, b)(ids).logits, atol=1e-6)


def test_resident_layers_cut_reads_and_change_nothing(sharded, tmp_path, monkeypatch):
    """With room in the budget, read layers stay resident (the top ones first): the same plan from fewer reads of
    the checkpoint, and every layer released when the pass ends."""
    from optimum_slm.io.shards import TensorStore

    reads = []
    original = TensorStore.read
    monkeypatch.setattr(TensorStore, "read", lambda self, name: reads.append(name) or original(self, name))
    corpus = write_corpus(tmp_path / "c.txt")
    cal = CalibrationConfig(corpus, 4, 16, fit_samples=8, fit_seq_len=16)
    full, tok = load_model(sharded)
    want = compress(full, "sleb", cal, tokenizer=tok, cache=False, num_layers=2)
    counts = {}
    for budget in (1, 2**30):
        lazy = load_lazy_model(sharded)
        reads.clear()
        plan = compress(lazy, "sleb", cal, tokenizer=tok, cache=False, num_layers=2, budget=MemoryBudget(budget))
        counts[budget] = len(reads)
        assert plan.ops == want.ops
        assert all(p.is_meta for p in lazy.model.layers.parameters())  # released
    assert counts[2**30] * 3 < counts[1]  # each layer read once instead of once per trial stack


@pytest.mark.parametrize("budget", [1, 2**34])
def test_a_streamed_fit_pass_reads_each_layer_once(sharded, monkeypatch, budget):
    """Streamed, the fit set goes layer-outer: every layer up to the highest point is read once per pass whatever
    the number of fit batches (batch-outer it was read once per batch), with the in-memory engine's states; with no
    room the running states go to a temp folder that is gone when the pass ends."""
    from optimum_slm.engine import ForwardEngine
    from optimum_slm.engine import spill
    from optimum_slm.io.shards import TensorStore

    fit = calib_ids(40, 16, seed=5)
    full, _ = load_model(sharded)
    want = [{p: h.clone() for p, h in b.inputs.items()}
            for b in ForwardEngine(full, calib_ids(2, 8), fit_ids=fit, fit_batch_size=16).stream_fit([2, 4])]
    engine = SequentialEngine(load_lazy_model(sharded), calib_ids(2, 8), fit_ids=fit, fit_batch_size=16,
                              budget=MemoryBudget(budget))
    reads, folders = [], []
    original_read, original_folder = TensorStore.read, spill.ActivationFolder.__init__
    monkeypatch.setattr(TensorStore, "read", lambda self, name: reads.append(name) or original_read(self, name))
    monkeypatch.setattr(spill.ActivationFolder, "__init__",
                        lambda self: original_folder(self) or folders.append(self._dir.name))
    got = [{p: h.clone() for p, h in b.inputs.items()} for b in engine.stream_fit([2, 4])]
    per_layer = len([n for n in reads if n.startswith("model.layers.0.")])
    assert per_layer == len(list(engine.adapter.layers[0].parameters()))  # read once, not once per batch (3)
    assert {n.split(".")[2] for n in reads} == {"0", "1", "2", "3"}  # nothing above the highest point
    assert len(got) == len(want) == 3
    for a, b in zip(want, got):
        assert a.keys() == b.keys() and all(torch.equal(a[p], b[p]) for p in a)
    assert engine.fit_layer_tokens == fit.numel() * 5
    assert (len(folders) == 1) == (budget == 1)
    assert not any(os.path.exists(f) for f in folders)  # the pass's temp folder is gone with it
    engine.close()


def test_the_cache_keeps_the_top_layers(sharded):
    engine = SequentialEngine(load_lazy_model(sharded), calib_ids(2, 8), budget=MemoryBudget(2**30))
    engine.record_layer_inputs()
    one_layer = sum(p.numel() * p.element_size() for p in engine.adapter.layers[0].parameters())
    engine.close()
    engine._cache_budget = 2.5 * one_layer  # room for two layers
    for i in range(6):
        with engine.loaded(engine.adapter.layers[i]):
            pass
    resident = [i for i, layer in enumerate(engine.adapter.layers) if not layer.mlp.down_proj.weight.is_meta]
    assert resident == [4, 5]
    engine.close()
    assert all(p.is_meta for p in engine.adapter.layers.parameters())


def test_every_built_in_pass_streams():
    from optimum_slm.registry import pass_classes

    assert [name for name, cls in pass_classes().items() if not cls.streams] == []


def test_the_sequential_backward_gives_the_whole_model_gradients(sharded, tmp_path):
    """Per-parameter gradients, not only the scores the passes keep: layer-by-layer top-down back-propagation on the
    recorded inputs equals one backward of the whole model's loss."""
    from optimum_slm.engine import ForwardEngine

    full, _ = load_model(sharded)
    ids = calib_ids(4, 16)
    want = {(i, name): p.grad.clone() for i, layer in ForwardEngine(full, ids, batch_size=2).layer_gradients()
            for name, p in layer.named_parameters()}
    got = {(i, name): p.grad.clone() for i, layer in SequentialEngine(load_lazy_model(sharded), ids, batch_size=2)
           .layer_gradients() for name, p in layer.named_parameters()}
    assert want.keys() == got.keys()
    assert all(torch.allclose(want[k], got[k], rtol=1e-5, atol=1e-7) for k in want)
    assert all(p.grad is None and p.requires_grad for p in full.parameters())  # left as found


def test_a_plug_in_pass_that_does_not_declare_streaming_is_refused(sharded, tmp_path):
    from optimum_slm import PassResult, hookimpl
    from optimum_slm.passes.base import CompressionPass
    from optimum_slm.registry import register_plugin, unregister_plugin

    class ReadsWeights(CompressionPass):
        name = "reads-weights-test"
        description = "reads a layer's weights directly"

        def run(self, engine):
            float(engine.adapter.layers[0].mlp.down_proj.weight.sum())  # fails on a meta tensor
            return PassResult([{"op": "drop", "layers": [1]}])

    class Plugin:
        @hookimpl
        def register_passes(self, register):
            register(ReadsWeights)

    corpus = write_corpus(tmp_path / "c.txt")
    plugin = Plugin()
    register_plugin(plugin)
    try:
        result = CliRunner().invoke(cli, ["-q", "compress", "--model", sharded, "--method", "reads-weights-test",
                                          "--calib-data", corpus, "--calib-samples", "4", "--calib-seq-len", "16",
                                          "--max-memory", "1KB", "--output", str(tmp_path / "o")])
    finally:
        unregister_plugin(plugin)
    assert result.exit_code == 2
    assert "needs the model in memory" in result.stderr and "taylor-width" in result.stderr
    assert not (tmp_path / "o").exists()


def test_parse_size():
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("500MB") == 500 * 10**6 and parse_size("4096") == 4096
    assert parse_size("1.5GB") == 1_500_000_000
    for bad in ("two", "-1GB", "0", "5XB"):
        with pytest.raises(click.BadParameter):
            parse_size(bad)
