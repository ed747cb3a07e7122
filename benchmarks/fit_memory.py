"""Peak memory of fitting a least-squares map on fit sets of growing size: the fit streams, so memory stays flat.

    OMP_NUM_THREADS=2 python benchmarks/fit_memory.py [--fit-samples 64,1024] [--output benchmarks/results/fit_memory_smollm2.md]

Each size runs in a fresh process (peak RSS is per process): load SmolLM2-135M (fp32), plan ``slm-plus`` (its
defaults: two least-squares maps per window) at ratio 0.2 on the default search set and a packed ``wiki-leads`` fit
set of ``fit_samples`` x 256 tokens, no plan cache. Reported: the process's peak RSS, its RSS after loading the model, the
fit's time and layer passes, and the map's window.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OPTIMUM_SLM_QUIET", "1")


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(fit_samples: int, fit_seq_len: int) -> dict:
    import torch

    from optimum_slm import CalibrationConfig, compress, load_model

    model, tok = load_model("smollm2-135m", dtype="float32")
    loaded = _rss_mb()
    cal = CalibrationConfig("wiki-leads", fit_samples=fit_samples, fit_seq_len=fit_seq_len)
    started = time.perf_counter()
    plan = compress(model, "slm-plus", cal, tokenizer=tok, cache=False, ratio=0.2)
    stage = plan.stages[0]
    return {
        "fit_samples": fit_samples, "fit_seq_len": fit_seq_len, "fit_tokens": stage.trace["fit"]["fit_tokens"],
        "windows": plan.describe_ops(), "plan_s": round(time.perf_counter() - started, 1),
        "fit_s": plan.timings[0].get("fit_seconds"), "fit_layer_passes": stage.trace["fit"]["fit_layer_passes"],
        "pass_s": plan.timings[0]["seconds"],
        "layer_evaluations": stage.trace["layer_evaluations"],
        "rss_loaded_mb": round(loaded, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit-samples", default="64,1024", help="comma-separated fit-set sizes in sequences")
    parser.add_argument("--fit-seq-len", type=int, default=256)
    parser.add_argument("--output", default="benchmarks/results/fit_memory_smollm2.md")
    parser.add_argument("--update", action="store_true",
                        help="keep the other sizes' rows of the existing .json (rerun only the sizes given)")
    parser.add_argument("--redraw", action="store_true", help="only rewrite the table from the .json")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.fit_seq_len)), flush=True)
        return 0
    rows = []
    saved = os.path.splitext(args.output)[0] + ".json"
    sizes = [int(x) for x in args.fit_samples.split(",") if x]
    if args.redraw:
        sizes = []
    if (args.update or args.redraw) and os.path.exists(saved):
        with open(saved, encoding="utf-8") as fh:
            rows = [r for r in json.load(fh)["rows"] if r["fit_samples"] not in sizes]
    for n in sizes:
        out = subprocess.run([sys.executable, __file__, "--child", str(n), "--fit-seq-len", str(args.fit_seq_len)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    rows.sort(key=lambda r: r["fit_tokens"])
    smallest = rows[0]
    lines = [
        "# Fit-set size and peak memory (SmolLM2-135M, slm-plus, ratio 0.2)", "",
        __doc__.split("\n\n", 2)[2].strip(), "",
        "| fit tokens | window(s) | peak RSS MB | × smallest | RSS after load MB | plan s | of which fit s | "
        "search s | search layer evaluations | fit layer passes |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['fit_tokens']:,} | {'; '.join(r['windows'])} | {r['peak_rss_mb']:.0f} | "
                     f"{r['peak_rss_mb'] / smallest['peak_rss_mb']:.2f} | {r['rss_loaded_mb']:.0f} | {r['plan_s']:.1f} | "
                     f"{r['fit_s']:.1f} | {r.get('pass_s', r['plan_s']) - r['fit_s']:.1f} | "
                     f"{r['layer_evaluations']:,.0f} | "
                     f"{r['fit_layer_passes']} |")
    threads = os.environ.get("OMP_NUM_THREADS")
    command = (f"OMP_NUM_THREADS={threads} " if threads else "") + "python benchmarks/fit_memory.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    if args.redraw and os.path.exists(saved):
        with open(saved, encoding="utf-8") as fh:
            command = json.load(fh).get("command", command)
    lines += [f"* {r['fit_tokens']:,} tokens: {r['note']}" for r in rows if r.get("note")]
    lines += ["", f"torch threads: {rows[0]['threads']}, one process at a time on an otherwise idle 2-core machine. "
              "\"search s\" is the pass's run time without the fit (\"plan s\" adds reading and tokenising the corpus, "
              "drawing the fit set and fingerprinting the base); "
              "\"search layer evaluations\" counts decoder-layer runs over the search set, the load-independent "
              "cost. Regenerate with:", "", "```", command.strip(), "```", ""]
    with open(args.output, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))
    with open(os.path.splitext(args.output)[0] + ".json", "w", encoding="utf-8") as fh:
        json.dump({"rows": rows, "command": command.strip()}, fh, indent=1)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
