"""Every depth pass on SmolLM2-135M: removed layers, held-out perplexity on two corpora, plan cost; a table and a chart.

    OMP_NUM_THREADS=2 python benchmarks/compare_depth.py [--passes shortgpt,sleb] [--ratios 0.2,0.35]
        [--output benchmarks/results/depth_smollm2.md] [--plans-from benchmarks/results/quality_smollm2.json]

Setup: the ``smollm2-135m`` alias in fp32; one calibration for every pass: the search set (10 x 128 tokens of the
``wiki-leads`` split, seed 1234) and the fit set (256 x 256 packed tokens of the documents after the search set's,
read only by passes that fit a map). Perplexity on two held-out texts no pass sees (16 x 512 tokens each,
``evaluate.heldout_ids``): ``wiki-leads-test`` (the calibration domain) and ``lambada-books`` (BookCorpus fiction,
out of domain). Per row: wall time (the whole plan, and the fit), decoder-layer evaluations in passes over the search
set (load-independent), and the peak RSS during the row (VmHWM, reset before each row). ``--plans-from`` applies
the plans a ``quality.py`` results file holds for a pass and ratio instead of searching again (those rows show no
plan cost; a quality row ``slm-plus[merge=calibrated]`` serves the depth row ``slm-plus[calibrated]``). Each plan
is applied to a deep copy of the base. By default every registered pass runs except
``drop`` (which needs an explicit layer list), so a newly registered pass appears without editing this script;
``slm`` runs once per merge rule and ``laco`` once per RDSC mode. The chart (same name, ``.png``) has one bar per pass
and ratio on a log perplexity axis, with the dense model as a line.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OPTIMUM_SLM_QUIET", "1")

import torch

from optimum_slm import CalibrationConfig, apply_plan, compress, get_pass, list_passes, load_model
from optimum_slm.errors import SLMError
from optimum_slm.evaluate import heldout_ids, perplexity

#: the held-out texts every row is scored on: (row key, corpus alias)
HELDOUT = (("ppl", "wiki-leads-test"), ("ppl_ood", "lambada-books"))


def reset_peak_rss() -> None:
    """Reset the process's VmHWM (Linux: writing 5 to clear_refs), so the next reading is this row's peak."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None

#: passes that run more than once, with these parameter sets (label suffix = the values)
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "slm": [{"merge": r} for r in ("official", "paper", "mean", "keep-bottom", "keep-top")],
    "slm-plus": [{}, {"merge": "calibrated"}],
    "laco": [{"merge": "official"}, {"merge": "paper"}],
}
#: registered passes that cannot run from a ratio alone
SKIP = {"drop"}
#: greedy passes whose k-layer plan is the first k rounds of any longer run (trace key of the removal order);
#: with --reuse-greedy they run once at the largest ratio and the smaller ratios take the prefix
GREEDY = {"sleb": "removal_order"}


