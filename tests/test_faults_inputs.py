"""Faults of issue 29, one row per root cause: plans that do nothing, non-finite weights written, inputs that used to
end in a traceback (GGUF, huge integers, deep JSON, duplicate YAML keys, Python API misuse), a ``datasets`` corpus
fetched without ``--allow-download``. CLI rows: exit 2, one ``error:`` line, nothing written; Python rows: an
``SLMError`` subclass."""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_bad_input_catalogue import CALIB, assert_one_line, leftovers, run

from conftest import calib_ids, make_model
from optimum_slm import CompressionPlan, apply_plan, plan_compression
from optimum_slm import SLMCompressor, load_model
from optimum_slm.errors import CalibrationError, ModelLoadError, PassError, PlanError, SLMError
from optimum_slm.passes.base import CompressionPass, PassResult
from optimum_slm.plan import drop_op


def compress(checkpoint, corpus, tmp_path, *args):
    return run("compress", "--model", checkpoint, "--calib-data", corpus, *CALIB, *args,
               "--output", str(tmp_path / "out"))


# ------------------------------------------------------------------------------------------------ plans that do nothing
@pytest.mark.parametrize("method, ratio, message", [
    ("flap", "0.001", "flap: ratio 0.001 removes nothing: every layer keeps its 128 MLP channels and 2 KV groups"),
    ("minitron-width", "0.01", "minitron-width: ratio 0.01 removes nothing: every layer keeps its 128 MLP channels "
                               "and 2 query heads per KV group"),
    ("taylor-width", "0.001", "taylor-width: ratio 0.001 removes nothing"),
])
def test_a_width_ratio_that_removes_nothing_is_refused(tiny_checkpoint, corpus, tmp_path, method, ratio, message):
    result = compress(tiny_checkpoint, corpus, tmp_path, "--method", method, "--ratio", ratio)
    assert_one_line(result, 2, message)
    assert "the smallest ratio that removes something is 0.0209" in result.stderr  # computed: 4 of 128 channels
    assert not leftovers(tmp_path)


def test_the_smallest_ratio_named_does_remove_something(tiny_checkpoint, corpus, tmp_path):
    result = compress(tiny_checkpoint, corpus, tmp_path, "--method", "flap", "--ratio", "0.0209", "--plan-only")
    assert result.exit_code == 0, result.output
    assert CompressionPlan.load(tmp_path / "out" / "slm_plan.json").ops


class _Nothing(CompressionPass):
    name = "nothing"
    needs_calibration = False

    def run(self, engine):
        return PassResult([])


def test_any_pass_that_returns_no_ops_is_refused(tiny_llama):
    with pytest.raises(PassError, match="pass 'nothing' removes nothing from this model .its plan has no ops"):
        plan_compression(tiny_llama, _Nothing(), cache=False)
    with pytest.raises(PassError, match="^stage 2: pass 'nothing' removes nothing"):
        plan_compression(tiny_llama, [{"method": "drop", "layers": [1]}, _Nothing()], cache=False)


def test_a_plan_with_no_ops_is_not_applied(tiny_model, tiny_checkpoint, tmp_path):
    CompressionPlan.for_model(tiny_model, "hand", []).save(tmp_path / "empty.json")
    result = run("apply", "--model", tiny_checkpoint, "--plan", str(tmp_path / "empty.json"),
                 "--output", str(tmp_path / "out"))
    assert_one_line(result, 2, "the plan has no ops: applying it would leave the base unchanged")
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(PlanError, match="has no ops"):
        apply_plan(tiny_model, CompressionPlan.load(tmp_path / "empty.json"))


@pytest.fixture
def tiny_model(tiny_checkpoint):
    from optimum_slm import load_model

    return load_model(tiny_checkpoint)[0]


