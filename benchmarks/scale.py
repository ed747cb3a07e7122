"""Memory and time at scale: planning and writing a compressed ~1.5B-parameter random Llama (about 6 GB of fp32
weights in shards) in memory and with the sequential engine under ``--max-memory 2GiB``, and how the streaming cost
grows with layers, hidden size and calibration tokens.

Random weights are fine for cost: the work does not depend on the values. Every run is a separate ``slm compress``
process, launched from a fresh Python process of its own so that ``RUSAGE_CHILDREN``'s maximum resident set is
that run's alone; its wall time comes from the clock. The plans of the two engines and the written checkpoints
(sha256 of every tensor) are compared.

    python benchmarks/scale.py                  # writes benchmarks/results/scale.md (~30 min on 2 cores)
    python benchmarks/scale.py --quick          # a ~0.2B model, for a smoke test

The models are generated tensor by tensor straight into shards (never whole in memory) under ``--work``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUTPUT = os.path.join(HERE, "results", "scale.md")
#: a search set small enough that a 1.5B search runs in minutes on 2 cores (the cost per calibration token is
#: measured separately, in the growth table)
CALIB = ["--calib-data", "wiki-leads", "--calib-samples", "2", "--calib-seq-len", "32", "--fit-samples", "4",
         "--fit-seq-len", "32", "--no-cache", "--no-check"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/optimum-slm-scale", help="where the random models and outputs go")
    p.add_argument("--output", default=DEFAULT_OUTPUT)
    p.add_argument("--passes", default="shortgpt,sleb,slm-plus")
    p.add_argument("--max-memory", default="2GiB")
    p.add_argument("--quick", action="store_true", help="a small model instead of ~1.5B")
    p.add_argument("--skip-growth", action="store_true", help="keep the growth table of <output stem>.json")
    p.add_argument("--growth-only", action="store_true",
                   help="rerun only the growth table (the main rows come from <output stem>.json)")
    p.add_argument("--resident-only", action="store_true",
                   help="rerun only the resident-layers table (streaming sleb under two budgets)")
    return p.parse_args(argv)


def make_random_llama(path: str, layers: int, hidden: int, intermediate: int, heads: int, seed: int = 0) -> int:
    """A random Llama checkpoint in ~512 MB shards, written tensor by tensor; returns its parameter count."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from optimum_slm.loading import resolve_model_path

    if os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "params.txt")) as fh:
            return int(fh.read())
    tokenizer_dir = resolve_model_path("smollm2-135m")  # a real tokenizer, so calibration text tokenises
    config = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    gen = torch.Generator().manual_seed(seed)
    shards, current, size, weight_map, total = [], {}, 0, {}, 0
    names = [(n, tuple(p.shape)) for n, p in skeleton.named_parameters()]
    for name, shape in names:
        t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02
        current[name] = t
        size += t.numel() * 4
        total += t.numel()
        if size >= 512 << 20:
            shards.append(current)
            current, size = {}, 0
            _flush(tmp, shards, weight_map, save_file)
    if current:
        shards.append(current)
        _flush(tmp, shards, weight_map, save_file)
    n = len(shards)
    final = {}
    for k in range(1, n + 1):
        old = os.path.join(tmp, f"part-{k}.safetensors")
        new = f"model-{k:05d}-of-{n:05d}.safetensors"
        os.replace(old, os.path.join(tmp, new))
        final.update({name: new for name, f in weight_map.items() if f == f"part-{k}.safetensors"})
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total * 4}, "weight_map": final}, fh)
    config.save_pretrained(tmp)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tokenizer_dir, f), tmp)
    with open(os.path.join(tmp, "params.txt"), "w") as fh:
        fh.write(str(total))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return total


def _flush(folder, shards, weight_map, save_file) -> None:
    k = len(shards)
    tensors = shards[-1]
    save_file(tensors, os.path.join(folder, f"part-{k}.safetensors"))
    weight_map.update({name: f"part-{k}.safetensors" for name in tensors})
    shards[-1] = {}  # drop the tensors: the generator never holds more than one shard


