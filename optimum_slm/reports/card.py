"""The model card (``README.md``) written beside a compressed checkpoint."""

from __future__ import annotations

import json

from ..plan import CompressionPlan
from ..plan.fingerprint import jsonable

PLAN_FILE = "slm_plan.json"


def model_card(plan: CompressionPlan, params_before: int, params_after: int) -> str:
    """A generated README.md for a compressed checkpoint: base, stages, ops, layers and parameters."""
    name = plan.base.get("name_or_path")
    lines = [
        "---",
        "library_name: transformers",
        "tags: [optimum-slm, depth-pruning, layer-merging]",
        f"base_model: {name}",
        "---",
        "",
        f"# {plan.method} compression of {name}",
        "",
        "Made with [optimum-slm](https://pypi.org/project/optimum-slm/). A plain transformers checkpoint: load it with",
        "`AutoModelForCausalLM.from_pretrained(<this folder>)`.",
        "",
        "| | |",
        "|---|---|",
        f"| base | `{name}` ({plan.base['model_type']}) |",
    ]
    for k, stage in enumerate(plan.stages):
        label = f"stage {k + 1}" if len(plan.stages) > 1 else "method"
        lines.append(f"| {label} | `{stage.method}` `{json.dumps(jsonable(stage.params), sort_keys=True)}` |")
    lines += [
        f"| operations (base layer numbering) | {'; '.join(plan.describe_ops()) or 'none'} |",
        f"| layers | {plan.num_layers} → {plan.num_layers_after} |",
        f"| parameters | {params_before:,} → {params_after:,} ({100.0 * params_after / params_before:.1f}%) |",
        f"| base fingerprint | `{plan.base['fingerprint']}` ({plan.base.get('fingerprint_scheme', 'v1')}) |",
        "",
    ]
    c = plan.calibration
    if c:
        lines += [f"Calibration: `{c.get('source')}`, {c.get('n_samples')} × {c.get('seq_len')} tokens, "
                  f"seed {c.get('seed')}.", ""]
    side = " and its side-car `slm_plan.safetensors`" if plan.tensors else ""
    lines += [f"`{PLAN_FILE}`{side} rebuild this model from the base: "
              f"`slm apply --model <base> --plan {PLAN_FILE} --output DIR`.", ""]
    return "\n".join(lines)
