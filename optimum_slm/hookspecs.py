"""Plugin hook specifications. A plugin module implements any of these with ``@hookimpl``; the built-in passes, op
kinds, merge rules and similarities are registered through the same hooks."""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("optimum_slm")
hookimpl = pluggy.HookimplMarker("optimum_slm")


@hookspec
def register_passes(register):
    """Register compression passes: call ``register(PassClass)`` for each (a ``CompressionPass`` subclass)."""


@hookspec
def register_op_kinds(register):
    """Register plan op kinds: call ``register(kind)`` for each (an ``optimum_slm.plan.OpKind`` instance)."""


@hookspec
def register_merge_rules(register):
    """Register merge rules: call ``register(rule)`` for each (an ``optimum_slm.merge.MergeRule``)."""


@hookspec
def register_similarities(register):
    """Register similarity criteria: call ``register(name, fn)`` with ``fn(engine, candidate_final) -> float``."""
