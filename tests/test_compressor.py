"""``SLMCompressor``: checkpoint + plan + card, atomic writes, vanilla reload identical to ``apply_plan``."""

from __future__ import annotations

import os

import pytest
import torch
import transformers

from conftest import calib_ids, write_corpus
from optimum_slm import CompressionPlan, SLMCompressor, SLMError, apply_plan, load_model
from optimum_slm.compressor import PLAN_FILE


def test_compress_writes_vanilla_checkpoint(tiny_checkpoint, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "out"
    compressor = SLMCompressor.from_pretrained(tiny_checkpoint, dtype="float32")
    plan = compressor.compress(out, method="slm", calibration=corpus, n_samples=4, seq_len=16, num_layers=2)
    assert plan.removed_layers == 2
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", PLAN_FILE, "README.md", "tokenizer.json"} <= files
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".out.tmp")]

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_layers == 4
    base, _ = load_model(tiny_checkpoint)
    rebuilt = apply_plan(base, CompressionPlan.load(out / PLAN_FILE))
    ids = calib_ids(2, 10)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, rebuilt(ids).logits)

    card = (out / "README.md").read_text()
    assert "6 → 4" in card and "slm" in card and "parameters" in card


def test_refuses_non_empty_output_and_overwrites_when_asked(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    compressor = SLMCompressor.from_pretrained(tiny_checkpoint)
    with pytest.raises(SLMError, match="not empty"):
        compressor.compress(out, method="drop", layers=[1])
    assert os.listdir(out) == ["keep.txt"]
    compressor.compress(out, method="drop", layers=[1], overwrite=True)
    assert "keep.txt" not in os.listdir(out)
    assert transformers.AutoConfig.from_pretrained(out).num_hidden_layers == 5


def test_failed_run_leaves_nothing(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    compressor = SLMCompressor.from_pretrained(tiny_checkpoint)
    with pytest.raises(SLMError):
        compressor.compress(out, method="slm", calibration=str(tmp_path / "missing.txt"), ratio=0.3)
    assert os.listdir(tmp_path) == ["tiny-llama"]  # the base only: neither the output nor a temp folder


def test_plan_only_and_second_compress_reloads_base(tiny_checkpoint, tmp_path):
    compressor = SLMCompressor.from_pretrained(tiny_checkpoint)
    plan = compressor.compress(tmp_path / "p", method="drop", layers=[2], plan_only=True)
    assert os.listdir(tmp_path / "p") == [PLAN_FILE]
    assert compressor.model.config.num_hidden_layers == 6
    compressor.compress(tmp_path / "a", method="drop", layers=[2])
    compressor.compress(tmp_path / "b", method="drop", layers=[3, 4])
    assert transformers.AutoConfig.from_pretrained(tmp_path / "b").num_hidden_layers == 4
    assert CompressionPlan.load(tmp_path / "p" / PLAN_FILE).to_dict() == plan.to_dict()


def test_tensor_calibration_is_accepted(tiny_checkpoint, tmp_path):
    compressor = SLMCompressor.from_pretrained(tiny_checkpoint)
    plan = compressor.plan("slm", calibration=calib_ids(3, 12), threshold=0.5)
    assert plan.calibration["n_samples"] == 3 and plan.calibration["source"] == "<tensor>"
