"""Quality table: dense SmolLM2-135M vs every registered depth pass at 20% and 35% depth reduction.

Each configuration is planned on the same calibration (10 × 128 tokens of the ``wiki-leads`` split, seed 1234),
applied without any healing, and evaluated on

* the paper's 7 zero-shot tasks (offline ``slm_*`` lm-eval tasks, ``lm_eval_slm.tasks``; acc for BoolQ, PIQA,
  WinoGrande, ARC-e and acc_norm for HellaSwag, ARC-c, OBQA; AVE = their mean) with lm-eval's Python API, and
* held-out Wikipedia-lead perplexity (``optimum_slm.evaluate``: 16 × 512 tokens of ``wiki-leads-test``).

    python benchmarks/quality.py                       # every pass except drop, ratios 0.2,0.35, default limit
    python benchmarks/quality.py --passes slm,shortgpt --ratios 0.2 --limit 5 --output /tmp/q.md
    python benchmarks/quality.py --limit full          # the full task sets (about 1.5-2 h per model on 2 cores)

Results are cached per configuration in ``<output>.json`` and reused when the settings match (``--fresh`` to
recompute), so an interrupted run resumes; plans are reused when only the evaluation settings (``--limit``,
``--batch-size``) changed; configurations whose plans are identical share one evaluation. Writes
``<output>`` (markdown) and ``<output stem>.png``; a hand-written ``<output stem>_note.md``, when present, is
appended as the closing note.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import traceback
from functools import lru_cache
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUTPUT = os.path.join(HERE, "results", "quality_smollm2.md")
#: documents per task: 200 gives ±1.3 points of standard error on AVE (±0.7-1.7 on a paired difference of two passes,
#: against ±2.7 at 50). One unit (a document of each task) is ~22 loglikelihood requests; a 20-layer model takes
#: ~4 min, dense ~5 min on 2 free cores at batch 16, so 19 configurations with cached plans take about 75 min
DEFAULT_LIMIT = 200
TASK_LABELS = {
    "slm_boolq": "BoolQ",
    "slm_piqa": "PIQA",
    "slm_hellaswag": "HellaSwag",
    "slm_winogrande": "WinoG",
    "slm_arc_easy": "ARC-e",
    "slm_arc_challenge": "ARC-c",
    "slm_openbookqa": "OBQA",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="base model (alias, folder or GGUF)")
    p.add_argument("--passes", default=None,
                   help="comma-separated pass names (default: every registered pass except drop)")
    p.add_argument("--ratios", default="0.2,0.35", help="comma-separated depth-reduction ratios")
    p.add_argument("--limit", default=str(DEFAULT_LIMIT),
                   help=f"documents per task (default {DEFAULT_LIMIT}); 0 or 'full' for the full sets")
    p.add_argument("--output", default=DEFAULT_OUTPUT, help="markdown file (the .json cache and .png sit beside it)")
    p.add_argument("--batch-size", type=int, default=16, help="lm-eval batch size")
    p.add_argument("--calib-data", default="wiki-leads")
    p.add_argument("--calib-samples", type=int, default=10)
    p.add_argument("--calib-seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--fresh", action="store_true", help="ignore cached results in <output>.json")
    p.add_argument("--no-dense", action="store_true", help="leave out the dense reference row (saves its evaluation)")
    return p.parse_args(argv)


def parse_limit(value: str) -> int | None:
    if value.lower() in ("0", "full", "none", "all"):
        return None
    limit = int(value)
    if limit < 1:
        raise SystemExit(f"error: --limit must be positive, 0 or 'full', got {value}")
    return limit


# --------------------------------------------------------------------------------------------- evaluation
@lru_cache(maxsize=1)
def _task_manager():
    import logging

    from lm_eval_slm.tasks import task_manager

    # custom_dataset tasks log a "Custom kwargs can be passed..." hint on every load: noise for this script
    logging.getLogger("lm_eval.api.task").setLevel(logging.ERROR)
    return task_manager()


def evaluate_tasks(model, tokenizer, limit: int | None, batch_size: int
                   ) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """The 7 tasks with lm-eval's ``simple_evaluate`` on an in-memory model.

    Returns ``({task: {acc, acc_norm}}, {task: per-document correctness})``; the second is the paper metric of each
    document in ``doc_id`` order as a string of 0/1, so two passes can be compared on the same documents.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from lm_eval_slm.tasks import PAPER_METRICS, TASKS

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), task_manager=_task_manager(), limit=limit,
                                  bootstrap_iters=0, log_samples=True)
    scores, correct = {}, {}
    for task in TASKS:
        row = out["results"][task]
        scores[task] = {m: float(row[f"{m},none"]) for m in ("acc", "acc_norm") if f"{m},none" in row}
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        correct[task] = "".join("1" if s[PAPER_METRICS[task]] > 0.5 else "0" for s in samples)
    return scores, correct


