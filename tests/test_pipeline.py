"""One pipeline for every front door: the plan cache is shared, checked against its key, and bypassable; bad plans
are refused in one line by every reader."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
from click.testing import CliRunner

from conftest import calib_ids, make_model, plan_of
from optimum_slm import CalibrationConfig, CompressionPlan, PlanError, apply_plan, compress, get_pass
from optimum_slm.cli import cli
from optimum_slm.errors import PassError
from optimum_slm.plan.cache import PlanCache

CALIB = ["--calib-samples", "4", "--calib-seq-len", "16"]


def slm(*args: str):
    return CliRunner().invoke(cli, ["--quiet", *args], catch_exceptions=False)


def cache_entries() -> list[str]:
    return sorted(glob.glob(os.path.join(os.environ["OPTIMUM_SLM_PLAN_CACHE"], "*.json")))


def test_compress_twice_computes_once_and_lm_eval_reuses_it(tiny_checkpoint, corpus, tmp_path):
    args = ["compress", "--model", tiny_checkpoint, "--method", "slm-plus", "--num-layers", "2", "--calib-data",
            corpus, *CALIB]
    first = slm(*args, "--output", str(tmp_path / "a"))
    assert first.exit_code == 0, first.output
    assert "reused" not in first.stdout and len(cache_entries()) == 1
    second = slm(*args, "--output", str(tmp_path / "b"))
    assert second.exit_code == 0 and "reused the cached plan" in second.stdout
    assert (tmp_path / "a" / "slm_plan.json").read_bytes() == (tmp_path / "b" / "slm_plan.json").read_bytes()
    assert (tmp_path / "b" / "slm_plan.tensors").exists()

    pytest.importorskip("lm_eval")
    from lm_eval_slm.model import SLMLM

    lm = SLMLM(base=tiny_checkpoint, method="slm-plus", num_layers=2, calib=corpus, calib_samples=4,
               calib_seq_len=16, device="cpu", batch_size=1)
    assert lm.slm_plan_reused and lm.slm_plan.ops == CompressionPlan.load(tmp_path / "a" / "slm_plan.json").ops

    fresh = slm(*args, "--no-cache", "--output", str(tmp_path / "c"))
    assert fresh.exit_code == 0 and "reused" not in fresh.stdout


def test_python_api_shares_the_cache_and_says_so(tiny_llama):
    ids = calib_ids(3, 12)
    plan = compress(tiny_llama, "sleb", ids, num_layers=1)
    assert plan.reused_from is None
    again = compress(tiny_llama, "sleb", ids, num_layers=1)
    assert again.reused_from == cache_entries()[0] and again.to_dict() == plan.to_dict()
    assert compress(tiny_llama, "sleb", ids, num_layers=1, cache=False).reused_from is None
    assert compress(tiny_llama, "sleb", calib_ids(3, 12, seed=5), num_layers=1).reused_from is None  # other data


def _edit_entry(change) -> str:
    (path,) = cache_entries()
    data = json.loads(open(path, encoding="utf-8").read())
    change(data)
    text = json.dumps(data)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path


def test_a_tampered_cache_entry_is_recomputed(tiny_llama, caplog):
    ids = calib_ids(3, 12)
    plan = compress(tiny_llama, "sleb", ids, num_layers=1)
    _edit_entry(lambda d: d["stages"][0]["ops"][0].__setitem__("layers", [0]))
    again = compress(tiny_llama, "sleb", ids, num_layers=1)
    assert again.reused_from is None and again.ops == plan.ops
    assert "changed after it was written" in caplog.text
    assert compress(tiny_llama, "sleb", ids, num_layers=1).reused_from  # the rewritten entry serves again


def test_an_entry_that_does_not_answer_its_key_is_recomputed(tiny_llama, caplog):
    """An entry with another base's fingerprint (its digest rewritten too) is recomputed, not an error."""
    import hashlib

    ids = calib_ids(3, 12)
    plan = compress(tiny_llama, "sleb", ids, num_layers=1)
    path = _edit_entry(lambda d: d["base"].__setitem__("fingerprint", "0" * 64))
    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    with open(path[: -len(".json")] + ".sha256", "w", encoding="utf-8") as fh:
        fh.write(digest + "\n")
    again = compress(tiny_llama, "sleb", ids, num_layers=1)
    assert again.reused_from is None and again.ops == plan.ops
    assert "another base" in caplog.text


def test_a_cache_that_is_not_read_still_stores(tiny_llama, tmp_path):
    ids = calib_ids(3, 12)
    store = PlanCache(tmp_path / "c", read=False)
    compress(tiny_llama, "shortgpt", ids, num_layers=1, cache=store)
    assert compress(tiny_llama, "shortgpt", ids, num_layers=1, cache=store).reused_from is None
    assert compress(tiny_llama, "shortgpt", ids, num_layers=1, cache=tmp_path / "c").reused_from


