"""Depth vs width vs depth ∘ width on SmolLM2-135M at the same fraction of removed layer parameters.

    python benchmarks/compare_width.py [--limit 100] [--ratios 0.2,0.35]

For each ratio r: depth passes (``slm-plus``, ``sleb``) remove round(r·L) layers; width passes (``flap``,
``taylor-width``, ``minitron-width``) remove about r of every layer's projection parameters; the recipe
``slm-plus`` then ``flap`` removes about half by each (1 − (1 − r_depth)(1 − r_width) = r). Every plan is made by
the pipeline on the same 10 × 128 ``wiki-leads`` calibration tokens. Reported: layer parameters (attention + MLP
projections) removed, total parameters, held-out ``wiki-leads-test`` perplexity (16 × 512 tokens), the 7-task
average (``--limit`` documents per task, paired against ``slm-plus`` at the same ratio), and prefill / decode
speed-up over dense at batch 1 and 16, all models measured in ONE interleaved ``bench_models`` run.
Writes ``benchmarks/results/width_smollm2.{md,json}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def configs(ratio: float, num_layers: int) -> list[tuple[str, Any]]:
    """(label, method or stage list) of every configuration at ``ratio``."""
    depth_layers = max(1, round(ratio * num_layers / 2))
    depth_fraction = depth_layers / num_layers
    width = 1 - (1 - ratio) / (1 - depth_fraction)
    return [
        ("slm-plus", {"method": "slm-plus", "ratio": ratio}),
        ("sleb", {"method": "sleb", "ratio": ratio}),
        ("flap", {"method": "flap", "ratio": ratio}),
        ("taylor-width", {"method": "taylor-width", "ratio": ratio}),
        ("minitron-width", {"method": "minitron-width", "ratio": ratio}),
        (f"slm-plus {depth_layers}L ∘ flap {width:.2f}",
         [{"method": "slm-plus", "num_layers": depth_layers}, {"method": "flap", "ratio": round(width, 4)}]),
    ]


def layer_params(model) -> int:
    from optimum_slm.arch import ArchAdapter

    return sum(p.numel() for layer in ArchAdapter(model).layers for n, p in layer.named_parameters()
               if "proj" in n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.35")
    parser.add_argument("--limit", type=int, default=100, help="documents per task (7-task average)")
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval batch size")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode tokens in the speed run")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats in the speed run")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "width_smollm2"))
    args = parser.parse_args(argv)

    import torch

    import optimum_slm
    from optimum_slm import CalibrationConfig, apply_plan, load_model
    from optimum_slm.arch import param_count
    from optimum_slm.bench import bench_models
    from optimum_slm.evaluate import heldout_ids, perplexity
    from quality import evaluate_tasks, paired_difference, paper_metrics

    torch.manual_seed(0)
    base, tok = load_model(args.model, dtype="float32", device="cpu")
    ids = CalibrationConfig("wiki-leads", 10, 128, 1234).load(tok)
    heldout = heldout_ids(tok)
    dense_layer_params = layer_params(base)
    rows: list[dict[str, Any]] = []
    models: list[tuple[str, Any, Any]] = [("dense", base, tok)]

    def evaluate(label: str, ratio: float | None, model, plan, plan_s: float) -> dict[str, Any]:
        start = time.time()
        scores, correct = evaluate_tasks(model, tok, args.limit, args.batch_size)
        paper = paper_metrics(scores)
        row = {
            "config": label, "ratio": ratio, "plan_s": round(plan_s, 1),
            "layers": model.config.num_hidden_layers, "params": param_count(model),
            "layer_params_removed": round(1 - layer_params(model) / dense_layer_params, 4),
            "ppl": perplexity(model, heldout), "avg": 100 * sum(paper.values()) / len(paper),
            "paper": paper, "correct": correct, "eval_s": round(time.time() - start, 1),
            "ops": "; ".join(plan.describe_ops()) if plan is not None else "",
        }
        print(f"{label} @ {ratio}: ppl {row['ppl']:.2f}, AVE {row['avg']:.1f}, "
              f"removed {row['layer_params_removed']:.3f}", flush=True)
        return row

    rows.append(evaluate("dense", None, base, None, 0.0))
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for label, method in configs(ratio, base.config.num_hidden_layers):
            start = time.time()
            if isinstance(method, dict):
                spec = dict(method)
                plan = optimum_slm.compress(base, spec.pop("method"), ids, tokenizer=tok, **spec)
            else:
                plan = optimum_slm.compress(base, method, ids, tokenizer=tok)
            plan_s = time.time() - start
            model = apply_plan(copy.deepcopy(base), plan)
            rows.append(evaluate(label, ratio, model, plan, plan_s))
            models.append((f"{label} @ {ratio}", model, tok))
    for row in rows:
        anchor = next((r for r in rows if r["config"] == "slm-plus" and r["ratio"] == row["ratio"]), None)
        if anchor is not None and anchor is not row:
            row["paired_vs_slm_plus"] = paired_difference(anchor["correct"], row["correct"])
    speed = bench_models(models, (1, 16), 128, args.new_tokens, None, args.repeats,
                         progress=lambda msg: print(f"  {msg}", flush=True))
    for row, name in zip(rows, [m[0] for m in models]):
        for r in speed:
            if r.name == name:
                row[f"prefill_x_b{r.batch_size}"] = round(r.speedup_prefill, 3)
                row[f"decode_x_b{r.batch_size}"] = round(r.speedup_decode, 3)
    settings = {"model": args.model, "calibration": "wiki-leads 10 x 128, seed 1234", "limit": args.limit,
                "heldout": "wiki-leads-test 16 x 512", "speed": f"prompt 128, {args.new_tokens} new tokens, "
                f"{args.repeats} repeats, interleaved, CPU"}
    with open(args.out + ".json", "w", encoding="utf-8") as fh:
        json.dump({"settings": settings, "rows": rows}, fh, indent=1)
    write_markdown(args.out + ".md", rows, settings)
    return 0


def rewrite(path: str) -> None:
    """Regenerate the markdown from a results JSON (``--rewrite``)."""
    with open(path + ".json", encoding="utf-8") as fh:
        data = json.load(fh)
    write_markdown(path + ".md", data["rows"], data["settings"])


def _fold(ops: str) -> str:
    """Runs of ops of one kind shown as ``kind × n (first … last)``, as ``slm inspect`` does."""
    from optimum_slm.plan.schema import _condensed

    items = ops.split("; ")
    return "; ".join(_condensed(items, [item.split(" ")[0] for item in items], limit=4))


def write_markdown(path: str, rows: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    lines = [
        "# Depth vs width on SmolLM2-135M",
        "",
        f"Calibration {settings['calibration']}; perplexity on {settings['heldout']}; 7-task average at "
        f"{settings['limit']} documents per task (\"paired\" = slm-plus minus the row, ± SE, on the same documents); "
        f"speed-up over dense in one interleaved run ({settings['speed']}). Generated by "
        "`python benchmarks/compare_width.py`.",
        "",
        "| config | ratio | layers | params | layer params removed | held-out PPL | AVE | paired vs slm-plus | "
        "prefill × b1 | decode × b1 | prefill × b16 | decode × b16 | plan s |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        paired = r.get("paired_vs_slm_plus")
        paired_text = f"{paired[0]:+.1f} ± {paired[1]:.1f}" if paired else ""
        lines.append(
            f"| {r['config']} | {r['ratio'] if r['ratio'] is not None else '–'} | {r['layers']} | "
            f"{r['params'] / 1e6:.1f} M | {100 * r['layer_params_removed']:.1f}% | {r['ppl']:.2f} | {r['avg']:.1f} | "
            f"{paired_text} | {r.get('prefill_x_b1', 0):.2f} | {r.get('decode_x_b1', 0):.2f} | "
            f"{r.get('prefill_x_b16', 0):.2f} | {r.get('decode_x_b16', 0):.2f} | {r['plan_s']} |")
    lines += ["", "Plans:", ""] + [f"* {r['config']} @ {r['ratio']}: {_fold(r['ops'])}" for r in rows if r["ops"]]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rewrite"]:
        rewrite(os.path.join(HERE, "results", "width_smollm2"))
        sys.exit(0)
    sys.exit(main())