def paired_difference(a: dict[str, str], b: dict[str, str]) -> tuple[float, float]:
    """AVE(a) − AVE(b) ×100 and its standard error, pairing the two passes' answers document by document.

    AVE is the mean of the per-task accuracies, so its difference is the mean over tasks of the per-task mean
    difference d_i = correct_a − correct_b, with variance (1/T²)·Σ_t var(d)/n_t. Pairing removes the documents both
    passes get right (or wrong), which is most of the noise of two independent ±SE.
    """
    means, variances = [], []
    for task in a:
        d = [int(x) - int(y) for x, y in zip(a[task], b[task], strict=True)]
        n = len(d)
        mean = sum(d) / n
        means.append(mean)
        variances.append(sum((x - mean) ** 2 for x in d) / max(1, n - 1) / n)
    t = len(means)
    return 100 * sum(means) / t, 100 * sum(variances) ** 0.5 / t


def paper_metrics(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    from lm_eval_slm.tasks import PAPER_METRICS

    return {task: scores[task][metric] for task, metric in PAPER_METRICS.items()}


#: the settings a plan depends on; a cache that differs only elsewhere (limit, batch size) lends its plans
PLAN_SETTINGS = ("model", "calib_data", "calib_samples", "calib_seq_len", "seed")
EVAL_KEYS = ("ppl", "tasks", "correct", "paper", "avg", "eval_s")


def plans_of(rows: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The plan ops of every planned row, by configuration key."""
    return {k: r["ops"] for k, r in rows.items() if "ops" in r}


def ops_key(ops: list[dict[str, Any]] | None) -> str:
    """Identical plans give identical models: their evaluations are shared (``same_as``)."""
    return json.dumps(ops or [], sort_keys=True)


def known_plan(model, name: str, ratio: float | None, ops: list[dict[str, Any]] | None):
    """The plan of ops kept in a results file, or None when they cannot rebuild it on their own.

    Files written before plan format v2 hold ops with inline base64 scales (format v1), read through the v1
    upgrade; v2 ops that reference side-car tensors are not self-contained (the plan cache serves those plans).
    """
    from optimum_slm.plan import CompressionPlan, Stage, describe_base
    from optimum_slm.plan.v1 import upgrade

    if ops is None or any("tensors" in op for op in ops):
        return None
    old = {"format": "optimum-slm.plan", "version": 1, "base": {}, "method": name, "params": {"ratio": ratio},
           "ops": ops, "num_layers_after": None}
    upgraded, tensors = upgrade(old)
    return CompressionPlan(base=describe_base(model), stages=[Stage(**upgraded["stages"][0])], tensors=tensors)


def parse_entry(entry: str) -> tuple[str, dict[str, str]]:
    """``"slm-plus[merge=calibrated]"`` -> ``("slm-plus", {"merge": "calibrated"})`` (a configuration's label is
    the entry as written)."""
    name, _, rest = entry.partition("[")
    params = {}
    for item in filter(None, rest.rstrip("]").split(";" if ";" in rest else ",")):
        key, _, value = item.partition("=")
        params[key.strip()] = value.strip()
    return name, params


def requested_params(entry: str, ratio: float | None) -> dict[str, Any] | None:
    """The parameters a configuration plans with (defaults included): a cached row made with others is stale."""
    from optimum_slm import get_pass

    if entry == "dense":
        return None
    name, params = parse_entry(entry)
    return json.loads(json.dumps(get_pass(name, ratio=ratio, **params).public_params()))


def run_config(name: str, ratio: float | None, args, ids, heldout, limit,
               done: dict[str, dict[str, Any]], known_ops: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Plan (unless dense), apply, evaluate; returns one result row.

    ``done`` maps ``ops_key`` to an already evaluated row: a plan identical to an earlier one reuses its scores.
    ``known_ops``: the plan's ops from an earlier run on the same base, pass, ratio and calibration (only the
    evaluation settings differed), applied instead of searching again.
    """
    from optimum_slm.arch import ArchAdapter, param_count
    from optimum_slm.compressor import SLMCompressor
    from optimum_slm.evaluate import perplexity

    t0 = time.time()
    compressor = SLMCompressor.from_pretrained(args.model, dtype="float32", device="cpu")
    row: dict[str, Any] = {"pass": name, "ratio": ratio, "pass_params": requested_params(name, ratio)}
    pass_name, pass_params = parse_entry(name)
    if name == "dense":
        model = compressor.model
    else:
        plan = known_plan(compressor.model, pass_name, ratio, known_ops)
        if plan is not None:
            row["plan_reused"] = True
        else:
            plan = compressor.plan(pass_name, calibration=ids, ratio=ratio, **pass_params)
            if plan.stages[0].trace.get("fit"):
                row["fit_tokens"] = plan.stages[0].trace["fit"]["fit_tokens"]
            row["plan_s"] = round(time.time() - t0, 1)
        row["ops"] = plan.ops
        # ops that reference fitted tensors name them, not their values: such plans never share an evaluation
        twin = None if plan.tensors else done.get(ops_key(plan.ops))
        if twin is not None:
            row.update({k: twin[k] for k in EVAL_KEYS}, layers=twin["layers"], params=twin["params"],
                       same_as=f"{twin['pass']}@{twin['ratio']}")
            return row
        model = compressor.apply(plan)
    row["layers"] = ArchAdapter(model).num_layers
    row["params"] = param_count(model)
    t1 = time.time()
    row["ppl"] = perplexity(model, heldout)
    row["tasks"], row["correct"] = evaluate_tasks(model, compressor.tokenizer, limit, args.batch_size)
    row["paper"] = paper_metrics(row["tasks"])
    row["avg"] = sum(row["paper"].values()) / len(row["paper"])
    row["eval_s"] = round(time.time() - t1, 1)
    return row


# --------------------------------------------------------------------------------------------- reporting
def fmt_ops(ops: list[dict[str, Any]]) -> str:
    parts = []
    for op in ops:
        if op["op"] == "merge":
            parts.append(f"merge {op['layers'][0]}–{op['layers'][1]}")
        else:
            parts.append(f"drop {','.join(map(str, op['layers']))}")
    return "; ".join(parts)


def write_markdown(path: str, rows: list[dict[str, Any]], settings: dict[str, Any], command: str) -> None:
    from lm_eval_slm.tasks import TASKS

    dense = next((r for r in rows if r["pass"] == "dense" and "avg" in r), None)
    ok = [r for r in rows if "avg" in r]
    limit = settings["limit"]
    lines = [
        "# Quality of depth compression on SmolLM2-135M (no healing)",
        "",
        f"Base `{settings['model']}` (30 layers, fp32). Calibration `{settings['calib_data']}`, "
        f"{settings['calib_samples']} × {settings['calib_seq_len']} tokens, seed {settings['seed']}, the same for "
        "every pass. Zero-shot lm-eval on the offline `slm_*` tasks "
        f"({'full sets' if limit is None else f'first {limit} documents per task'}); acc for BoolQ, PIQA, "
        "WinoGrande, ARC-e, acc_norm for HellaSwag, ARC-c, OBQA (the paper's convention); AVE is their mean ×100; "
        "\"% dense\" is AVE relative to the dense model. PPL: held-out Wikipedia leads (`wiki-leads-test`, "
        "16 × 512 tokens).",
        "",
        "Regenerate:",
        "",
        "```bash",
        command,
        "```",
        "",
        "| pass | ratio | layers | params | " + " | ".join(TASK_LABELS[t] for t in TASKS)
        + " | AVE | % dense | AVE w/o BoolQ | PPL |",
        "|---|---|---|---|" + "---|" * len(TASKS) + "---|---|---|---|",
    ]
    for r in rows:
        if "avg" not in r:
            lines.append(f"| {r['pass']} | {r['ratio']} | – | – | " + " | ".join("–" for _ in TASKS)
                         + f" | – | – | – | failed: {r.get('error', '?')[:80]} |")
            continue
        pct = f"{100 * r['avg'] / dense['avg']:.1f}" if dense else "–"
        ppl = f"{r['ppl']:.2f}" if r["ppl"] < 1e5 else f"{r['ppl']:.3g}"
        lines.append(
            f"| {r['pass']} | {r['ratio'] if r['ratio'] is not None else '–'} | {r['layers']} | "
            f"{r['params'] / 1e6:.1f} M | " + " | ".join(f"{100 * r['paper'][t]:.1f}" for t in TASKS)
            + f" | **{100 * r['avg']:.1f}** | {pct} | {100 * avg_without_boolq(r):.1f} | {ppl} |"
        )
    lines += ["", "Layers removed or merged (base numbering):", ""]
    for r in ok:
        if r["pass"] != "dense":
            same = f"; same plan as `{r['same_as']}`, scores shared" if r.get("same_as") else ""
            made = "plan from the previous run's cache" if r.get("plan_reused") else f"planning {r.get('plan_s', '?')} s"
            lines.append(f"* `{r['pass']}` @ {r['ratio']}: {fmt_ops(r['ops'])} ({made}{same})")
    lines += ["", "## Findings", ""]
    lines += findings(ok, dense, limit)
    # the human-written interpretation lives beside the results and survives regeneration
    note = os.path.splitext(path)[0] + "_note.md"
    if os.path.exists(note):
        with open(note, encoding="utf-8") as fh:
            lines += ["", "## Closing note", "", fh.read().strip()]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def avg_without_boolq(row: dict[str, Any]) -> float:
    others = [v for t, v in row["paper"].items() if t != "slm_boolq"]
    return sum(others) / len(others)


def boolq_yes_rate(limit: int | None) -> float:
    """Share of "yes" answers among the evaluated BoolQ documents (the majority-class accuracy)."""
    from lm_eval_slm.tasks.sources import load_boolq

    labels = load_boolq()["validation"]["label"]
    labels = labels[:limit] if limit else labels
    return sum(labels) / len(labels)


def findings(rows: list[dict[str, Any]], dense: dict[str, Any] | None, limit: int | None = None) -> list[str]:
    """Data-driven summary lines: the ranking per ratio and where SLM stands."""
    out = []
    ratios = sorted({r["ratio"] for r in rows if r["pass"] != "dense"})
    for ratio in ratios:
        group = sorted((r for r in rows if r["ratio"] == ratio and r["pass"] != "dense"), key=lambda r: -r["avg"])
        ranking = ", ".join(f"`{r['pass']}` {100 * r['avg']:.1f}" for r in group)
        by_ppl = min(group, key=lambda r: r["ppl"])
        out.append(f"* ratio {ratio}: AVE ranking {ranking}; lowest perplexity `{by_ppl['pass']}` ({by_ppl['ppl']:.1f}).")
        slm = next((k for k, r in enumerate(group) if r["pass"] == "slm"), None)
        if slm is not None:
            out.append(f"  SLM ranks {slm + 1} of {len(group)} on AVE at this ratio.")
        out += paired_lines(group)
    if dense:
        if limit:
            task_se, ave_se = 50 / limit ** 0.5, 50 / (7 * limit) ** 0.5
            out.append(f"* dense AVE {100 * dense['avg']:.1f}, PPL {dense['ppl']:.2f}. With {limit} documents per "
                       f"task the standard error is about ±{task_se:.0f} points per task and ±{ave_se:.1f} on AVE, "
                       "so smaller AVE differences are noise; perplexity (8,192 tokens) is the sharper signal.")
        else:
            out.append(f"* dense AVE {100 * dense['avg']:.1f}, PPL {dense['ppl']:.2f} (full task sets).")
        yes = boolq_yes_rate(limit)
        out.append(f"* BoolQ: the dense model scores {100 * dense['paper']['slm_boolq']:.1f} while always answering "
                   f"\"yes\" scores {100 * yes:.1f} on these documents; this instruct checkpoint leans to \"no\", and "
                   "pruning shifts that bias, so BoolQ swings far more than the model's quality does (AVE above "
                   "100% of dense comes from there). The \"AVE w/o BoolQ\" column removes that artefact.")
    return out


#: the pass every other one is compared with, document by document
REFERENCE_PASS = "slm-plus"


def paired_lines(group: list[dict[str, Any]]) -> list[str]:
    """``REFERENCE_PASS`` against every other pass of one ratio: paired AVE difference ± SE (rows that have the
    per-document answers only, i.e. evaluated with this script's current version)."""
    ref = next((r for r in group if r["pass"] == REFERENCE_PASS and r.get("correct")), None)
    if ref is None:
        return []
    parts = []
    for r in group:
        if r is ref or not r.get("correct"):
            continue
        diff, se = paired_difference(ref["correct"], r["correct"])
        verdict = "resolved" if abs(diff) > 2 * se else "not resolved"
        parts.append(f"`{r['pass']}` {diff:+.1f} ± {se:.1f} ({verdict})")
    if not parts:
        return []
    return [f"  `{REFERENCE_PASS}` minus each pass, paired over the same documents (AVE points ± SE; resolved = "
            f"beyond 2 SE): " + ", ".join(parts) + "."]


def write_plot(path: str, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "avg" in r]
    dense = next((r for r in ok if r["pass"] == "dense"), None)
    passes = sorted({r["pass"] for r in ok if r["pass"] != "dense"})
    ratios = sorted({r["ratio"] for r in ok if r["pass"] != "dense"})
    if not passes:
        return
    fig, (ax_acc, ax_ppl) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=120)
    width = 0.8 / max(1, len(ratios))
    for k, ratio in enumerate(ratios):
        xs, accs, ppls = [], [], []
        for i, name in enumerate(passes):
            r = next((r for r in ok if r["pass"] == name and r["ratio"] == ratio), None)
            if r is not None:
                xs.append(i + (k - (len(ratios) - 1) / 2) * width)
                accs.append(100 * r["avg"])
                ppls.append(r["ppl"])
        bars = ax_acc.bar(xs, accs, width, label=f"ratio {ratio}")
        ax_acc.bar_label(bars, fmt="%.1f", fontsize=7)
        bars = ax_ppl.bar(xs, ppls, width, label=f"ratio {ratio}")
        ax_ppl.bar_label(bars, labels=[f"{p:.0f}" if p < 1e4 else f"{p:.1e}" for p in ppls], fontsize=7)
    for ax in (ax_acc, ax_ppl):
        ax.set_xticks(range(len(passes)))
        ax.set_xticklabels(passes, rotation=30, ha="right")
        ax.grid(axis="y", alpha=0.3)
    if dense:
        ax_acc.axhline(100 * dense["avg"], color="black", linestyle="--", label="dense")
        ax_ppl.axhline(dense["ppl"], color="black", linestyle="--", label="dense")
    ax_acc.set_ylabel("7-task average (AVE, %)")
    ax_acc.set_title("Zero-shot 7-task average")
    ax_ppl.set_yscale("log")
    if dense:  # log-scale bars need an explicit floor; start below the dense perplexity
        ax_ppl.set_ylim(bottom=dense["ppl"] / 2)
    ax_ppl.set_ylabel("held-out perplexity (log scale)")
    ax_ppl.set_title("Wikipedia-lead perplexity")
    ax_acc.legend(fontsize=8)
    ax_ppl.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M depth compression without healing", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limit = parse_limit(args.limit)
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]

    import optimum_slm
    from optimum_slm.calibration import CalibrationConfig
    from optimum_slm.evaluate import heldout_ids
    from optimum_slm.loading import load_model

    from lm_eval_slm.tasks import require_data

    require_data()
    available = optimum_slm.list_passes()
    passes = [p for p in args.passes.split(",") if p] if args.passes else [p for p in available if p != "drop"]
    unknown = [p for p in passes if parse_entry(p)[0] not in available]
    if unknown:
        raise SystemExit(f"error: unknown pass(es) {', '.join(unknown)}; available: {', '.join(available)}")

    settings = {"model": args.model, "limit": limit, "calib_data": args.calib_data,
                "calib_samples": args.calib_samples, "calib_seq_len": args.calib_seq_len, "seed": args.seed,
                "batch_size": args.batch_size}
    cache_path = os.path.splitext(args.output)[0] + ".json"
    cache: dict[str, Any] = {}
    known_plans: dict[str, list[dict[str, Any]]] = {}
    if os.path.exists(cache_path) and not args.fresh:
        with open(cache_path, encoding="utf-8") as fh:
            saved = json.load(fh)
        if saved.get("settings") == settings:
            cache = saved.get("rows", {})
        if all(saved.get("settings", {}).get(k) == settings[k] for k in PLAN_SETTINGS):
            # the plans depend on the planning settings only: a run that differed in --limit / --batch-size found
            # the same plans, so they are reused instead of searched again
            known_plans = {**saved.get("plans", {}), **plans_of(saved.get("rows", {}))}

    _, tokenizer = load_model(args.model)
    # the search set, and the fit set (default size, drawn on demand) that replaceme and the *-lstsq rules read
    ids = CalibrationConfig(args.calib_data, args.calib_samples, args.calib_seq_len, args.seed).load(tokenizer)
    heldout = heldout_ids(tokenizer)

    # ratio-major so that an interrupted run still has complete, comparable rows for the first ratio; there the SLM
    # variants go first, at later ratios last (their window searches are the slowest planners, and grow with ratio)
    slm_first = sorted(passes, key=lambda p: (not p.startswith("slm"), p))
    slm_last = sorted(passes, key=lambda p: (p.startswith("slm"), p))
    configs = [] if args.no_dense else [("dense", None)]
    configs += [(p, r) for k, r in enumerate(ratios) for p in (slm_first if k == 0 else slm_last)]
    command = " ".join(["python benchmarks/quality.py"] + [shlex.quote(a) for a in (argv if argv is not None
                                                                                     else sys.argv[1:])])
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    rows = []
    for name, ratio in configs:
        key = f"{name}@{ratio}"
        stale = key in cache and "pass_params" in cache[key] and cache[key]["pass_params"] != requested_params(
            name, ratio)
        if stale:
            print(f"[quality] {key}: the cached row was planned with other parameters; running again", flush=True)
            known_plans.pop(key, None)
        if key in cache and "avg" in cache[key] and not stale:
            row = cache[key]
            print(f"[quality] {key}: cached AVE {100 * row['avg']:.1f}", flush=True)
        else:
            print(f"[quality] {key}: running", flush=True)
            done = {ops_key(r.get("ops")): r for r in cache.values() if "avg" in r and "same_as" not in r}
            try:
                row = run_config(name, ratio, args, ids, heldout, limit, done, known_plans.get(key))
            except Exception as exc:  # one failing pass must not sink the table; the error is recorded
                traceback.print_exc()
                row = {"pass": name, "ratio": ratio, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
            cache[key] = row
            plans = {**known_plans, **plans_of(cache)}
            with open(cache_path, "w", encoding="utf-8") as fh:
                json.dump({"settings": settings, "rows": cache, "plans": plans}, fh, indent=1)
            if "avg" in row:
                print(f"[quality] {key}: AVE {100 * row['avg']:.1f} PPL {row['ppl']:.2f} "
                      f"({row.get('plan_s', 0)} s plan, {row['eval_s']} s eval"
                      + (f", same plan as {row['same_as']}" if row.get("same_as") else "") + ")", flush=True)
        rows.append(row)
        write_markdown(args.output, rows, settings, command)
        write_plot(os.path.splitext(args.output)[0] + ".png", rows)
    print(f"[quality] wrote {args.output}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
