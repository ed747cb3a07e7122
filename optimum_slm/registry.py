"""The pass registry: ``get_pass(name, **params)`` and ``list_passes()`` over every registered plugin."""

from __future__ import annotations

from typing import Any

from .errors import PassError
from .passes.base import CompressionPass
from .plugins import collect, load_plugins, plugins_changed, pm


def pass_classes() -> dict[str, type[CompressionPass]]:
    """Every registered pass class by name (sorted)."""
    return dict(sorted(collect("register_passes", CompressionPass, "CompressionPass subclass", PassError).items()))


def get_pass_class(name: str) -> type[CompressionPass]:
    classes = pass_classes()
    if name not in classes:
        raise PassError(f"unknown pass {name!r}; available: {', '.join(classes)}")
    return classes[name]


def get_pass(name: str, **params: Any) -> CompressionPass:
    """An instance of pass ``name`` with validated parameters (``optimum_slm.compress`` runs it)."""
    return get_pass_class(name)(**params)


def list_passes() -> dict[str, str]:
    """Registered pass names with their one-line descriptions."""
    return {name: cls.description for name, cls in pass_classes().items()}


def register_plugin(plugin: object, name: str | None = None) -> None:
    """Register a plugin object (a module or instance with ``@hookimpl`` hooks) at run time."""
    load_plugins()
    pm.register(plugin, name)
    plugins_changed()


def unregister_plugin(plugin: object) -> None:
    pm.unregister(plugin)
    plugins_changed()