def variants(names: list[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, pass name, extra params) for every run; a name such as ``slm[mean]`` selects one variant."""
    out = []
    for entry in names:
        name = entry.split("[", 1)[0]
        for extra in VARIANTS.get(name, [{}]):
            label = name + (f"[{','.join(str(v) for v in extra.values())}]" if extra else "")
            if entry in (name, label):
                out.append((label, name, extra))
    return out


def describe_ops(plan) -> str:
    return "; ".join(plan.describe_ops())


def run_one(model, calib, heldout, name: str, extra: dict[str, Any], ratio: float,
            known: dict[tuple[str, str], Any] | None = None, use_cache: bool = False) -> dict[str, Any]:
    row: dict[str, Any] = {"pass": name, "params": extra, "ratio": ratio}
    reset_peak_rss()
    plan = (known or {}).get(request_key(name, extra, ratio))
    if plan is not None:
        row["plan_reused"] = True
    else:
        try:
            start = time.perf_counter()
            plan = compress(model, get_pass(name, ratio=ratio, **extra), calib, cache=use_cache)
            row["plan_s"] = round(time.perf_counter() - start, 2)
        except SLMError as exc:
            row["error"] = str(exc)
            return row
        if plan.reused_from:
            row["plan_cached"] = True  # the plan cache held it: no wall time for this row
        row["layer_evaluations"] = plan.stages[0].trace.get("layer_evaluations")
        fit = plan.stages[0].trace.get("fit")
        if fit:
            row["fit_s"] = plan.timings[0].get("fit_seconds") if plan.timings else None
            row["fit_tokens"] = fit["fit_tokens"]
            row["fit_layer_passes"] = fit["fit_layer_passes"]
    row["removed"] = plan.removed_layers
    row["layers_after"] = plan.num_layers_after
    row["ops"] = describe_ops(plan)
    if name in GREEDY:
        row["_plan"] = plan
    if "threshold" in plan.params and name in ("slm", "laco"):
        row["threshold"] = plan.params["threshold"]
    row = measure_perplexity(row, model, plan, heldout)
    row["peak_rss_mb"] = peak_rss_mb()
    return row


def measure_perplexity(row: dict[str, Any], model, plan, heldout) -> dict[str, Any]:
    """``row`` with the perplexity of ``plan`` applied to a copy of ``model`` on every held-out text, and its time."""
    compressed = apply_plan(copy.deepcopy(model), plan)
    start = time.perf_counter()
    for key, ids in heldout.items():
        row[key] = perplexity(compressed, ids)
    row["eval_s"] = round(time.perf_counter() - start, 1)
    return row


def request_key(name: str, extra: dict[str, Any], ratio: float) -> tuple[str, str]:
    """What a plan was requested with: the pass and its full parameters (defaults included) as JSON."""
    return name, json.dumps(get_pass(name, ratio=ratio, **extra).public_params(), sort_keys=True, default=str)


def known_plans(path: str | None, model) -> dict[tuple[str, str], Any]:
    """The self-contained plans of a ``quality.py`` results file, by ``request_key``."""
    if not path:
        return {}
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from quality import known_plan, parse_entry

    with open(path, encoding="utf-8") as fh:
        rows = json.load(fh)["rows"]
    plans = {}
    for r in rows.values():
        if r.get("pass") not in (None, "dense") and r.get("ratio") is not None:
            name, extra = parse_entry(r["pass"])
            plan = known_plan(model, name, r["ratio"], r.get("ops"))
            if plan is not None:
                plans[request_key(name, extra, r["ratio"])] = plan
    return plans


def prefix_rows(model, calib, heldout, name: str, ratios: list[float], known=None) -> list[dict[str, Any]]:
    """Rows of a greedy pass for all ``ratios`` from ONE run at the largest: the smaller plans are prefixes of its
    removal order, their plan time the sum of their rounds' times (plus the shared recording, in round 1)."""
    from optimum_slm.plan import CompressionPlan, drop_op

    top = max(ratios)
    big = run_one(model, calib, heldout, name, {}, top, known)
    rows = [big]
    if "error" in big or "_plan" not in big:
        return rows
    full = big.pop("_plan")
    order = full.trace[GREEDY[name]]
    L = full.num_layers
    for ratio in sorted(r for r in ratios if r != top):
        k = get_pass(name, ratio=ratio).target_count(L)
        rounds = full.trace["rounds"][:k]
        sub = CompressionPlan.for_model(model, name, [drop_op(order[:k])], params={"ratio": ratio},
                                        trace={GREEDY[name]: order[:k], "rounds": rounds})
        row = {"pass": name, "params": {}, "ratio": ratio, "removed": k, "layers_after": L - k,
               "ops": describe_ops(sub), "plan_s": round(sum(r["seconds"] for r in rounds), 2),
               "prefix_of": top}
        rows.append(measure_perplexity(row, model, sub, heldout))
    return rows


def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _ppl(value: float) -> str:
    return f"{value:.2f}" if value < 1e5 else f"{value:.3g}"


def write_markdown(path: str, rows: list[dict[str, Any]], dense: dict[str, float], command: str, setup: str) -> None:
    lines = [
        "# Depth passes on SmolLM2-135M (30 layers)",
        "",
        setup,
        "",
        f"Dense model: perplexity **{dense['ppl']:.2f}** on `wiki-leads-test`, **{dense['ppl_ood']:.2f}** on "
        "`lambada-books`.",
        "",
        "| pass | ratio | layers | removed / merged (base numbering) | wiki-leads PPL | lambada-books PPL | plan s "
        "| of which fit s | search layer evaluations | peak RSS MB |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    unique = {(r["label"], r["ratio"]): r for r in rows}  # a configuration named twice is one row (the last run)
    for r in sorted(unique.values(), key=lambda r: (r["ratio"], r.get("ppl", float("inf")))):
        if "error" in r:
            lines.append(f"| {r['label']} | {r['ratio']} | – | error: {r['error']} | – | – | – | – | – | – |")
            continue
        ops = r["ops"] + (f" (T={r['threshold']:.4g})" if "threshold" in r else "")
        if "prefix_of" in r:
            ops += f" (first {r['removed']} rounds of the ratio-{r['prefix_of']} run)"
        cost = ("plan from --plans-from" if r.get("plan_reused") else "plan cache" if r.get("plan_cached")
                else f"{r['plan_s']:.1f}")
        lines.append(
            f"| {r['label']} | {r['ratio']} | {r['layers_after']} | {ops} | {_ppl(r['ppl'])} | "
            f"{_ppl(r['ppl_ood']) if 'ppl_ood' in r else '–'} | {cost} | {_num(r.get('fit_s'))} | "
            f"{_num(r.get('layer_evaluations'))} | {_num(r.get('peak_rss_mb'), 0)} |"
        )
    lines += ["", "Rows are sorted by ratio, then perplexity (best first).", "", "Regenerate with:", "",
              "```", command, "```", ""]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))


