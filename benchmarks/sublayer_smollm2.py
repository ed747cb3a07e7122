"""slm-plus at layer grain vs sub-layer grain on SmolLM2-135M: equal parameters and equal measured decode speed.

    OMP_NUM_THREADS=2 python benchmarks/sublayer_smollm2.py [--ratios 0.2,0.35] [--rows ...] [--no-match-speed]
    python benchmarks/sublayer_smollm2.py --table-only     # rebuild the table from the rows measured so far

Rows: ``dense``; ``slm-plus@R`` (slm-plus, whole layers, ratio R: round(R x 30) layers); ``sublayer@R``
(``slm-plus granularity=sublayer`` at ratio R: attention and MLP sub-layers whose parameters fit in those of
round(R x 30) layers, so ``slm-plus@R`` and ``sublayer@R`` are compared at (nearly) equal parameters). Removing an
attention saves less compute than removing a layer, so for each R the driver also looks for the comparison at equal
measured decode speed (``--match-speed``, on by default): when ``sublayer@R`` decodes slower than ``slm-plus@R``, it
adds ``sublayer`` rows at R + 0.05, R + 0.10, ... (at most ``--max-steps``) until one decodes at least as fast.

Every row runs in its own process and is appended to ``benchmarks/results/sublayer_smollm2.jsonl`` as it finishes; a
row already there is never recomputed (``--redo ROW`` forces it). The table goes to ``sublayer_smollm2.md``.

Setup (every row): SmolLM2-135M-Instruct (alias ``smollm2-135m``, offline) in float32 on the CPU; the default
calibration of every front door (search set: 10 x 128 tokens of ``wiki-leads``, seed 1234; fit set: 256 x 256
packed tokens after it); no plan cache. Measured per row:

* held-out perplexity (``evaluate.heldout_ids``, 16 x 512 tokens each, batch 2) on the test corpora no pass reads and
  no setting was chosen on — ``wiki-leads-test``, ``lambada-books``, ``python-code-test`` — and on the validation
  splits ``wiki-leads-valid`` and ``python-code-valid`` (the splits slm-plus's defaults were chosen on);
* parameters (unique, tied embedding once) and decoder layers left; for a sub-layer row the attention / MLP units
  removed and the layers dropped whole;
* plan time (search / fit split from ``plan.timings``), decoder-layer evaluations over the search set, layer passes
  over the fit set;
* decode speed: greedy generation of 64 new tokens (``min_new_tokens`` = 64, no EOS), batch 1, from the same
  32-token prompt (the first tokens of ``wiki-leads-test``), after one warm-up generation; tokens/s of the median
  of 3 timed runs (prefill included: a 32-token prompt is a small part of it).

Timings are only comparable between rows measured on the same, otherwise idle cores: the table says when a row was
measured, and speed-matching decisions are as good as those timings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OPTIMUM_SLM_QUIET", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# the one reader of a resumable benchmark's jsonl, and the table's number format (real_model imports only the
# standard library at its top)
from real_model import _f, load_rows  # noqa: E402
DEFAULT_OUTPUT = os.path.join(HERE, "results", "sublayer_smollm2.md")
MODEL = "smollm2-135m"
#: (row key, corpus alias): the held-out test corpora, then the validation splits
TEST = (("wiki", "wiki-leads-test"), ("books", "lambada-books"), ("code", "python-code-test"))
VALID = (("wiki_valid", "wiki-leads-valid"), ("code_valid", "python-code-valid"))
NEW_TOKENS = 64
PROMPT_TOKENS = 32
TIMED_RUNS = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--ratios", default="0.2,0.35", help="comma-separated ratios of the paired rows")
    p.add_argument("--rows", default=None, help="comma-separated rows to run instead of the default list")
    p.add_argument("--no-match-speed", dest="match_speed", action="store_false",
                   help="do not add sub-layer rows at higher ratios to match slm-plus's decode speed")
    p.add_argument("--max-steps", type=int, default=4, help="speed-matching rows per ratio, at most")
    p.add_argument("--step", type=float, default=0.05, help="ratio step of the speed-matching rows")
    p.add_argument("--output", default=DEFAULT_OUTPUT)
    p.add_argument("--redo", default="", help="comma-separated rows to recompute")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one row in this process
    return p.parse_args(argv)


def default_rows(ratios: list[float]) -> list[str]:
    return ["dense"] + [f"{kind}@{r:g}" for r in ratios for kind in ("slm-plus", "sublayer")]


def parse_row(row: str) -> dict[str, Any] | None:
    """The stage of a plan row (None for ``dense``); ``SystemExit`` for a name that is neither."""
    if row == "dense":
        return None
    kind, _, ratio = row.partition("@")
    if kind not in ("slm-plus", "sublayer") or not ratio:
        raise SystemExit(f"unknown row {row!r}: use dense, slm-plus@R or sublayer@R")
    stage: dict[str, Any] = {"method": "slm-plus", "ratio": float(ratio)}
    if kind == "sublayer":
        stage["granularity"] = "sublayer"
    return stage


# ---------------------------------------------------------------------------------------------- measuring one row
def heldout(model, tokenizer) -> dict[str, float]:
    from optimum_slm.evaluate import heldout_ids, perplexity

    return {key: round(perplexity(model, heldout_ids(tokenizer, corpus), batch_size=2), 3)
            for key, corpus in TEST + VALID}


def decode_speed(model, tokenizer) -> dict[str, Any]:
    """Tokens/s of greedy 64-token generations, batch 1, the same prompt: median of 3 after a warm-up."""
    import torch

    from optimum_slm.evaluate import heldout_ids

    prompt = heldout_ids(tokenizer, "wiki-leads-test", 1, PROMPT_TOKENS)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def once() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=pad,
                                 use_cache=True)
        assert out.shape[1] - prompt.shape[1] == NEW_TOKENS
        return time.perf_counter() - started

    once()  # warm-up: first-call allocations and kernel selection are not decode speed
    seconds = [once() for _ in range(TIMED_RUNS)]
    median = statistics.median(seconds)
    return {"decode_tok_s": round(NEW_TOKENS / median, 2), "decode_runs_s": [round(s, 3) for s in seconds]}


def run_one(args, row: str) -> dict[str, Any]:
    import torch

    from optimum_slm import CalibrationConfig, apply_plan, load_model, plan_compression
    from optimum_slm.arch import param_count

    torch.manual_seed(0)
    model, tokenizer = load_model(args.model, dtype="float32", device="cpu")
    stage = parse_row(row)
    record: dict[str, Any] = {}
    if stage is not None:
        calib = CalibrationConfig("wiki-leads").load(tokenizer)
        started = time.perf_counter()
        plan = plan_compression(model, [stage], calib, tokenizer=tokenizer, cache=False)
        seconds = time.perf_counter() - started
        fit_s = sum(t.get("fit_seconds", 0.0) for t in plan.timings)
        trace = plan.stages[0].trace
        record.update(plan_s=round(seconds, 1), fit_s=round(fit_s, 1), search_s=round(seconds - fit_s, 1),
                      layer_evals=trace.get("layer_evaluations"),
                      fit_layer_passes=(trace.get("fit") or {}).get("fit_layer_passes"),
                      ops=plan.describe_ops())
        if stage.get("granularity") == "sublayer":
            record.update(attn_removed=trace["attn_removed"], mlp_removed=trace["mlp_removed"],
                          layers_dropped=trace["layers_dropped"], param_budget=trace["param_budget"],
                          params_removed=trace["params_removed"])
        apply_plan(model, plan)
        plan.save(os.path.join(os.path.splitext(args.output)[0] + "_plans", row, "slm_plan.json"))
    record.update(layers=len(model.model.layers), params_m=round(param_count(model) / 1e6, 2))
    started = time.perf_counter()
    record["ppl"] = heldout(model, tokenizer)
    record["eval_s"] = round(time.perf_counter() - started, 1)
    record.update(decode_speed(model, tokenizer))
    return record


# ---------------------------------------------------------------------------------------------- the driver
def measure(args, row: str, jsonl: str) -> dict[str, Any] | None:
    """Run ``row`` in its own process and append its record; None when it failed."""
    print(f"== {row}", flush=True)
    started = time.perf_counter()
    cmd = [sys.executable, os.path.abspath(__file__), "--one", row, "--model", args.model, "--output", args.output]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("ROW ")]
    if proc.returncode != 0 or not lines:
        print(f"   {row}: failed (exit {proc.returncode}); not recorded", flush=True)
        return None
    entry = {"row": row, **json.loads(lines[-1][4:]), "row_s": round(time.perf_counter() - started, 1),
             "when": time.strftime("%Y-%m-%d %H:%M"), "threads": os.environ.get("OMP_NUM_THREADS")}
    with open(jsonl, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
    print(f"   {row}: {json.dumps(entry)}", flush=True)
    return entry


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jsonl = os.path.splitext(args.output)[0] + ".jsonl"
    if args.one:
        print("ROW " + json.dumps(run_one(args, args.one)))
        return 0
    ratios = [float(r) for r in args.ratios.split(",") if r]
    if not args.table_only:
        redo = {r for r in args.redo.split(",") if r}
        rows = [r for r in args.rows.split(",") if r] if args.rows else default_rows(ratios)
        for row in rows:
            parse_row(row)  # a bad name stops the run before anything is measured
        done = load_rows(jsonl)
        fresh: set[str] = set()  # rows measured in this run (``--redo`` applies once)

        def ensure(row: str) -> dict[str, Any] | None:
            if row not in done or (row in redo and row not in fresh):
                fresh.add(row)
                done[row] = measure(args, row, jsonl) or done.get(row)
                write_table(args, load_rows(jsonl), ratios)
            return done.get(row)

        for row in rows:
            ensure(row)
        if args.match_speed and not args.rows:
            for r in ratios:
                target = (done.get(f"slm-plus@{r:g}") or {}).get("decode_tok_s")
                for step in range(args.max_steps + 1):
                    ratio = round(r + step * args.step, 4)
                    if target is None or ratio >= 1:
                        break
                    speed = (ensure(f"sublayer@{ratio:g}") or {}).get("decode_tok_s")
                    if speed is None or speed >= target:
                        break
    write_table(args, load_rows(jsonl), ratios)
    return 0


# ---------------------------------------------------------------------------------------------- the table
def _removed(r: dict[str, Any], base_layers: int | None) -> str:
    if "attn_removed" in r:
        return (f"{len(r['attn_removed'])} attn, {len(r['mlp_removed'])} MLP"
                + (f", {len(r['layers_dropped'])} whole" if r["layers_dropped"] else ""))
    if r.get("layers") is not None and r["row"] != "dense" and base_layers:
        return f"{base_layers - r['layers']} layers"
    return "–"


def _ratio(row: str) -> float | None:
    return float(row.split("@")[1]) if "@" in row else None


def write_table(args, rows: dict[str, dict[str, Any]], ratios: list[float]) -> None:
    keys = [k for k, _ in TEST + VALID]
    out = ["# SmolLM2-135M: slm-plus at layer grain vs sub-layer grain (`granularity=sublayer`)", "",
           "Generated by `benchmarks/sublayer_smollm2.py` (see its docstring for the setup); rows measured so far. "
           "Float32 on the CPU. Perplexity: 16 x 512 tokens of each corpus (test corpora, then the validation "
           "splits). Decode: greedy 64 tokens, batch 1, same 32-token prompt, median of 3 (tokens/s, prefill "
           "included). `sublayer@R` spends the parameters of round(R x 30) layers; `slm-plus@R` removes that many "
           "layers.", "",
           "| row | removed | layers | params (M) | wiki-leads-test | lambada-books | python-code-test | "
           "wiki-leads-valid | python-code-valid | decode tok/s | plan s | search s | fit s | layer evals | "
           "fit passes | measured |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    order = sorted(rows, key=lambda n: (n != "dense", _ratio(n) or 0, n))
    base_layers = (rows.get("dense") or {}).get("layers", 30)  # SmolLM2-135M has 30
    for name in order:
        r = rows[name]
        ppl = r.get("ppl") or {}
        out.append(f"| {name} | {_removed(r, base_layers)} | {r.get('layers', '–')} | {_f(r.get('params_m'), 2)} | "
                   + " | ".join(_f(ppl.get(k)) for k in keys)
                   + f" | {_f(r.get('decode_tok_s'), 1)} | {_f(r.get('plan_s'), 0)} | {_f(r.get('search_s'), 0)} | "
                   f"{_f(r.get('fit_s'), 0)} | {_f(r.get('layer_evals'), 0)} | {_f(r.get('fit_layer_passes'), 0)} | "
                   f"{r.get('when', '–')} |")
    pairs = []
    for ratio in ratios:
        layer, sub = rows.get(f"slm-plus@{ratio:g}"), rows.get(f"sublayer@{ratio:g}")
        if layer and sub:
            pairs.append(f"- **equal parameters, {ratio:g}**: `sublayer@{ratio:g}` {_f(sub['params_m'])} M vs "
                         f"`slm-plus@{ratio:g}` {_f(layer['params_m'])} M; test perplexities "
                         + " / ".join(f"{_f(sub['ppl'][k])} vs {_f(layer['ppl'][k])}" for k, _ in TEST)
                         + f"; decode {_f(sub.get('decode_tok_s'), 1)} vs {_f(layer.get('decode_tok_s'), 1)} tok/s.")
        if layer and layer.get("decode_tok_s"):
            fast = [n for n in order if n.startswith("sublayer@") and (_ratio(n) or 0) >= ratio
                    and (rows[n].get("decode_tok_s") or 0) >= layer["decode_tok_s"]]
            if fast:
                n = fast[0]
                s = rows[n]
                pairs.append(f"- **equal decode speed, {ratio:g}**: `{n}` ({_f(s['decode_tok_s'], 1)} tok/s, "
                             f"{_f(s['params_m'])} M) is the first sub-layer row at least as fast as "
                             f"`slm-plus@{ratio:g}` ({_f(layer['decode_tok_s'], 1)} tok/s); test perplexities "
                             + " / ".join(f"{_f(s['ppl'][k])} vs {_f(layer['ppl'][k])}" for k, _ in TEST) + ".")
    if pairs:
        out += ["", "Comparisons (test perplexities: wiki-leads-test / lambada-books / python-code-test, "
                "sub-layer vs layer):", ""] + pairs
    note = os.path.splitext(args.output)[0] + "_note.md"
    if os.path.exists(note):
        with open(note, encoding="utf-8") as fh:
            out += ["", fh.read().strip()]
    out += ["", "Regenerate: `OMP_NUM_THREADS=2 python benchmarks/sublayer_smollm2.py` (measured rows are kept; "
            "`--redo ROW` recomputes one), `python benchmarks/sublayer_smollm2.py --table-only` rebuilds this file.",
            ""]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as fh:
        fh.write("\n".join(out))


if __name__ == "__main__":
    sys.exit(main())
