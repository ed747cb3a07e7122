"""``python -m lm_eval_slm ...``: lm-eval's command line with the ``slm`` model registered; same flags as lm_eval.

The fallback when the start-up hook does not run: ``OPTIMUM_SLM_NO_LM_EVAL_HOOK=1``, ``python -S``, or the package
reached through ``PYTHONPATH`` instead of being installed (``.pth`` files are read only from site directories).
"""

from __future__ import annotations


def main() -> None:
    """Register ``slm`` (importing the model loads lm-eval's own models first), then run lm-eval's CLI."""
    import os

    import lm_eval_slm.model  # registers "slm"
    from lm_eval.__main__ import cli_evaluate

    os.environ[lm_eval_slm.model.CLI_FLAG] = "1"  # bad model_args end with one line, not a traceback
    cli_evaluate()


if __name__ == "__main__":
    main()