def test_the_engine_is_built_by_the_pipeline_and_handed_to_the_pass(tiny_llama):
    from optimum_slm import PassResult, hookimpl
    from optimum_slm.engine import ForwardEngine
    from optimum_slm.passes.base import CompressionPass
    from optimum_slm.registry import register_plugin, unregister_plugin

    seen = []

    class Probe(CompressionPass):
        name = "probe-engine-test"
        description = "records the engine it gets"

        def run(self, engine):
            seen.append(engine)
            return PassResult([{"op": "drop", "layers": [engine.num_layers - 2]}])

    class Plugin:
        @hookimpl
        def register_passes(self, register):
            register(Probe)

    plugin = Plugin()
    register_plugin(plugin)
    try:
        plan = compress(tiny_llama, "probe-engine-test", calib_ids(2, 8), cache=False)
    finally:
        unregister_plugin(plugin)
    assert len(seen) == 1 and isinstance(seen[0], ForwardEngine) and seen[0].model is tiny_llama
    assert plan.ops == [{"op": "drop", "layers": [4]}]


def test_bad_requests_fail_before_any_work(tiny_llama):
    with pytest.raises(PassError, match="needs calibration data"):
        compress(tiny_llama, "sleb", num_layers=1)
    with pytest.raises(PassError, match="stage 2: unknown pass 'nope'"):
        compress(tiny_llama, ["sleb", "nope"], calib_ids(2, 8))
    with pytest.raises(PassError, match="parameters inside each stage"):
        compress(tiny_llama, ["sleb", "shortgpt"], calib_ids(2, 8), num_layers=1)
    with pytest.raises(Exception, match="n_samples must be an integer"):
        CalibrationConfig("wiki-leads", n_samples=0)


# ------------------------------------------------------------------------------------------------ bad plans, every reader
@pytest.fixture
def slm_plus_plan(tiny_checkpoint, tmp_path):
    from optimum_slm import load_model

    model, _ = load_model(tiny_checkpoint)
    # the calibrated merge (the default before fitted maps): per-window scales and similarities to show
    plan = plan_of(get_pass("slm-plus", num_layers=2, merge="calibrated"), model, calib_ids(3, 12))
    path = tmp_path / "plan" / "slm_plan.json"
    plan.save(path)
    return path


def _nan_sidecar(path):
    from safetensors.torch import load_file, save_file

    side = path.with_suffix(".tensors")
    tensors = load_file(side)
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, side)


def _bad_plans(path):
    """(label, how to break the plan file at ``path``, the message every reader gives)."""
    return [
        ("nan", _nan_sidecar, "sha256"),
        ("missing side-car", lambda p: p.with_suffix(".tensors").unlink(), "is missing"),
        ("wrong shape", lambda p: _reshape_manifest(p), "shape"),
        ("nan in json", lambda p: p.write_text(p.read_text().replace('"sim": ', '"sim": NaN, "x": ', 1)),
         "non-finite"),
    ]


def _reshape_manifest(path):
    data = json.loads(path.read_text())
    name = sorted(data["tensors"])[0]
    data["tensors"][name]["shape"] = [3]
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("case", range(4))
def test_a_broken_plan_is_refused_in_one_line_by_every_reader(slm_plus_plan, tiny_checkpoint, tmp_path, case):
    label, breaks, message = _bad_plans(slm_plus_plan)[case]
    breaks(slm_plus_plan)
    with pytest.raises(PlanError, match=message) as err:
        CompressionPlan.load(slm_plus_plan)
    assert "\n" not in str(err.value)
    for args in (["inspect", str(slm_plus_plan)],
                 ["apply", "--model", tiny_checkpoint, "--plan", str(slm_plus_plan), "--output", str(tmp_path / "o")]):
        result = slm(*args)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], (label, result.output)
    assert not (tmp_path / "o").exists()
    pytest.importorskip("lm_eval")
    from lm_eval_slm.model import SLMLM

    with pytest.raises(PlanError, match=message):
        SLMLM(base=tiny_checkpoint, plan=str(slm_plus_plan), device="cpu", batch_size=1)


def test_inspect_shows_the_calibrated_rule_and_each_windows_similarity(slm_plus_plan):
    result = slm("inspect", str(slm_plus_plan))
    plan = CompressionPlan.load(slm_plus_plan)
    assert result.exit_code == 0
    for low, high in plan.windows:
        assert f"merge {low}-{high} (rule calibrated): {high - low + 1} layers -> 1, similarity 0." in result.stdout
    assert "side-car tensors: 2" in result.stdout or "side-car tensors: 4" in result.stdout


def test_apply_rebuilds_the_checkpoint_compress_wrote(slm_plus_plan, tiny_checkpoint, tmp_path):
    import transformers

    from optimum_slm import load_model

    out = tmp_path / "rebuilt"
    assert slm("apply", "--model", tiny_checkpoint, "--plan", str(slm_plus_plan), "--output", str(out)).exit_code == 0
    assert (out / "slm_plan.tensors").exists()
    base, _ = load_model(tiny_checkpoint)
    expected = apply_plan(base, CompressionPlan.load(slm_plus_plan))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = calib_ids(2, 10)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected(ids).logits)


def test_a_multi_stage_plan_round_trips_with_prefixed_tensors(tmp_path):
    model = make_model("llama", 8)
    plan = compress(model, [{"method": "drop", "layers": [0]}, {"method": "slm-plus", "num_layers": 2}],
                    calib_ids(3, 12), cache=False)
    assert all(name.startswith("stage1.merge.") for name in plan.tensors)
    plan.save(tmp_path / "p.json")
    loaded = CompressionPlan.load(tmp_path / "p.json")
    assert loaded.to_dict() == plan.to_dict() and loaded.num_layers_after == 5
