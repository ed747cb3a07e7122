"""Side-car tensors: fitted values a plan's ops reference by name (branch scales, fitted maps, long index lists).

They live in ``<plan>.tensors`` (safetensors format) next to ``<plan>.json`` (``slm_plan.tensors`` beside
``slm_plan.json``; not ``*.safetensors``, which serving engines read as weights; the name releases before 0.4 wrote,
``slm_plan.safetensors``, is still read); the
JSON's ``tensors`` manifest lists each name with its dtype, shape and the sha256 of its bytes. Loading checks that
every listed tensor is present with that dtype and shape, that its hash matches and its values are finite, and that
the file holds nothing unlisted. A plan without tensors has no side-car.
"""

from __future__ import annotations

import hashlib
import os
from typing import Mapping

import torch

from ..errors import PlanError
from ..io.names import legacy_sidecar_path, sidecar_path

#: dtypes a side-car may hold (as written in the manifest)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "int64": torch.int64, "int32": torch.int32}
_NAMES = {v: k for k, v in DTYPES.items()}


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as stored (contiguous, CPU)."""
    t = t.detach().to("cpu").contiguous()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


def describe(t: torch.Tensor) -> dict:
    """A tensor's manifest entry."""
    if t.dtype not in _NAMES:
        raise PlanError(f"plan tensors must be one of {', '.join(DTYPES)}, got {t.dtype}")
    return {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "sha256": tensor_sha256(t)}


def check_tensor(name: str, t: torch.Tensor, entry: Mapping | None = None) -> None:
    """Refuse a non-finite tensor, or one that differs from its manifest ``entry`` (dtype, shape, hash)."""
    if entry is not None:
        if not isinstance(entry, Mapping) or set(entry) != {"dtype", "shape", "sha256"}:
            raise PlanError(f"plan tensor {name!r}: manifest entry must be {{dtype, shape, sha256}}, got {entry!r}")
        shape = entry["shape"]
        if (not isinstance(entry["dtype"], str) or not isinstance(entry["sha256"], str)
                or not isinstance(shape, list)
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise PlanError(f"plan tensor {name!r}: manifest entry needs a dtype name, a shape (list of sizes) and a "
                            f"sha256, got {entry!r}")
        if entry["dtype"] != _NAMES.get(t.dtype):
            raise PlanError(f"plan tensor {name!r} is {_NAMES.get(t.dtype, t.dtype)}, the plan lists {entry['dtype']}")
        if list(entry["shape"]) != list(t.shape):
            raise PlanError(f"plan tensor {name!r} has shape {list(t.shape)}, the plan lists {entry['shape']}")
        if entry["sha256"] != tensor_sha256(t):
            raise PlanError(f"plan tensor {name!r} does not match its sha256 in the plan (side-car changed)")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise PlanError(f"plan tensor {name!r} holds NaN or infinite values")


def read_sidecar(plan_path: str | os.PathLike, manifest: Mapping[str, Mapping]) -> dict[str, torch.Tensor]:
    """The side-car tensors of a plan file, each checked against ``manifest``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not manifest:
        return {}
    path = sidecar_path(plan_path)
    if not os.path.isfile(path) and os.path.isfile(legacy_sidecar_path(plan_path)):
        path = legacy_sidecar_path(plan_path)  # written by a release before 0.4
    if not os.path.isfile(path):
        raise PlanError(f"plan {os.fspath(plan_path)} references {len(manifest)} tensors but its side-car {path} is "
                        "missing")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise PlanError(f"plan side-car {path} is not a readable safetensors file: {first}") from None
    missing = sorted(set(manifest) - set(tensors))
    if missing:
        raise PlanError(f"plan side-car {path} lacks the tensor {missing[0]!r}")
    extra = sorted(set(tensors) - set(manifest))
    if extra:
        raise PlanError(f"plan side-car {path} holds a tensor the plan does not list: {extra[0]!r}")
    for name, entry in manifest.items():
        check_tensor(name, tensors[name], entry)
    return tensors


def write_sidecar(path: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write ``tensors`` as a safetensors file (contiguous CPU copies)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in sorted(tensors.items())}, path)