def write_chart(path: str, rows: list[dict[str, Any]], dense: dict[str, float], ratios: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "ppl" in r]
    labels = list(dict.fromkeys(r["label"] for r in ok))
    # order passes by their perplexity at the first ratio so the chart reads best to worst
    first = {r["label"]: r["ppl"] for r in ok if r["ratio"] == ratios[0]}
    labels.sort(key=lambda l: first.get(l, float("inf")))
    width = 0.8 / max(len(ratios), 1)
    fig, ax = plt.subplots(figsize=(max(8, 0.75 * len(labels) + 2), 5.5))
    for k, ratio in enumerate(ratios):
        values = {r["label"]: r["ppl"] for r in ok if r["ratio"] == ratio}
        xs = [i + (k - (len(ratios) - 1) / 2) * width for i, l in enumerate(labels) if l in values]
        ys = [values[l] for l in labels if l in values]
        bars = ax.bar(xs, ys, width, label=f"ratio {ratio}")
        for bar, y in zip(bars, ys):
            ax.annotate(f"{y:.3g}" if y >= 1e4 else f"{y:.0f}" if y >= 100 else f"{y:.1f}", (bar.get_x() + bar.get_width() / 2, y),
                        ha="center", va="bottom", fontsize=7, rotation=90, xytext=(0, 2), textcoords="offset points")
    dense = dense["ppl"]
    ax.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense {dense:.2f}")
    ax.set_yscale("log")
    ax.set_ylim(bottom=dense / 2)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=40, ha="right", fontsize=9)
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title("SmolLM2-135M depth compression: held-out Wikipedia-leads perplexity (lower is better)")
    ax.legend(fontsize=9)
    top = max([r["ppl"] for r in ok] + [dense])
    ax.set_ylim(top=top * 3000)  # room for the rotated value labels on a log axis
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", default=None, help="comma-separated pass names (default: all registered but drop)")
    parser.add_argument("--ratios", default="0.2,0.35", help="comma-separated removal ratios")
    parser.add_argument("--output", default="benchmarks/results/depth_smollm2.md", help="markdown file; .png/.json next to it")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--reuse-greedy", action="store_true",
        help="run greedy passes (sleb) once at the largest ratio; smaller ratios use the first rounds of that run",
    )
    parser.add_argument("--note", default="", help="a sentence appended to the setup paragraph")
    parser.add_argument("--plan-cache", action="store_true",
                        help="take plans from the user plan cache when it holds them (rows say so; no plan time)")
    parser.add_argument("--plans-from", default=None, help="a quality.py results .json whose plans are applied "
                        "instead of searching again (rows of passes with extra parameters always plan)")
    parser.add_argument("--redraw", action="store_true", help="rewrite the table and chart from the saved .json only")
    parser.add_argument(
        "--combine", default=None, help="with --redraw: comma-separated .json files of partial runs to join first"
    )
    args = parser.parse_args(argv)
    base = os.path.splitext(args.output)[0]
    if args.redraw:
        if args.combine:
            parts = []
            for path in args.combine.split(","):
                with open(path, encoding="utf-8") as fh:
                    parts.append(json.load(fh))
            latest = {(r["label"], r["ratio"]): r for part in parts for r in part["rows"]}  # later files win
            saved = dict(parts[-1], rows=list(latest.values()))
            saved["command"] = parts[-1]["command"].split(" python ")[0] + " python benchmarks/compare_depth.py"
            with open(base + ".json", "w", encoding="utf-8") as fh:
                json.dump(saved, fh, indent=1)
        with open(base + ".json", encoding="utf-8") as fh:
            saved = json.load(fh)
        ratios = list(dict.fromkeys(r["ratio"] for r in saved["rows"]))
        write_markdown(args.output, saved["rows"], saved["dense_ppl"], saved["command"], saved["setup"])
        write_chart(base + ".png", saved["rows"], saved["dense_ppl"], ratios)
        return 0

    registered = list(list_passes())
    names = [p for p in args.passes.split(",") if p] if args.passes else [p for p in registered if p not in SKIP]
    unknown = [p for p in names if p.split("[", 1)[0] not in registered]
    if unknown:
        parser.error(f"unknown pass {unknown[0]!r}; registered: {', '.join(registered)}")
    ratios = [float(r) for r in args.ratios.split(",") if r]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    threads = os.environ.get("OMP_NUM_THREADS")
    command = (f"OMP_NUM_THREADS={threads} " if threads else "") + "python benchmarks/compare_depth.py " + " ".join(
        shlex.quote(a) for a in argv
    )

    model, tokenizer = load_model(args.model, dtype="float32")
    config = CalibrationConfig("wiki-leads", n_samples=10, seq_len=128, seed=1234)
    calib = config.load(tokenizer)
    heldout = {key: heldout_ids(tokenizer, source) for key, source in HELDOUT}
    dense = {key: perplexity(model, ids) for key, ids in heldout.items()}
    known = known_plans(args.plans_from, model)
    setup = (
        f"Model `{args.model}` (fp32, CPU, torch threads: {torch.get_num_threads()}). Calibration for every pass: "
        f"search set {calib.ids.shape[0]} x {calib.ids.shape[1]} tokens of `wiki-leads` (seed 1234); fit set (read by "
        f"`replaceme` and the `*-lstsq` merge rules only) {config.fit_samples} x {config.fit_seq_len} packed tokens "
        f"of the next `wiki-leads` documents. Perplexity: held-out `wiki-leads-test` and `lambada-books`, "
        f"16 x 512 tokens each. Pass defaults unless named (`slm[rule]`, `slm-plus[rule]`: merge rule, "
        "`laco[mode]`: RDSC mode; T = the threshold the target search chose). " + args.note
    ).strip()
    print(f"dense perplexity {dense}", flush=True)
    rows: list[dict[str, Any]] = []

    def record(new_rows: list[dict[str, Any]], label: str) -> None:
        for row in new_rows:
            row.pop("_plan", None)
            row["label"] = label
            rows.append(row)
            print(json.dumps(row), flush=True)
        write_markdown(args.output, rows, dense, command, setup)
        with open(base + ".json", "w", encoding="utf-8") as fh:
            json.dump({"dense_ppl": dense, "rows": rows, "command": command, "setup": setup}, fh, indent=1)

    runs = variants(names)
    if args.reuse_greedy:
        for label, name, extra in [v for v in runs if v[1] in GREEDY and not v[2]]:
            record(prefix_rows(model, calib, heldout, name, ratios, known), label)
        runs = [v for v in runs if not (v[1] in GREEDY and not v[2])]
    for ratio in ratios:
        for label, name, extra in runs:
            record([run_one(model, calib, heldout, name, extra, ratio, known, args.plan_cache)], label)
    write_chart(base + ".png", rows, dense, ratios)
    print(f"wrote {args.output}, {base}.png, {base}.json")
    return 0 if all("ppl" in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
