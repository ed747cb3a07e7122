"""Faults of integrity (issue 29): a base that differs in most of its values, an incomplete checkpoint, caches
trusted on weak keys, pickle and network in lm-eval. Each is refused in one line or detected and recomputed (README
"Bad input and faults")."""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
import time

import pytest
import torch

from conftest import assert_one_line, make_model, run
from optimum_slm import CompressionPlan, PlanError, apply_plan
from optimum_slm.errors import ModelLoadError
from optimum_slm.plan import drop_op
from optimum_slm.plan.fingerprint import fingerprint, fingerprint_files, fingerprint_v2

CALIB = ["--calib-samples", "4", "--calib-seq-len", "16"]



@pytest.fixture(autouse=True)
def _own_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIMUM_SLM_CACHE", str(tmp_path / "user-cache"))


# ------------------------------------------------------------------------------------------------ 1. fingerprint v3
def _edits(model):
    """Edits the v2 sample does not see: 120 of 128 rows of a tensor, 7/8 of a layer's neurons, most embeddings."""
    def rows(m):
        w = m.model.layers[2].mlp.up_proj.weight  # [128, 64]: v2 samples rows 0, 16, 32, ...
        keep = set(range(0, 128, 16))
        for r in range(128):
            if r not in keep:
                w[r] += 0.5

    def neurons(m):
        mlp = m.model.layers[3].mlp
        dead = [i for i in range(128) if i % 8]  # 7 of every 8 intermediate neurons zeroed
        mlp.gate_proj.weight[dead] = 0
        mlp.up_proj.weight[dead] = 0

    def embeddings(m):
        e = m.model.embed_tokens.weight  # [320, 64]: v2 samples 8 rows
        sampled = {i * 320 // 8 for i in range(8)}
        for r in range(320):
            if r not in sampled:
                e[r] = torch.randn(64)

    return {"rows": rows, "neurons": neurons, "embeddings": embeddings}


@pytest.mark.parametrize("edit", ["rows", "neurons", "embeddings"])
def test_a_base_differing_outside_the_v2_sample_is_refused(edit):
    base = make_model("llama", 6)
    plan = CompressionPlan.for_model(base, "t", [drop_op([2])])
    assert plan.base["fingerprint_scheme"] == "v3"
    other = copy.deepcopy(base)
    with torch.no_grad():
        _edits(other)[edit](other)
    assert fingerprint_v2(other) == fingerprint_v2(base)  # the weakness v3 closes
    assert fingerprint(other) != fingerprint(base)
    with pytest.raises(PlanError, match="another base"):
        apply_plan(other, plan)
    # a v2 plan is still checked under v2 (and accepted for its own base)
    v2 = CompressionPlan.from_dict({**plan.to_dict(), "base": {**plan.base, "fingerprint": fingerprint_v2(base),
                                                               "fingerprint_scheme": "v2"}})
    apply_plan(copy.deepcopy(base), v2)


def test_the_files_fingerprint_is_remembered_only_for_identical_files(tmp_path, monkeypatch):
    from optimum_slm.io import manifest

    monkeypatch.setattr(manifest, "_SETTLE_S", 0.02)  # files changed longer ago than this are remembered
    model = make_model("llama", 2)
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    weights = folder / "model.safetensors"
    old = time.time() - 60
    for f in folder.iterdir():
        os.utime(f, (old, old))
    time.sleep(0.1)
    first = fingerprint_files(folder)
    assert first == fingerprint(model) == fingerprint_files(folder)
    assert os.listdir(tmp_path / "user-cache" / "fingerprints")  # remembered
    time.sleep(0.05)
    # rewrite one value in place, same size, mtime set back: only ctime (and the content) tell
    stat = os.stat(weights)
    data = bytearray(weights.read_bytes())
    data[-2] ^= 0x40  # the top mantissa bit of the last float32: survives bfloat16 rounding
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(weights).st_size == stat.st_size and os.stat(weights).st_mtime_ns == stat.st_mtime_ns
    assert fingerprint_files(folder) != first
    assert fingerprint_files(folder, remember=False) != first


# ------------------------------------------------------------------------------------------------ 2. incomplete
def _rewrite_weights(folder, change) -> None:
    from safetensors.torch import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    change(state)
    save_file({k: v.clone().contiguous() for k, v in state.items()}, path, metadata={"format": "pt"})


def _extra_layer(state):
    state.update({k.replace("layers.5.", "layers.6."): v for k, v in list(state.items()) if ".layers.5." in k})


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("model.layers.3.mlp.up_proj.weight"),
     "incomplete checkpoint: 1 weight(s) its config needs are missing (first: model.layers.3.mlp.up_proj.weight)"),
    (_extra_layer, "holds 9 weight(s) the model has no place for (first: model.layers.6."),
])
def test_an_incomplete_or_surplus_checkpoint_is_refused_by_compress(tiny_checkpoint, corpus, tmp_path, change,
                                                                     message):
    _rewrite_weights(tiny_checkpoint, change)
    result = run("compress", "--model", tiny_checkpoint, "--calib-data", corpus, *CALIB, "--num-layers", "1",
                 "--output", str(tmp_path / "out"))
    assert_one_line(result, 2, message)
    assert not (tmp_path / "out").exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".out")]


def test_a_complete_checkpoint_still_loads(tiny_checkpoint):
    from optimum_slm import load_model

    model, _ = load_model(tiny_checkpoint)
    assert model.config.num_hidden_layers == 6


