"""The ``slm`` click group end to end (CliRunner) and the same commands through ``optimum-cli slm`` (subprocess)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import click
import pytest
import torch
import transformers
from click.testing import CliRunner


from optimum_slm.cli import cli
from optimum_slm.plan import CompressionPlan

OPTIMUM_CLI = shutil.which("optimum-cli") or os.path.join(os.path.dirname(sys.executable), "optimum-cli")
# 4 x 16-token crops keep the slm search on the tiny model well under a second
CALIB = ["--calib-samples", "4", "--calib-seq-len", "16"]



def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def layers_of(path) -> int:
    return transformers.AutoModelForCausalLM.from_pretrained(path).config.num_hidden_layers


def subprocess_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def test_help_lists_every_command():
    result = run("--help")
    assert result.exit_code == 0
    for name in ("compress", "apply", "list", "inspect"):
        assert name in result.output


def test_list_shows_passes_with_parameters():
    from optimum_slm.registry import pass_classes

    result = run("list")
    assert result.exit_code == 0
    for name, cls in pass_classes().items():
        assert f"{name}: {cls.description}" in result.output
        for p in cls.params:
            assert any(line.split()[:2] == [p.name, p.type] for line in result.output.splitlines())
    assert "0.72" in result.output  # slm's default threshold


def test_compress_inspect_apply_roundtrip(tiny_checkpoint, corpus, tmp_path):
    out = tmp_path / "out"
    result = run("compress", "--model", tiny_checkpoint, "--method", "slm", "--num-layers", "2",
                 "--calib-data", corpus, *CALIB, "--output", str(out), "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "layers: 6 -> 4" in result.stdout
    assert f"wrote {out}" in result.stdout
    assert {"config.json", "model.safetensors", "slm_plan.json", "README.md"} <= set(os.listdir(out))
    assert layers_of(out) == 4

    plan = CompressionPlan.load(out / "slm_plan.json")
    shown = run("inspect", str(out / "slm_plan.json"))
    assert shown.exit_code == 0
    assert "layers: 6 -> 4" in shown.output
    for low, high in plan.windows:
        assert f"merge {low}-{high} (rule official): {high - low + 1} layers -> 1, similarity" in shown.output
    assert f"calibration: {corpus}, 4 x 16 tokens, seed 1234" in shown.output

    rebuilt = tmp_path / "rebuilt"
    applied = run("apply", "--model", tiny_checkpoint, "--plan", str(out / "slm_plan.json"), "--output",
                  str(rebuilt), "--quiet")
    assert applied.exit_code == 0, applied.output
    assert "layers: 6 -> 4" in applied.output
    a = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(rebuilt).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_plan_only_and_param_passthrough(tiny_checkpoint, corpus, tmp_path):
    out = tmp_path / "plan"
    result = run("--quiet", "compress", "--model", tiny_checkpoint, "--ratio", "0.34", "--calib-data", corpus,
                 *CALIB, "--output", str(out), "--plan-only", "--param", "max_window=2",
                 "--param", "similarity=token-cosine", "--merge", "mean")
    assert result.exit_code == 0, result.output
    assert os.listdir(out) == ["slm_plan.json"]
    plan = CompressionPlan.load(out / "slm_plan.json")
    assert plan.params["max_window"] == 2 and plan.params["similarity"] == "token-cosine"
    assert all(hi - lo == 1 for lo, hi in plan.windows)  # max_window=2 reached the pass
    assert all(op["rule"] == "mean" for op in plan.ops)
    assert "(plan only)" in result.output


def test_drop_needs_no_calibration_and_overwrite_replaces(tiny_checkpoint, tmp_path):
    out = tmp_path / "dropped"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    result = run("compress", "--model", tiny_checkpoint, "--method", "drop", "--param", "layers=1,2",
                 "--output", str(out), "--overwrite")
    assert result.exit_code == 0, result.output
    assert "stale.txt" not in os.listdir(out)
    assert layers_of(out) == 4


def test_quiet_hides_progress_bars(tiny_checkpoint, corpus, tmp_path):
    args = ["compress", "--model", tiny_checkpoint, "--num-layers", "1", "--calib-data", corpus, *CALIB,
            "--plan-only"]
    loud = run(*args, "--output", str(tmp_path / "a"))
    quiet = run(*args, "--output", str(tmp_path / "b"), "--quiet")
    assert loud.exit_code == quiet.exit_code == 0
    assert "slm-plus: searching windows" in loud.stderr and "1/1" in loud.stderr  # a total, so an ETA
    assert "searching windows" not in quiet.stderr and "Loading weights" not in quiet.stderr


# ------------------------------------------------------------------ the optimum-cli bridge
def test_bridge_roundtrips_every_parameter_kind():
    """argparse options generated from click parameters give click back the same arguments."""
    from optimum.commands.register.register_optimum_slm import add_click_params, click_argv

    seen = {}

    @click.command()
    @click.argument("paths", nargs=-1)
    @click.option("--name", required=True)
    @click.option("--n", type=int, default=3, show_default=True)
    @click.option("--kind", type=click.Choice(["a", "b"]))
    @click.option("--tag", multiple=True)
    @click.option("--flag", is_flag=True)
    @click.option("--color/--no-color", default=True)
    @click.option("-v", "--verbose", count=True)
    def demo(**kwargs):
        seen.update(kwargs)

    parser = argparse.ArgumentParser()
    add_click_params(parser, demo)
    ns = parser.parse_args(["--name", "x", "--kind", "b", "--tag", "t1", "--tag", "t2", "--flag", "--no-color",
                            "-v", "-v", "p1", "p2"])
    demo.main(args=click_argv(demo, ns), standalone_mode=False)
    assert seen == {"paths": ("p1", "p2"), "name": "x", "n": 3, "kind": "b", "tag": ("t1", "t2"), "flag": True,
                    "color": False, "verbose": 2}
    with pytest.raises(SystemExit):
        parser.parse_args(["--kind", "c", "--name", "x"])  # choices are enforced by argparse too


def test_bridge_picks_up_commands_added_to_the_group():
    from optimum.commands.register.register_optimum_slm import SLMCommand

    @cli.command(name="hello-test")
    @click.option("--who", default="world")
    def hello(who):
        click.echo(f"hello {who}")

    try:
        root = argparse.ArgumentParser(prog="optimum-cli")
        SLMCommand(root.add_subparsers())
        args = root.parse_args(["slm", "hello-test", "--who", "bridge"])
        runner = CliRunner()
        with runner.isolation() as (out, _err, _):
            with pytest.raises(SystemExit) as done:
                args.func(args).run()
        assert done.value.code == 0
        assert out.getvalue().decode().strip() == "hello bridge"
    finally:
        cli.commands.pop("hello-test")


def test_bridge_survives_a_broken_package(monkeypatch, capsys):
    """An import error in optimum_slm must not break optimum-cli; 'optimum-cli slm' reports it in one line."""
    import optimum.commands.register.register_optimum_slm as register

    monkeypatch.setitem(sys.modules, "optimum_slm.cli", None)  # makes the import fail
    monkeypatch.setattr(register, "load_error", None)
    root = argparse.ArgumentParser(prog="optimum-cli")
    register.SLMCommand(root.add_subparsers())
    args = root.parse_args(["slm"])
    with pytest.raises(SystemExit) as done:
        args.func(args).run()
    assert done.value.code == 2
    assert capsys.readouterr().err.startswith("error: optimum-slm cannot be loaded (ModuleNotFoundError")


def test_optimum_cli_help_and_list():
    env = subprocess_env()
    top = subprocess.run([OPTIMUM_CLI, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert top.returncode == 0 and "slm" in top.stdout
    group = subprocess.run([OPTIMUM_CLI, "slm", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert group.returncode == 0
    for name in ("compress", "apply", "list", "inspect"):
        assert name in group.stdout
    helped = subprocess.run([OPTIMUM_CLI, "slm", "compress", "--help"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert helped.returncode == 0 and "--calib-seq-len" in helped.stdout and "--param KEY=VALUE" in helped.stdout
    listed = subprocess.run([OPTIMUM_CLI, "slm", "list"], capture_output=True, text=True, env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout == run("list").output


def test_optimum_cli_compress_apply_inspect(tiny_checkpoint, corpus, tmp_path):
    out, rebuilt = tmp_path / "out", tmp_path / "rebuilt"
    env = subprocess_env()
    done = subprocess.run(
        [OPTIMUM_CLI, "slm", "compress", "--model", tiny_checkpoint, "--method", "slm", "--ratio", "0.34",
         "--calib-data", corpus, *CALIB, "--output", str(out), "--quiet"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "layers: 6 -> 4" in done.stdout
    assert layers_of(out) == 4
    shown = subprocess.run([OPTIMUM_CLI, "slm", "inspect", str(out / "slm_plan.json")], capture_output=True,
                           text=True, env=env, timeout=120)
    assert shown.returncode == 0 and shown.stdout == run("inspect", str(out / "slm_plan.json")).output
    applied = subprocess.run(
        [OPTIMUM_CLI, "slm", "apply", "--model", tiny_checkpoint, "--plan", str(out / "slm_plan.json"), "--output",
         str(rebuilt), "-q"], capture_output=True, text=True, env=env, timeout=300,
    )
    assert applied.returncode == 0, applied.stderr
    assert layers_of(rebuilt) == 4
    # a bad input through optimum-cli: one line, exit code 2
    again = subprocess.run(
        [OPTIMUM_CLI, "slm", "apply", "--model", tiny_checkpoint, "--plan", str(out / "slm_plan.json"), "--output",
         str(rebuilt), "-q"], capture_output=True, text=True, env=env, timeout=300,
    )
    assert again.returncode == 2
    assert again.stderr.strip().startswith("error: output directory") and len(again.stderr.splitlines()) == 1


def test_slm_console_script_version():
    slm = os.path.join(os.path.dirname(sys.executable), "slm")
    done = subprocess.run([slm, "--version"], capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert done.returncode == 0 and "optimum-slm" in done.stdout
