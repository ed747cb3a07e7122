"""First contact: the recommended pass by default, a quality check after every compression, a model card that says
what the checkpoint is, and a README whose command and option tables match the real ``--help``."""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from click.testing import CliRunner

from optimum_slm import CompressionPlan, quality
from optimum_slm.cli import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALIB = ["--calib-samples", "4", "--calib-seq-len", "16"]


def slm(*args: str):
    return CliRunner().invoke(cli, ["--quiet", *args], catch_exceptions=False)


def compress(checkpoint: str, corpus: str, out, *extra: str):
    return slm("compress", "--model", checkpoint, "--num-layers", "2", "--calib-data", corpus, *CALIB,
               "--output", str(out), *extra)


def test_default_method_is_the_recommended_one_and_the_run_ends_with_a_check(tiny_checkpoint, corpus, tmp_path):
    result = compress(tiny_checkpoint, corpus, tmp_path / "out")
    assert result.exit_code == 0, result.output
    plan = CompressionPlan.load(tmp_path / "out" / "slm_plan.json")
    assert plan.method == "slm-plus"
    check = plan.quality_check
    assert set(check) == {"text", "tokens", "base_ppl", "ppl", "ppl_ratio", "final_cosine"}
    assert check["tokens"] > 0 and 0 < check["final_cosine"] <= 1 and check["ppl"] > 0
    assert check["ppl_ratio"] == pytest.approx(check["ppl"] / check["base_ppl"], rel=1e-3)
    assert "quality check on" in result.stdout and "final-state cosine" in result.stdout
    assert re.search(r"wrote .*out \(checkpoint, slm_plan.json, README.md, [\d.,]+ [KMG]?B\) in [\d.]+s", result.stdout)
    assert result.stdout.count("layers: 6 -> 4") == 1
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| quality check | perplexity" in card and "| dtype | float32 |" in card
    assert "slm compress --model" in card and "--num-layers 2" in card  # the command that reproduces it
    assert "arxiv.org/abs/2502.19159" in card


def test_the_check_is_measured_on_text_the_calibration_did_not_read(tiny_checkpoint, corpus, tmp_path):
    from optimum_slm import load_model
    from optimum_slm.calibration import load_calibration

    _, tok = load_model(tiny_checkpoint)
    calib = load_calibration(tok, corpus, 4, 16, 1234)
    ids, unseen = calib.ids, calib.unseen()
    docs = open(corpus, encoding="utf-8").read().strip().split("\n\n")
    crops = [tok.decode(row) for row in ids.tolist()]
    used = [d for d in docs if d not in unseen]
    assert unseen and len(used) >= 4 and all(any(c.strip() in u for u in used) for c in crops)


def test_a_broken_result_is_called_out_and_still_written(tiny_checkpoint, corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "WARN_RATIO", 0.01)  # any result counts as broken
    result = compress(tiny_checkpoint, corpus, tmp_path / "out", "--method", "slm")
    assert result.exit_code == 0
    lines = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(lines) == 1 and "try --method slm-plus" in lines[0]
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert "WARNING" in (tmp_path / "out" / "README.md").read_text()
    plus = compress(tiny_checkpoint, corpus, tmp_path / "plus")
    assert "try a smaller --ratio" in plus.stderr


def test_warning_threshold_is_five_times_the_base():
    ok = {"ppl_ratio": 4.9}
    assert quality.warning(ok, "slm") is None
    assert "slm-plus" in quality.warning({"ppl_ratio": 5.1}, "slm") and quality.WARN_RATIO == 5.0
    assert quality.warning({"ppl_ratio": "inf"}, "slm-plus") is not None


def test_no_check_and_save_dtype(tiny_checkpoint, corpus, tmp_path):
    result = compress(tiny_checkpoint, corpus, tmp_path / "out", "--no-check", "--save-dtype", "bfloat16")
    assert result.exit_code == 0 and "quality check: skipped (--no-check)" in result.stdout
    assert CompressionPlan.load(tmp_path / "out" / "slm_plan.json").quality_check is None
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.bfloat16
    assert "| dtype | bfloat16 |" in (tmp_path / "out" / "README.md").read_text()


def test_outputs_follow_the_umask(tiny_checkpoint, corpus, tmp_path):
    old = os.umask(0o022)
    try:
        assert compress(tiny_checkpoint, corpus, tmp_path / "out").exit_code == 0
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o755
    modes = {name: os.stat(tmp_path / "out" / name).st_mode & 0o777 for name in os.listdir(tmp_path / "out")}
    assert set(modes.values()) == {0o644}, modes


