"""Inference speed benchmark: prefill and decode latency, tokens/s, peak memory, and speedup against a baseline.

Protocol (after the official ``gen_batch_eval_time.py``, paper.md §5): every run generates exactly ``new_tokens``
tokens (``min_new_tokens = max_new_tokens``), after warm-up runs that are not timed; each measurement is repeated.
Differences, chosen for a fair layer-count comparison: decoding is greedy (the official script samples with top-k 50
/ top-p 0.95, whose vocabulary sort is a fixed cost unrelated to depth), the prompt is the official one repeated to
exactly ``prompt_len`` tokens, and models are measured interleaved (model A, B, A, B, ...) so that load from other
processes on a shared machine hits all of them alike. Summary numbers (memory included) are medians over the repeats; means and
standard deviations are in the JSON.

* prefill latency: one forward of the ``[batch, prompt_len]`` prompt with a KV cache (time to first logits);
* decode latency per token: timed on its own — after that prefill, ``new_tokens − 1`` greedy single-token forwards
  on its KV cache, divided by their count (never the difference of two separately timed runs, which a busy host
  can drive to zero or below);
* decode tokens/s = batch / decode latency per token; end-to-end tokens/s = batch × new_tokens / generate time
  (the official script's throughput);
* peak memory: CUDA ``torch.cuda.max_memory_allocated`` during generation (weights included); on CPU the peak
  resident-set growth during generation above the resident set before it (freed heap returned to the OS first with
  glibc ``malloc_trim``; Linux ``VmHWM`` after resetting it via ``/proc/self/clear_refs``, elsewhere a 2 ms RSS
  sampler), i.e. KV cache + activations + allocator slack, weights excluded.

Defaults: CUDA 10 warm-ups and 20 repeats as the official script; CPU 1 warm-up and 3 repeats. When the repeats of a
timing disagree by more than ``SPREAD_WARN`` (max − min over the median), one warning line says so.
"""

from __future__ import annotations

import inspect
import logging
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .arch import ArchAdapter, param_count
from .errors import SLMError

logger = logging.getLogger(__name__)

PAPER_PROMPT = "The Leaning Tower of Pisa is known for"
#: repeats whose (max − min) / median exceeds this are called out (a busy host, or runs too short to time)
SPREAD_WARN = 0.2
CUDA_DEFAULTS = {"warmup": 10, "repeats": 20}
CPU_DEFAULTS = {"warmup": 1, "repeats": 3}


def default_runs(device: str | torch.device) -> dict[str, int]:
    """Warm-ups and repeats for a device: the paper's on CUDA, fewer on CPU."""
    return dict(CUDA_DEFAULTS if torch.device(device).type == "cuda" else CPU_DEFAULTS)


@dataclass
class BenchResult:
    """One model at one batch size; times in milliseconds, memory in MiB."""

    name: str
    num_layers: int
    params: int
    weights_mib: float
    batch_size: int
    prompt_len: int
    new_tokens: int
    device: str
    prefill_ms: float
    decode_ms_per_token: float
    decode_tokens_per_s: float
    e2e_tokens_per_s: float
    generate_ms: float
    peak_memory_mib: float
    memory_kind: str
    samples: dict[str, list[float]] = field(default_factory=dict)
    #: (max − min) / median of the prefill and decode repeats
    spread: dict[str, float] = field(default_factory=dict)
    speedup_decode: float | None = None
    speedup_prefill: float | None = None
    ideal_speedup: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["stats"] = {k: {"mean": statistics.fmean(v), "std": statistics.pstdev(v), "median": statistics.median(v)}
                        for k, v in self.samples.items()}
        return out


