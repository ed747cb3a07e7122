"""Issue 27's table on SmolLM2-135M: every 2025-26 depth pass and SLM variant beside slm-plus and ReplaceMe, at 20%
and 35%: held-out perplexity on every corpus, plan cost, decode speed-up, two calibration seeds for the top three.

    OMP_NUM_THREADS=2 python benchmarks/frontier_smollm2.py [--ratios 0.2,0.35] [--rows ...] [--no-seeds]
        [--no-match-speed]
    python benchmarks/frontier_smollm2.py --table-only     # rebuild the table from the rows measured so far

Row names: ``dense``; ``<pass>@R`` (that pass at ratio R with its defaults); ``<pass>[k=v,...]@R`` (with
parameters); ``sublayer@R`` (short for ``slm-plus[granularity=sublayer]@R``: attention and MLP sub-layers whose
parameters fit in those of round(R x 30) layers, so it compares with ``slm-plus@R`` at nearly equal parameters); a
suffix ``~S`` draws the calibration with seed S instead of 1234 (search and fit sets both move). The default list
(``--rows`` replaces it): for each ratio ``slm-plus``, ``slm-plus[refine_epochs=10]``,
``slm-plus[fit_order=bottom-up]``,
``slm-plus[outlier_clip=32]``, ``sublayer``, ``replaceme``, ``replaceme[outlier_clip=32]``, ``linearpatch``,
``prune-comp`` and ``sleb`` (the best drop baseline of ``depth_smollm2.md``). Then, unless ``--no-seeds``, the
three rows (distinct plans) of each ratio with the lowest validation score (the sum of the log perplexities on the three validation
splits: test perplexities never choose) are planned again with seed 4321, which gives the spread of a calibration
draw. Removing an attention saves less compute than removing a layer, so unless ``--no-match-speed`` the driver
also adds ``sublayer`` rows at R + 0.05, R + 0.10, ... (at most ``--max-steps``) until one decodes at least as fast
as ``slm-plus@R``: the comparison at equal measured speed.

Every row runs in its own process and is appended to ``benchmarks/results/frontier_smollm2.jsonl`` as it
finishes; a row already there is never recomputed (``--redo ROW`` forces it). The table goes to
``frontier_smollm2.md``.

Setup (every row): SmolLM2-135M-Instruct (alias ``smollm2-135m``, offline) in float32 on the CPU; the default
calibration of every front door (search set: 10 x 128 tokens of ``wiki-leads``, seed 1234; fit set: 256 x 256
packed tokens after it); no plan cache. Measured per row:

* held-out perplexity (``evaluate.heldout_ids``, 16 x 512 tokens each, batch 2) on the test corpora no pass reads and
  no setting was chosen on — ``wiki-leads-test``, ``lambada-books``, ``python-code-test`` — and on the validation
  splits ``wiki-leads-valid``, ``lambada-books-valid`` and ``python-code-valid`` (where settings are chosen);
* parameters (unique, tied embedding once) and decoder layers left; for a sub-layer row the attention / MLP units
  removed and the layers dropped whole;
* plan time (search / fit split from ``plan.timings``), decoder-layer evaluations over the search set, layer passes
  over the fit set;
* decode speed-up: greedy generation of 64 new tokens (``min_new_tokens`` = 64, no EOS), batch 1, from the same
  32-token prompt (the first tokens of ``wiki-leads-test``), after one warm-up generation; tokens/s of the median
  of 3 timed runs (prefill included: a 32-token prompt is a small part of it), measured on the dense model and on
  the compressed one **in the same process, minutes apart**: the ratio of the two is the speed-up, which holds up
  under a background load far better than either speed alone.

Plan times are only comparable between rows measured on the same, otherwise idle cores: the table says when a row
was measured.
"""

from __future__ import annotations

import argparse
import json
import math
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
DEFAULT_OUTPUT = os.path.join(HERE, "results", "frontier_smollm2.md")
MODEL = "smollm2-135m"
#: (row key, corpus alias): the held-out test corpora, then the validation splits
TEST = (("wiki", "wiki-leads-test"), ("books", "lambada-books"), ("code", "python-code-test"))
VALID = (("wiki_valid", "wiki-leads-valid"), ("books_valid", "lambada-books-valid"),
         ("code_valid", "python-code-valid"))
