"""The plugin manager: built-in passes are plugins like any other, third-party ones come by entry point.

Third-party packages declare ``[project.entry-points.optimum_slm] name = "module"``; the module implements
``register_passes(register)`` with ``optimum_slm.hookimpl``. ``OPTIMUM_SLM_DISABLE_PLUGIN_AUTOLOAD=1`` loads only the
built-ins.
"""

from __future__ import annotations

import importlib
import os

import pluggy

from . import hookspecs

DEFAULT_PLUGINS = (
    "optimum_slm.passes.drop",
    "optimum_slm.passes.slm",
    "optimum_slm.passes.slm_plus",
    "optimum_slm.passes.shortgpt",
    "optimum_slm.passes.angular",
    "optimum_slm.passes.sleb",
    "optimum_slm.passes.shortened",
    "optimum_slm.passes.laco",
)
ENTRY_POINT_GROUP = "optimum_slm"

pm = pluggy.PluginManager("optimum_slm")
pm.add_hookspecs(hookspecs)

_loaded = False


def load_plugins() -> pluggy.PluginManager:
    """Register the built-in plugins and the installed entry points (once)."""
    global _loaded
    if _loaded:
        return pm
    _loaded = True
    for name in DEFAULT_PLUGINS:
        mod = importlib.import_module(name)
        if not pm.is_registered(mod):
            pm.register(mod, name)
    if not os.environ.get("OPTIMUM_SLM_DISABLE_PLUGIN_AUTOLOAD"):
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return pm
