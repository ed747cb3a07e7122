"""``lm_eval --model slm``: the HFLM subclass in process, and the real lm-eval CLI in a subprocess (start-up hook,
plan cache reuse, ``python -m lm_eval_slm`` fallback with a saved plan)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import CORPUS_WORDS, make_model, write_corpus
from optimum_slm.errors import ModelLoadError, PassError, PlanError, SLMError

lm_eval = pytest.importorskip("lm_eval")
from lm_eval_slm.model import SLMLM  # noqa: E402

TASK = "slm_tiny_mc"
BIN = os.path.dirname(sys.executable)
SMALL_CALIB = {"calib_samples": 4, "calib_seq_len": 16}


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


def write_task(directory) -> str:
    """A 3-way multiple-choice task over a JSONL file (absolute path: lm-eval resolves data_files from the CWD)."""
    os.makedirs(directory, exist_ok=True)
    data = os.path.join(directory, "mc.jsonl")
    with open(data, "w", encoding="utf-8") as fh:
        for i, word in enumerate(CORPUS_WORDS):
            row = {"question": f"which words follow {word}", "choices": ["layer merge", "token window", "data state"],
                   "label": i % 3}
            fh.write(json.dumps(row) + "\n")
    with open(os.path.join(directory, f"{TASK}.yaml"), "w", encoding="utf-8") as fh:
        fh.write(
            f"task: {TASK}\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
            "output_type: multiple_choice\n"
            "test_split: test\n"
            'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
            'doc_to_choice: "{{choices}}"\n'
            "doc_to_target: label\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "metadata:\n  version: 1.0\n"
        )
    return str(directory)


def make_lm(base: str, **kwargs) -> SLMLM:
    return SLMLM(base=base, device="cpu", batch_size=1, **kwargs)


def layer_count(lm: SLMLM) -> int:
    return len(lm.model.get_decoder().layers)


# ------------------------------------------------------------------ in process
def test_builds_the_compressed_model_and_reuses_the_cached_plan(tiny_checkpoint, corpus, tmp_path):
    cache = str(tmp_path / "plans")
    first = make_lm(tiny_checkpoint, num_layers=2, calib=corpus, plan_cache=cache, **SMALL_CALIB)
    assert layer_count(first) == 4 and first.config.num_hidden_layers == 4
    assert not first.slm_plan_reused and len(glob.glob(os.path.join(cache, "*.json"))) == 1
    second = make_lm(tiny_checkpoint, num_layers=2, calib=corpus, plan_cache=cache, **SMALL_CALIB)
    assert second.slm_plan_reused and second.slm_plan.ops == first.slm_plan.ops
    # other calibration -> other key -> a new plan
    third = make_lm(tiny_checkpoint, num_layers=2, calib=corpus, plan_cache=cache, seed=7, **SMALL_CALIB)
    assert not third.slm_plan_reused and len(glob.glob(os.path.join(cache, "*.json"))) == 2
    # a saved plan rebuilds the same weights
    plan_file = tmp_path / "plan.json"
    first.slm_plan.save(plan_file)
    from_plan = make_lm(tiny_checkpoint, plan=str(plan_file))
    a, b = first.model.state_dict(), from_plan.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_extra_keys_go_to_the_pass(tiny_checkpoint, corpus, tmp_path):
    lm = make_lm(tiny_checkpoint, ratio=0.34, max_window=2, calib=corpus, plan_cache=str(tmp_path), **SMALL_CALIB)
    assert lm.slm_plan.params["max_window"] == 2
    assert all(hi - lo == 1 for lo, hi in lm.slm_plan.windows)
    with pytest.raises(PassError, match="has no parameter 'windowz'; valid: ratio"):
        make_lm(tiny_checkpoint, ratio=0.3, windowz=3, calib=corpus)
    with pytest.raises(PassError, match="unknown pass"):
        make_lm(tiny_checkpoint, method="nope")
    with pytest.raises(PassError, match="plan= applies a saved plan"):
        make_lm(tiny_checkpoint, plan="p.json", ratio=0.2)
    # no calib=: the bundled wiki-leads corpus, as slm compress defaults to
    default = make_lm(tiny_checkpoint, ratio=0.34, plan_cache=str(tmp_path), **SMALL_CALIB)
    assert default.slm_plan.method == "slm-plus" and default.slm_plan.calibration["source"] == "wiki-leads"


def test_plan_for_another_base_is_refused(tiny_checkpoint, tiny_tokenizer, corpus, tmp_path):
    lm = make_lm(tiny_checkpoint, num_layers=1, calib=corpus, plan_cache=str(tmp_path / "c"), **SMALL_CALIB)
    plan_file = tmp_path / "plan.json"
    lm.slm_plan.save(plan_file)
    other = tmp_path / "other"
    make_model("llama", 6, seed=3).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    with pytest.raises(PlanError, match="another base"):
        make_lm(str(other), plan=str(plan_file))


def test_parallelize_loads_the_streamed_compressed_checkpoint_with_a_device_map(tiny_checkpoint, corpus, tmp_path,
                                                                              monkeypatch):
    """parallelize=True: the compressed checkpoint is planned and written with the layers streamed from the base's
    shards, then HFLM loads it with its accelerate device map (here, on a CPU-only machine, offloaded to disk)."""
    monkeypatch.setenv("OPTIMUM_SLM_CACHE", str(tmp_path / "cache"))
    args = dict(num_layers=2, calib=corpus, plan_cache=str(tmp_path / "plans"), **SMALL_CALIB)
    plain = make_lm(tiny_checkpoint, **args)
    mapped = make_lm(tiny_checkpoint, parallelize=True, offload_folder=str(tmp_path / "offload"), **args)
    assert mapped.slm_prebuilt and getattr(mapped.model, "hf_device_map", None) is not None
    assert mapped.slm_plan.ops == plain.slm_plan.ops and layer_count(mapped) == 4
    probe = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        assert torch.allclose(mapped.model(probe).logits, plain.model(probe).logits, atol=1e-5)
    again = make_lm(tiny_checkpoint, parallelize=True, offload_folder=str(tmp_path / "offload"), **args)
    assert again.slm_prebuilt == mapped.slm_prebuilt and again.slm_plan_reused  # same plan: the same folder
    with pytest.raises(SLMError, match="tp_plan"):
        make_lm(tiny_checkpoint, tp_plan="auto", **args)
    with pytest.raises(SLMError, match="same widths in every layer"):
        make_lm(tiny_checkpoint, method="flap", ratio=0.3, structure="AL-AM", parallelize=True, calib=corpus,
                plan_cache=str(tmp_path / "plans"), **SMALL_CALIB)


def test_a_base_over_max_memory_is_compressed_streamed_and_never_loaded_whole(tiny_checkpoint, corpus, tmp_path,
                                                                              monkeypatch):
    """max_memory= (the orchestrator's streaming decision, as ``slm compress --max-memory``): the base's layers are
    streamed while planning and the compressed checkpoint written, which lm-eval then loads; same model as in memory."""
    from optimum_slm.orchestrate import ModelSource

    monkeypatch.setenv("OPTIMUM_SLM_CACHE", str(tmp_path / "cache"))
    args = dict(num_layers=2, calib=corpus, plan_cache=str(tmp_path / "plans"), **SMALL_CALIB)
    plain = make_lm(tiny_checkpoint, **args)
    loads = []
    original = ModelSource.load
    monkeypatch.setattr(ModelSource, "load", lambda self, lazy=False: loads.append(lazy) or original(self, lazy))
    streamed = make_lm(tiny_checkpoint, max_memory="1KB", **args)
    assert loads == [True] and streamed.slm_prebuilt and layer_count(streamed) == 4
    assert streamed.slm_plan.ops == plain.slm_plan.ops
    probe = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        assert torch.allclose(streamed.model(probe).logits, plain.model(probe).logits, atol=1e-5)
    with pytest.raises(SLMError, match="expected a size like 2GiB"):
        make_lm(tiny_checkpoint, max_memory="lots", **args)


def test_a_model_offloaded_by_accelerate_is_refused_in_one_line(tiny_checkpoint, corpus, tmp_path):
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM

    from optimum_slm import compress

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "disk" if i == 3 else "cpu" for i in range(6)}}
    model = dispatch_model(model, device_map, offload_dir=str(tmp_path / "offload"))
    with pytest.raises(ModelLoadError, match="offloaded by accelerate"):
        compress(model, "shortgpt", torch.randint(0, 300, (2, 8)), num_layers=1, cache=False)


def test_peft_adapter_is_applied_after_compression(tiny_checkpoint, corpus, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    cache = str(tmp_path / "plans")
    lm = make_lm(tiny_checkpoint, method="drop", layers=[1, 2], plan_cache=cache)
    adapter = get_peft_model(lm.model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "lora")
    with_lora = make_lm(tiny_checkpoint, method="drop", layers=[1, 2], plan_cache=cache, peft=str(tmp_path / "lora"))
    assert isinstance(with_lora.model, PeftModel)
    assert len(with_lora.model.get_base_model().model.layers) == 4


# ------------------------------------------------------------------ the lm-eval command line (subprocesses)
def _env(cache: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OPTIMUM_SLM_PLAN_CACHE"}  # plans go under ``cache``
    return dict(env, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
                TOKENIZERS_PARALLELISM="false", HF_HOME=os.path.join(cache, "hf"), OPTIMUM_SLM_CACHE=cache)


def _results(output: str) -> dict:
    files = sorted(glob.glob(os.path.join(output, "**", "results_*.json"), recursive=True))
    assert files, f"no results JSON under {output}"
    with open(files[-1], encoding="utf-8") as fh:
        return json.load(fh)


def _lm_eval(argv: list[str], model_args: str, tasks: str, output: str, env: dict) -> subprocess.CompletedProcess:
    cmd = [*argv, "--model", "slm", "--model_args", model_args, "--tasks", TASK, "--include_path", tasks,
           "--limit", "8", "--device", "cpu", "--batch_size", "4", "--output_path", output]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_lm_eval_cli_model_slm_with_plan_cache(tiny_checkpoint, corpus, tmp_path):
    tasks = write_task(tmp_path / "tasks")
    cache = str(tmp_path / "cache")
    env = _env(cache)
    args = f"base={tiny_checkpoint},num_layers=2,calib={corpus},calib_samples=4,calib_seq_len=16"
    first = _lm_eval([os.path.join(BIN, "lm_eval")], args, tasks, str(tmp_path / "r1"), env)
    assert "computed a slm-plus plan" in first.stderr and "6 -> 4 layers" in first.stderr
    res1 = _results(str(tmp_path / "r1"))
    assert TASK in res1["results"] and "acc,none" in res1["results"][TASK]
    assert res1["config"]["model"] == "slm"

    second = _lm_eval([os.path.join(BIN, "lm_eval")], args, tasks, str(tmp_path / "r2"), env)
    assert "reusing cached plan" in second.stderr and "6 -> 4 layers" in second.stderr
    assert _results(str(tmp_path / "r2"))["results"][TASK] == res1["results"][TASK]

    # the fallback entry point, hook disabled, with the cached plan as plan=: the same numbers
    (plan_file,) = glob.glob(os.path.join(cache, "plans", "*.json"))
    fallback = _lm_eval([sys.executable, "-m", "lm_eval_slm"], f"base={tiny_checkpoint},plan={plan_file}", tasks,
                        str(tmp_path / "r3"), dict(env, OPTIMUM_SLM_NO_LM_EVAL_HOOK="1"))
    assert "6 -> 4 layers" in fallback.stderr
    assert _results(str(tmp_path / "r3"))["results"][TASK] == res1["results"][TASK]


def test_data_parallel_cpu_processes_split_the_requests(tiny_checkpoint, corpus, tmp_path):
    """``accelerate launch`` with two CPU processes: the main one computes and caches the plan, the other reuses it,
    each evaluates half of the requests, and the gathered result equals one process's."""
    import socket

    tasks = write_task(tmp_path / "tasks")
    env = _env(str(tmp_path / "cache"))
    args = f"base={tiny_checkpoint},num_layers=2,calib={corpus},calib_samples=4,calib_seq_len=16"
    one = _lm_eval([os.path.join(BIN, "lm_eval")], args, tasks, str(tmp_path / "one"), env)
    assert "/24 [" in one.stderr  # 8 documents x 3 choices in one process
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    launch = [os.path.join(BIN, "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), "-m", "lm_eval"]
    cache = str(tmp_path / "cache2")
    both = _lm_eval(launch, args, tasks, str(tmp_path / "two"), dict(_env(cache), ACCELERATE_USE_CPU="1"))
    assert "Building contexts for slm_tiny_mc on rank 1" in both.stderr  # two processes, each with its share
    assert both.stderr.count("computed a slm-plus plan") == 1 and "reusing cached plan" in both.stderr
    assert "/12 [" in both.stderr and "/24 [" not in both.stderr  # each process ran half of the 24 requests
    assert _results(str(tmp_path / "two"))["results"][TASK] == _results(str(tmp_path / "one"))["results"][TASK]


def test_startup_hook_keeps_builtin_models_and_registers_slm_lazily():
    probe = (
        "import sys\n"
        "assert 'lm_eval' not in sys.modules and 'torch' not in sys.modules\n"
        "from lm_eval.api.registry import get_model, model_registry\n"
        "print(get_model('hf').__name__, 'slm' in model_registry)\n"
        "print(get_model('slm').__name__ if 'slm' in model_registry else '-')\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    with_hook = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert with_hook.returncode == 0, with_hook.stderr
    assert with_hook.stdout.split() == ["HFLM", "True", "SLMLM"]
    env["OPTIMUM_SLM_NO_LM_EVAL_HOOK"] = "1"
    without = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert without.returncode == 0, without.stderr
    assert without.stdout.split() == ["HFLM", "False", "-"]