NEW_TOKENS = 64
PROMPT_TOKENS = 32
TIMED_RUNS = 3
#: the calibration seed of every front door, and the second draw of the seed rows
SEED, SECOND_SEED = 1234, 4321
#: the rows of each ratio, in table order (see the module docstring)
PER_RATIO = ("slm-plus", "slm-plus[refine_epochs=10]", "slm-plus[fit_order=bottom-up]", "slm-plus[outlier_clip=32]", "sublayer", "replaceme",
             "replaceme[outlier_clip=32]", "linearpatch", "prune-comp", "sleb")
#: passes of the SLM family (the issue's criterion compares the best of them with the best of the rest)
SLM_FAMILY = ("slm", "slm-plus")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--ratios", default="0.2,0.35", help="comma-separated ratios")
    p.add_argument("--rows", default=None, help="comma-separated rows to run instead of the default list")
    p.add_argument("--no-seeds", dest="seeds", action="store_false",
                   help="do not re-plan the top three rows of each ratio with a second calibration seed")
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
    return ["dense"] + [f"{kind}@{r:g}" for r in ratios for kind in PER_RATIO]


def split_row(row: str) -> tuple[str, float | None, int]:
    """(the row without ratio and seed, its ratio, its calibration seed)."""
    seed = SEED
    if "~" in row:
        row, _, s = row.partition("~")
        seed = int(s)
    name, _, ratio = row.partition("@")
    return name, (float(ratio) if ratio else None), seed


def parse_row(row: str) -> tuple[dict[str, Any] | None, int]:
    """(the stage of a plan row, None for ``dense``; its calibration seed); ``SystemExit`` for a bad name."""
    if row == "dense":
        return None, SEED
    try:
        name, ratio, seed = split_row(row)
    except ValueError:
        raise SystemExit(f"bad seed in row {row!r}: use <row>~<integer>") from None
    if ratio is None:
        raise SystemExit(f"row {row!r} has no ratio: use dense, <pass>@R, <pass>[k=v,...]@R or sublayer@R")
    params: dict[str, Any] = {}
    if name == "sublayer":
        name, params = "slm-plus", {"granularity": "sublayer"}
    elif name.endswith("]") and "[" in name:
        name, extra = name[:-1].split("[", 1)
        for item in extra.split(","):
            key, sep, value = item.partition("=")
            if not sep:
                raise SystemExit(f"bad parameter {item!r} in row {row!r}: use k=v")
            params[key] = value
    return {"method": name, "ratio": ratio, **params}, seed


def family(row: str) -> str:
    """``slm`` for a row of the SLM family, ``other`` for the rest, ``dense``."""
    if row == "dense":
        return "dense"
    name = split_row(row)[0]
    return "slm" if name == "sublayer" or name.split("[")[0] in SLM_FAMILY else "other"


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
    stage, seed = parse_row(row)
    record: dict[str, Any] = {}
    if stage is not None:
        dense = decode_speed(model, tokenizer)  # the same process and minutes before: the speed-up's reference
        record["dense_decode_tok_s"] = dense["decode_tok_s"]
        calib = CalibrationConfig("wiki-leads", seed=seed).load(tokenizer)
        started = time.perf_counter()
        plan = plan_compression(model, [stage], calib, tokenizer=tokenizer, cache=False)
        seconds = time.perf_counter() - started
        fit_s = sum(t.get("fit_seconds", 0.0) for t in plan.timings)
        trace = plan.stages[0].trace
        record.update(plan_s=round(seconds, 1), fit_s=round(fit_s, 1), search_s=round(seconds - fit_s, 1),
                      layer_evals=trace.get("layer_evaluations"),
                      fit_layer_passes=(trace.get("fit") or {}).get("fit_layer_passes"),
                      ops=plan.describe_ops(), seed=seed)
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
    if stage is not None:
        record["speedup"] = round(record["decode_tok_s"] / record["dense_decode_tok_s"], 3)
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


def valid_score(r: dict[str, Any]) -> float | None:
    """The sum of the log perplexities on the validation splits (lower is better): what chooses, never a test set."""
    ppl = r.get("ppl") or {}
    if any(not ppl.get(k) or not math.isfinite(ppl[k]) for k, _ in VALID):
        return None
    return sum(math.log(ppl[k]) for k, _ in VALID)


