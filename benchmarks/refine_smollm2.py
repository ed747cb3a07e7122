"""The learning rate of ``slm-plus refine_epochs=N`` on SmolLM2-135M, chosen on the validation splits.

    OMP_NUM_THREADS=2 python benchmarks/refine_smollm2.py [--plan P] [--lrs 1e-3,2e-3,4e-3] [--epochs 10]
    python benchmarks/refine_smollm2.py --table-only

The windows are not searched again: ``--plan`` (default: the ``slm-plus@0.2`` plan ``frontier_smollm2.py`` saved)
is applied to the base, then every merged layer is refined with the library's ``merge.refine.refine_layer``, exactly
as the pass does after its fit (the base's own states entering and leaving the window, the same fit set: 256 x 256
packed ``wiki-leads`` tokens after the search set's, seed 1234), once per learning rate. Each row: the held-out
relative error of every window before and after (the fit's last eighth), the best epoch, the refinement's time, and
perplexity on the validation splits (which choose) and the test corpora (which only report), 16 x 512 tokens each.
Rows are appended to ``refine_smollm2.jsonl`` (a measured row is kept; ``--redo`` recomputes), the table is
``refine_smollm2.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OPTIMUM_SLM_QUIET", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from frontier_smollm2 import TEST, VALID  # noqa: E402  the corpora of issue 27's table
from real_model import _f, load_rows  # noqa: E402

DEFAULT_PLAN = os.path.join(HERE, "results", "frontier_smollm2_plans", "slm-plus@0.2", "slm_plan.json")
DEFAULT_OUTPUT = os.path.join(HERE, "results", "refine_smollm2.md")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--plan", default=DEFAULT_PLAN)
    p.add_argument("--lrs", default="1e-3,2e-3,4e-3")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--output", default=DEFAULT_OUTPUT)
    p.add_argument("--redo", action="store_true")
    p.add_argument("--table-only", action="store_true")
    return p.parse_args(argv)


def row_name(plan_path: str, lr: float, epochs: int) -> str:
    return f"{os.path.basename(os.path.dirname(plan_path))} refine_epochs={epochs} refine_lr={lr:g}"


def measure(args, lr: float | None) -> dict:
    import torch

    from optimum_slm import CalibrationConfig, apply_plan, load_model
    from optimum_slm.engine import ForwardEngine
    from optimum_slm.evaluate import heldout_ids, perplexity
    from optimum_slm.merge.refine import refine_layer
    from optimum_slm.plan import CompressionPlan

    torch.manual_seed(0)
    model, tok = load_model(args.model, dtype="float32", device="cpu")
    plan = CompressionPlan.load(args.plan)
    compressed = apply_plan(copy.deepcopy(model), plan)
    windows = sorted(tuple(op["layers"]) for op in plan.ops if op["op"] == "merge")
    record: dict = {"windows": [list(w) for w in windows], "refine": {}}
    if lr is not None:
        calib = CalibrationConfig("wiki-leads").load(tok)
        engine = ForwardEngine(model, calib.ids, fit_ids=calib.fit_ids())
        started = time.perf_counter()
        removed = 0
        for lo, hi in windows:  # position of base layer lo in the compressed model: the layers removed below it
            record["refine"][f"{lo}-{hi}"] = refine_layer(engine, compressed.model.layers[lo - removed], lo, lo,
                                                          hi + 1, args.epochs, lr, what=f"refine {lo}-{hi}")
            removed += hi - lo
        record["refine_s"] = round(time.perf_counter() - started, 1)
    record["ppl"] = {key: round(perplexity(compressed, heldout_ids(tok, corpus), batch_size=2), 3)
                     for key, corpus in TEST + VALID}
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    jsonl = os.path.splitext(args.output)[0] + ".jsonl"
    if not args.table_only:
        done = load_rows(jsonl)
        for lr in [None] + [float(x) for x in args.lrs.split(",") if x]:
            name = (f"{os.path.basename(os.path.dirname(args.plan))} (fitted merge, no refinement)" if lr is None
                    else row_name(args.plan, lr, args.epochs))
            if name in done and not args.redo:
                continue
            print(f"== {name}", flush=True)
            entry = {"row": name, "lr": lr, "epochs": None if lr is None else args.epochs, **measure(args, lr),
                     "when": time.strftime("%Y-%m-%d %H:%M"), "threads": os.environ.get("OMP_NUM_THREADS")}
            with open(jsonl, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")
            print(json.dumps(entry), flush=True)
            write_table(args, load_rows(jsonl))
    write_table(args, load_rows(jsonl))
    return 0


def write_table(args, rows: dict) -> None:
    keys = [k for k, _ in VALID + TEST]
    out = ["# slm-plus refine_epochs on SmolLM2-135M: the learning rate, chosen on validation", "",
           "Generated by `benchmarks/refine_smollm2.py` (see its docstring). The plan's windows are refined with "
           "the library's `refine_layer` on the fit set; the validation score is the sum of the log perplexities "
           "on the three validation splits (lower is better: it chooses), the test corpora only report.", "",
           "| row | windows: held-out error before → after (best epoch) | refine s | "
           + " | ".join(c for _, c in VALID + TEST) + " | validation score |",
           "|---|---|---:|" + "---:|" * (len(keys) + 1)]
    for name, r in rows.items():
        ppl = r.get("ppl") or {}
        refine = "; ".join(f"{w}: {_f(v['before'], 4)} → {_f(v['after'], 4)} ({v['best_epoch']})"
                           for w, v in (r.get("refine") or {}).items()) or "–"
        score = sum(math.log(ppl[k]) for k, _ in VALID) if all(k in ppl for k, _ in VALID) else None
        out.append(f"| {name} | {refine} | {_f(r.get('refine_s'), 0)} | "
                   + " | ".join(_f(ppl.get(k)) for k in keys) + f" | {_f(score, 4)} |")
    out += ["", "Regenerate: `OMP_NUM_THREADS=2 python benchmarks/refine_smollm2.py` (measured rows are kept).", ""]
    with open(args.output, "w", encoding="utf-8") as fh:
        fh.write("\n".join(out))


if __name__ == "__main__":
    sys.exit(main())
