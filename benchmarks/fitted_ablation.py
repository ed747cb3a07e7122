"""Fitted-merge ablation on SmolLM2-135M: where the least-squares map goes, how the search sees it, regularisation.

    OMP_NUM_THREADS=2 python benchmarks/fitted_ablation.py --configs '[{"method": "replaceme", "ratio": 0.2}]'
    python benchmarks/fitted_ablation.py --redraw          # rewrite the table from the .jsonl

Every configuration plans on the same calibration: the search set (10 x 128 tokens of ``wiki-leads``, seed 1234)
and the fit set (``--fit-samples`` x ``--fit-seq-len`` packed tokens of the documents after the search set's).
Each row: the plan's windows, perplexity on the validation texts ``wiki-leads-valid`` and ``lambada-books-valid``
(choices such as the ridge are made on them: the lowest sum of their log perplexities), and on the test texts ``wiki-leads-test`` (the calibration domain) and ``lambada-books`` (out of domain), 16 x 512
tokens each, the plan's wall time and the fit's share, decoder-layer
evaluations of the search (in passes over the search set) and of the fit (in passes over the fit set). Rows are
appended to ``<output>.jsonl`` (one run per line, never rewritten), the table is rebuilt from all of them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OPTIMUM_SLM_QUIET", "1")

DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fitted_smollm2.md")


def run(configs: list[dict], fit_samples: int, fit_seq_len: int, note: str) -> list[dict]:
    import torch

    from optimum_slm import CalibrationConfig, apply_plan, compress, load_model
    from optimum_slm.evaluate import heldout_ids, perplexity

    model, tok = load_model("smollm2-135m", dtype="float32")
    heldout = {"valid": heldout_ids(tok, "wiki-leads-valid"), "ood_valid": heldout_ids(tok, "lambada-books-valid"),
               "wiki": heldout_ids(tok), "ood": heldout_ids(tok, "lambada-books")}
    cal = CalibrationConfig("wiki-leads", fit_samples=fit_samples, fit_seq_len=fit_seq_len)
    rows = []
    for cfg in configs:
        params = dict(cfg)
        method = params.pop("method")
        row = {"method": method, "params": params, "fit_samples": fit_samples, "fit_seq_len": fit_seq_len,
               "threads": torch.get_num_threads(), "note": note}
        if method == "dense":
            row.update({k: perplexity(model, ids) for k, ids in heldout.items()})
        else:
            started = time.perf_counter()
            plan = compress(model, method, cal, tokenizer=tok, **params)  # the user plan cache: reruns are cheap
            row["plan_s"] = round(time.perf_counter() - started, 1)
            row["plan_reused"] = plan.reused_from is not None
            trace = plan.stages[0].trace
            row.update(ops=plan.describe_ops(), layer_evaluations=trace.get("layer_evaluations"), fit=trace.get("fit"),
                       fit_s=plan.timings[0].get("fit_seconds") if plan.timings else None)
            compressed = apply_plan(copy.deepcopy(model), plan)
            row.update({k: round(perplexity(compressed, ids), 3) for k, ids in heldout.items()})
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def write_markdown(path: str, rows: list[dict]) -> None:
    dense = next((r for r in rows if r["method"] == "dense"), None)
    lines = ["# Fitted merges on SmolLM2-135M: ablation", "", __doc__.split("\n\n", 2)[2].strip(), ""]
    if dense:
        lines += [f"Dense: **{dense['wiki']:.2f}** (wiki-leads-test), **{dense['ood']:.2f}** (lambada-books).", ""]
    lines += ["| method | parameters | fit tokens | windows | wiki valid PPL | books valid PPL | wiki-leads PPL | "
              "lambada-books PPL | plan s | fit s | search layer evals | fit layer passes | note |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["method"] == "dense":
            continue
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items() if k != "ratio")
        fit = r.get("fit") or {}
        valid = f"{r['valid']:.2f}" if "valid" in r else "–"
        ood_valid = f"{r['ood_valid']:.2f}" if "ood_valid" in r else "–"
        plan_s = "cached" if r.get("plan_reused") else f"{r['plan_s']:.0f}"
        fit_s = r["fit_s"] if r.get("fit_s") is not None else "–"
        lines.append(
            f"| {r['method']} {r['params'].get('ratio', '')} | {params or 'defaults'} | {fit.get('fit_tokens', 0):,} "
            f"| {'; '.join(r['ops'])} | {valid} | {ood_valid} | {r['wiki']:.2f} | {r['ood']:.2f} | {plan_s} | {fit_s} | "
            f"{r.get('layer_evaluations', '–')} | {fit.get('fit_layer_passes', '–')} | {r.get('note', '')} |")
    lines += ["", "Rows in the order they were run; the note says what the code did differently then.", ""]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=None, help="JSON list of {method, **params}")
    parser.add_argument("--fit-samples", type=int, default=256)
    parser.add_argument("--fit-seq-len", type=int, default=256)
    parser.add_argument("--note", default="")
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    parser.add_argument("--redraw", action="store_true", help="only rebuild the table from the .jsonl")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    log = os.path.splitext(args.output)[0] + ".jsonl"
    if not args.redraw:
        if not args.configs:
            parser.error("--configs is required (or --redraw)")
        for row in run(json.loads(args.configs), args.fit_samples, args.fit_seq_len, args.note):
            with open(log, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
    with open(log, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    write_markdown(args.output, rows)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
