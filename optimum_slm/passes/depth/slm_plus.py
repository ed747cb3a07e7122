"""``slm-plus``: the SLM variant that wins on our benchmarks, as the recommended default for users.

Same machinery as ``slm`` (windows of merged layers, the same engine and plan ops), with the choices that won the
ablations (``benchmarks/results/ablation_smollm2.md`` for the search, ``benchmarks/results/fitted_smollm2.md`` for
the merge):

* a greedy window search scored by the per-token cosine of the final hidden states against the base model;
* the ``lstsq-attn`` merge: each window keeps its bottom layer and two least-squares d×d maps, on that layer's
  attention and MLP outputs, stand in for the layers it drops (ReplaceMe's fold, with a second map);
* the search sees the maps (``search_ridge``): every scored candidate gets maps fitted on the search set, shrunk
  towards the identity, so the search prefers windows a map can recover (contiguous blocks);
* the final maps are fitted after the search on the fit set (65,536 tokens by default), every window's from the
  base's own activations in one pass (``fit_order=independent``; ``bottom-up`` ties it on the validation texts at
  35% and costs 2.8× the fit time), with a ridge towards the identity (``ridge`` 0.1). Both were chosen on the
  validation splits ``wiki-leads-valid`` + ``lambada-books-valid`` (the lowest sum of log perplexities).

``granularity=sublayer`` (default ``layer``) searches attention and MLP sub-layers instead of windows of layers,
each removal bridged by a fitted map on the layer's other branch, under a parameter budget (see
``passes/depth/sublayer.py``); its checkpoints have per-layer widths (``optimum_slm.load_model`` reloads them).

The merged layers fold their maps into ``o_proj`` / ``down_proj``: the checkpoint is a vanilla one. Families with a
norm between a branch and the residual add (Gemma-2/3) get the map before that norm and a refitted norm gain (both
fold exactly; see ``merge/lstsq.py``). A family with no exact fold for a map gets ``merge=calibrated`` (the previous
default) instead, said in one warning line, unless the user asked for a fitted merge.
"""

from __future__ import annotations

import warnings

from ...errors import PassError
from ...merge import get_merge_rule
from ...similarity import SIMILARITIES
from ..base import NUM_LAYERS, OUTLIER_CLIP, RATIO, PassParam
from .slm import SEARCHES, SLMPass
from .sublayer import RANKS, run_sublayer

#: the defaults the fitted-merge ablation chose (``benchmarks/fitted_ablation.py``)
MERGE = "lstsq-attn"
SEARCH_RIDGE_DEFAULT = 0.1
RIDGE_DEFAULT = 0.1
FIT_ORDER_DEFAULT = "independent"
GRANULARITIES = ("layer", "sublayer")
#: the sub-layer search's rank of units (chosen on the validation splits: benchmarks/frontier_smollm2.py)
UNIT_RANK_DEFAULT = "per-param"
#: refine_epochs' learning rate: the lowest validation score of the sweep in benchmarks/results/refine_smollm2.md
REFINE_LR_DEFAULT = 4e-3
#: parameters of the window search that mean nothing to the sub-layer search (refused there when given)
WINDOW_ONLY = ("merge", "search", "max_window")


