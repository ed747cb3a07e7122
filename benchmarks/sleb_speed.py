"""SLEB fast path vs the naive full-forward loop on SmolLM2-135M: a bounded run (a few removal rounds).

Both loops make the same choices (checked here and in tests/test_baselines.py). The naive loop is timed two ways:
one calibration sequence per forward, as the official ``get_loss`` does, and all sequences in one batch.

    OMP_NUM_THREADS=2 python benchmarks/sleb_speed.py --rounds 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

from optimum_slm import load_calibration, load_model
from optimum_slm.engine import ForwardEngine
from optimum_slm.passes.depth.sleb import sleb_fast, sleb_naive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=1, help="removal rounds to time (each tries every alive block)")
    parser.add_argument("--output", default=None, help="also write the numbers as markdown here")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model)
    ids = load_calibration(tokenizer, "wiki-leads", n_samples=10, seq_len=128, seed=1234).ids
    rows = []

    t = time.perf_counter()
    fast, _ = sleb_fast(ForwardEngine(model, ids), args.rounds)  # includes recording the layer inputs
    rows.append(("fast (engine, recorded activations)", time.perf_counter() - t, fast))
    for per_sample, label in ((True, "naive, one sequence per forward (official)"), (False, "naive, one batch")):
        t = time.perf_counter()
        removed, _ = sleb_naive(model, ids, args.rounds, per_sample=per_sample)
        rows.append((label, time.perf_counter() - t, removed))

    lines = [
        f"SLEB speed on {args.model}, {args.rounds} removal round(s), 10 x 128 wiki-leads calibration, "
        f"torch threads {torch.get_num_threads()}",
        "",
        "| loop | seconds | speed-up of fast | removed |",
        "|---|---:|---:|---|",
    ]
    fast_time = rows[0][1]
    for label, seconds, removed in rows:
        lines.append(f"| {label} | {seconds:.1f} | {seconds / fast_time:.2f}x | {removed} |")
    same = all(r[2] == fast for r in rows)
    lines += ["", f"same choices: {same}", "", f"command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} "
              f"python benchmarks/sleb_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}`"]
    text = "\n".join(lines)
    print(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