# ------------------------------------------------------------------------------------------------ 3. caches
def test_an_edited_plan_cache_entry_is_recomputed_with_a_warning(tiny_llama, tmp_path, caplog):
    import hashlib

    from conftest import calib_ids
    from optimum_slm.pipeline import compress
    from optimum_slm.plan.cache import PlanCache

    store = PlanCache(tmp_path / "plans")
    ids = calib_ids(3, 12)
    plan = compress(tiny_llama, "sleb", ids, num_layers=1, cache=store)
    (path,) = [p for p in (tmp_path / "plans").iterdir() if p.suffix == ".json"]
    data = json.loads(path.read_text())
    data["stages"][0]["ops"] = [drop_op([0, 1, 2])]  # removes other layers
    data["num_layers_after"] = 3
    data["shape_after"] = {"num_layers": 3, "layers": [3, 4, 5]}
    path.write_text(json.dumps(data))
    digest = path.with_suffix(".sha256")
    digest.write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "\n")  # the unkeyed digest, rewritten
    with caplog.at_level(logging.WARNING):
        again = compress(tiny_llama, "sleb", ids, num_layers=1, cache=store)
    assert again.reused_from is None and again.ops == plan.ops
    assert "not bound to the key" in caplog.text
    # an intact entry moved under another key is not reused either
    key = path.stem
    other = "f" * 64
    for suffix in (".json", ".sha256"):
        os.replace(tmp_path / "plans" / f"{key}{suffix}", tmp_path / "plans" / f"{other}{suffix}")
    assert store.get(other) is not None and store.check_binding(other)
    assert compress(tiny_llama, "sleb", ids, num_layers=1, cache=store).reused_from is None
    assert compress(tiny_llama, "sleb", ids, num_layers=1, cache=store).reused_from  # rewritten: serves again


def test_concurrent_puts_of_one_key_do_not_collide(tiny_llama, tmp_path):
    from optimum_slm.plan.cache import PlanCache

    store = PlanCache(tmp_path / "plans")
    plan = CompressionPlan.for_model(tiny_llama, "t", [drop_op([1])])
    key = "a" * 64
    errors: list[BaseException] = []

    def put():
        try:
            for _ in range(25):
                store.put(key, plan)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=put) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert store.get(key).ops == plan.ops and store.check_binding(key) is None
    assert sorted(os.listdir(tmp_path / "plans")) == [f"{key}.json", f"{key}.sha256"]  # no temp files left


def test_the_gguf_conversion_key_is_the_files_content(tmp_path, monkeypatch):
    from optimum_slm.io import manifest
    from optimum_slm.loading import _gguf_cache_key

    monkeypatch.setattr(manifest, "_SETTLE_S", 0.02)
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 1000)
    old = time.time() - 60
    os.utime(path, (old, old))
    time.sleep(0.1)
    first = _gguf_cache_key(str(path))
    assert _gguf_cache_key(str(path)) == first
    assert os.listdir(tmp_path / "user-cache" / "digests")  # remembered
    time.sleep(0.05)
    stat = os.stat(path)
    path.write_bytes(b"GGUF" + b"\1" * 1000)  # same path, size and mtime: another file
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _gguf_cache_key(str(path)) != first


def test_a_tampered_prebuilt_checkpoint_is_rebuilt(tiny_checkpoint, corpus, tmp_path, caplog):
    pytest.importorskip("lm_eval")
    from lm_eval_slm.model import SLMLM

    args = dict(base=tiny_checkpoint, num_layers=2, calib=corpus, plan_cache=str(tmp_path / "plans"),
                calib_samples=4, calib_seq_len=16, max_memory="1KB", device="cpu", batch_size=1)
    first = SLMLM(**args)
    folder = first.slm_prebuilt
    assert os.path.isfile(os.path.join(folder, "slm_weights.sha256.json"))
    probe = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        want = first.model(probe).logits
    weights = os.path.join(folder, "model.safetensors")
    data = bytearray(open(weights, "rb").read())
    data[-5] ^= 0x40  # a tampered copy, same size
    with open(weights, "wb") as fh:
        fh.write(bytes(data))
    with caplog.at_level(logging.WARNING):
        second = SLMLM(**args)
    assert second.slm_prebuilt == folder and "rebuilding it" in caplog.text
    with torch.no_grad():
        assert torch.equal(second.model(probe).logits, want)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        third = SLMLM(**args)  # intact: reused without a warning
    assert "rebuilding" not in caplog.text and third.slm_prebuilt == folder


# ------------------------------------------------------------------------------------------------ 4. lm-eval
def test_lm_eval_refuses_a_pickle_adapter_and_an_unknown_id_at_once(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    from lm_eval_slm import model as slm_model
    from lm_eval_slm.model import SLMLM

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelLoadError, match="holds only pickle weights .adapter_model.bin.*allow_pickle=True"):
        SLMLM(base=tiny_checkpoint, method="drop", layers=[1], peft=str(adapter), device="cpu", batch_size=1)
    assert slm_model._adapter_folder(str(adapter), False, True) == str(adapter)  # opted in
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv(slm_model.CLI_FLAG, "1")  # as under lm-eval's command line
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        SLMLM(base="nobody/no-such-model-xyz", method="drop", layers=[1], device="cpu", batch_size=1)
    assert exit_.value.code == 2 and time.perf_counter() - started < 5
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "downloads are off (allow them with allow_download=True in --model_args)" in lines[0]
