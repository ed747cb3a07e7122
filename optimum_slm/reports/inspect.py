"""What ``slm inspect`` prints about a plan: its stages and ops, each window's similarity, calibration, trace."""

from __future__ import annotations

from typing import Any

from ..plan import CompressionPlan, kind_of


def window_similarities(trace: dict[str, Any]) -> dict[tuple[int, int], float]:
    """The similarity of the compressed model when each window took its final form, from a pass's trace.

    Reads the window searches' traces: accepted ``{"window", "sim", "passed"}`` entries (official loop), scored
    windows ``{"window", "sim"}`` (global search) and rounds ``{"windows", "sim"}`` (greedy: the round in which a
    window first appears in its final form).
    """
    sims: dict[tuple[int, int], float] = {}
    rounds: dict[tuple[int, int], float] = {}
    for entry in trace.get("tried") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("sim"), (int, float)):
            continue
        window = entry.get("window")
        if isinstance(window, list) and len(window) == 2 and entry.get("passed", True):
            sims[(window[0], window[1])] = float(entry["sim"])
        for w in entry.get("windows") or []:
            if isinstance(w, list) and len(w) == 2:
                rounds.setdefault((w[0], w[1]), float(entry["sim"]))
    return {**rounds, **sims}


def _is_small_table(value: Any) -> bool:
    """A short list of flat records (e.g. a threshold search), worth printing in full."""
    return (isinstance(value, list) and 0 < len(value) <= 12
            and all(isinstance(row, dict) and len(row) <= 4
                    and all(isinstance(v, (str, int, float, bool)) for v in row.values()) for row in value))


def trace_lines(trace: dict[str, Any]) -> list[str]:
    """Generic lines for trace entries (scalars shown, short lists and tables in full, long ones counted)."""
    lines = []
    if isinstance(trace.get("tried"), list):
        lines.append(f"  windows tried in the final run: {len(trace['tried'])}")
    for key in sorted(trace):
        if key in ("tried", "windows"):
            continue
        value = trace[key]
        if isinstance(value, (str, int, float, bool)):
            lines.append(f"  {key}: {value}")
        elif isinstance(value, list) and len(value) <= 40 and all(isinstance(v, (int, float)) for v in value):
            lines.append(f"  {key}: " + ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value))
        elif _is_small_table(value):
            rows = (" ".join(f"{k}={v}" for k, v in row.items()) for row in value)
            lines.append(f"  {key}: " + " | ".join(rows))
        elif isinstance(value, (list, dict)):
            lines.append(f"  {key}: {len(value)} entries")
    return lines


def inspect_lines(plan: CompressionPlan, path: str) -> list[str]:
    """Everything ``slm inspect`` prints for ``plan`` (read from ``path``)."""
    lines = [f"plan: {path} ({plan.created_with or 'unknown version'})", plan.summary()]
    sims: dict[tuple[int, int], float] = {}
    for stage in plan.stages:
        sims.update(window_similarities(stage.trace))
    merges = [(kind_of(op).describe(op), window) for op in plan.ops for window in kind_of(op).footprint(op).get(
        "merged", [])]
    if merges:
        lines.append("windows (base numbering):")
        for text, (low, high) in merges:
            sim = sims.get((low, high))
            score = f", similarity {sim:.4f}" if sim is not None else ""
            lines.append(f"  {text}: {high - low + 1} layers -> 1{score}")
    if plan.tensors:
        total = sum(t.numel() for t in plan.tensors.values())
        lines.append(f"side-car tensors: {len(plan.tensors)} ({total:,} values)")
    cal = plan.calibration
    if cal:
        digest = (cal.get("sha256") or "")[:12]
        lines.append(f"calibration: {cal.get('source')}, {cal.get('n_samples')} x {cal.get('seq_len')} tokens, "
                     f"seed {cal.get('seed')}" + (f", {cal['sampling']}" if cal.get("sampling") else "")
                     + (f", ids sha256 {digest}" if digest else ""))
        fit = cal.get("fit")
        if isinstance(fit, dict):
            lines.append(f"fit set: {fit.get('n_samples')} x {fit.get('seq_len')} tokens "
                         f"({fit.get('sampling', 'pack')}), ids sha256 {(fit.get('sha256') or '')[:12]}")
    else:
        lines.append("calibration: none")
    if plan.recipe is not None:  # the request, as the recipe file that repeats it (slm compress --recipe)
        import yaml

        lines.append("recipe (slm compress --recipe):")
        lines += [f"  {line}" for line in yaml.safe_dump(plan.recipe, sort_keys=False).splitlines()]
    for k, stage in enumerate(plan.stages):
        extra = trace_lines(stage.trace)
        if extra:
            lines.append("trace:" if len(plan.stages) == 1 else f"trace of stage {k + 1} ({stage.method}):")
            lines += extra
    return lines

