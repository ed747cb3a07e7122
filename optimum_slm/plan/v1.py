"""Reading plan format version 1 (optimum-slm 0.1.0): upgraded in memory to version 2 on load.

v1 had one method/params/calibration/trace and one op list; the calibrated merge was written as ``rule: keep-top``
with base64 float32 ``scales`` per branch inside the op. The upgrade makes one stage, turns such an op into a
``calibrated`` merge whose scales become side-car tensors (``merge.<low>-<high>.<branch>``), and tags the base's
fingerprint as scheme ``v1`` so it is checked as 0.1.0 computed it. The upgraded plan applies to exactly the same
weights (tests/test_plan_v1_compat.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import PlanError

CALIBRATED_ROLES = ("attn", "mlp")


def _upgrade_op(op: Any, k: int, tensors: dict[str, torch.Tensor]) -> Any:
    if not isinstance(op, dict) or "scales" not in op:
        return op
    from ..merge.calibrated import decode_vector

    layers = op.get("layers")
    scales = op["scales"]
    where = f"plan op #{k} (merge window {layers})"
    if not isinstance(layers, list) or len(layers) != 2 or not all(isinstance(i, int) for i in layers):
        raise PlanError(f"{where}: 'layers' must be [start, end]")
    if op.get("rule", "official") != "keep-top":
        raise PlanError(f"{where}: v1 scales belong to the keep-top rule, got rule {op.get('rule')!r}")
    if not isinstance(scales, dict) or set(scales) != set(CALIBRATED_ROLES):
        raise PlanError(f"{where}: 'scales' must be an object with the branches {', '.join(CALIBRATED_ROLES)}")
    refs = {}
    for role in CALIBRATED_ROLES:
        try:
            vec = decode_vector(scales[role])
        except ValueError:
            raise PlanError(f"{where}: scales[{role!r}] is not base64 float32") from None
        if not all(math.isfinite(v) for v in vec.tolist()):
            raise PlanError(f"{where}: scales[{role!r}] holds NaN or infinite values")
        name = f"merge.{layers[0]}-{layers[1]}.{role}"
        tensors[name] = vec
        refs[role] = name
    upgraded = {key: value for key, value in op.items() if key != "scales"}
    upgraded["rule"] = "calibrated"
    upgraded["tensors"] = refs
    return upgraded


def upgrade(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A v1 plan object as a v2 one, with the tensors its inline scales held."""
    for key in ("base", "method", "ops", "num_layers_after"):
        if key not in data:
            raise PlanError(f"plan lacks the field {key!r}")
    base = data["base"]
    if not isinstance(base, dict):
        raise PlanError("plan 'base' must be an object")
    ops = data["ops"]
    if not isinstance(ops, list):
        raise PlanError("plan 'ops' must be a list")
    tensors: dict[str, torch.Tensor] = {}
    stage = {
        "method": data["method"],
        "params": data.get("params") or {},
        "calibration": data.get("calibration"),
        "trace": data.get("trace") or {},
        "ops": [_upgrade_op(op, k, tensors) for k, op in enumerate(ops)],
    }
    from .tensors import describe

    upgraded = {
        "format": data["format"],
        "version": 2,
        "base": {**base, "fingerprint_scheme": "v1"},
        "stages": [stage],
        "num_layers_after": data["num_layers_after"],
        "tensors": {name: describe(t) for name, t in tensors.items()},
        "created_with": data.get("created_with", ""),
    }
    return upgraded, tensors
