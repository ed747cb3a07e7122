"""Kill tests: SIGKILL at points all through ``slm compress`` and ``slm apply`` leaves the output folder absent or
complete and loadable, and a rerun succeeds (it cleans what the killed run left)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import transformers

from optimum_slm import CompressionPlan

SLM = [sys.executable, "-c", "from optimum_slm.cli import main; main()"]
CALIB = ["--calib-samples", "4", "--calib-seq-len", "16"]


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _complete_or_absent(out) -> None:
    if not os.path.exists(out):
        return
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "slm_plan.json", "README.md"} <= files, files
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    plan = CompressionPlan.load(os.path.join(out, "slm_plan.json"))
    assert model.config.num_hidden_layers == plan.num_layers_after


def _killed_then_rerun(args: list[str], out, delays: list[float]) -> None:
    parent = os.path.dirname(out)
    for delay in delays:
        proc = subprocess.Popen([*SLM, "-q", *args, "--output", str(out), "--overwrite"], env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        _complete_or_absent(out)
    done = subprocess.run([*SLM, "-q", *args, "--output", str(out), "--overwrite"], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    _complete_or_absent(out)
    assert os.path.exists(out)
    stray = [f for f in os.listdir(parent) if f.startswith(f".{os.path.basename(out)}.")]
    assert stray == [], stray  # the killed runs' temp folders and lock are gone


@pytest.mark.parametrize("command", ["compress", "apply"])
def test_sigkill_leaves_nothing_half_written(tiny_checkpoint, corpus, tmp_path, command):
    rng = random.Random(0 if command == "compress" else 1)
    delays = sorted(rng.uniform(1.0, 7.0) for _ in range(3))
    if command == "compress":
        args = ["compress", "--model", tiny_checkpoint, "--calib-data", corpus, *CALIB, "--num-layers", "2"]
    else:
        plan = tmp_path / "plan"
        made = subprocess.run([*SLM, "-q", "compress", "--model", tiny_checkpoint, "--calib-data", corpus, *CALIB,
                               "--num-layers", "2", "--plan-only", "--output", str(plan)], env=_env(),
                              capture_output=True, text=True, timeout=300)
        assert made.returncode == 0, made.stderr
        args = ["apply", "--model", tiny_checkpoint, "--plan", str(plan / "slm_plan.json")]
    _killed_then_rerun(args, tmp_path / "out", delays)
