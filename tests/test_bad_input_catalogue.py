"""The bad-input and fault catalogue: every case gives one ``error:`` line, the documented exit code, no traceback,
and nothing written (README "Bad input and faults")."""

from __future__ import annotations

import base64
import json
import os

import pytest
import torch
from click.testing import CliRunner

from conftest import assert_one_line, make_model, run
from optimum_slm.cli import cli
from optimum_slm.plan import CompressionPlan, drop_op, fingerprint_v1

CALIB = ["--calib-samples", "4", "--calib-seq-len", "16"]



def leftovers(folder) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.startswith(".") or f.startswith("out"))


# ------------------------------------------------------------------------------------------------ corpora
def _latin1(path):
    path.write_bytes("café crème brûlée\n\n".encode("latin-1") * 50)


def _binary(path):
    path.write_bytes(bytes(range(256)) * 20)


@pytest.mark.parametrize("name, write, message", [
    ("latin1.txt", _latin1, "is not UTF-8 text"),
    ("binary.txt", _binary, "is not UTF-8 text"),
    ("number.json", lambda p: p.write_text("42"), "must hold a list of documents"),
    ("string.json", lambda p: p.write_text('"just a string"'), "must hold a list of documents"),
    ("rows.json", lambda p: p.write_text("[1.5, [2]]"), "row 1 is float, not a document"),
    ("nulls.jsonl", lambda p: p.write_text('{"text": null}\n'), "is not text"),
])
def test_bad_corpora(tiny_checkpoint, tmp_path, name, write, message):
    write(tmp_path / name)
    result = run("compress", "--model", tiny_checkpoint, "--calib-data", str(tmp_path / name), *CALIB,
                 "--num-layers", "1", "--output", str(tmp_path / "out"))
    assert_one_line(result, 2, message)
    assert not leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------ parameters
@pytest.mark.parametrize("args, message", [
    (["--method", "slm", "--threshold", "5"], "threshold must be in [-1, 1)"),
    (["--method", "slm", "--threshold", "-3"], "threshold must be in [-1, 1)"),
    (["--method", "slm", "--threshold", "nan"], "expected a finite number"),
    (["--ratio", "inf"], "expected a finite number"),
    (["--ratio", "1.5"], "ratio must be in (0, 1)"),
    (["--num-layers", "6"], "cannot remove 6 of 6 layers"),
    (["--ratio", "0.2", "--num-layers", "1"], "give only one of --ratio, --num-layers"),
    (["--num-layers", "1", "--param", "protect=0-300000000"], "longer than 100000 values"),
    (["--num-layers", "1", "--param", "batch_size=0"], "batch_size must be >= 1"),
    (["--num-layers", "1", "--dtype", "float8"], "Invalid value for '--dtype'"),
    (["--num-layers", "1", "--calib-samples", "0"], "n_samples must be an integer in 1.."),
    (["--num-layers", "1", "--bogus"], "No such option '--bogus'"),
    (["--num-layers", "1", "--fit-samples", "0"], "fit_samples must be an integer in 1.."),
    (["--num-layers", "1", "--fit-seq-len", "1"], "fit_seq_len must be an integer in 2.."),
    (["--num-layers", "1", "--calib-sampling", "random"], "Invalid value for '--calib-sampling'"),
    (["--num-layers", "1", "--param", "ridge=-1"], "ridge must be a finite number >= 0"),
    (["--num-layers", "1", "--param", "ridge=inf"], "expected a finite number"),
    (["--num-layers", "1", "--merge", "calibrated", "--param", "ridge=0.1"],
     "ridge applies to merge rules with a fitted map"),
    (["--num-layers", "1", "--merge", "calibrated", "--param", "search_ridge=0.1"],
     "search_ridge applies to merge rules with a fitted map"),
    (["--method", "replaceme", "--num-layers", "1", "--param", "num_blocks=0"], "num_blocks must be >= 1"),
    (["--num-layers", "1", "--param", "outlier_clip=0.5"], "outlier_clip must be a finite number >= 1"),
    (["--method", "replaceme", "--num-layers", "1", "--param", "outlier_clip=nan"], "expected a finite number"),
    (["--num-layers", "1", "--merge", "calibrated", "--param", "outlier_clip=32"],
     "outlier_clip applies to merge rules with a fitted map"),
    (["--num-layers", "1", "--param", "refine_epochs=0"], "refine_epochs must be >= 1"),
    (["--num-layers", "1", "--param", "refine_epochs=2", "--param", "refine_lr=-1"],
     "refine_lr must be a finite number > 0"),
    (["--num-layers", "1", "--merge", "calibrated", "--param", "refine_epochs=2"],
     "refine_epochs needs a merge rule that fits"),
])
def test_bad_parameters(tiny_checkpoint, corpus, tmp_path, args, message):
    result = run("compress", "--model", tiny_checkpoint, "--calib-data", corpus, *CALIB, *args,
                 "--output", str(tmp_path / "out"))
    assert_one_line(result, 2, message)
    assert not leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------ models and outputs
