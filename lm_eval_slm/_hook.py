"""Start-up hook run by ``optimum_slm_lm_eval.pth``: makes ``lm_eval --model slm`` work with lm-eval 0.4.13.

lm-eval fills its model registry by importing ``lm_eval.models`` the first time a model is looked up, and only when
the registry is empty. Registering ``slm`` at interpreter start would make the registry non-empty and hide every
built-in model, so this hook waits: a one-shot ``sys.meta_path`` finder lets ``lm_eval.models`` execute and then
adds ``slm`` as a lazy placeholder (the class is imported only when ``slm`` is requested). At start-up the hook costs
one small module: neither lm-eval nor torch is imported. ``OPTIMUM_SLM_NO_LM_EVAL_HOOK=1`` disables it.
"""

from __future__ import annotations

import os
import sys

MODEL_NAME = "slm"
TARGET = "lm_eval_slm.model:SLMLM"
WATCHED = "lm_eval.models"
OPT_OUT = "OPTIMUM_SLM_NO_LM_EVAL_HOOK"


def register() -> None:
    """Add ``slm`` to lm-eval's model registry as a lazy placeholder (no-op when it is already there)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=TARGET)


def _register_quietly() -> None:
    try:
        register()
    except Exception as exc:  # a hook must never break lm-eval's own models
        print(f"optimum-slm: could not register the lm-eval model 'slm': {exc}", file=sys.stderr)


class AfterModelsImport:
    """A one-shot meta-path finder: runs ``register`` right after ``lm_eval.models`` has executed."""

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != WATCHED:
            return None
        self.uninstall()
        for finder in sys.meta_path:  # the finder that would have found it without us
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:
            return spec

        def exec_then_register(module):
            exec_module(module)
            _register_quietly()

        loader.exec_module = exec_then_register  # this loader instance serves this one module only
        return spec

    def uninstall(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def install() -> None:
    """Register now if lm-eval's models are loaded, else arm the finder; honours ``OPTIMUM_SLM_NO_LM_EVAL_HOOK``."""
    if os.environ.get(OPT_OUT, "").strip().lower() not in ("", "0", "false", "no"):
        return
    if WATCHED in sys.modules:
        _register_quietly()
    elif not any(isinstance(f, AfterModelsImport) for f in sys.meta_path):
        sys.meta_path.insert(0, AfterModelsImport())


install()
