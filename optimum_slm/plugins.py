"""The plugin manager: built-ins are plugins like any other, third-party ones come by entry point.

Third-party packages declare ``[project.entry-points.optimum_slm] name = "module"``; the module implements any hook of
``hookspecs`` with ``optimum_slm.hookimpl`` (``register_passes``, ``register_op_kinds``, ``register_merge_rules``,
``register_similarities``). ``OPTIMUM_SLM_DISABLE_PLUGIN_AUTOLOAD=1`` loads only the built-ins.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import pluggy

from . import hookspecs
from .errors import SLMError

#: the built-ins, registered like any plugin (``default_plugins`` lists every built-in pass, op kind, rule, similarity)
DEFAULT_PLUGINS = ("optimum_slm.default_plugins",)
ENTRY_POINT_GROUP = "optimum_slm"

pm = pluggy.PluginManager("optimum_slm")
pm.add_hookspecs(hookspecs)

_loaded = False
#: registries built from the hooks, dropped whenever the set of plugins changes
_collected: dict[str, dict[str, Any]] = {}


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


def collect(hook: str, kind: type | None, what: str, error: type[SLMError] = SLMError) -> dict[str, Any]:
    """Call ``hook`` on every plugin and gather what each registers, by name (cached until plugins change).

    A registered object must be an instance of ``kind`` with a ``name`` (or come as ``register(name, obj)``); two
    different objects under one name are refused.
    """
    if hook in _collected:
        return _collected[hook]
    load_plugins()
    found: dict[str, Any] = {}

    def register(*args: Any) -> None:
        if len(args) == 2:
            name, obj = args
        elif len(args) == 1:
            obj = args[0]
            name = getattr(obj, "name", None)
        else:
            raise error(f"register() takes one {what} (or a name and a {what})")
        if (not isinstance(name, str) or not name or (kind is not None and not _is_kind(obj, kind))
                or (isinstance(obj, type) and obj is kind)):
            raise error(f"register() takes a named {what}, got {obj!r}")
        if name in found and found[name] is not obj:
            raise error(f"two plugins register a {what} named {name!r}")
        found[name] = obj

    getattr(pm.hook, hook)(register=register)
    _collected[hook] = found
    return found


def lookup(hook: str, kind: type | None, what: str, name: str, error: type[SLMError] = SLMError) -> Any:
    """The object registered as ``name`` through ``hook``; ``error`` listing what is available when none is."""
    found = collect(hook, kind, what, error)
    if name not in found:
        raise error(f"unknown {what} {name!r}; available: {', '.join(sorted(found))}")
    return found[name]


def _is_kind(obj: Any, kind: type) -> bool:
    return isinstance(obj, kind) or (isinstance(obj, type) and issubclass(obj, kind))


def plugins_changed() -> None:
    """Forget every collected registry (a plugin was registered or removed)."""
    _collected.clear()