def top_rows(rows: dict[str, dict[str, Any]], ratio: float, n: int = 3) -> list[str]:
    """The ``n`` first-seed rows at ``ratio`` with the lowest validation score, one per distinct plan (a variant
    whose plan equals its default's, e.g. an option that changes nothing at this ratio, is the same row)."""
    scored = [(valid_score(r), name) for name, r in rows.items()
              if name != "dense" and "~" not in name and split_row(name)[1] == ratio]
    chosen: list[str] = []
    for score, name in sorted((s, m) for s, m in scored if s is not None):
        if all(rows[name].get("ops") != rows[c].get("ops") or rows[name].get("ppl") != rows[c].get("ppl")
               for c in chosen):
            chosen.append(name)
    return chosen[:n]


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
        if args.seeds and not args.rows:
            for r in ratios:
                for row in top_rows(done, r):
                    ensure(f"{row}~{SECOND_SEED}")
        if args.match_speed and not args.rows:
            for r in ratios:
                target = (done.get(f"slm-plus@{r:g}") or {}).get("speedup")
                for step in range(args.max_steps + 1):
                    ratio = round(r + step * args.step, 4)
                    if target is None or ratio >= 1:
                        break
                    speedup = (ensure(f"sublayer@{ratio:g}") or {}).get("speedup")
                    if speedup is None or speedup >= target:
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


def _order(name: str) -> tuple:
    """Table order within a ratio: the default list's order, a seed row after its first-seed row, then the rest."""
    base, ratio, seed = split_row(name)
    index = PER_RATIO.index(base) if base in PER_RATIO else len(PER_RATIO)
    return (ratio or 0, index, base, seed != SEED, seed)


def _ppl(r: dict[str, Any] | None, key: str) -> float:
    value = ((r or {}).get("ppl") or {}).get(key)
    return value if value is not None and math.isfinite(value) else math.inf


def verdict(rows: dict[str, dict[str, Any]], ratio: float, dense: dict[str, Any] | None) -> list[str]:
    """Issue 27's criterion at ``ratio``: per test corpus, the best SLM-family row against the best other row, the
    margin against the spread of two calibration seeds, and the multiple of dense on ``wiki-leads-test``."""
    at = {n: r for n, r in rows.items() if n != "dense" and "~" not in n and split_row(n)[1] == ratio}
    if not at:
        return []
    seeded = [(n, rows[f"{n}~{SECOND_SEED}"]) for n in top_rows(rows, ratio) if f"{n}~{SECOND_SEED}" in rows]
    out = [f"**{ratio:g}**: validation's top three: " + (", ".join(f"`{n}`" for n in top_rows(rows, ratio)) or "–")
           + "."]
    for key, corpus in TEST:
        slm = min((n for n in at if family(n) == "slm"), key=lambda n: _ppl(at[n], key), default=None)
        other = min((n for n in at if family(n) == "other"), key=lambda n: _ppl(at[n], key), default=None)
        if slm is None or other is None:
            continue
        spread = max((abs(_ppl(r2, key) - _ppl(rows[n], key)) for n, r2 in seeded), default=None)
        margin = _ppl(at[other], key) - _ppl(at[slm], key)
        said = (f"- `{corpus}`: best SLM `{slm}` {_f(_ppl(at[slm], key))}, best other `{other}` "
                f"{_f(_ppl(at[other], key))}: margin {_f(margin)}")
        if spread is not None:
            said += (f", seed spread {_f(spread)} (largest |seed {SEED} - seed {SECOND_SEED}| of the top three): "
                     + ("**margin larger**" if margin > spread else "margin NOT larger"))
        if key == "wiki" and dense:
            said += f"; best SLM at {_f(_ppl(at[slm], key) / _ppl(dense, key))}x dense"
        out.append(said + ".")
    return out


