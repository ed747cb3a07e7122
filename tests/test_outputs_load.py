"""Output folders that every engine loads: nothing in a compressed checkpoint folder looks like weights except the
weights (vLLM reads every ``*.safetensors`` file of a folder as weights), and ``optimum_slm.load_model`` reloads every
output ``slm compress`` writes, per-layer widths included."""

from __future__ import annotations

import glob
import os
import shutil

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors import safe_open

from conftest import calib_ids
from optimum_slm import CompressionPlan, apply_plan, load_model
from optimum_slm.cli import cli

CALIB = ["--calib-samples", "4", "--calib-seq-len", "16", "--fit-samples", "8", "--fit-seq-len", "16"]


def weight_names_in_folder(folder) -> set[str]:
    """What a strict loader such as vLLM's reads as weights: every tensor of every ``*.safetensors`` in the folder."""
    names: set[str] = set()
    for path in glob.glob(os.path.join(folder, "*.safetensors")):
        with safe_open(path, "pt") as fh:
            names |= set(fh.keys())
    return names


@pytest.mark.parametrize("method, params", [
    ("slm-plus", ["--num-layers", "2"]),                                   # fitted maps: a side-car
    ("flap", ["--ratio", "0.3"]),                                          # uniform widths
    ("flap", ["--ratio", "0.4", "--param", "structure=AL-AM"]),             # per-layer widths
    ("taylor-width", ["--ratio", "0.4", "--param", "layer_start=1", "--param", "layer_end=4"]),  # some layers narrowed
])
def test_every_output_loads_strictly_and_through_load_model(tiny_checkpoint, corpus, tmp_path, method, params):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["-q", "compress", "--model", tiny_checkpoint, "--method", method, *params,
                                      "--calib-data", corpus, *CALIB, "--no-check", "--output", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    plan = CompressionPlan.load(out / "slm_plan.json")
    assert bool(plan.tensors) == (out / "slm_plan.tensors").exists()
    reloaded, _ = load_model(str(out))
    per_layer = bool(getattr(reloaded.config, "slm_layer_widths", None))
    assert ("note: the layers have different widths" in result.output) == per_layer  # who cannot serve it, said
    # every tensor a strict loader finds is a parameter of the model, and every parameter is there
    expected = set(reloaded.state_dict())
    if reloaded.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    assert weight_names_in_folder(out) == expected
    base, _ = load_model(tiny_checkpoint)
    rebuilt = apply_plan(base, plan)
    probe = calib_ids(2, 10, seed=3)
    with torch.no_grad():
        assert torch.allclose(reloaded(probe).logits, rebuilt(probe).logits, atol=1e-5)
    if not per_layer:  # uniform widths: vanilla transformers loads it too
        vanilla = transformers.AutoModelForCausalLM.from_pretrained(out)
        with torch.no_grad():
            assert torch.allclose(vanilla(probe).logits, rebuilt(probe).logits, atol=1e-5)


def test_a_plan_with_the_old_side_car_name_still_loads_and_is_rewritten_under_the_new_one(tiny_checkpoint, corpus,
                                                                                         tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["-q", "compress", "--model", tiny_checkpoint, "--num-layers", "2",
                                      "--calib-data", corpus, *CALIB, "--no-check", "--plan-only",
                                      "--output", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    plan = CompressionPlan.load(out / "slm_plan.json")
    assert plan.tensors
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(out / "slm_plan.json", old / "slm_plan.json")
    shutil.copy(out / "slm_plan.tensors", old / "slm_plan.safetensors")  # as releases before 0.4 wrote it
    legacy = CompressionPlan.load(old / "slm_plan.json")
    assert legacy.to_json() == plan.to_json()
    assert all(torch.equal(legacy.tensors[k], plan.tensors[k]) for k in plan.tensors)
    legacy.save(old / "slm_plan.json")
    assert sorted(os.listdir(old)) == ["slm_plan.json", "slm_plan.tensors"]  # the old name does not linger
