"""One engine timing one model, run by ``benchmarks/serving.py`` under the engine's own Python (vLLM and llama.cpp
live in their own virtual environments): the timing code is ``optimum_slm.serving``, which imports only the standard
library and the engine, so the repository on ``sys.path`` is all this needs.

    python serving_worker.py ENGINE MODEL --batch 8 --prompt-len 128 --new-tokens 64

Prints one line ``SERVING {json}``: prefill and decode tokens per second, the first greedy token ids, the engine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("engine", choices=("transformers", "vllm", "llama.cpp"))
    p.add_argument("model", help="checkpoint folder (a .gguf file for llama.cpp)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = p.parse_args()
    sys.path.insert(0, args.repo)
    from optimum_slm import serving

    longest = max(args.new_tokens, 32)
    if args.engine == "transformers":
        from optimum_slm import load_model  # per-layer widths need our loader; others load as plain checkpoints

        model, _ = load_model(args.model, dtype="float32")
        runner = serving.TransformersRunner(model, args.batch, args.prompt_len)
    elif args.engine == "vllm":
        runner = serving.VLLMRunner(args.model, args.batch, args.prompt_len, longest)
    else:
        runner = serving.LlamaCppRunner(args.model, args.batch, args.prompt_len, longest)
    result = serving.measure([runner], args.batch, args.prompt_len, args.new_tokens, args.reps)[0]
    print("SERVING " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