# ------------------------------------------------------------------------------------------------ non-finite weights
def test_a_float16_write_that_overflows_is_refused(tmp_path, tiny_tokenizer, corpus):
    model = make_model("llama", 6)
    with torch.no_grad():
        model.model.embed_tokens.weight[5, :3] = torch.tensor([1e6, -2e6, 7e4])
    model.save_pretrained(tmp_path / "big")
    tiny_tokenizer.save_pretrained(tmp_path / "big")
    result = compress(str(tmp_path / "big"), corpus, tmp_path, "--method", "drop", "--param", "layers=1",
                      "--save-dtype", "float16")
    assert_one_line(result, 2, "model.embed_tokens.weight overflows float16 (max 65504): 3 values become inf; "
                               "write float32 or bfloat16 (--save-dtype)")
    assert not leftovers(tmp_path)
    ok = compress(str(tmp_path / "big"), corpus, tmp_path, "--method", "drop", "--param", "layers=1",
                  "--save-dtype", "bfloat16")
    assert ok.exit_code == 0, ok.output


def test_the_streamed_weight_writer_refuses_an_overflow_too(tmp_path):
    from optimum_slm.io.checkpoint import write_weights

    model = make_model("llama", 2)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = 1e9
    with pytest.raises(SLMError, match=r"^model.layers.1.mlp.down_proj.weight overflows float16 .* 1 value becomes"):
        write_weights(model, str(tmp_path), dtype=torch.float16)


def test_a_base_broken_in_its_dtype_is_blamed_not_the_pass(tiny_llama):
    from optimum_slm import quality
    from optimum_slm.quality import QualityCheck

    ids = calib_ids(2, 16)
    check = QualityCheck(ids, "corpus", float("inf"), [torch.zeros(2, 16, 64)])
    result = check.run(tiny_llama)
    assert result["base_ppl"] == "inf" and result["ppl_ratio"] == "n/a" and result["base_dtype"] == "float32"
    line = quality.warning(result, "slm")
    assert "base model's own perplexity is inf in float32: the base is already broken in this dtype" in line
    assert "try --method" not in line and "\n" not in line
    assert "(base inf, n/a)" in quality.describe(result)
    json.dumps(CompressionPlan.for_model(tiny_llama, "t", [drop_op([1])], trace={"quality_check": result}).to_dict())


# ------------------------------------------------------------------------------------------------ inputs
@pytest.mark.parametrize("content", [b"GGUF\x03\x00\x00\x00\x05", bytes(range(256)) * 4, b""],
                         ids=["truncated", "not-gguf", "empty"])
