"""Plugin hook specifications. A plugin module implements ``register_passes`` with ``@hookimpl``."""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("optimum_slm")
hookimpl = pluggy.HookimplMarker("optimum_slm")


@hookspec
def register_passes(register):
    """Register compression passes: call ``register(PassClass)`` for each (a ``CompressionPass`` subclass)."""
