"""The command line: the ``slm`` click group (also served as ``optimum-cli slm``). ``commands`` compresses, applies,
lists and inspects; ``analysis`` adds ``analyze`` and ``bench``; ``heal`` adds ``heal``; ``common`` holds what they
share (the group's one-line errors, the model and memory options)."""

from .analysis import register_commands as _register_analysis
from .commands import cli, main
from .common import SLMGroup, SLMUsageError
from .export import register_commands as _register_export
from .heal import register_commands as _register_heal

_register_analysis(cli)
_register_heal(cli)
_register_export(cli)

__all__ = ["SLMGroup", "SLMUsageError", "cli", "main"]
