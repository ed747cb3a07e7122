"""The built-in plugin: every pass, op kind, merge rule and similarity that ships with optimum-slm, registered in
one place through the same hooks a third-party plugin implements (simonw/llm's ``default_plugins`` pattern).

A new built-in is added here; the modules that define passes, op kinds and rules know nothing about pluggy.
"""

from __future__ import annotations

from .hookspecs import hookimpl
from .merge.rules import MERGE_RULES
from .passes.depth.angular import AngularPass
from .passes.depth.drop import DropPass
from .passes.depth.laco import LaCoPass
from .passes.depth.prune_comp import PruneCompPass
from .passes.depth.linearpatch import LinearPatchPass
from .passes.depth.replaceme import ReplaceMePass
from .passes.depth.shortened import ShortenedMagnitudePass, ShortenedPPLPass, ShortenedTaylorPass
from .passes.depth.shortgpt import ShortGPTPass
from .passes.depth.sleb import SLEBPass
from .passes.depth.slm import SLMPass
from .passes.depth.slm_plus import SLMPlusPass
from .passes.width.flap import FLAPPass
from .passes.width.minitron import MinitronWidthPass
from .passes.width.taylor import TaylorWidthPass
from .plan.ops import BUILTIN_KINDS
from .plan.stream_ops import RescaleOp
from .plan.refine_ops import SetWeightsOp
from .plan.sublayer_ops import DropAttention, DropMLP
from .plan.width_ops import NarrowAttention, NarrowMLP
from .similarity import SIMILARITIES

#: the built-in passes: depth (the paper's SLM, our slm-plus, the baselines), then width
PASSES = (DropPass, SLMPass, SLMPlusPass, ShortGPTPass, AngularPass, ReplaceMePass, LinearPatchPass, SLEBPass,
          PruneCompPass,
          ShortenedPPLPass, ShortenedTaylorPass, ShortenedMagnitudePass, LaCoPass, FLAPPass, TaylorWidthPass,
          MinitronWidthPass)


@hookimpl
def register_passes(register) -> None:
    for cls in PASSES:
        register(cls)


@hookimpl
def register_op_kinds(register) -> None:
    for kind in (*BUILTIN_KINDS, RescaleOp(), NarrowMLP(), NarrowAttention(), DropAttention(), DropMLP(),
                 SetWeightsOp()):
        register(kind)


@hookimpl
def register_merge_rules(register) -> None:
    for rule in MERGE_RULES.values():
        register(rule)


@hookimpl
def register_similarities(register) -> None:
    for name, fn in SIMILARITIES.items():
        register(name, fn)