def write_table(args, rows: dict[str, dict[str, Any]], ratios: list[float]) -> None:
    keys = [k for k, _ in TEST + VALID]
    dense = rows.get("dense")
    base_layers = (dense or {}).get("layers", 30)  # SmolLM2-135M has 30
    out = ["# SmolLM2-135M: the 2025-26 depth passes and SLM variants beside slm-plus and ReplaceMe", "",
           "Generated by `benchmarks/frontier_smollm2.py` (see its docstring for the setup); rows measured so far. "
           "Float32 on the CPU. Perplexity: 16 x 512 tokens of each corpus (the three test corpora, then their "
           "validation splits). `~4321`: the same row planned on a second calibration draw (seed 4321 instead "
           "of 1234). Speed-up: greedy decode tokens/s (64 tokens, batch 1, median of 3) of the compressed model "
           "over the dense one, both measured in the row's process. `sublayer@R` spends the parameters of "
           "round(R x 30) layers. Family `slm`: the SLM passes and their variants.", ""]
    if dense:
        out += [f"Dense: {' / '.join(_f(_ppl(dense, k)) for k, _ in TEST)} on the test corpora, "
                f"{' / '.join(_f(_ppl(dense, k)) for k, _ in VALID)} on validation; {_f(dense.get('params_m'))} M "
                f"parameters; {_f(dense.get('decode_tok_s'), 1)} tok/s decode.", ""]
    header = ("| row | family | removed | layers | params (M) | wiki-leads-test | lambada-books | python-code-test | "
              "wiki-leads-valid | lambada-books-valid | python-code-valid | speed-up | plan s | fit s | "
              "layer evals | measured |")
    for ratio in sorted({split_row(n)[1] for n in rows if n != "dense"} | set(ratios)):
        names = sorted((n for n in rows if n != "dense" and split_row(n)[1] == ratio), key=_order)
        if not names:
            continue
        out += [f"## {ratio:g}", "", header, "|---|---|---|---:|---:|" + "---:|" * 6 + "---:|---:|---:|---:|---|"]
        for name in names:
            r = rows[name]
            out.append(f"| {name} | {family(name)} | {_removed(r, base_layers)} | {r.get('layers', '–')} | "
                       f"{_f(r.get('params_m'), 2)} | " + " | ".join(_f((r.get("ppl") or {}).get(k)) for k in keys)
                       + f" | {_f(r.get('speedup'), 2)} | {_f(r.get('plan_s'), 0)} | {_f(r.get('fit_s'), 0)} | "
                       f"{_f(r.get('layer_evals'), 0)} | {r.get('when', '–')} |")
        out += [""] + verdict(rows, ratio, dense) + [""]
        layer, sub = rows.get(f"slm-plus@{ratio:g}"), rows.get(f"sublayer@{ratio:g}")
        if layer and sub:
            out.append(f"- equal parameters: `sublayer@{ratio:g}` {_f(sub['params_m'])} M vs `slm-plus@{ratio:g}` "
                       f"{_f(layer['params_m'])} M; test perplexities "
                       + " / ".join(f"{_f(_ppl(sub, k))} vs {_f(_ppl(layer, k))}" for k, _ in TEST)
                       + f"; speed-up {_f(sub.get('speedup'))} vs {_f(layer.get('speedup'))}.")
        if layer and layer.get("speedup"):
            fast = [n for n in sorted(rows, key=lambda n: split_row(n)[1] or 0)
                    if n.startswith("sublayer@") and "~" not in n and (split_row(n)[1] or 0) >= ratio
                    and (rows[n].get("speedup") or 0) >= layer["speedup"]]
            if fast:
                s2 = rows[fast[0]]
                out.append(f"- equal decode speed: `{fast[0]}` (speed-up {_f(s2['speedup'])}, {_f(s2['params_m'])} M) "
                           f"is the first sub-layer row at least as fast as `slm-plus@{ratio:g}` "
                           f"({_f(layer['speedup'])}); test perplexities "
                           + " / ".join(f"{_f(_ppl(s2, k))} vs {_f(_ppl(layer, k))}" for k, _ in TEST) + ".")
        out.append("")
    note = os.path.splitext(args.output)[0] + "_note.md"
    if os.path.exists(note):
        with open(note, encoding="utf-8") as fh:
            out += [fh.read().strip(), ""]
    out += ["Regenerate: `OMP_NUM_THREADS=2 python benchmarks/frontier_smollm2.py` (measured rows are kept; "
            "`--redo ROW` recomputes one), `python benchmarks/frontier_smollm2.py --table-only` rebuilds this file.",
            ""]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as fh:
        fh.write("\n".join(out))


if __name__ == "__main__":
    sys.exit(main())
