"""``slm-plus``: the SLM variant that wins on our benchmarks, as the recommended default for users.

Same machinery as ``slm`` (windows of merged layers, the same engine and plan ops), with the choices that won the
ablation in ``benchmarks/results/ablation_smollm2.md``: a greedy window search scored by the per-token cosine of the
final hidden states against the base model, and the calibrated merge (keep the window's top layer, refit its branch
output scales). See the README's Results section for the evidence.
"""

from __future__ import annotations

from ...hookspecs import hookimpl
from ..base import FIT_ORDER, NUM_LAYERS, RATIO, RIDGE, PassParam
from .slm import CALIBRATED, SEARCHES, SLMPass
from ...similarity import SIMILARITIES


class SLMPlusPass(SLMPass):
    name = "slm-plus"
    description = "Recommended: SLM windows found by greedy per-token-cosine search, calibrated keep-top merge."
    params = (
        RATIO,
        NUM_LAYERS,
        PassParam("merge", "str", CALIBRATED, "merge rule (see slm)"),
        PassParam("similarity", "str", "token-cosine", "similarity criterion", choices=tuple(SIMILARITIES)),
        PassParam("search", "str", "greedy", "window search: global or greedy", choices=SEARCHES[1:]),
        PassParam("protect", "int_list", None, "base layers never placed in a window"),
        PassParam("max_window", "int", None, "largest window size in layers (default 8)"),
        PassParam("batch_size", "int", None, "calibration samples per forward batch (run-time only)"),
        FIT_ORDER,
        RIDGE,
    )

    def validate(self) -> None:
        self.config.setdefault("threshold", None)
        super().validate()


@hookimpl
def register_passes(register):
    register(SLMPlusPass)
