"""Healing benchmark: SmolLM2-135M compressed by 35% with ``slm-plus`` and the best baseline (``sleb``), each healed
with ``lora`` (the SLM paper's recipe) and ``tail`` (last 3 layers + final norm + lm_head, arXiv 2411.15558) on the
same ``wiki-leads`` training text, for a bounded budget.

Every row reports held-out perplexity on ``wiki-leads-test`` (the training text's domain, disjoint documents) and
``lambada-books`` (BookCorpus fiction, out of domain), and the 7-task average (``benchmarks/quality.py``'s offline
tasks, first ``--limit`` documents each) with the paired difference against the same model before healing. The
training text is the ``wiki-leads`` split, disjoint from both held-out sets; its own validation slice (held out from
it) picks the best checkpoint.

    python benchmarks/heal.py                                   # the committed table (about 1 h on 2 cores)
    python benchmarks/heal.py --passes sleb --methods tail --max-steps 5 --limit 10 --output /tmp/h.md

Results are kept per configuration in ``<output stem>.json`` and reused when the settings match, so an interrupted
run resumes. Unhealed and dense 7-task scores are taken from ``quality_smollm2.json`` when it holds the same plan
evaluated with the same ``--limit``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
DEFAULT_OUTPUT = os.path.join(HERE, "results", "heal_smollm2.md")
QUALITY_JSON = os.path.join(HERE, "results", "quality_smollm2.json")
HELDOUT = (("ppl", "wiki-leads-test"), ("ppl_ood", "lambada-books"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratio", type=float, default=0.35)
    p.add_argument("--passes", default="slm-plus,sleb")
    p.add_argument("--methods", default="lora,tail")
    p.add_argument("--data", default="wiki-leads", help="healing text (disjoint from the held-out sets)")
    p.add_argument("--max-steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--eval-steps", type=int, default=10)
    p.add_argument("--warmup-steps", type=int, default=8)
    p.add_argument("--val-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=200, help="documents per task of the 7-task average")
    p.add_argument("--batch-size-eval", type=int, default=16)
    p.add_argument("--output", default=DEFAULT_OUTPUT)
    p.add_argument("--fresh", action="store_true", help="ignore the cached rows")
    return p.parse_args(argv)


def heal_config(args, method: str):
    from optimum_slm.healing import HealConfig

    # the method's published defaults (lr, LoRA r/alpha/dropout, tail layers, cutoff 256); only the budget is ours
    return HealConfig(data=args.data, method=method, max_steps=args.max_steps, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, eval_steps=args.eval_steps, warmup_steps=args.warmup_steps,
                      val_size=args.val_size)


def settings_of(args) -> dict[str, Any]:
    return {k: getattr(args, k) for k in ("model", "ratio", "data", "max_steps", "batch_size", "grad_accum",
                                          "eval_steps", "warmup_steps", "val_size", "limit")}


def quality_row(name: str, ops: list | None, limit: int) -> dict[str, Any] | None:
    """The 7-task row ``quality.py`` measured for the same model (same plan ops, same limit), or None."""
    try:
        with open(QUALITY_JSON, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError:
        return None
    if data.get("settings", {}).get("limit") != limit:
        return None
    row = data["rows"].get(name)
    if row is None or (ops is not None and json.dumps(row.get("ops"), sort_keys=True) != json.dumps(ops, sort_keys=True)):
        return None
    return row


def load(args, pass_name: str | None):
    """(model, tokenizer, plan): the base, compressed by ``pass_name`` at ``args.ratio`` (the plan cache serves
    plans computed before), fp32 on the CPU."""
    from optimum_slm.calibration import CalibrationConfig
    from optimum_slm.compressor import SLMCompressor

    compressor = SLMCompressor.from_pretrained(args.model, dtype="float32", device="cpu")
    if pass_name is None:
        return compressor.model, compressor.tokenizer, None
    plan = compressor.plan(pass_name, calibration=CalibrationConfig("wiki-leads"), ratio=args.ratio)
    return compressor.apply(plan), compressor.tokenizer, plan


def measure(model, tokenizer, heldout, args, reuse: dict[str, Any] | None) -> dict[str, Any]:
    from optimum_slm.evaluate import perplexity
    from quality import evaluate_tasks, paper_metrics

    row: dict[str, Any] = {key: perplexity(model, ids) for key, ids in heldout.items()}
    t0 = time.time()
    if reuse is not None:
        row.update(tasks=reuse["tasks"], correct=reuse["correct"], avg=reuse["avg"], tasks_from="quality_smollm2.json")
    else:
        row["tasks"], row["correct"] = evaluate_tasks(model, tokenizer, args.limit, args.batch_size_eval)
        paper = paper_metrics(row["tasks"])
        row["avg"] = sum(paper.values()) / len(paper)
        row["eval_s"] = round(time.time() - t0, 1)
    return row


def write_markdown(path: str, rows: dict[str, dict[str, Any]], args, command: str) -> None:
    from quality import paired_difference

    dense = rows.get("dense")
    lines = [
        "# Healing after 35% depth compression (SmolLM2-135M)",
        "",
        f"`{command}`",
        "",
        f"Compressed with each pass at ratio {args.ratio} (calibration: 10 × 128 `wiki-leads` tokens, seed 1234; "
        f"slm-plus also fits its maps on 256 × 256 packed tokens), then healed on `{args.data}` text packed into "
        f"256-token sequences: {args.max_steps} optimizer steps of {args.batch_size} × {args.grad_accum} sequences "
        f"({args.max_steps * args.batch_size * args.grad_accum * 256:,} tokens at most), warm-up {args.warmup_steps}, "
        f"validation on {args.val_size} held-out sequences every {args.eval_steps} steps, best checkpoint kept, "
        "patience 3. Everything else is the method's published default: `lora` r 8, α 16, dropout 0.05 on every "
        "projection, lr 1e-4 (the SLM paper); `tail` = last 3 layers + final norm + lm_head (tied to the "
        "embeddings in SmolLM2, so they train too), lr 1e-5 (arXiv 2411.15558). fp32 on 2 CPU cores.",
        "",
        "Held-out perplexity: 16 × 512 tokens of `wiki-leads-test` (same domain as the healing text, disjoint "
        "documents) and of `lambada-books` (out of domain). AVE: the 7 zero-shot tasks, first "
        f"{args.limit} documents each; Δ = healed minus unhealed, paired document by document (± SE).",
        "",
        "| model | healing | steps (tokens) | heal time | val loss before → best (step) | wiki-leads PPL | "
        "lambada-books PPL | AVE | Δ AVE vs unhealed |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    def unhealed(model: str, healing: str, r: dict) -> str:
        return f"| {model} | {healing} | – | – | – | {r['ppl']:.2f} | {r['ppl_ood']:.2f} | {100 * r['avg']:.1f} | – |"

    if dense:
        lines.append(unhealed("dense", "–", dense))
    for pass_name in args.passes.split(","):
        base = rows.get(f"{pass_name}/none")
        if base is None:
            continue
        lines.append(unhealed(f"{pass_name} {args.ratio:g}", "none", base))
        for method in args.methods.split(","):
            r = rows.get(f"{pass_name}/{method}")
            if r is None:
                continue
            rec = r["record"]
            diff, se = paired_difference(r["correct"], base["correct"])
            lines.append(
                f"| {pass_name} {args.ratio:g} | {method} | {rec['steps']} ({rec['tokens_trained']:,}) | "
                f"{rec['seconds'] / 60:.1f} min | {rec['val_loss_before']:.3f} → {rec['val_loss_best']:.3f} "
                f"({rec['best_step']}) | {r['ppl']:.2f} | {r['ppl_ood']:.2f} | {100 * r['avg']:.1f} | "
                f"{diff:+.1f} ± {se:.1f} |")
    lines += ["", "Validation loss at each evaluation (step: loss):", ""]
    for key, r in rows.items():
        if "record" in r:
            hist = ", ".join(f"{h['step']}: {h['val_loss']:.3f}" for h in r["record"]["val_history"])
            lines.append(f"* {key}: {hist}; {r['record']['stopped']}")
    note = os.path.splitext(path)[0] + "_note.md"
    if os.path.exists(note):
        with open(note, encoding="utf-8") as fh:
            lines += ["", fh.read().rstrip()]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from optimum_slm.evaluate import heldout_ids
    from optimum_slm.healing import heal_model

    cache_path = os.path.splitext(args.output)[0] + ".json"
    settings = settings_of(args)
    rows: dict[str, dict[str, Any]] = {}
    if not args.fresh and os.path.exists(cache_path):
        with open(cache_path, encoding="utf-8") as fh:
            cached = json.load(fh)
        if cached.get("settings") == settings:
            rows = cached["rows"]
    command = "python benchmarks/heal.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                 else sys.argv[1:]))

    os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)

    def save() -> None:
        with open(cache_path, "w", encoding="utf-8") as fh:
            json.dump({"settings": settings, "rows": rows}, fh, indent=1)
        write_markdown(args.output, rows, args, command.strip())

    configs = [("dense", None, None)] + [(f"{p}/none", p, None) for p in args.passes.split(",")] + [
        (f"{p}/{m}", p, m) for p in args.passes.split(",") for m in args.methods.split(",")]
    heldout = None
    for key, pass_name, method in configs:
        if key in rows:
            print(f"{key}: cached", flush=True)
            continue
        t0 = time.time()
        model, tokenizer, plan = load(args, pass_name)
        if heldout is None:
            heldout = {k: heldout_ids(tokenizer, source) for k, source in HELDOUT}
        ops = plan.ops if plan is not None else None
        row: dict[str, Any] = {"ops": ops}
        if method is None:
            reuse = quality_row(f"{pass_name}@{args.ratio}" if pass_name else "dense@None", ops, args.limit)
        else:
            reuse = None
            model, row["record"] = heal_model(model, tokenizer, heal_config(args, method))
        row.update(measure(model, tokenizer, heldout, args, reuse))
        row["seconds"] = round(time.time() - t0, 1)
        rows[key] = row
        print(f"{key}: wiki {row['ppl']:.2f} books {row['ppl_ood']:.2f} AVE {100 * row['avg']:.1f} "
              f"({row['seconds']:.0f} s)", flush=True)
        save()
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
