"""The model card (``README.md``) written beside a compressed checkpoint."""

from __future__ import annotations

import json
import math
from typing import Any

from ..assets import base_identity
from ..io.names import HEAL_FILE, PLAN_FILE, PLAN_TENSORS_FILE
from ..plan import CompressionPlan
from ..plan.fingerprint import jsonable

#: where each built-in method comes from
METHOD_PAPERS = {
    "slm": "[Sliding-Window Merging for Compacting Patch-Redundant Layers in LLMs (AAAI-26)]"
           "(https://arxiv.org/abs/2502.19159)",
    "slm-plus": "optimum-slm's variant of [Sliding-Window Merging (AAAI-26)](https://arxiv.org/abs/2502.19159)",
    "shortgpt": "[ShortGPT (Men et al. 2024)](https://arxiv.org/abs/2403.03853)",
    "angular": "[The Unreasonable Ineffectiveness of the Deeper Layers (Gromov et al. 2024)]"
               "(https://arxiv.org/abs/2403.17887)",
    "sleb": "[SLEB (Song et al., ICML 2024)](https://arxiv.org/abs/2402.09025)",
    "shortened-ppl": "[Shortened LLaMA (Kim et al. 2024)](https://arxiv.org/abs/2402.02834)",
    "shortened-taylor": "[Shortened LLaMA (Kim et al. 2024)](https://arxiv.org/abs/2402.02834)",
    "shortened-magnitude": "[Shortened LLaMA (Kim et al. 2024)](https://arxiv.org/abs/2402.02834)",
    "laco": "[LaCo (Yang et al., EMNLP 2024 Findings)](https://arxiv.org/abs/2402.11187)",
    "prune-comp": "[Prune&Comp (Chen et al., AAAI 2026)](https://arxiv.org/abs/2507.18212)",
}


def _num(value: Any) -> str:
    return f"{value:,.2f}" if isinstance(value, (int, float)) else str(value)


def model_card(plan: CompressionPlan, params_before: int, params_after: int, *, dtype: str | None = None,
               command: str | None = None) -> str:
    """A generated README.md for a compressed checkpoint: base, stages, ops, layers, parameters, quality check."""
    name = plan.base.get("name_or_path")
    identity = base_identity(name)
    front = ["---", "library_name: transformers", "tags: [optimum-slm, depth-pruning, layer-merging]"]
    if identity["hub_id"]:
        front.append(f"base_model: {identity['hub_id']}")
    lines = front + [
        "---",
        "",
        f"# {plan.method} compression of {identity['hub_id'] or name}",
        "",
        "Made with [optimum-slm](https://pypi.org/project/optimum-slm/). A plain transformers checkpoint: load it with",
        "`AutoModelForCausalLM.from_pretrained(<this folder>)`.",
        "",
        "| | |",
        "|---|---|",
        f"| base | `{name}` ({plan.base['model_type']}) |",
    ]
    if identity["file"]:
        lines.append(f"| base file | {identity['file']} |")
    for k, stage in enumerate(plan.stages):
        label = f"stage {k + 1}" if len(plan.stages) > 1 else "method"
        paper = METHOD_PAPERS.get(stage.method)
        lines.append(f"| {label} | `{stage.method}` `{json.dumps(jsonable(stage.params), sort_keys=True)}`"
                     + (f" — {paper}" if paper else "") + " |")
    lines += [
        f"| operations (base layer numbering) | {'; '.join(plan.describe_ops()) or 'none'} |",
        f"| layers | {plan.num_layers} → {plan.num_layers_after} |",
        f"| parameters | {params_before:,} → {params_after:,} ({100.0 * params_after / params_before:.1f}%) |",
    ]
    if dtype:
        lines.append(f"| dtype | {dtype} |")
    lines.append(f"| base fingerprint | `{plan.base['fingerprint']}` ({plan.base.get('fingerprint_scheme', 'v1')}) |")
    check = plan.quality_check
    if check:
        lines.append(f"| quality check | perplexity {_num(check['ppl'])} vs base {_num(check['base_ppl'])} "
                     f"({_num(check['ppl_ratio'])}×), final-state cosine {check['final_cosine']} on "
                     f"{check['tokens']:,} tokens of {check['text']} |")
    lines.append("")
    if check:
        from ..quality import warning

        loud = warning(check, plan.method)
        if loud:
            lines += [f"> **{loud}**", ""]
    c = plan.calibration
    if c:
        fit = c.get("fit") if isinstance(c.get("fit"), dict) else None
        fit_text = (f" Least-squares maps fitted on {fit.get('n_samples')} × {fit.get('seq_len')} packed tokens "
                    "of the documents after those." if fit else "")
        lines += [f"Calibration: `{c.get('source')}`, {c.get('n_samples')} × {c.get('seq_len')} tokens, "
                  f"seed {c.get('seed')}.{fit_text}", ""]
    if command:
        lines += ["Reproduce:", "", "```bash", command, "```", ""]
    side = f" and its side-car `{PLAN_TENSORS_FILE}`" if plan.tensors else ""
    lines += [f"`{PLAN_FILE}`{side} rebuild this model from the base: "
              f"`slm apply --model <base> --plan {PLAN_FILE} --output DIR`.", ""]
    return "\n".join(lines)


def healing_section(record: dict[str, Any], number: int = 1) -> str:
    """The model card's section on one healing run (``slm heal`` or a recipe's ``heal`` stage)."""
    data, config = record["data"], record["config"]
    title = "## Healing" + (f" (run {number})" if number > 1 else "")
    before, best = record["val_loss_before"], record["val_loss_best"]
    lines = [
        title,
        "",
        f"These weights were trained after compression, so `{PLAN_FILE}` rebuilds the compressed model *before* "
        f"healing; `{HEAL_FILE}` records the run.",
        "",
        "| | |",
        "|---|---|",
        f"| method | `{record['method']}`: {record['trained']} ({record['trainable_parameters']:,} trainable "
        "parameters) |",
        f"| data | `{data['source']}` ({data['format']}): {data['train_examples']:,} training sequences "
        f"({data['train_tokens']:,} tokens), {data['val_examples']:,} held out for validation |",
        f"| schedule | lr {config['lr']:g}, {config['batch_size']} × {config['grad_accum']} sequences a step, "
        f"warm-up {config['warmup_steps']}, cutoff {config['cutoff_len']}, {record['precision']} |",
        f"| steps | {record['steps']:,} of {record['planned_steps']:,} planned ({record['tokens_trained']:,} tokens); "
        f"{record['stopped']} |",
        f"| validation loss | {before:.4f} → {best:.4f} (perplexity {math.exp(before):,.2f} → {math.exp(best):,.2f}); "
        f"kept {record['kept']} |",
        "",
    ]
    return "\n".join(lines)
