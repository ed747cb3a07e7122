"""The pass registry: ``get_pass(name, **params)`` and ``list_passes()`` over every registered plugin."""

from __future__ import annotations

from typing import Any

from .errors import PassError
from .passes.base import CompressionPass
from .plugins import load_plugins, pm


def _collect() -> dict[str, type[CompressionPass]]:
    load_plugins()
    found: dict[str, type[CompressionPass]] = {}

    def register(pass_cls: type[CompressionPass]) -> None:
        if not (isinstance(pass_cls, type) and issubclass(pass_cls, CompressionPass)) or not pass_cls.name:
            raise PassError(f"register() takes a named CompressionPass subclass, got {pass_cls!r}")
        if pass_cls.name in found and found[pass_cls.name] is not pass_cls:
            raise PassError(f"two plugins register a pass named {pass_cls.name!r}")
        found[pass_cls.name] = pass_cls

    pm.hook.register_passes(register=register)
    return found


def pass_classes() -> dict[str, type[CompressionPass]]:
    """Every registered pass class by name (sorted)."""
    return dict(sorted(_collect().items()))


def get_pass_class(name: str) -> type[CompressionPass]:
    classes = pass_classes()
    if name not in classes:
        raise PassError(f"unknown pass {name!r}; available: {', '.join(classes)}")
    return classes[name]


def get_pass(name: str, **params: Any) -> CompressionPass:
    """An instance of pass ``name`` with validated parameters; ``.plan(model, calibration)`` makes a plan."""
    return get_pass_class(name)(**params)


def list_passes() -> dict[str, str]:
    """Registered pass names with their one-line descriptions."""
    return {name: cls.description for name, cls in pass_classes().items()}


def register_plugin(plugin: object, name: str | None = None) -> None:
    """Register a plugin object (a module or instance with ``@hookimpl register_passes``) at run time."""
    load_plugins()
    pm.register(plugin, name)


def unregister_plugin(plugin: object) -> None:
    pm.unregister(plugin)
