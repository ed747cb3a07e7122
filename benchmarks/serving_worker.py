"""One engine timing one model: run by ``benchmarks/serving.py`` under the engine's own Python (vLLM and llama.cpp
live in their own virtual environments), so this file imports only the standard library and the engine.

    python serving_worker.py ENGINE MODEL --batch 8 --prompt-len 128 --new-tokens 64

Prints one JSON line: ``prefill_tps`` (prompt tokens per second, the batch's prompts processed together),
``decode_tps`` (generated tokens per second after the prompt, timed on its own: a run with ``new_tokens`` minus a run
with one new token, each the best of ``--reps``), ``greedy`` (the first ``--check-tokens`` greedy token ids of the
first prompt) and the engine's version. Prompts are token ids (the same for every engine): seeded random ids from
the first 10,000 of the vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time


def prompts(vocab: int, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, min(vocab, 10_000)) for _ in range(length)] for _ in range(batch)]


def best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run_transformers(args) -> dict:
    import torch
    import transformers

    sys.path.insert(0, args.repo)
    from optimum_slm import load_model  # per-layer widths need our loader; others load as plain checkpoints

    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, dtype="float32")
    ids = torch.tensor(prompts(model.config.vocab_size, args.batch, args.prompt_len))

    def generate(n: int):
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=0)

    out = generate(args.check_tokens)
    greedy = out[0, ids.shape[1]:].tolist()
    one = best(lambda: generate(1), args.reps)
    full = best(lambda: generate(args.new_tokens), args.reps)
    return _rates(args, one, full, greedy, f"transformers {transformers.__version__}")


def run_vllm(args) -> dict:
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, dtype="float32", max_model_len=args.prompt_len + args.new_tokens + 8,
              enforce_eager=True, seed=0)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    batch = [{"prompt_token_ids": p} for p in prompts(vocab, args.batch, args.prompt_len)]

    def generate(n: int):
        return llm.generate(batch, SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True),
                            use_tqdm=False)

    greedy = list(generate(args.check_tokens)[0].outputs[0].token_ids)
    one = best(lambda: generate(1), args.reps)
    full = best(lambda: generate(args.new_tokens), args.reps)
    return _rates(args, one, full, greedy, f"vllm {vllm.__version__}")


def run_llama_cpp(args) -> dict:
    """llama.cpp through llama-cpp-python: one sequence at a time (its Python API has no batched generation), so
    ``--batch`` prompts run one after another and rates count all their tokens."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=args.model, n_ctx=args.prompt_len + args.new_tokens + 8, n_threads=args.threads,
                          n_batch=args.prompt_len, verbose=False, seed=0)
    batch = prompts(llm.n_vocab(), args.batch, args.prompt_len)

    def generate(n: int, keep: list | None = None):
        for k, p in enumerate(batch):
            llm.reset()
            llm.eval(p)
            for _ in range(n):
                token = llm.sample(temp=0.0, top_k=1)
                if keep is not None and k == 0:
                    keep.append(int(token))
                llm.eval([token])

    greedy: list[int] = []
    generate(args.check_tokens, greedy)
    one = best(lambda: generate(1), args.reps)
    full = best(lambda: generate(args.new_tokens), args.reps)
    return _rates(args, one, full, greedy, f"llama-cpp-python {llama_cpp.__version__}")


def _rates(args, one: float, full: float, greedy: list[int], version: str) -> dict:
    decode = full - one
    return {
        "prefill_tps": round(args.batch * args.prompt_len / one, 2),
        "decode_tps": round(args.batch * (args.new_tokens - 1) / decode, 2) if decode > 0 else None,
        "seconds_one": round(one, 4), "seconds_full": round(full, 4),
        "greedy": greedy, "engine": version,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("engine", choices=("transformers", "vllm", "llama.cpp"))
    p.add_argument("model")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--check-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = p.parse_args()
    run = {"transformers": run_transformers, "vllm": run_vllm, "llama.cpp": run_llama_cpp}[args.engine]
    print("SERVING " + json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
