"""Faults around the output folder (README "Bad input and faults"): outputs that must be refused (an empty path, the
current, home or root folder, the run's own inputs), clean-up that removes only what this project made, a lock that
two runs cannot both take, a SIGTERM handled like Ctrl-C, spill folders of killed runs removed from TMPDIR."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from conftest import assert_one_line, make_model, run
from optimum_slm import SLMCompressor
from optimum_slm.errors import SLMError
from optimum_slm.io.output import TEMP_MARKER, check_output_dir, claim_output, run_token
from optimum_slm.plan import CompressionPlan, drop_op

CALIB = ["--calib-samples", "4", "--calib-seq-len", "16"]
DEAD = "999999999-1"  # no such process



def snapshot(folder) -> dict[str, int]:
    """Every file and folder under ``folder`` with its size: what a refused run must leave as it was."""
    out = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "plan-cache"]  # the tests' own plan cache (conftest)
        for name in dirs + files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = os.path.getsize(path) if name in files else -1
    return out


def compress_args(model, corpus):
    return ["compress", "--model", str(model), "--calib-data", str(corpus), *CALIB, "--method", "sleb",
            "--num-layers", "1", "--no-cache"]


@pytest.fixture
def place(tmp_path, tiny_checkpoint, corpus, monkeypatch):
    """A working folder the test runs in (cwd) and a home folder, both holding a file; the model and the corpus lie
    beside them in ``tmp_path``."""
    cwd, home = tmp_path / "work", tmp_path / "home"
    for folder in (cwd, home):
        (folder / "sub").mkdir(parents=True)
        (folder / "keep.txt").write_text("mine")
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    return tmp_path


# ------------------------------------------------------------------------------------------------ refused outputs
@pytest.mark.parametrize("output, cwd, message", [
    ("", "work", "the output path is empty (an unset variable?)"),
    (" ", "work", "the output path is empty (an unset variable?)"),
    (".", "work", "is the current directory"),
    ("{tmp}/work", "work/sub", "contains the current directory"),
    ("{tmp}/home", "work", "is your home directory"),
    ("{tmp}", "work", "contains the current directory"),
    ("{model}", "work", "is this run's input"),
    ("{model}/out", "work", "is inside this run's input"),
    ("{tmp}/models", "work", "contains this run's input"),
    ("{tmp}/data", "work", "contains this run's input"),
])
def test_refused_outputs_of_compress(place, tiny_checkpoint, tmp_path, monkeypatch, output, cwd, message):
    import shutil

    model = tmp_path / "models" / "base"
    shutil.copytree(tiny_checkpoint, model)
    corpus = tmp_path / "data" / "corpus.txt"
    corpus.parent.mkdir()
    corpus.write_text((tmp_path / "corpus.txt").read_text())
    monkeypatch.chdir(tmp_path / cwd)
    before = snapshot(tmp_path)
    result = run(*compress_args(model, corpus), "--output", output.format(tmp=tmp_path, model=model),
                 "--overwrite")
    assert_one_line(result, 2, message)
    assert snapshot(tmp_path) == before  # nothing deleted, nothing written


def test_the_root_is_refused(place, tiny_checkpoint, corpus):
    result = run(*compress_args(tiny_checkpoint, corpus), "--output", "/")
    assert_one_line(result, 2, "output / is the filesystem root")
    with pytest.raises(SLMError, match="is the filesystem root"):
        check_output_dir("/", overwrite=True)


def test_apply_and_heal_refuse_their_input(place, tiny_checkpoint, corpus, tmp_path):
    plan = tmp_path / "plan.json"
    CompressionPlan.for_model(make_model("llama", 6), "t", [drop_op([1])]).save(plan)
    before = snapshot(tmp_path)
    result = run("apply", "--model", tiny_checkpoint, "--plan", str(plan), "--output", tiny_checkpoint, "--overwrite")
    assert_one_line(result, 2, "is this run's input")
    result = run("heal", "--model", tiny_checkpoint, "--data", corpus, "--max-steps", "1",
                 "--output", tiny_checkpoint, "--overwrite")
    assert_one_line(result, 2, "is this run's input")
    result = run("heal", "--model", tiny_checkpoint, "--data", corpus, "--max-steps", "1",
                 "--output", os.path.join(tiny_checkpoint, "healed"))
    assert_one_line(result, 2, "is inside this run's input")
    assert snapshot(tmp_path) == before


def test_the_compressor_refuses_its_source(place, tiny_checkpoint, tmp_path):
    compressor = SLMCompressor.from_pretrained(tiny_checkpoint)
    before = snapshot(tmp_path)
    with pytest.raises(SLMError, match="is this run's input"):
        compressor.compress(tiny_checkpoint, "sleb", num_layers=1, overwrite=True)
    with pytest.raises(SLMError, match="is inside this run's input"):
        compressor.apply(CompressionPlan.for_model(compressor.model, "t", [drop_op([1])]),
                         os.path.join(tiny_checkpoint, "out"))
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------ clean-up
def _marked(folder, token: str, content: str = "partial") -> None:
    folder.mkdir()
    (folder / TEMP_MARKER).write_text(token + "\n")
    (folder / "model.safetensors").write_text(content)


def test_only_what_a_killed_run_made_is_removed(tiny_checkpoint, corpus, tmp_path, caplog):
    mine = {"out.old-backup": "my backup", ".out.tmp-notes": "my notes", "out.old": "old"}
    for name, text in mine.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "f.txt").write_text(text)
    (tmp_path / ".out.tmp-12-34").mkdir()  # empty, but not named like ours (<pid>-<start>-<random>)
    _marked(tmp_path / f".out.tmp-{DEAD}-abc", DEAD)  # a killed run's
    reused = f"{os.getppid()}-1"  # a live pid, but another process: its start time differs
    _marked(tmp_path / f".out.tmp-{reused}-abf", reused)
    (tmp_path / f".out.tmp-{DEAD}-abd").mkdir()  # killed before it wrote its marker
    (tmp_path / f".out.tmp-{DEAD}-abc0").mkdir()  # killed between creating its marker and writing the line
    (tmp_path / f".out.tmp-{DEAD}-abc0" / TEMP_MARKER).write_text("")
    (tmp_path / f".out.tmp-{DEAD}-abc1").mkdir()  # an empty marker beside something else: not provably ours
    (tmp_path / f".out.tmp-{DEAD}-abc1" / TEMP_MARKER).write_text("")
    (tmp_path / f".out.tmp-{DEAD}-abc1" / "f.txt").write_text("kept")
    _marked(tmp_path / f".out.tmp-{run_token()}-abe", run_token())  # a live run's (this one)
    (tmp_path / ".out.lock").write_text(f"{reused}\n")  # the lock of a killed run (no flock held on it)
    result = run(*compress_args(tiny_checkpoint, corpus), "--output", str(tmp_path / "out"), "--overwrite")
    assert result.exit_code == 0, result.output
    left = sorted(f for f in os.listdir(tmp_path) if f.startswith((".out", "out")))
    assert left == sorted([".out.tmp-12-34", f".out.tmp-{run_token()}-abe", f".out.tmp-{DEAD}-abc1", "out", *mine]), left
    for name, text in mine.items():
        assert (tmp_path / name / "f.txt").read_text() == text
    assert "left by a run that was killed" in caplog.text


def test_a_live_run_holding_the_lock_refuses_a_second(tiny_checkpoint, corpus, tmp_path):
    (tmp_path / ".out.lock").write_text(f"{os.getppid()}\n")  # a live process, recorded by pid alone
    result = run(*compress_args(tiny_checkpoint, corpus), "--output", str(tmp_path / "out"))
    assert_one_line(result, 2, f"another run (pid {os.getppid()}) is writing")
    assert (tmp_path / ".out.lock").read_text() == f"{os.getppid()}\n"
    assert not os.path.exists(tmp_path / "out")


RACER = textwrap.dedent("""
    import sys, time
    from optimum_slm.errors import SLMError
    from optimum_slm.io.output import claim_output
    start = float(sys.argv[2])
    time.sleep(max(0.0, start - time.time() - 0.05))
    while time.time() < start:  # all four take the lock at the same moment
        pass
    try:
        with claim_output(sys.argv[1]):
            print("won", flush=True)
            time.sleep(1.5)
    except SLMError as exc:
        print("refused:", exc, flush=True)