def test_a_broken_gguf_is_one_line(tmp_path, corpus, monkeypatch, content):
    monkeypatch.setenv("OPTIMUM_SLM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "m.gguf").write_bytes(content)
    result = compress(str(tmp_path / "m.gguf"), corpus, tmp_path, "--num-layers", "1")
    assert_one_line(result, 2, f"cannot read GGUF file {tmp_path / 'm.gguf'}")
    assert not leftovers(tmp_path)


def test_a_5000_digit_integer_in_a_plan_is_refused(tiny_model, tiny_checkpoint, tmp_path):
    data = CompressionPlan.for_model(tiny_model, "t", [drop_op([1])]).to_dict()
    data["stages"][0]["trace"] = {"huge": 0}
    (tmp_path / "plan.json").write_text(json.dumps(data).replace('"huge": 0', '"huge": ' + "9" * 5000))
    message = "holds the 5000-digit integer 9999999999...999999; every integer in a plan must fit in 64 bits"
    assert_one_line(run("inspect", str(tmp_path / "plan.json")), 2, message)
    result = run("apply", "--model", tiny_checkpoint, "--plan", str(tmp_path / "plan.json"),
                 "--output", str(tmp_path / "out"))
    assert_one_line(result, 2, message)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("name, text, message", [
    ("deep.json", "[" * 100_000 + "]" * 100_000, "is nested too deeply to be a corpus"),
    ("deep.jsonl", '{"text": "a"}\n' + "[" * 100_000 + "]" * 100_000 + "\n", "deep.jsonl:2 is nested too deeply"),
    ("huge.json", "[" + "7" * 5000 + "]", "cannot be read as JSON: Exceeds the limit"),
])
def test_deep_or_huge_json_corpora_are_one_line(tiny_checkpoint, tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    result = compress(tiny_checkpoint, str(tmp_path / name), tmp_path, "--num-layers", "1")
    assert_one_line(result, 2, message)
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("text, message", [
    ("stages:\n  - method: drop\n    layers: [1]\n    layers: [2]\n", "key 'layers' is given twice in one mapping "
                                                                     "(lines 3 and 4)"),
    ("stages:\n  - {method: drop, layers: [1]}\ncalibration: {n_samples: 4}\ncalibration: {n_samples: 8}\n",
     "key 'calibration' is given twice in one mapping (lines 3 and 4)"),
])
def test_duplicate_recipe_keys_are_refused(tiny_checkpoint, corpus, tmp_path, text, message):
    (tmp_path / "r.yaml").write_text(text)
    result = run("compress", "--model", tiny_checkpoint, "--calib-data", corpus, "--recipe", str(tmp_path / "r.yaml"),
                 "--output", str(tmp_path / "out"))
    assert_one_line(result, 2, message)
    assert not leftovers(tmp_path)


def test_duplicate_keys_in_a_json_recipe_are_refused():
    from optimum_slm.recipe import Recipe, RecipeError

    with pytest.raises(RecipeError, match="key 'layers' is given twice"):
        Recipe.from_yaml('{"stages": [{"method": "drop", "layers": [1], "layers": [2]}]}\n')
    merged = Recipe.from_yaml("stages:\n  - &d {method: drop, layers: [1]}\n  - <<: *d\n    layers: [2]\n")
    assert merged.stages[1].params == {"layers": [2]}  # a '<<' merge may still be overridden


#: the Python API called the wrong way: (label, call, error type, message)
MISUSES = [
    ("apply_plan(plan path)", lambda m, p: apply_plan(p), PlanError, "the model given is str"),
    ("apply_plan(model, plan path)", lambda m, p: apply_plan(m, p), PlanError, "the plan given is str"),
    ("apply_plan(model, plan dict)", lambda m, p: apply_plan(m, json.loads(open(p).read())), PlanError,
     "the plan given is dict"),
    ("apply_plan(None, plan)", lambda m, p: apply_plan(None, CompressionPlan.load(p)), PlanError,
     "the model given is NoneType"),
    ("plan_compression(path, ...)", lambda m, p: plan_compression("some/folder", "sleb", calib_ids(), num_layers=1),
     SLMError, "first argument is the model"),
    ("float ids", lambda m, p: plan_compression(m, "sleb", torch.rand(2, 8), num_layers=1), CalibrationError,
     "got a float32 tensor of shape [2, 8] (token ids are integers"),
    ("1-D ids", lambda m, p: plan_compression(m, "sleb", torch.arange(3, 11), num_layers=1), CalibrationError,
     "got an int64 tensor of shape [8] (one sequence: ids[None])"),
    ("int32 ids", lambda m, p: plan_compression(m, "sleb", calib_ids().int(), num_layers=1), CalibrationError,
     "got an int32 tensor of shape [4, 16] (token ids are integers: .long())"),
    ("no sequences", lambda m, p: plan_compression(m, "sleb", torch.ones(0, 8, dtype=torch.long), num_layers=1),
     CalibrationError, "got an int64 tensor of shape [0, 8]"),
    ("ids >= vocab", lambda m, p: plan_compression(m, "sleb", torch.full((2, 8), 320), num_layers=1),
     CalibrationError, "calibration ids hold token 320, outside the model's vocabulary 0..319"),
    ("negative ids", lambda m, p: plan_compression(m, "sleb", torch.full((2, 8), -1), num_layers=1), CalibrationError,
     "calibration ids hold token -1, outside"),
    ("fit ids >= vocab", lambda m, p: plan_compression(m, "replaceme", calib_ids(), fit=torch.full((2, 8), 999),
                                                       num_layers=1), CalibrationError, "fit ids hold token 999"),
    ("float fit", lambda m, p: plan_compression(m, "replaceme", calib_ids(), fit=torch.rand(2, 8), num_layers=1),
     CalibrationError, "fit must be token ids"),
    ("list of int lists", lambda m, p: plan_compression(m, "sleb", [[1, 2, 3]], num_layers=1), SLMError,
     "calibration must be a CalibrationConfig"),
    ("get_pass(ratio='abc')", lambda m, p: plan_compression(m, "sleb", calib_ids(), ratio="abc"), PassError,
     "parameter 'ratio'"),
    ("CompressionPlan.load(5)", lambda m, p: CompressionPlan.load(5), PlanError,
     "CompressionPlan.load takes the path of a plan file, got int"),
    ("CompressionPlan.load(model)", lambda m, p: CompressionPlan.load(m), PlanError, "got LlamaForCausalLM"),
    ("load_model(None)", lambda m, p: load_model(None), ModelLoadError, "load_model takes a checkpoint folder"),
    ("load_model(5)", lambda m, p: load_model(5), ModelLoadError, "got int 5"),
    ("SLMCompressor(path)", lambda m, p: SLMCompressor("some/folder"), SLMError,
     "SLMCompressor takes a loaded model, got str; for a path"),
]


@pytest.mark.parametrize("label, call, error, message", MISUSES, ids=[m[0] for m in MISUSES])
def test_python_api_misuse_is_an_slm_error(tmp_path, label, call, error, message):
    model = make_model("llama", 4)
    CompressionPlan.for_model(model, "t", [drop_op([1])]).save(tmp_path / "p.json")
    with pytest.raises(error) as info:
        call(model, str(tmp_path / "p.json"))
    assert message in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------ network
@pytest.fixture
def fake_hub(monkeypatch):
    """A reachable hub (offline switches off) whose ``load_dataset`` records whether it was called offline."""
    import datasets
    import datasets.config as ds_config
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(ds_config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append(ds_config.HF_HUB_OFFLINE and hub_constants.HF_HUB_OFFLINE)
        if calls[-1]:
            raise ConnectionError(f"Couldn't reach '{path}' on the Hub (OfflineModeIsEnabled)")
        raise RuntimeError("the download was tried")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_a_datasets_corpus_is_not_downloaded_without_allow_download(tiny_checkpoint, tmp_path, fake_hub):
    import datasets.config as ds_config

    result = compress(tiny_checkpoint, "some-org/some-corpus", tmp_path, "--num-layers", "1")
    assert_one_line(result, 2, "cannot load dataset 'some-org/some-corpus': it is not in the local cache; pass "
                               "--allow-download to download it")
    assert fake_hub == [True] and ds_config.HF_HUB_OFFLINE is False  # offline for the call only
    assert not leftovers(tmp_path)
    result = compress(tiny_checkpoint, "some-org/some-corpus", tmp_path, "--num-layers", "1", "--allow-download")
    assert_one_line(result, 2, "cannot load dataset 'some-org/some-corpus': the download was tried")
    assert fake_hub == [True, False]


def test_python_downloads_only_inside_downloads_allowed(fake_hub):
    from optimum_slm.calibration import downloads_allowed, load_documents

    with pytest.raises(CalibrationError, match="not in the local cache"):
        load_documents("some-org/some-corpus")
    with downloads_allowed(), pytest.raises(CalibrationError, match="the download was tried"):
        load_documents("some-org/some-corpus")
    assert fake_hub == [True, False]


# ------------------------------------------------------------------------------------------------ heal progress
def test_the_first_validation_pass_shows_progress(tiny_tokenizer, corpus, monkeypatch):
    from optimum_slm.healing import HealConfig, heal_model, load_heal_data
    from optimum_slm.healing import train

    bars = []
    real = train.progress_bar

    def recording(**kwargs):
        bars.append((kwargs.get("desc"), kwargs.get("total")))
        return real(**kwargs)

    monkeypatch.setattr(train, "progress_bar", recording)
    config = HealConfig(data=corpus, method="tail", cutoff_len=32, batch_size=2, grad_accum=1, lr=1e-3,
                        warmup_steps=0, eval_steps=1, max_steps=1, tail_layers=1)
    data = load_heal_data(tiny_tokenizer, config)
    heal_model(make_model("llama", 2), tiny_tokenizer, config, data)
    batches = -(-len(data.val) // 2)
    assert bars[0] == ("heal: validation loss before training", batches)  # before any training step
    assert ("heal: validation at step 1", batches) in bars