def test_truncated_weights(tiny_checkpoint, corpus, tmp_path):
    weights = os.path.join(tiny_checkpoint, "model.safetensors")
    with open(weights, "r+b") as fh:
        fh.truncate(os.path.getsize(weights) // 2)
    result = run("compress", "--model", tiny_checkpoint, "--calib-data", corpus, *CALIB, "--num-layers", "1",
                 "--output", str(tmp_path / "out"))
    assert_one_line(result, 2, "cannot load model")
    assert not os.path.exists(tmp_path / "out")


def test_pickle_only_checkpoint_is_refused(tmp_path, tiny_tokenizer, corpus):
    model = make_model("llama", 4)
    model.config.save_pretrained(tmp_path / "pkl")
    torch.save(model.state_dict(), tmp_path / "pkl" / "pytorch_model.bin")  # what older tools write
    tiny_tokenizer.save_pretrained(tmp_path / "pkl")
    assert not any(f.endswith(".safetensors") for f in os.listdir(tmp_path / "pkl"))
    result = run("compress", "--model", str(tmp_path / "pkl"), "--calib-data", corpus, *CALIB, "--num-layers", "1",
                 "--output", str(tmp_path / "out"))
    assert_one_line(result, 2, "holds only pickle weights")
    assert "--allow-pickle" in result.stderr and not os.path.exists(tmp_path / "out")


def test_unknown_name_fails_at_once_offline(tmp_path, corpus, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # even with the hub "reachable", nothing is tried
    result = run("compress", "--model", "no-org/no-such-model-xyz", "--calib-data", corpus, "--num-layers", "1",
                 "--output", str(tmp_path / "out"))
    assert_one_line(result, 2, "downloads are off (allow them with --allow-download)")


def test_analyze_takes_the_same_loading_flags_as_compress(tmp_path, corpus, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    result = run("analyze", "--model", "no-org/no-such-model-xyz", "--calib-data", corpus, "--output",
                 str(tmp_path / "a"))
    assert_one_line(result, 2, "downloads are off (allow them with --allow-download)")
    assert not os.path.exists(tmp_path / "a")
    for flag in ("--allow-download", "--allow-pickle"):
        assert flag in run("analyze", "--help").stdout


def test_unwritable_output(tiny_checkpoint, corpus):
    result = run("compress", "--model", tiny_checkpoint, "--calib-data", corpus, *CALIB, "--num-layers", "1",
                 "--output", "/proc/optimum-slm-test/out")
    assert_one_line(result, 2, "cannot create /proc/optimum-slm-test")


def test_no_room_is_refused_before_the_model_loads(tiny_checkpoint, corpus, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    result = run("compress", "--model", tiny_checkpoint, "--calib-data", corpus, *CALIB, "--num-layers", "1",
                 "--output", str(tmp_path / "out"))
    assert_one_line(result, 2, "not enough room for the output")
    assert not leftovers(tmp_path)


def test_a_second_run_on_the_same_output_is_refused(tiny_checkpoint, corpus, tmp_path):
    (tmp_path / ".out.lock").write_text(f"{os.getppid()}\n")  # a live process holds the folder
    result = run("compress", "--model", tiny_checkpoint, "--calib-data", corpus, *CALIB, "--num-layers", "1",
                 "--output", str(tmp_path / "out"))
    assert_one_line(result, 2, "is writing")
    assert not os.path.exists(tmp_path / "out")


def test_leftovers_of_a_killed_run_are_cleaned(tiny_checkpoint, corpus, tmp_path, caplog):
    (tmp_path / ".out.lock").write_text("999999999\n")  # no such process
    dead = tmp_path / ".out.tmp-999999999-1-dead"  # a temp folder of a run that is gone, marked as ours
    dead.mkdir()
    (dead / ".slm-temp").write_text("999999999-1\n")
    (dead / "model.safetensors").write_bytes(b"partial")
    result = run("compress", "--model", tiny_checkpoint, "--calib-data", corpus, *CALIB, "--num-layers", "1",
                 "--output", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert leftovers(tmp_path) == ["out"] and "left by a run that was killed" in caplog.text


def test_unexpected_errors_are_one_line_with_a_debug_hint(tiny_checkpoint, corpus, tmp_path, monkeypatch):
    from optimum_slm import pipeline

    def boom(*args, **kwargs):
        raise RuntimeError("something broke\ninside")

    monkeypatch.setattr(pipeline, "_run_stages", boom)
    args = ["compress", "--model", tiny_checkpoint, "--calib-data", corpus, *CALIB, "--num-layers", "1",
            "--output", str(tmp_path / "out")]
    assert_one_line(run(*args), 1, "unexpected RuntimeError: something broke inside (rerun with --debug")
    with pytest.raises(RuntimeError):
        CliRunner().invoke(cli, ["--debug", "--quiet", *args], catch_exceptions=False)
    assert not leftovers(tmp_path)


def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(tiny_checkpoint, corpus, tmp_path, monkeypatch):
    import transformers

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device", "model.safetensors")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full)
    result = run("compress", "--model", tiny_checkpoint, "--calib-data", corpus, *CALIB, "--num-layers", "1",
                 "--output", str(tmp_path / "out"))
    assert_one_line(result, 1, "No space left on device")
    assert not leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------ plans
def _v1(model, ops, num_layers=6, num_layers_after=None):
    return {"format": "optimum-slm.plan", "version": 1, "method": "hand", "ops": ops,
            "num_layers_after": num_layers_after if num_layers_after is not None else 5,
            "base": {"model_type": "llama", "num_layers": num_layers, "fingerprint": fingerprint_v1(model)}}


def _f32(values) -> str:
    return base64.b64encode(torch.tensor(values, dtype=torch.float32).numpy().astype("<f4").tobytes()).decode()


@pytest.fixture
def tiny_model(tiny_checkpoint):
    from optimum_slm import load_model

    return load_model(tiny_checkpoint)[0]


@pytest.mark.parametrize("label", [
    "directory", "not utf-8", "calibration list", "scales number", "scales list", "nan scales", "nan coefficients",
    "1e18 layers", "3e7 layers", "drop everything", "truncated",
])
def test_bad_plans(tiny_model, tiny_checkpoint, tmp_path, label):
    nan = _f32([float("nan")] * 64)
    v2 = CompressionPlan.for_model(tiny_model, "t", [drop_op([1])]).to_dict()
    cases = {
        "directory": (None, "is a directory"),
        "not utf-8": (b"\xff\xfe garbage", "not UTF-8 text"),
        "calibration list": ({**v2, "stages": [{**v2["stages"][0], "calibration": [1, 2]}]}, "'calibration' must be"),
        "scales number": (_v1(tiny_model, [{"op": "merge", "layers": [3, 4], "rule": "keep-top", "scales": 7}]),
                          "'scales' must be an object"),
        "scales list": (_v1(tiny_model, [{"op": "merge", "layers": [3, 4], "rule": "keep-top", "scales": [1]}]),
                        "'scales' must be an object"),
        "nan scales": (_v1(tiny_model, [{"op": "merge", "layers": [3, 4], "rule": "keep-top",
                                         "scales": {"attn": nan, "mlp": nan}}]), "NaN"),
        "nan coefficients": (_v1(tiny_model, [{"op": "merge", "layers": [3, 4], "rule": "linear",
                                               "args": {"coefficients": [1.0, 1e999]}}]), "non-finite"),
        "1e18 layers": (_v1(tiny_model, [drop_op([1])], num_layers=10**18), "num_layers must be in 1..4096"),
        "3e7 layers": (_v1(tiny_model, [drop_op([1])], num_layers=3 * 10**7), "num_layers must be in 1..4096"),
        "drop everything": (_v1(tiny_model, [drop_op(range(6))], num_layers_after=0), "removes every layer"),
        "truncated": (json.dumps(v2)[:200], "not valid JSON"),
    }
    content, message = cases[label]
    path = tmp_path / "plan.json"
    if content is None:
        path = tmp_path / "adir"
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content).replace("Infinity", "1e999"))
    assert_one_line(run("inspect", str(path)), 2, message)
    result = run("apply", "--model", tiny_checkpoint, "--plan", str(path), "--output", str(tmp_path / "out"))
    assert_one_line(result, 2, message)
    assert not os.path.exists(tmp_path / "out")


def test_a_free_form_trace_never_breaks_inspect(tiny_model, tmp_path):
    data = CompressionPlan.for_model(tiny_model, "t", [drop_op([1])]).to_dict()
    data["stages"][0]["trace"] = {"tried": [{"window": [1, 2], "sim": "high", "passed": True}, 3, None],
                                  "windows": "x", "similarity_evaluations": "many"}
    (tmp_path / "p.json").write_text(json.dumps(data))
    result = run("inspect", str(tmp_path / "p.json"))
    assert result.exit_code == 0 and "Traceback" not in result.output


# ------------------------------------------------------------------------------------------------ lm-eval
@pytest.mark.parametrize("kwargs, message", [
    ({"windowz": 3}, "has no parameter 'windowz'"),
    ({"base": None}, "needs base="),
    ({"ratio": 1.5}, "ratio must be in (0, 1)"),
    ({"ratio": 0.2, "calib_samples": "many"}, "calib_samples must be an integer"),
    ({"ratio": 0.2, "fit_samples": "many"}, "fit_samples must be an integer"),
    ({"ratio": 0.2, "calib_sampling": "random"}, "calibration sampling must be one of"),
    ({"plan": "TRUNCATED"}, "not valid JSON"),
    ({"plan": "OTHER_BASE"}, "made for another base"),
])
def test_lm_eval_bad_model_args_are_one_line(tiny_checkpoint, tmp_path, monkeypatch, capsys, kwargs, message):
    pytest.importorskip("lm_eval")
    from lm_eval_slm.model import CLI_FLAG, SLMLM

    if kwargs.get("plan") == "TRUNCATED":
        (tmp_path / "p.json").write_text('{"format": "optimum-slm.plan", "version": 2, "ba')
        kwargs = {"plan": str(tmp_path / "p.json")}
    elif kwargs.get("plan") == "OTHER_BASE":
        CompressionPlan.for_model(make_model("llama", 6, seed=9), "t", [drop_op([1])]).save(tmp_path / "p.json")
        kwargs = {"plan": str(tmp_path / "p.json")}
    monkeypatch.setenv(CLI_FLAG, "1")
    args = {"base": tiny_checkpoint, "device": "cpu", "batch_size": 1, **kwargs}
    with pytest.raises(SystemExit) as exit_info:
        SLMLM(**args)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], lines


def test_a_damaged_converted_copy_is_not_trusted(tmp_path):
    from optimum_slm.loading import _conversion_intact, _write_manifest

    folder = tmp_path / "converted"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"x" * 1000)
    _write_manifest(str(folder))
    assert _conversion_intact(str(folder))
    with open(folder / "model.safetensors", "r+b") as fh:
        fh.truncate(10)
    assert not _conversion_intact(str(folder))
    (folder / "slm_converted.json").unlink()
    assert not _conversion_intact(str(folder))  # a copy from before the manifest, or cut before it, is redone
