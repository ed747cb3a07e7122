"""Registers ``optimum-cli slm ...``: the click group ``optimum_slm.cli:cli`` bridged to optimum-cli's argparse.

optimum-cli imports every file of the ``optimum.commands.register`` namespace at start-up and an exception here
would break every optimum-cli command, so this module imports only argparse, click and optimum's base classes, and
loads the click group inside a guard. Each click command becomes an argparse subcommand whose options are generated
from the click parameters (defined once); ``run`` rebuilds the argument list and hands it to click, which converts,
validates and runs exactly as the ``slm`` console script does. Commands added to the group later (for example by
``optimum_slm.cli.analysis``) appear here automatically.
"""

from __future__ import annotations

import argparse
import sys

import click
from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

GROUP_MODULE = "optimum_slm.cli"
#: where argparse keeps the group-level ``-q`` (apart from each command's own ``--quiet``)
GROUP_QUIET = "slm_group_quiet"
PROG = "optimum-cli slm"

#: why the click group could not be imported (shown when ``optimum-cli slm`` is run), None when it loaded
load_error: str | None = None


def _help(param: click.Option) -> str:
    text = param.help or ""
    default = param.default
    if param.show_default and isinstance(default, (str, int, float)) and not isinstance(default, bool):
        text = f"{text} (default: {default})"
    return text.replace("%", "%%")  # argparse formats help with %


def add_click_params(parser: argparse.ArgumentParser, command: click.Command) -> None:
    """Declare ``command``'s click parameters on ``parser``; defaults stay click's (argparse suppresses its own)."""
    for param in command.params:
        if isinstance(param, click.Argument):
            nargs = {-1: "+" if param.required else "*"}.get(param.nargs, None if param.required else "?")
            parser.add_argument(param.name, metavar=param.human_readable_name, nargs=nargs)
            continue
        if not isinstance(param, click.Option) or param.hidden:
            continue
        kwargs: dict = {"dest": param.name, "help": _help(param), "default": argparse.SUPPRESS}
        if param.count:
            parser.add_argument(*param.opts, action="count", **kwargs)
        elif param.is_flag and param.secondary_opts:
            parser.add_argument(*param.opts, action="store_const", const=True, **kwargs)
            parser.add_argument(*param.secondary_opts, action="store_const", const=False, dest=param.name,
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        elif param.is_flag:
            parser.add_argument(*param.opts, action="store_true", **kwargs)
        else:
            if param.multiple:
                kwargs["action"] = "append"
            if isinstance(param.type, click.Choice):
                kwargs["choices"] = [str(c) for c in param.type.choices]
            kwargs["metavar"] = param.metavar or (None if "choices" in kwargs else param.type.name.upper())
            kwargs["required"] = bool(param.required)
            parser.add_argument(*param.opts, **kwargs)


def one_line_errors(parser: argparse.ArgumentParser) -> None:
    """argparse's own errors (a bad choice, a missing value) as ``slm`` prints them: one line, exit code 2."""

    def error(message: str) -> None:
        print(f"error: {' '.join(message.split())} (see '{parser.prog} --help')", file=sys.stderr)
        raise SystemExit(2)

    parser.error = error  # type: ignore[method-assign]


def click_argv(command: click.Command, namespace: argparse.Namespace) -> list[str]:
    """The click argument list equivalent to what argparse parsed (only the options the user gave)."""
    given = vars(namespace)
    argv: list[str] = []
    positional: list[str] = []
    for param in command.params:
        if param.name not in given:
            continue
        value = given[param.name]
        if isinstance(param, click.Argument):
            if value is not None:
                positional.extend(str(v) for v in (value if isinstance(value, list) else [value]))
        elif param.count:
            argv.extend([param.opts[0]] * int(value))
        elif param.is_flag and param.secondary_opts:
            argv.append(param.opts[0] if value else param.secondary_opts[0])
        elif param.is_flag:
            if value:
                argv.append(param.opts[0])
        else:
            for item in value if param.multiple else [value]:
                argv.extend([param.opts[0], str(item)])
    return argv + (["--", *positional] if positional else [])


def bridged_command(group: click.Group, path: tuple[str, ...], command: click.Command) -> type:
    """An optimum-cli command class running ``group``'s command at ``path`` (nested groups recurse)."""

    class BridgedCommand(BaseOptimumCLICommand):
        SUBCOMMANDS = tuple(
            CommandInfo(name, help=sub.get_short_help_str(limit=80),
                        subcommand_class=bridged_command(group, path + (name,), sub))
            for name, sub in sorted(getattr(command, "commands", {}).items())
            if not sub.hidden
        )

        @staticmethod
        def parse_args(parser: argparse.ArgumentParser) -> None:
            parser.description = command.help
            add_click_params(parser, command)
            one_line_errors(parser)

        def run(self) -> None:
            if isinstance(command, click.Group):
                self.parser.print_help()
                return
            # through the group, so its error handling (one-line 'error: ...', exit 2) applies; the group's own
            # -q (``optimum-cli slm -q list``) is handed on as the group's option
            quiet = ["--quiet"] if vars(self.args).get(GROUP_QUIET) else []
            group.main(args=[*quiet, *path, *click_argv(command, self.args)], prog_name=PROG)

    BridgedCommand.__name__ = BridgedCommand.__qualname__ = f"SLM_{'_'.join(path)}_Command"
    return BridgedCommand


class SLMCommand(BaseOptimumCLICommand):
    """``optimum-cli slm``: one subcommand per command of the ``slm`` click group."""

    COMMAND = CommandInfo(name="slm", help="Depth compression of LLMs (Sliding-Window Merging, depth pruning).")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        """The group's own options, as ``slm`` has them: ``--quiet``/``-q`` before the command, ``--version``."""
        from optimum_slm._version import __version__  # a constant: importing it loads nothing else

        parser.add_argument("-q", "--quiet", dest=GROUP_QUIET, action="store_true", default=argparse.SUPPRESS,
                            help="Hide progress bars (also accepted after the command).")
        parser.add_argument("--version", action="version", version=f"optimum-slm, version {__version__}")

    def __init__(self, subparsers, args=None, command=None, from_defaults_factory=False, parser=None):
        global load_error
        if not from_defaults_factory:
            try:
                import importlib

                group = importlib.import_module(GROUP_MODULE).cli
                self.SUBCOMMANDS = tuple(
                    CommandInfo(name, help=cmd.get_short_help_str(limit=80),
                                subcommand_class=bridged_command(group, (name,), cmd))
                    for name, cmd in group.commands.items()
                    if not cmd.hidden
                )
            except Exception as exc:  # never break optimum-cli; say what is wrong when 'slm' is used
                load_error = f"{type(exc).__name__}: {exc}"
                self.SUBCOMMANDS = ()
        super().__init__(subparsers, args=args, command=command, from_defaults_factory=from_defaults_factory,
                         parser=parser)

    def run(self) -> None:
        if load_error:
            print(f"error: optimum-slm cannot be loaded ({load_error})", file=sys.stderr)
            raise SystemExit(2)
        self.parser.print_help()


REGISTER_COMMANDS = [SLMCommand]
