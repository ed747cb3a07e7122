"""Cost of the ``slm`` pass against a slow loop that follows the official SLM.py (deepcopy + full forward).

    python benchmarks/slm_cost.py [--thresholds 0.5,0.72,0.9] [--ratio 0.2] [--output benchmarks/results/slm_cost.md]

On SmolLM2-135M (``smollm2-135m`` alias, fp32) with 10 x 128 calibration tokens from the ``wiki-leads`` split. Each
measurement runs in its own subprocess so that its peak RSS (``ru_maxrss``) is its own. Checks that both give the
same windows and prints the speed ratio and the peak memory of each.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OPTIMUM_SLM_QUIET", "1")


def _measure(kind: str, threshold: float | None, ratio: float | None, plan_path: str | None = None) -> dict:
    import torch

    import optimum_slm as slm
    from optimum_slm.passes.depth.slm_official_port import official_slm_windows

    device = os.environ.get("SLM_COST_DEVICE", "cpu")
    model, tok = slm.load_model("smollm2-135m", dtype="float32", device=device)
    ids = slm.load_calibration(tok, "wiki-leads", n_samples=10, seq_len=128, seed=1234)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if kind == "fast":
        params = {"ratio": ratio} if ratio is not None else {"threshold": threshold}
        plan = slm.compress(model, slm.get_pass("slm", **params), ids, cache=False)
        windows = [list(w) for w in plan.windows]
        extra = {"evaluations": plan.trace["similarity_evaluations"], "threshold": plan.params["threshold"],
                 "removed": plan.removed_layers}
        if plan_path:
            plan.save(plan_path)
    else:
        found, tried = official_slm_windows(model, ids.ids, threshold)
        windows = [list(w) for w in found]
        extra = {"evaluations": len(tried)}
    seconds = time.perf_counter() - start
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "kind": kind,
        "threshold": threshold,
        "ratio": ratio,
        "seconds": round(seconds, 2),
        "windows": windows,
        "peak_rss_mb": round(rss_after / 1024, 1),
        "extra_peak_mb": round((rss_after - rss_before) / 1024, 1),
        "threads": torch.get_num_threads(),
        "device": device,
        **({"cuda_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)} if device == "cuda" else {}),
        **extra,
    }


def _run_child(kind: str, threshold: float | None, ratio: float | None, plan_path: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", kind]
    if plan_path:
        cmd += ["--plan-path", plan_path]
    if threshold is not None:
        cmd += ["--threshold", str(threshold)]
    if ratio is not None:
        cmd += ["--ratio", str(ratio)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--thresholds", default="0.5,0.72,0.9")
    ap.add_argument("--ratio", type=float, default=0.2, help="also time the target-ratio search")
    ap.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "slm_cost.md"))
    ap.add_argument("--device", default="cpu", help="cpu or cuda (children load the model there)")
    ap.add_argument("--child", choices=["fast", "slow"], help=argparse.SUPPRESS)
    ap.add_argument("--threshold", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--plan-path", help=argparse.SUPPRESS)
    ap.add_argument("--target-ratios", default="0.2,0.35", help="ratios checked for exact counts and byte-identical reruns")
    args = ap.parse_args()
    os.environ["SLM_COST_DEVICE"] = args.device  # inherited by the children
    if args.child:
        ratio = args.ratio if args.threshold is None else None
        print(json.dumps(_measure(args.child, args.threshold, ratio, args.plan_path)))
        return

    rows = []
    for t in [float(x) for x in args.thresholds.split(",")]:
        fast = _run_child("fast", t, None)
        slow = _run_child("slow", t, None)
        same = fast["windows"] == slow["windows"]
        rows.append((t, fast, slow, same))
        print(f"threshold {t}: fast {fast['seconds']} s, slow {slow['seconds']} s, "
              f"x{slow['seconds'] / fast['seconds']:.1f}, same windows: {same} {fast['windows']}", flush=True)
    search = _run_child("fast", None, args.ratio) if args.ratio else None
    reruns = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in [float(x) for x in args.target_ratios.split(",") if x]:
            a, b = os.path.join(tmp, f"{r}-a.json"), os.path.join(tmp, f"{r}-b.json")
            first = _run_child("fast", None, r, a)
            _run_child("fast", None, r, b)
            with open(a, "rb") as fa, open(b, "rb") as fb:
                identical = fa.read() == fb.read()
            reruns.append((r, first, identical))
            print(f"ratio {r}: removed {first['removed']}, threshold {first['threshold']}, rerun byte-identical: "
                  f"{identical}", flush=True)

    lines = [
        "# `slm` pass cost on SmolLM2-135M",
        "",
        "Generated by `python benchmarks/slm_cost.py` (2 CPU cores, fp32, 10 x 128 `wiki-leads` calibration tokens,",
        f"seed 1234, torch threads {rows[0][1]['threads']}). \"slow\" follows the official SLM.py: a deep copy of the",
        "whole model and a full forward (batch 1, with labels) per candidate window. Peak RSS is per process",
        "(model and data included); \"extra\" is the growth during the pass.",
        "",
        "| threshold | windows (base numbering) | same windows | windows scored (fast / slow) | fast s | slow s | speed-up | fast peak RSS MB (extra) | slow peak RSS MB (extra) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t, fast, slow, same in rows:
        lines.append(
            f"| {t} | {fast['windows']} | {'yes' if same else 'NO'} | {fast['evaluations']} / {slow['evaluations']} "
            f"| {fast['seconds']} | {slow['seconds']} | {slow['seconds'] / fast['seconds']:.1f}x "
            f"| {fast['peak_rss_mb']} ({fast['extra_peak_mb']}) | {slow['peak_rss_mb']} ({slow['extra_peak_mb']}) |"
        )
    if search:
        single = [r[1] for r in rows if r[0] == 0.72]
        ratio_note = ""
        if single:
            ratio_note = (f" ({search['evaluations'] / single[0]['evaluations']:.2f}x the windows and "
                          f"{search['seconds'] / single[0]['seconds']:.2f}x the time of one threshold-0.72 run)")
        lines += [
            "",
            f"Target-ratio mode `ratio={args.ratio}`: threshold {search['threshold']} found by bisection, windows "
            f"{search['windows']}, {search['evaluations']} windows scored in {search['seconds']} s{ratio_note}.",
        ]
    if reruns:
        lines += ["", "| target ratio | removed of 30 | threshold found | windows | plan s | rerun byte-identical |",
                  "|---|---|---|---|---|---|"]
        for r, first, identical in reruns:
            lines.append(f"| {r} | {first['removed']} | {first['threshold']} | {first['windows']} | "
                         f"{first['seconds']} | {'yes' if identical else 'NO'} |")
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
