"""``drop``: remove exactly the given base layers. The simplest real pass; it needs no calibration."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import PassError
from ..hookspecs import hookimpl
from ..plan import CompressionPlan, drop_op
from .base import CompressionPass, PassParam


class DropPass(CompressionPass):
    name = "drop"
    description = "Remove the listed decoder layers (no calibration needed)."
    params = (PassParam("layers", "int_list", None, "base layer indices to remove, e.g. 3,4 or 10-13"),)

    def validate(self) -> None:
        super().validate()
        if not self.config.get("layers"):
            raise PassError("pass 'drop' needs layers=[i, ...]")

    def plan(self, model: nn.Module, calibration: torch.Tensor | None = None) -> CompressionPlan:
        n = self.adapter(model).num_layers
        layers = sorted(set(self.config["layers"]))
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise PassError(f"drop: layer {bad[0]} out of range 0..{n - 1}")
        if len(layers) >= n:
            raise PassError("drop: cannot remove every layer")
        return self.make_plan(model, [drop_op(layers)], calibration)


@hookimpl
def register_passes(register):
    register(DropPass)
