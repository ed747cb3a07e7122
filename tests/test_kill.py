"""Kill tests: SIGTERM and SIGKILL at points all through ``slm compress`` (in memory and streamed), ``slm apply`` and
``slm heal`` leave the output folder absent or complete and loadable. A SIGTERM is one ``error:`` line, exit 143,
and leaves nothing behind itself; after a SIGKILL the next (successful) run removes what the killed run left: no
lock, temp folder or spill folder remains beside the output or in TMPDIR.

The points are events the test watches for (the output's lock taken, its temp folder made, a spill folder in
TMPDIR), not blind delays: each signal lands where it is meant to."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import transformers

from conftest import make_model
from optimum_slm import CompressionPlan

SLM = [sys.executable, "-c", "from optimum_slm.cli import main; main()"]
CALIB = ["--calib-samples", "4", "--calib-seq-len", "16"]
CHECKPOINT = {"config.json", "model.safetensors", "README.md"}
SPILL = ("slm-activations-", "slm-spill-")


def _env(tmpdir) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                TMPDIR=str(tmpdir))


def _beside(out) -> list[str]:
    """What runs on ``out`` make beside it: its lock and temp folders."""
    return sorted(f for f in os.listdir(os.path.dirname(out)) if f.startswith(f".{os.path.basename(out)}."))


def _locked(out) -> bool:
    """The run holds ``out``'s lock (it wrote its token into the lock file)."""
    try:
        with open(os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.lock"), encoding="utf-8") as fh:
            return bool(fh.read().strip())
    except OSError:
        return False


def _spilled(tmpdir) -> list[str]:
    return sorted(f for f in os.listdir(tmpdir) if f.startswith(SPILL))


#: the points a signal is sent at
EVENTS = {
    "claimed": lambda out, tmpdir: _locked(out),  # loading, planning, training
    "writing": lambda out, tmpdir: any(".tmp-" in f for f in _beside(out)),  # the checkpoint being written
    "spilling": lambda out, tmpdir: bool(_spilled(tmpdir)),  # the streamed engine's folders in TMPDIR
}


def _complete_or_absent(out, files: set[str]) -> None:
    if not os.path.exists(out):
        return
    assert files <= set(os.listdir(out)), os.listdir(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    if "slm_plan.json" in files:
        plan = CompressionPlan.load(os.path.join(out, "slm_plan.json"))
        assert model.config.num_hidden_layers == plan.num_layers_after


def _stop(argv: list[str], tmpdir, out, sig: signal.Signals, event: str) -> None:
    """Run ``argv``, send ``sig`` when ``event`` is seen; check what it left."""
    proc = subprocess.Popen(argv, env=_env(tmpdir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, hit = time.monotonic() + 120, False
    while proc.poll() is None and time.monotonic() < deadline:
        if EVENTS[event](out, tmpdir):
            proc.send_signal(sig)
            hit = True
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert hit, f"the run ended before {event}: {err}"
        assert proc.returncode == 143, (proc.returncode, err)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert errors == ["error: terminated (SIGTERM)"] and "Traceback" not in err, err
        assert _beside(out) == [] and _spilled(tmpdir) == []  # it cleaned up after itself
    else:
        assert proc.returncode in (-signal.SIGKILL, 0), (proc.returncode, err)


def _stopped_then_rerun(args: list[str], out, tmpdir, points, files: set[str]) -> None:
    argv = [*SLM, "-q", *args, "--output", str(out), "--overwrite"]
    for sig, event in points:
        _stop(argv, tmpdir, out, sig, event)
        _complete_or_absent(out, files)
    done = subprocess.run(argv, env=_env(tmpdir), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert os.path.exists(out)
    _complete_or_absent(out, files)
    assert _beside(out) == [], _beside(out)  # the killed runs' lock and temp folders are gone
    assert _spilled(tmpdir) == [], _spilled(tmpdir)  # and their spill folders


@pytest.fixture
def tmpdir_(tmp_path):
    path = tmp_path / "TMPDIR"
    path.mkdir()
    return path


def test_compress_and_apply(tiny_checkpoint, corpus, tmp_path, tmpdir_):
    args = ["compress", "--model", tiny_checkpoint, "--calib-data", corpus, *CALIB, "--method", "sleb",
            "--num-layers", "2", "--no-cache"]
    _stopped_then_rerun(args, tmp_path / "out", tmpdir_,
                        [(signal.SIGTERM, "claimed"), (signal.SIGKILL, "writing")], CHECKPOINT | {"slm_plan.json"})
    args = ["apply", "--model", tiny_checkpoint, "--plan", str(tmp_path / "out" / "slm_plan.json")]
    _stopped_then_rerun(args, tmp_path / "rebuilt", tmpdir_, [(signal.SIGKILL, "writing")],
                        CHECKPOINT | {"slm_plan.json"})


def test_streamed_compress(tiny_tokenizer, corpus, tmp_path, tmpdir_):
    sharded = tmp_path / "sharded"
    make_model("llama", 6).save_pretrained(sharded, max_shard_size="100KB")
    tiny_tokenizer.save_pretrained(sharded)
    args = ["compress", "--model", str(sharded), "--calib-data", corpus, *CALIB, "--method", "sleb",
            "--num-layers", "2", "--no-cache", "--max-memory", "1KB"]
    _stopped_then_rerun(args, tmp_path / "out", tmpdir_,
                        [(signal.SIGTERM, "spilling"), (signal.SIGKILL, "spilling")], CHECKPOINT | {"slm_plan.json"})


def test_heal(tiny_checkpoint, corpus, tmp_path, tmpdir_):
    args = ["heal", "--model", tiny_checkpoint, "--data", corpus, "--cutoff-len", "32", "--batch-size", "2",
            "--eval-steps", "2", "--max-steps", "2"]
    _stopped_then_rerun(args, tmp_path / "healed", tmpdir_,
                        [(signal.SIGTERM, "claimed"), (signal.SIGKILL, "writing")], CHECKPOINT | {"slm_heal.json"})