""")


def test_runs_racing_on_a_stale_lock_one_wins(tmp_path):
    (tmp_path / ".out.lock").write_text(f"{DEAD}\n")
    start = time.time() + 2.0
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / "out"), str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(o.split(":")[0] for o in outs) == ["refused"] * 3 + ["won"], outs
    assert all("is writing" in o for o in outs if o.startswith("refused")), outs
    assert not os.path.exists(tmp_path / ".out.lock")


def test_a_claim_nests_and_is_released(tmp_path):
    with claim_output(tmp_path / "out") as target:
        with claim_output(target):
            assert os.path.exists(tmp_path / ".out.lock")
        assert os.path.exists(tmp_path / ".out.lock")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------ SIGTERM
def test_sigterm_is_one_line_exit_143_and_leaves_nothing(tiny_checkpoint, corpus, tmp_path, monkeypatch):
    from optimum_slm import orchestrate

    def terminated(*args, **kwargs):
        # the CLI's handler must be in place, else this signal would end the test run
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM was not handled")

    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(orchestrate, "write_result", terminated)
    result = run(*compress_args(tiny_checkpoint, corpus), "--output", str(tmp_path / "out"))
    assert_one_line(result, 143, "terminated (SIGTERM)")
    assert signal.getsignal(signal.SIGTERM) == handler  # given back
    assert not [f for f in os.listdir(tmp_path) if "out" in f]


# ------------------------------------------------------------------------------------------------ TMPDIR
def test_spill_folders_of_killed_runs_are_removed(tmp_path, monkeypatch):
    from optimum_slm.engine.spill import ActivationFolder, SpillStore

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    _marked(tmp_path / f"slm-spill-{DEAD}-abc", DEAD)
    _marked(tmp_path / f"slm-activations-{DEAD}-abc", DEAD)
    (tmp_path / f"slm-spill-{DEAD}-abd").mkdir()  # killed before its marker
    (tmp_path / "slm-spill-mine").mkdir()  # a user's: not marked
    (tmp_path / "slm-spill-mine" / "f.txt").write_text("mine")
    _marked(tmp_path / f"slm-activations-{run_token()}-abe", run_token())  # a live run's
    store = SpillStore()
    folder = ActivationFolder()
    ours = {os.path.basename(store._dir.name), os.path.basename(folder._dir.name)}
    assert all(name.startswith(("slm-spill-" + run_token(), "slm-activations-" + run_token())) for name in ours)
    assert set(os.listdir(tmp_path)) == {"slm-spill-mine", f"slm-activations-{run_token()}-abe", *ours}
    del store, folder
    assert set(os.listdir(tmp_path)) == {"slm-spill-mine", f"slm-activations-{run_token()}-abe"}


def test_a_killed_gguf_conversions_temp_folder_is_removed_and_nothing_else(tmp_path, monkeypatch):
    """GGUF conversions write into marked temp folders in the conversion cache, cleaned like every other temp folder
    of ours: a dead run's marked folder goes (its pid reused or not), a user's look-alike stays."""
    from optimum_slm.errors import ModelLoadError
    from optimum_slm.loading import CONVERT_PREFIX, cache_dir, convert_gguf

    monkeypatch.setenv("OPTIMUM_SLM_CACHE", str(tmp_path / "cache"))
    converted = cache_dir("converted")
    dead = os.path.join(converted, f"{CONVERT_PREFIX}{DEAD}-abcd1234")
    os.makedirs(dead)
    with open(os.path.join(dead, TEMP_MARKER), "w", encoding="utf-8") as fh:
        fh.write(f"{DEAD} {socket.gethostname()}\n")
    with open(os.path.join(dead, "model.safetensors"), "wb") as fh:
        fh.write(b"partial")
    mine = os.path.join(converted, f"{CONVERT_PREFIX}notes")  # named like ours, but not ours
    os.makedirs(mine)
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(ModelLoadError, match="cannot read GGUF file"):
        convert_gguf(str(tmp_path), "broken.gguf")
    assert not os.path.exists(dead) and os.path.isdir(mine)
    assert sorted(os.listdir(converted)) == [f"{CONVERT_PREFIX}notes"]  # the failed conversion left nothing
