"""Compression plans: the one object everything flows through.

* ``schema``: ``CompressionPlan`` (base, stages of ops, side-car tensors), JSON load/save, summaries;
* ``ops``: the op-kind registry (``drop``, ``merge``, ``scale_branches``; plugins add kinds) and the running ``PlanShape``;
  ``width_ops`` (``narrow_mlp``, ``narrow_attn``), ``sublayer_ops`` (``drop_attn``, ``drop_mlp``: a layer without its
  attention or MLP, a per-layer width of zero) and ``stream_ops`` (``rescale``: Prune&Comp's compensation) add
  built-in kinds;
* ``execute``: ``apply_plan``, validated in full before any weight changes;
* ``fingerprint``: base-model fingerprints (v3: every value of every tensor; v2 and v1 kept for old plans);
* ``tensors``: the ``<plan>.tensors`` side-car; ``v1``: reading 0.1.0 plans; ``cache``: the plan cache.
"""

from .execute import ApplyContext, apply_plan, check_base
from .fingerprint import fingerprint, fingerprint_files, fingerprint_v1
from .ops import OpKind, PlanShape, drop_op, kind_of, merge_op, op_kinds, scale_branches_op
from .schema import PLAN_FORMAT, PLAN_VERSION, CompressionPlan, Stage, describe_base

#: the fingerprint of a loaded model under the current scheme
model_fingerprint = fingerprint

__all__ = [
    "ApplyContext", "apply_plan", "check_base", "fingerprint", "fingerprint_files", "fingerprint_v1",
    "model_fingerprint", "OpKind", "PlanShape", "drop_op", "kind_of", "merge_op", "op_kinds", "scale_branches_op",
    "PLAN_FORMAT", "PLAN_VERSION", "CompressionPlan", "Stage", "describe_base",
]
