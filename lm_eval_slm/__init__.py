"""lm-eval integration of optimum-slm: the model ``slm`` builds a compressed model in memory and evaluates it.

    lm_eval --model slm --model_args base=smollm2-135m,ratio=0.2,calib=wiki-leads --tasks ... --device cpu

How ``slm`` becomes known to lm-eval (0.4.13 reads no entry points):

* the ``optimum_slm_lm_eval.pth`` start-up hook (installed with the package) registers it lazily, right after
  lm-eval registers its own models (``lm_eval_slm._hook``; opt out with ``OPTIMUM_SLM_NO_LM_EVAL_HOOK=1``);
* the ``lm_eval.models`` entry point, for lm-eval releases that read it;
* ``python -m lm_eval_slm ...``: lm-eval's CLI with the model imported first (same flags as ``lm_eval``).

This package's ``__init__`` imports nothing heavy: the start-up hook imports it in every interpreter.
"""

from __future__ import annotations

__all__ = ["SLMLM"]


def __getattr__(name: str) -> type:  # no typing import: this runs at every interpreter start
    if name == "SLMLM":
        from .model import SLMLM

        return SLMLM
    raise AttributeError(f"module 'lm_eval_slm' has no attribute {name!r}")