# ------------------------------------------------------------------------------------------------ inputs
def prompt_ids(tokenizer, batch_size: int, prompt_len: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """``[batch, prompt_len]`` ids: the paper's prompt repeated to length, or seeded random ids without a tokenizer."""
    if tokenizer is not None:
        unit = tokenizer(PAPER_PROMPT + " ", add_special_tokens=False)["input_ids"]
        if unit:
            ids = (unit * (prompt_len // len(unit) + 1))[:prompt_len]
            return torch.tensor([ids] * batch_size, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch_size, prompt_len), generator=g)


# ------------------------------------------------------------------------------------------------ memory
class _PeakMemory:
    """Peak memory during a block: CUDA allocator peak, or CPU resident-set growth."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mib = 0.0

    @property
    def kind(self) -> str:
        if self.device.type == "cuda":
            return "cuda max_memory_allocated"
        return "cpu peak RSS delta (VmHWM)" if _can_reset_hwm() else "cpu peak RSS delta (sampled)"

    def __enter__(self) -> "_PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        _release_free_memory()  # else pages freed by earlier runs are reused unseen and the delta reads ~0
        self.base = _rss_kib("VmRSS")
        self._stop = threading.Event()
        self._sampled = self.base
        if _can_reset_hwm():
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self._thread = None
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._sampled = max(self._sampled, _rss_kib("VmRSS"))

    def __exit__(self, *exc) -> bool:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
            return False
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = self._sampled
        else:
            peak = _rss_kib("VmHWM")
        self.peak_mib = max(0.0, (peak - self.base) / 1024)
        return False


def _release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``) so RSS growth measures the next run only."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the delta may under-count reused memory
        pass


_HWM_OK: bool | None = None


def _can_reset_hwm() -> bool:
    global _HWM_OK
    if _HWM_OK is None:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            _HWM_OK = _rss_kib("VmHWM") > 0
        except OSError:
            _HWM_OK = False
    return _HWM_OK


def _rss_kib(field_name: str) -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    import resource  # non-Linux fallback: lifetime peak only (ru_maxrss is KiB on Linux, bytes on macOS)

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


# ------------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _prefill_and_decode(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Seconds of the prefill (the prompt with a KV cache, giving the first token) and, timed on their own, of the
    ``new_tokens − 1`` greedy single-token forwards that follow on that cache."""
    device = ids.device
    mask = torch.ones_like(ids)
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    prefill = time.perf_counter() - start
    # the KV cache's argument and output field: ``cache`` in recent transformers, ``past_key_values`` before
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    past, ones = _cache_of(out), torch.ones_like(token)
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        mask = torch.cat([mask, ones], dim=1)
        out = model(input_ids=token, attention_mask=mask, use_cache=True, **{name: past})
        past, token = _cache_of(out), out.logits[:, -1:].argmax(-1)
    _sync(device)
    decode = time.perf_counter() - start
    tick = time.get_clock_info("perf_counter").resolution  # real work was timed: never report zero
    return max(prefill, tick), max(decode, tick)


@torch.inference_mode()
def _generate(model: nn.Module, ids: torch.Tensor, new_tokens: int, pad_id: int) -> tuple[float, int]:
    device = ids.device
    _sync(device)
    start = time.perf_counter()
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, pad_token_id=pad_id, eos_token_id=None, use_cache=True,
    )
    _sync(device)
    return time.perf_counter() - start, out.shape[1] - ids.shape[1]


def _cache_of(out: Any) -> Any:
    cache = out.get("cache")
    return out.get("past_key_values") if cache is None else cache


def _weights_mib(model: nn.Module) -> float:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total / 2**20


def _pad_id(model: nn.Module, tokenizer) -> int:
    for source in (tokenizer, getattr(model, "generation_config", None), model.config):
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(source, attr, None) if source is not None else None
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    return 0


def bench_models(
    models: Sequence[tuple[str, nn.Module, Any]],
    batch_sizes: Sequence[int] = (1, 16),
    prompt_len: int = 128,
    new_tokens: int = 128,
    warmup: int | None = None,
    repeats: int | None = None,
    progress: Any = None,
    warn: Any = None,
) -> list[BenchResult]:
    """Benchmark ``(name, model, tokenizer)`` triples; speedups are against the first model at each batch size.

    All models must be on the same device. ``warmup``/``repeats`` default by device (``default_runs``).
    ``progress`` is an optional callable receiving one-line status strings; ``warn`` one receiving the warning line
    when repeats disagree by more than ``SPREAD_WARN`` (default: the logger).
    """
    if not models:
        raise SLMError("bench needs at least one model")
    if new_tokens < 2:
        raise SLMError(f"new_tokens must be >= 2 (decode latency needs a token after the first), got {new_tokens}")
    if prompt_len < 1 or any(b < 1 for b in batch_sizes) or not batch_sizes:
        raise SLMError("prompt_len and every batch size must be positive")
    device = next(models[0][1].parameters()).device
    runs = default_runs(device)
    warmup = runs["warmup"] if warmup is None else warmup
    repeats = runs["repeats"] if repeats is None else repeats
    if warmup < 0 or repeats < 1:
        raise SLMError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
    info = []
    for name, model, tok in models:
        if next(model.parameters()).device != device:
            raise SLMError(f"model {name!r} is on another device than {models[0][0]!r}")
        model.eval()
        info.append({"layers": ArchAdapter(model).num_layers, "params": param_count(model),
                     "weights": _weights_mib(model), "pad": _pad_id(model, tok)})
    results: list[BenchResult] = []
    for batch in batch_sizes:
        inputs = [prompt_ids(tok, batch, prompt_len, m.config.vocab_size).to(device) for _, m, tok in models]
        for k, (name, model, _) in enumerate(models):
            for _ in range(warmup):
                _prefill_and_decode(model, inputs[k], new_tokens)
                _generate(model, inputs[k], new_tokens, info[k]["pad"])
        samples = [{"prefill_ms": [], "generate_ms": [], "decode_ms_per_token": [], "peak_memory_mib": []}
                   for _ in models]
        for r in range(repeats):
            for k, (name, model, _) in enumerate(models):  # interleaved: shared-machine noise hits every model
                if progress:
                    progress(f"batch {batch}: repeat {r + 1}/{repeats} {name}")
                prefill, decode = _prefill_and_decode(model, inputs[k], new_tokens)
                with _PeakMemory(device) as mem:
                    total, produced = _generate(model, inputs[k], new_tokens, info[k]["pad"])
                if produced != new_tokens:
                    raise SLMError(f"{name}: generated {produced} tokens instead of {new_tokens}")
                s = samples[k]
                s["prefill_ms"].append(prefill * 1e3)
                s["generate_ms"].append(total * 1e3)
                s["decode_ms_per_token"].append(decode * 1e3 / (new_tokens - 1))
                s["peak_memory_mib"].append(mem.peak_mib)
                kind = mem.kind
        for k, (name, model, _) in enumerate(models):
            s = samples[k]
            med = {key: statistics.median(v) for key, v in s.items()}
            results.append(BenchResult(
                name=name, num_layers=info[k]["layers"], params=info[k]["params"],
                weights_mib=info[k]["weights"], batch_size=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                device=str(device), prefill_ms=med["prefill_ms"], decode_ms_per_token=med["decode_ms_per_token"],
                decode_tokens_per_s=batch * 1e3 / med["decode_ms_per_token"],
                e2e_tokens_per_s=batch * new_tokens * 1e3 / med["generate_ms"], generate_ms=med["generate_ms"],
                peak_memory_mib=med["peak_memory_mib"], memory_kind=kind, samples=s,
                spread={key: _spread(s[key]) for key in ("prefill_ms", "decode_ms_per_token")},
            ))
        base = results[-len(models)]
        for res in results[-len(models):]:
            res.speedup_decode = base.decode_ms_per_token / res.decode_ms_per_token
            res.speedup_prefill = base.prefill_ms / res.prefill_ms
            res.ideal_speedup = base.num_layers / res.num_layers
    line = spread_warning(results)
    if line:
        (warn or logger.warning)(line)
    return results


def _spread(values: Sequence[float]) -> float:
    """(max − min) / median of repeated timings (0 for a single run)."""
    median = statistics.median(values)
    return (max(values) - min(values)) / median if len(values) > 1 and median > 0 else 0.0


def spread_warning(results: Sequence[BenchResult]) -> str | None:
    """One line when some timing's repeats disagree by more than ``SPREAD_WARN``, naming the worst; else None."""
    label = {"prefill_ms": "prefill", "decode_ms_per_token": "decode"}
    spread = [(value, r, key) for r in results for key, value in r.spread.items() if value > SPREAD_WARN]
    if not spread:
        return None
    value, r, key = max(spread, key=lambda item: item[0])
    return (f"timings disagree by more than {SPREAD_WARN:.0%} across repeats in {len(spread)} of "
            f"{2 * len(results)} measurements (worst: {r.name} {label[key]} at batch {r.batch_size}, "
            f"{value:.0%}): the host is busy or the runs are short; medians are reported — rerun with more "
            "--repeats on a quiet machine")


def format_table(results: Sequence[BenchResult]) -> str:
    """A markdown table of bench results (one row per model and batch size)."""
    header = ("| model | layers | params | batch | prefill ms | decode ms/tok | decode tok/s | e2e tok/s | "
              "peak mem MiB | prefill × | decode × | ideal L/L′ |")
    lines = [header, "|" + "---|" * 12]
    for r in results:
        lines.append(
            f"| {r.name} | {r.num_layers} | {r.params / 1e6:.1f} M | {r.batch_size} | {r.prefill_ms:.1f} | "
            f"{r.decode_ms_per_token:.2f} | {r.decode_tokens_per_s:.1f} | {r.e2e_tokens_per_s:.1f} | "
            f"{r.peak_memory_mib:.1f} | {r.speedup_prefill:.2f}× | {r.speedup_decode:.2f}× | {r.ideal_speedup:.2f}× |"
        )
    if results:
        r = results[0]
        lines.append("")
        lines.append(f"device {r.device}; prompt {r.prompt_len} tokens, {r.new_tokens} new tokens (greedy, fixed "
                     f"count); medians of {len(r.samples['prefill_ms'])} repeats; memory: {r.memory_kind}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ serving engines
def bench_engine(engine: str, paths: Sequence[str], batch_sizes: Sequence[int] = (1, 16), prompt_len: int = 128,
                 new_tokens: int = 128, repeats: int = 3, progress: Any = None) -> list[dict[str, Any]]:
    """Prefill and decode throughput of checkpoint folders in a serving engine (``vllm`` or ``llama.cpp``, see
    ``optimum_slm.serving``), with speed-ups against the first folder at each batch size; every model is loaded once
    per batch size and the repetitions are interleaved over them. llama.cpp gets each folder exported to a temporary
    f32 GGUF (``slm export``); the ideal speed-up is the layer ratio, as in ``bench_models``.
    """
    import json
    import os
    import tempfile

    from . import serving
    from .io.names import CONFIG_FILE

    missing = serving.engine_missing(engine)
    if missing:
        raise SLMError(missing)
    if new_tokens < 2 or prompt_len < 1 or repeats < 1 or not batch_sizes or any(b < 1 for b in batch_sizes):
        raise SLMError("need new_tokens >= 2, prompt_len >= 1, repeats >= 1 and positive batch sizes")
    layers = []
    for path in paths:
        config = os.path.join(path, CONFIG_FILE)
        if not os.path.isfile(config):
            raise SLMError(f"--engine {engine} serves checkpoint folders; {path} has no {CONFIG_FILE}")
        with open(config, encoding="utf-8") as fh:
            cfg = json.load(fh)
        layers.append(int((cfg.get("text_config") or cfg).get("num_hidden_layers") or 0))
    with tempfile.TemporaryDirectory(prefix="slm-bench-") as tmp:
        targets = list(paths)
        if engine == "llama.cpp":
            from .io.gguf_export import export_gguf

            targets = [export_gguf(path, os.path.join(tmp, f"{k}.gguf"), dtype="f32") for k, path in
                       enumerate(paths)]
        rows: list[dict[str, Any]] = []
        longest = max(new_tokens, 32)
        for batch in batch_sizes:
            runner = serving.VLLMRunner if engine == "vllm" else serving.LlamaCppRunner
            runners = [runner(target, batch, prompt_len, longest) for target in targets]
            report = (lambda line: progress(f"{engine}: batch {batch}: {line}")) if progress else None
            measured = serving.measure(runners, batch, prompt_len, new_tokens, repeats, progress=report)
            del runners
            base = measured[0]
            for path, n_layers, result in zip(paths, layers, measured):
                rows.append({"name": os.path.basename(os.path.normpath(path)), "engine": result["engine"],
                             "batch_size": batch, "layers": n_layers, **{k: v for k, v in result.items()
                                                                           if k not in ("greedy", "engine")},
                             "speedup_prefill": base["prefill_ms"] / result["prefill_ms"],
                             "speedup_decode": (base["decode_ms_per_token"] / result["decode_ms_per_token"]
                                                if base["decode_ms_per_token"] and result["decode_ms_per_token"]
                                                else None),
                             "ideal_speedup": layers[0] / n_layers if n_layers else None,
                             "greedy_matches_first": result["greedy"] == base["greedy"]})
    return rows


def format_engine_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of ``bench_engine`` rows."""
    def x(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f}×"

    lines = ["| model | engine | layers | batch | prefill tok/s | decode tok/s | prefill × | decode × | ideal L/L′ |",
             "|" + "---|" * 9]
    for r in rows:
        decode = "—" if r["decode_tps"] is None else f"{r['decode_tps']:.1f}"
        lines.append(f"| {r['name']} | {r['engine']} | {r['layers']} | {r['batch_size']} | {r['prefill_tps']:.1f} | "
                     f"{decode} | {x(r['speedup_prefill'])} | {x(r['speedup_decode'])} | {x(r['ideal_speedup'])} |")
    return "\n".join(lines)
