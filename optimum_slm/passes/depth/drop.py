"""``drop``: remove exactly the given base layers. The simplest real pass; it needs no calibration."""

from __future__ import annotations

from ...errors import PassError
from ...plan import drop_op
from ..base import CompressionPass, PassParam, PassResult


class DropPass(CompressionPass):
    name = "drop"
    streams = True  # runs on a lazy model through the sequential engine
    handles_removed_sublayers = True  # removes whole layers, running them only through the engine
    description = "Remove the listed decoder layers (no calibration needed)."
    params = (PassParam("layers", "int_list", None, "base layer indices to remove, e.g. 3,4 or 10-13"),)
    needs_calibration = False

    def validate(self) -> None:
        super().validate()
        if not self.config.get("layers"):
            raise PassError("pass 'drop' needs layers=[i, ...]")

    def run(self, engine) -> PassResult:
        n = engine.num_layers
        layers = sorted(set(self.config["layers"]))
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise PassError(f"drop: layer {bad[0]} out of range 0..{n - 1}")
        if len(layers) >= n:
            raise PassError("drop: cannot remove every layer")
        return PassResult([drop_op(layers)])