def run(args: list[str]) -> dict[str, Any]:
    """One ``slm`` process: exit code, wall seconds, peak RSS (MB), stderr tail."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OPTIMUM_SLM_QUIET="1")
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-c", "from optimum_slm.cli import main; main()", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out, err = proc.communicate()
    import resource  # the largest child's peak: ``run_isolated`` makes this process's only child the slm run

    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"rc": proc.returncode, "seconds": round(time.time() - started, 1), "peak_mb": round(peak),
            "stderr": err.decode()[-400:], "stdout": out.decode()[-800:]}


def run_isolated(args: list[str]) -> dict[str, Any]:
    """``run`` in a fresh Python process, so the children's maximum RSS is this run's alone."""
    code = ("import json, sys; sys.path.insert(0, %r); import scale; print(json.dumps(scale.run(%r)))"
            % (HERE, args))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"rc": done.returncode, "seconds": None, "peak_mb": None, "stderr": done.stderr[-400:]}


def tensor_hashes(folder: str) -> dict[str, str]:
    from safetensors import safe_open

    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors") and not f.startswith("slm_plan"):
            with safe_open(os.path.join(folder, f), framework="pt") as fh:
                for name in fh.keys():
                    out[name] = hashlib.sha256(fh.get_tensor(name).contiguous().numpy().tobytes()).hexdigest()
    return out


def plan_ops(folder: str) -> Any:
    with open(os.path.join(folder, "slm_plan.json"), encoding="utf-8") as fh:
        plan = json.load(fh)
    return [s["ops"] for s in plan["stages"]]


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    cache = os.path.splitext(args.output)[0] + ".json"
    if args.resident_only:
        with open(cache, encoding="utf-8") as fh:
            saved = json.load(fh)
        shape = (8, 1024, 2816, 16) if args.quick else (26, 2048, 5632, 16)
        saved["resident"] = resident_rows(args, os.path.join(args.work, "llama-%dx%d" % shape[:2]))
        write_markdown(args, saved["rows"], saved.get("growth", []), saved["params"], saved["params"] * 4 / 1e9,
                       saved["resident"])
        with open(cache, "w", encoding="utf-8") as fh:
            json.dump(saved, fh, indent=1)
        return 0
    if args.growth_only:
        with open(cache, encoding="utf-8") as fh:
            saved = json.load(fh)
        growth = growth_points(args)
        write_markdown(args, saved["rows"], growth, saved["params"], saved["params"] * 4 / 1e9,
                       saved.get("resident"))
        with open(cache, "w", encoding="utf-8") as fh:
            json.dump({**saved, "growth": growth}, fh, indent=1)
        return 0
    shape = (8, 1024, 2816, 16) if args.quick else (26, 2048, 5632, 16)
    model = os.path.join(args.work, "llama-%dx%d" % shape[:2])
    t0 = time.time()
    params = make_random_llama(model, *shape)
    weights_gb = params * 4 / 1e9
    print(f"model: {params / 1e9:.2f}B parameters, {weights_gb:.2f} GB fp32 ({time.time() - t0:.0f} s)", flush=True)
    rows = []
    for pass_name in args.passes.split(","):
        outs = {}
        for engine in ("in-memory", "streaming"):
            out = os.path.join(args.work, f"out-{pass_name}-{engine}")
            shutil.rmtree(out, ignore_errors=True)
            extra = ["--max-memory", args.max_memory] if engine == "streaming" else []
            r = run_isolated(["-q", "compress", "--model", model, "--method", pass_name, "--ratio", "0.2", *CALIB,
                              *extra, "--output", out])
            print(pass_name, engine, r["rc"], r["seconds"], r["peak_mb"], r.get("stderr", "")[-200:], flush=True)
            outs[engine] = out
            rows.append({"pass": pass_name, "engine": engine, **{k: r[k] for k in ("rc", "seconds", "peak_mb")}})
        same_plan = plan_ops(outs["in-memory"]) == plan_ops(outs["streaming"])
        same_ckpt = tensor_hashes(outs["in-memory"]) == tensor_hashes(outs["streaming"])
        rows[-1]["same_plan"], rows[-1]["same_checkpoint"] = same_plan, same_ckpt
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
    previous = {}
    if os.path.exists(cache):
        with open(cache, encoding="utf-8") as fh:
            previous = json.load(fh)
    growth = previous.get("growth", []) if args.skip_growth else growth_points(args)
    resident = previous.get("resident")  # kept: rerun with --resident-only
    write_markdown(args, rows, growth, params, weights_gb, resident)
    with open(cache, "w", encoding="utf-8") as fh:
        json.dump({"params": params, "rows": rows, "growth": growth, "resident": resident}, fh, indent=1)
    return 0


def resident_rows(args, model: str) -> list[dict[str, Any]]:
    """Streaming ``sleb`` (a search that re-runs the stack above every candidate block) under a tight budget, where
    no layer stays resident, and a roomier one, where the top layers do."""
    rows = []
    for budget in (None, "2GiB", "4GiB"):  # None: the in-memory engine, for reference
        out = os.path.join(args.work, "out-resident")
        shutil.rmtree(out, ignore_errors=True)
        extra = ["--max-memory", budget] if budget else []
        r = run_isolated(["-q", "compress", "--model", model, "--method", "sleb", "--ratio", "0.2", *CALIB,
                          *extra, "--plan-only", "--output", out])
        rows.append({"budget": budget or "in memory", **{k: r[k] for k in ("rc", "seconds", "peak_mb")}, "ops": plan_ops(out)
                     if r["rc"] == 0 else None})
        shutil.rmtree(out, ignore_errors=True)
        print("resident", budget, r["rc"], r["seconds"], r["peak_mb"], r.get("stderr", "")[-200:], flush=True)
    return rows


def growth_points(args) -> list[dict[str, Any]]:
    """Streaming ``shortgpt`` cost at small shapes: one axis varied at a time."""
    base = {"layers": 8, "hidden": 1024, "tokens": 1024}
    points = []
    for axis, values in (("layers", (8, 16, 32)), ("hidden", (512, 1024, 2048)), ("tokens", (1024, 4096, 16384))):
        for v in values:
            cfg = dict(base, **{axis: v})
            model = os.path.join(args.work, "g-%dx%d" % (cfg["layers"], cfg["hidden"]))
            make_random_llama(model, cfg["layers"], cfg["hidden"], int(cfg["hidden"] * 2.75), max(4, cfg["hidden"] // 64))
            out = os.path.join(args.work, "g-out")
            shutil.rmtree(out, ignore_errors=True)
            samples = max(1, cfg["tokens"] // 128)
            r = run_isolated(["-q", "compress", "--model", model, "--method", "shortgpt", "--ratio", "0.25",
                              "--calib-data", "wiki-leads", "--calib-samples", str(samples), "--calib-seq-len", "128",
                              "--calib-sampling", "pack", "--no-cache", "--no-check", "--max-memory", "1KB",
                              "--plan-only", "--output", out])
            shutil.rmtree(out, ignore_errors=True)
            import re

            planned = re.search(r"planned shortgpt in ([0-9.]+) s", r.get("stdout", ""))
            points.append({"axis": axis, **cfg, **{k: r[k] for k in ("rc", "seconds", "peak_mb")},
                           "plan_s": float(planned.group(1)) if planned else None})
            print("growth", axis, cfg, r["seconds"], points[-1]["plan_s"], r["peak_mb"], flush=True)
    return points


def exponent(points: list[dict[str, Any]], axis: str, key: str) -> float | None:
    xs = [(math.log(p[axis]), math.log(p[key])) for p in points if p["axis"] == axis and p.get(key)]
    if len(xs) < 2:
        return None
    mx = sum(x for x, _ in xs) / len(xs)
    my = sum(y for _, y in xs) / len(xs)
    return sum((x - mx) * (y - my) for x, y in xs) / sum((x - mx) ** 2 for x, _ in xs)


def write_markdown(args, rows, growth, params, weights_gb, resident=None) -> None:
    lines = [
        "# Scale: planning and writing a model larger than the memory budget",
        "",
        "`python benchmarks/scale.py` (the growth table: `--growth-only`)",
        "",
        f"A random Llama of {params / 1e9:.2f}B parameters ({weights_gb:.2f} GB of fp32 weights in ~512 MB shards), "
        "compressed by 20% with each pass by `slm compress` (plan + apply + write, `--no-check`), once in memory "
        f"and once with `--max-memory {args.max_memory}` (the sequential engine: layers read from the shards "
        "while they run, the checkpoint written tensor by tensor). Calibration: 2 × 32 `wiki-leads` tokens "
        "(fit set 4 × 32) so that a search finishes in minutes on 2 CPU cores; the cost per token is in the growth "
        "table. Peak RSS is the process's maximum resident set (`ru_maxrss`).",
        "",
        "| pass | engine | wall s | peak RSS MB | plan equal | checkpoint tensors equal |",
        "|---|---|---:|---:|---|---|",
    ]
    for r in rows:
        ok = "" if r["rc"] == 0 else f" (exit {r['rc']})"
        lines.append(f"| {r['pass']} | {r['engine']}{ok} | {r['seconds']} | {r['peak_mb']:,} | "
                     f"{r.get('same_plan', '')} | {r.get('same_checkpoint', '')} |")
    lines += ["", f"The official SLM loop holds two fp16 copies of the model on the GPU: {2 * params * 2 / 1e9:.1f} GB "
              "for this model (computed, not run).", ""]
    if resident:
        same = len({json.dumps(r["ops"]) for r in resident}) == 1
        lines += ["## Resident layers", "",
                  "`sleb` at 20% (`--plan-only`: the search alone) in memory and streaming under two budgets: read "
                  "layers stay resident while the budget has room (what the recorded activations leave, halved), "
                  "the highest layers first. Measured on an otherwise idle machine (`--resident-only`).", "",
                  "| engine / --max-memory | wall s | peak RSS MB |", "|---|---:|---:|"]
        lines += [f"| {r['budget']} | {r['seconds']} | {r['peak_mb']:,} |" for r in resident]
        lines += ["", f"Same plan in every row: {same}.", ""]
    if growth:
        lines += ["## Growth of the streaming cost", "",
                  "`shortgpt` at 25% with `--max-memory 1KB` (always streaming), `--plan-only`; base shape 8 layers, "
                  "hidden 1024 (intermediate 2.75×), 1,024 calibration tokens; one axis varied at a time. *plan s* is "
                  "the planning time the CLI reports (loading and process start-up excluded); the peak RSS includes "
                  "the process's fixed part (Python, torch, transformers, the tokenizer: about 0.5 GB).", "",
                  "| varied | layers | hidden | calib tokens | plan s | wall s | peak RSS MB |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for p in growth:
            lines.append(f"| {p['axis']} | {p['layers']} | {p['hidden']} | {p['tokens']} | {p.get('plan_s')} | "
                         f"{p['seconds']} | {p['peak_mb']:,} |")
        lines += ["", "Fitted exponents (slope of log cost against log size, least squares over the three points):", ""]
        for axis in ("layers", "hidden", "tokens"):
            t, m = exponent(growth, axis, "plan_s"), exponent(growth, axis, "peak_mb")
            lines.append(f"* {axis}: planning time ∝ {axis}^{t:.2f}, peak RSS ∝ {axis}^{m:.2f}"
                         if t is not None and m is not None else f"* {axis}: not measured")
    note = os.path.splitext(args.output)[0] + "_note.md"
    if os.path.exists(note):
        with open(note, encoding="utf-8") as fh:
            lines += ["", fh.read().rstrip()]
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
