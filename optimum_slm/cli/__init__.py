"""The command line: the ``slm`` click group (also served as ``optimum-cli slm``). ``commands`` compresses, applies,
lists and inspects; ``analysis`` adds ``analyze`` and ``bench``."""

from .commands import SLMGroup, SLMUsageError, cli, main

__all__ = ["SLMGroup", "SLMUsageError", "cli", "main"]
