"""``Recipe``: one request, whichever front door it comes through.

The same request given as CLI flags, as a recipe file, as lm-eval ``model_args`` and as Python arguments must give
byte-identical plans; a recipe written out and read back must be the same recipe (every recipe in the README).
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from click.testing import CliRunner

from optimum_slm import CalibrationConfig, CompressionPlan, load_model
from optimum_slm.cli import cli
from optimum_slm.healing import HealConfig
from optimum_slm.recipe import OutputOptions, PassStage, Recipe, RecipeError

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def readme_recipes() -> list[str]:
    """Every fenced YAML block of the README that is a recipe (has ``stages:``)."""
    with open(README, encoding="utf-8") as fh:
        text = fh.read()
    return [block for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if "stages:" in block]


def test_the_readme_has_recipes():
    assert len(readme_recipes()) >= 3


@pytest.mark.parametrize("text", readme_recipes())
def test_every_readme_recipe_round_trips(text, tmp_path):
    recipe = Recipe.from_yaml(text)
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    path = tmp_path / "r.json"
    recipe.save(path)
    assert Recipe.from_yaml(path) == recipe


def test_a_full_recipe_round_trips_every_field(tmp_path):
    recipe = Recipe(stages=(PassStage("sleb", {"ratio": 0.2, "protect": [0, 5]}),
                            PassStage("flap", {"ratio": 0.1, "metric": "IFV"})),
                    calibration=CalibrationConfig("wiki-leads", n_samples=16, seq_len=64, seed=7, fit_samples=32),
                    heal=HealConfig(data="wiki-leads", method="tail", max_steps=5, lora_targets=("q_proj",)),
                    max_memory=3 * 2**30, output=OutputOptions(check=False, save_dtype="bfloat16"))
    text = recipe.to_yaml()
    assert "max_memory: 3GiB" in text and "heal: tail" in text
    assert Recipe.from_yaml(text) == recipe
    # what the plan records is the request without how it is run and written
    assert set(recipe.plan_record()) == {"calibration", "stages"}
    assert recipe.plan_record()["stages"][-1]["heal"] == "tail"


def test_parameters_are_kept_as_the_pass_parses_them():
    """A value given as text on the command line and as a number in YAML is the same recipe; defaults stay out."""
    assert PassStage("slm-plus", {"ratio": "0.2"}) == PassStage("slm-plus", {"ratio": 0.2})
    assert PassStage("drop", {"layers": "1-3"}).params == {"layers": [1, 2, 3]}
    assert Recipe.single("sleb", num_layers="2").to_dict() == {"stages": [{"method": "sleb", "num_layers": 2}]}


@pytest.mark.parametrize("data, message", [
    ({"stages": [{"method": "slm-plus", "ratio": 1.5}]}, r"stage 1 \(slm-plus\): ratio must be in \(0, 1\)"),
    ({"stages": [{"method": "nope"}]}, "unknown pass 'nope'"),
    ({"stages": [{"method": "sleb", "rate": 0.2}]}, "has no parameter 'rate'"),
    ({"stages": [{"method": "sleb", "num_layers": 1}], "budget": 3}, "unknown key 'budget'"),
    ({"stages": [{"method": "sleb", "num_layers": 1}], "max_memory": "lots"}, "expected a size like 2GiB"),
    ({"stages": [{"method": "sleb", "num_layers": 1}], "output": {"dtype": "x"}}, "unknown output setting 'dtype'"),
    ({"stages": [{"method": "sleb", "num_layers": 1}], "output": {"save_dtype": "int8"}}, "save_dtype must be one"),
    ({"stages": [{"method": "sleb", "num_layers": 1}, {"heal": "lora", "data": "x.txt"}],
      "output": {"plan_only": True}}, "needs a checkpoint"),
    ({"stages": []}, "'stages' must be a non-empty list"),
])
def test_bad_recipes_are_one_line(data, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(data)


# ----------------------------------------------------------------------------- one request through every front door
def _plan_bytes(plan: CompressionPlan) -> tuple[str, dict[str, bytes]]:
    return plan.to_json(), {name: t.contiguous().view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool
                            else t.numpy().tobytes() for name, t in plan.tensors.items()}


def test_the_same_request_from_every_front_door_gives_byte_identical_plans(tiny_checkpoint, corpus, tmp_path):
    """``slm-plus`` removing 2 layers (a fitted merge: side-car tensors), on the same calibration and fit sets."""
    from lm_eval_slm.model import SLMLM

    import optimum_slm

    flags = ["--calib-data", corpus, "--calib-samples", "4", "--calib-seq-len", "16", "--fit-samples", "6",
             "--fit-seq-len", "16", "--seed", "3"]
    run = ["-q", "compress", "--model", tiny_checkpoint, "--no-cache", "--no-check", "--plan-only"]
    by_flags = CliRunner().invoke(cli, [*run, "--method", "slm-plus", "--num-layers", "2", *flags,
                                        "--output", str(tmp_path / "flags")], catch_exceptions=False)
    assert by_flags.exit_code == 0, by_flags.output
    (tmp_path / "r.yaml").write_text(
        f"calibration:\n  source: {corpus}\n  n_samples: 4\n  seq_len: 16\n  fit_samples: 6\n  fit_seq_len: 16\n"
        "  seed: 3\nstages:\n  - method: slm-plus\n    num_layers: 2\n")
    by_file = CliRunner().invoke(cli, [*run, "--recipe", str(tmp_path / "r.yaml"), "--output", str(tmp_path / "file")],
                                 catch_exceptions=False)
    assert by_file.exit_code == 0, by_file.output
    lm = SLMLM(base=tiny_checkpoint, method="slm-plus", num_layers=2, calib=corpus, calib_samples=4,
               calib_seq_len=16, fit_samples=6, fit_seq_len=16, seed=3, plan_cache="none", device="cpu",
               batch_size=1)
    model, tok = load_model(tiny_checkpoint)
    by_python = optimum_slm.plan_compression(
        model, "slm-plus", CalibrationConfig(corpus, 4, 16, seed=3, fit_samples=6, fit_seq_len=16), tokenizer=tok,
        cache=False, num_layers=2)

    plans = {"flags": CompressionPlan.load(tmp_path / "flags" / "slm_plan.json"),
             "recipe file": CompressionPlan.load(tmp_path / "file" / "slm_plan.json"),
             "lm-eval model_args": lm.slm_plan, "python": by_python}
    expected = _plan_bytes(plans["flags"])
    assert expected[1], "the plan has fitted tensors"
    for door, plan in plans.items():
        assert _plan_bytes(plan) == expected, door
    # the plan file holds exactly what to_json gives, and records the request
    assert (tmp_path / "flags" / "slm_plan.json").read_text(encoding="utf-8") == expected[0]
    recorded = Recipe.from_dict(plans["flags"].recipe)
    assert recorded.stages == (PassStage("slm-plus", {"num_layers": 2}),)
    assert recorded.calibration == CalibrationConfig(corpus, 4, 16, seed=3, fit_samples=6, fit_seq_len=16)
    # slm inspect prints it as the recipe file that repeats the run
    shown = CliRunner().invoke(cli, ["inspect", str(tmp_path / "flags" / "slm_plan.json")]).output
    block = shown.split("recipe (slm compress --recipe):\n")[1].split("\ntrace")[0]
    assert Recipe.from_yaml("\n".join(line[2:] for line in block.splitlines()) + "\n") == recorded


def test_command_line_options_win_over_the_recipe_file(tiny_checkpoint, corpus, tmp_path):
    (tmp_path / "r.yaml").write_text("calibration:\n  n_samples: 6\n  seq_len: 12\noutput:\n  plan_only: true\n"
                                     "stages:\n  - method: sleb\n    num_layers: 1\n")
    result = CliRunner().invoke(cli, ["-q", "compress", "--model", tiny_checkpoint, "--recipe", str(tmp_path / "r.yaml"),
                                      "--calib-data", corpus, "--calib-samples", "4", "--no-check",
                                      "--output", str(tmp_path / "o")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / "o")) == ["slm_plan.json"]  # the recipe's output options hold
    plan = CompressionPlan.load(tmp_path / "o" / "slm_plan.json")
    assert plan.stages[0].calibration["n_samples"] == 4 and plan.stages[0].calibration["seq_len"] == 12
    assert plan.recipe["calibration"]["source"] == corpus