def test_data_free_pass_needs_no_calibration(tiny_checkpoint, tmp_path, monkeypatch):
    from optimum_slm import assets

    monkeypatch.setattr(assets, "package_dir", lambda name: None)  # wiki-leads not installed
    result = slm("compress", "--model", tiny_checkpoint, "--method", "shortened-magnitude", "--num-layers", "1",
                 "--param", "keep_first=1", "--param", "keep_last=1", "--output", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "quality check: skipped (no calibration text to hold out)" in result.stdout


def test_card_names_the_alias_by_its_hub_id():
    from optimum_slm.assets import base_identity

    assert base_identity("smollm2-135m")["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "Q4_1" in base_identity("smollm2-135m")["file"]
    assert base_identity("org/model") == {"hub_id": "org/model", "file": None}


# ------------------------------------------------------------------------------------------------ README = --help
def _readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        return fh.read()


def _section(text: str, title: str) -> str:
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return text[start: end if end != -1 else None]


def _table_first_column(section: str, header: str) -> list[str]:
    """First cells of the markdown table whose header row starts with ``header``."""
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header}"))
    cells = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells.append(re.split(r"(?<!\\)\|", line)[1].strip())  # escaped pipes stay inside the cell
    return cells


def _options(command) -> set[str]:
    return {opt for p in command.params for opt in (*p.opts, *p.secondary_opts) if opt.startswith("-")} - {"-h"}


def _readme_options(cells: list[str]) -> set[str]:
    return {opt for cell in cells for opt in re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", cell)}


def test_readme_command_table_lists_every_command():
    cells = _table_first_column(_section(_readme(), "## Command line"), "command")
    documented = {re.match(r"`slm (\w+)", c).group(1) for c in cells for c in [c] if c.startswith("`slm ")}
    documented |= {name for c in cells for name in re.findall(r"`slm (\w+) …`", c)}
    assert documented == set(cli.commands), (documented, set(cli.commands))


@pytest.mark.parametrize("name", ["compress", "apply"])
def test_readme_option_tables_match_the_commands(name):
    section = _section(_readme(), "## Command line")
    title = f"`{name}` options:"
    table = section[section.index(title):]
    documented = _readme_options(_table_first_column(table, "option"))
    real = _options(cli.commands[name]) - {"--help"}
    assert documented == real, (sorted(documented - real), sorted(real - documented))


def test_readme_option_tables_match_optimum_cli_help():
    exe = shutil.which("optimum-cli") or os.path.join(os.path.dirname(sys.executable), "optimum-cli")
    section = _section(_readme(), "## Command line")
    for name in ("compress", "apply"):
        table = section[section.index(f"`{name}` options:"):]
        documented = _readme_options(_table_first_column(table, "option"))
        out = subprocess.run([exe, "slm", name, "--help"], capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, HF_HUB_OFFLINE="1"))
        assert out.returncode == 0, out.stderr
        missing = {opt for opt in documented if opt not in out.stdout}
        assert not missing, (name, missing)


def test_readme_lm_eval_keys_match_the_model():
    from lm_eval_slm.model import SLMLM

    cells = _table_first_column(_section(_readme(), "## lm-eval"), "key")
    documented = {k for c in cells for k in re.findall(r"`(\w+)`", c)}
    real = set(inspect.signature(SLMLM.__init__).parameters) - {"self", "kwargs"}
    assert real <= documented, sorted(real - documented)


def test_readme_names_every_registered_pass():
    from optimum_slm import list_passes

    text = _readme()
    assert all(f"`{name}`" in text for name in list_passes())


def test_quiet_and_version_are_accepted_everywhere():
    for args in (["-q", "list"], ["analyze", "-q", "--help"], ["bench", "-q", "--help"], ["--version"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, (args, result.output)
    exe = shutil.which("optimum-cli") or os.path.join(os.path.dirname(sys.executable), "optimum-cli")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    listed = subprocess.run([exe, "slm", "-q", "list"], capture_output=True, text=True, timeout=120, env=env)
    assert listed.returncode == 0 and "slm-plus:" in listed.stdout, listed.stderr
    version = subprocess.run([exe, "slm", "--version"], capture_output=True, text=True, timeout=120, env=env)
    assert version.returncode == 0 and "optimum-slm, version" in version.stdout
    bad = subprocess.run([exe, "slm", "compress", "--model", "m", "--output", "o", "--dtype", "float8"],
                         capture_output=True, text=True, timeout=120, env=env)
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and "invalid choice: 'float8'" in lines[0], bad.stderr
