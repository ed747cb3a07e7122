"""Ablation of the SLM variants on SmolLM2-135M: search x similarity criterion x merge rule, at 20% and 35%.

    python benchmarks/ablation.py [--ratios 0.2,0.35] [--configs NAME,...] [--output benchmarks/results/ablation_smollm2.md]
    python benchmarks/ablation.py --redraw      # the table from the cached rows only

Every configuration plans on the same 10 x 128 ``wiki-leads`` calibration tokens (seed 1234) and is scored by
perplexity on 16 x 512 held-out ``wiki-leads-test`` tokens. Results are appended to a JSONL cache next to the output
(so an interrupted run resumes), then the markdown table is written from it; a hand-written
``<output stem>_note.md``, when present, is appended (it survives regeneration).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OPTIMUM_SLM_QUIET", "1")

# name -> slm pass parameters (the target count comes from --ratios)
CONFIGS: dict[str, dict] = {
    "official/final-cosine/official": {"search": "official", "similarity": "final-cosine", "merge": "official"},
    "official/final-cosine/keep-top": {"search": "official", "similarity": "final-cosine", "merge": "keep-top"},
    "official/final-cosine/calibrated": {"search": "official", "similarity": "final-cosine", "merge": "calibrated"},
    "official/token-cosine/keep-top": {"search": "official", "similarity": "token-cosine", "merge": "keep-top"},
    "official/logit-kl/keep-top": {"search": "official", "similarity": "logit-kl", "merge": "keep-top"},
    "official/cka/keep-top": {"search": "official", "similarity": "cka", "merge": "keep-top"},
    "global/token-cosine/keep-top": {"search": "global", "similarity": "token-cosine", "merge": "keep-top"},
    "global/logit-kl/keep-top": {"search": "global", "similarity": "logit-kl", "merge": "keep-top"},
    "global/logit-kl/calibrated": {"search": "global", "similarity": "logit-kl", "merge": "calibrated"},
    "global/token-cosine/calibrated": {"search": "global", "similarity": "token-cosine", "merge": "calibrated"},
    "global/nll/calibrated": {"search": "global", "similarity": "nll", "merge": "calibrated"},
    "greedy/token-cosine/keep-top": {"search": "greedy", "similarity": "token-cosine", "merge": "keep-top"},
    "greedy/logit-kl/keep-top": {"search": "greedy", "similarity": "logit-kl", "merge": "keep-top"},
    "greedy/logit-kl/calibrated": {"search": "greedy", "similarity": "logit-kl", "merge": "calibrated"},
    "greedy/token-cosine/calibrated": {"search": "greedy", "similarity": "token-cosine", "merge": "calibrated"},
    "greedy/nll/calibrated": {"search": "greedy", "similarity": "nll", "merge": "calibrated"},
    "greedy/nll/keep-top": {"search": "greedy", "similarity": "nll", "merge": "keep-top"},
    # the slm-plus configuration with the top layers kept out of every window (they are the critical ones in
    # ShortGPT's and Gromov et al.'s analyses; slm-plus at 35% merges 26-27)
    "greedy/token-cosine/calibrated/protect-27-29": {"search": "greedy", "similarity": "token-cosine",
                                                     "merge": "calibrated", "protect": [27, 28, 29]},
    # fitted merges (least-squares maps on the 256 x 256 fit set; benchmarks/fitted_ablation.py measures them on both
    # held-out corpora and the validation splits, and is where slm-plus's merge was chosen)
    "greedy/token-cosine/lstsq": {"search": "greedy", "similarity": "token-cosine", "merge": "lstsq"},
    "greedy/token-cosine/calibrated-lstsq": {"search": "greedy", "similarity": "token-cosine",
                                             "merge": "calibrated-lstsq"},
    "greedy/token-cosine/lstsq-attn/search-map": {"search": "greedy", "similarity": "token-cosine",
                                                  "merge": "lstsq-attn", "search_ridge": 0.1, "ridge": 0.1,
                                                  "fit_order": "independent"},
}


def run(configs: list[str], ratios: list[float], cache_path: str) -> list[dict]:
    import optimum_slm as slm
    from optimum_slm.evaluate import heldout_ids, perplexity

    done = {}
    if os.path.exists(cache_path):
        with open(cache_path) as fh:
            for line in fh:
                row = json.loads(line)
                done[(row["config"], row["ratio"])] = row
    todo = [(c, r) for r in ratios for c in configs if (c, r) not in done]
    if todo:
        model, tok = slm.load_model("smollm2-135m", dtype="float32")
        # the search set, and the default fit set the fitted merges read (drawn only when one runs)
        ids = slm.CalibrationConfig("wiki-leads", n_samples=10, seq_len=128, seed=1234).load(tok)
        held = heldout_ids(tok)
        if ("dense", 0.0) not in done:
            row = {"config": "dense", "ratio": 0.0, "ppl": perplexity(model, held), "windows": [], "removed": 0,
                   "seconds": 0.0}
            done[("dense", 0.0)] = row
            with open(cache_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        for name, ratio in todo:
            start = time.perf_counter()
            plan = slm.compress(model, slm.get_pass("slm", ratio=ratio, **CONFIGS[name]), ids, cache=False)
            seconds = time.perf_counter() - start
            ppl = perplexity(slm.apply_plan(copy.deepcopy(model), plan), held)
            row = {"config": name, "ratio": ratio, "ppl": ppl, "windows": [list(w) for w in plan.windows],
                   "removed": plan.removed_layers, "seconds": round(seconds, 1),
                   "threshold": plan.params.get("threshold")}
            print(json.dumps(row), flush=True)
            done[(name, ratio)] = row
            with open(cache_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    return list(done.values())


def table(rows: list[dict], ratios: list[float]) -> str:
    dense = next(r["ppl"] for r in rows if r["config"] == "dense")
    lines = [
        "# SLM ablation on SmolLM2-135M (search / similarity / merge)",
        "",
        "Generated by `python benchmarks/ablation.py`. 10 x 128 `wiki-leads` calibration tokens (seed 1234); perplexity",
        f"on 16 x 512 held-out `wiki-leads-test` tokens; dense perplexity {dense:.2f}. `x dense` = perplexity / dense.",
        "",
        "| configuration | ratio | removed | windows (base numbering) | perplexity | x dense | plan s |",
        "|---|---|---|---|---|---|---|",
    ]
    for ratio in ratios:
        chosen = sorted((r for r in rows if r["ratio"] == ratio), key=lambda r: r["ppl"])
        for r in chosen:
            windows = ", ".join(f"{a}-{b}" for a, b in r["windows"])
            lines.append(f"| {r['config']} | {ratio} | {r['removed']} | {windows} | {r['ppl']:,.1f} "
                         f"| {r['ppl'] / dense:,.2f} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.2,0.35")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "ablation_smollm2.md"))
    ap.add_argument("--redraw", action="store_true", help="only rewrite the table from the JSONL cache")
    args = ap.parse_args()
    ratios = [float(x) for x in args.ratios.split(",")]
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration {unknown[0]!r}; known: {', '.join(CONFIGS)}")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    rows = run([] if args.redraw else configs, ratios, os.path.splitext(args.output)[0] + ".jsonl")
    text = table(rows, ratios)
    note = os.path.splitext(args.output)[0] + "_note.md"
    if os.path.exists(note):
        with open(note, encoding="utf-8") as fh:
            text += "\n" + fh.read().strip() + "\n"
    with open(args.output, "w", encoding="utf-8") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