class SLMPlusPass(SLMPass):
    name = "slm-plus"
    description = ("Recommended: SLM windows found by a greedy per-token-cosine search that sees the fitted maps; "
                   "each window keeps its bottom layer with least-squares maps on its attention and MLP outputs")
    params = (
        RATIO,
        NUM_LAYERS,
        PassParam("merge", "str", MERGE, "merge rule (see slm); calibrated: the previous default, no fit set"),
        PassParam("similarity", "str", "token-cosine", "similarity criterion", choices=tuple(SIMILARITIES)),
        PassParam("search", "str", "greedy", "window search: global or greedy", choices=SEARCHES[1:]),
        PassParam("protect", "int_list", None, "base layers never placed in a window"),
        PassParam("max_window", "int", None, "largest window size in layers (default 8)"),
        PassParam("batch_size", "int", None, "calibration samples per forward batch (run-time only)"),
        PassParam("fit_order", "str", None, "maps of several windows: independent (default with a fitted merge: "
                  "all from the base's activations, one pass over the fit set) or bottom-up",
                  choices=("bottom-up", "independent")),
        PassParam("ridge", "float", None, f"ridge of the final maps, towards the identity (default {RIDGE_DEFAULT} "
                  "with a fitted merge)"),
        PassParam("search_ridge", "float", None, "ridge of the search-set maps candidates are scored with "
                  f"(default {SEARCH_RIDGE_DEFAULT} with a fitted merge)"),
        OUTLIER_CLIP,
        PassParam("granularity", "str", "layer", "layer: windows of whole layers; sublayer: attention and MLP "
                  "sub-layers removed one at a time, each bridged by a fitted map, until their parameters reach "
                  "those of round(ratio x L) layers", choices=GRANULARITIES),
        PassParam("refine_epochs", "int", None, "train each merged layer for this many epochs over the fit set to "
                  "reproduce its window's output (block reconstruction, after the fitted maps; default off)"),
        PassParam("refine_lr", "float", None, f"refine_epochs: Adam's learning rate (default {REFINE_LR_DEFAULT:g})"),
        PassParam("unit_rank", "str", None, "granularity=sublayer: which unit a round removes: change (the least "
                  "change of the final state) or per-param (the least change per parameter removed; default)",
                  choices=RANKS),
    )

    def validate(self) -> None:
        self.config.setdefault("threshold", None)
        if self.config.get("granularity") != "sublayer" and self.config.get("unit_rank") is not None:
            raise PassError("unit_rank applies to slm-plus granularity=sublayer")
        if self.config.get("granularity") == "sublayer":
            if self.config.get("unit_rank") is None:
                self.config["unit_rank"] = UNIT_RANK_DEFAULT
            given = [k for k in WINDOW_ONLY if k in self.given_params]
            if given:
                raise PassError(f"{given[0]} applies to slm-plus granularity=layer (windows of layers); "
                                "granularity=sublayer removes attention and MLP sub-layers, each bridged by a fitted "
                                "map")
        self._validate_refine()
        if get_merge_rule(self.config["merge"]).fit_map:
            # the fitted-merge defaults apply only to rules that fit a map (slm refuses them elsewhere)
            if self.config["ridge"] is None:
                self.config["ridge"] = RIDGE_DEFAULT
            if self.config["search_ridge"] is None:
                self.config["search_ridge"] = SEARCH_RIDGE_DEFAULT
            if self.config["fit_order"] is None:
                self.config["fit_order"] = FIT_ORDER_DEFAULT
        super().validate()

    def _validate_refine(self) -> None:
        epochs, lr = self.config.get("refine_epochs"), self.config.get("refine_lr")
        if epochs is None:
            if lr is not None:
                raise PassError("refine_lr applies with refine_epochs=N (refinement is off by default)")
            return
        if epochs < 1:
            raise PassError(f"refine_epochs must be >= 1, got {epochs}")
        if lr is None:
            self.config["refine_lr"] = lr = REFINE_LR_DEFAULT
        if not (0 < lr < float("inf")):
            raise PassError(f"refine_lr must be a finite number > 0, got {lr}")
        if self.config.get("granularity") == "sublayer":
            raise PassError("refine_epochs applies to slm-plus granularity=layer (merged windows)")
        if not get_merge_rule(self.config["merge"]).fit_map:
            raise PassError(f"refine_epochs needs a merge rule that fits on the fit set (lstsq, lstsq-attn, ...), "
                            f"got merge={self.config['merge']}")

    @property
    def handles_removed_sublayers(self) -> bool:  # the sub-layer search skips units already removed
        return self.config.get("granularity") == "sublayer"

    def public_params(self) -> dict:
        params = super().public_params()
        if params.get("granularity") == "layer":
            params.pop("granularity")  # the default: plans (and their cache keys) read as they did before it existed
        else:
            for key in WINDOW_ONLY:
                params.pop(key, None)
        return params

    def run(self, engine):
        if self.config["granularity"] == "sublayer":
            return run_sublayer(self, engine)
        if ("merge" not in self.given_params and get_merge_rule(self.config["merge"]).fit_map
                and not engine.adapter.supports_output_map()):
            # the default must work on every supported family: fall back to the best merge that needs no fold
            if self.config.get("refine_epochs"):
                raise PassError(f"slm-plus: refine_epochs needs a fitted merge, which {engine.adapter.family.name} "
                                "cannot fold")
            warnings.warn(f"slm-plus: {engine.adapter.family.name} has no exact fold for a fitted map; using "
                          "merge=calibrated", stacklevel=2)
            self.config.update(merge="calibrated", ridge=None, search_ridge=None, fit_order=None)
        return super().run(engine)
