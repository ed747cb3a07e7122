"""What every ``slm`` command shares: the click group that turns failures into one line and an exit code, the
model, memory and quiet options, and small formatting helpers. Cheap to import (click only)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import click

from ..errors import SLMError

#: the model dtypes and devices the loaders accept
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
DEVICE_CHOICES = ("cpu", "cuda", "auto")


class SLMUsageError(click.ClickException):
    """An ``SLMError`` shown the CLI way: ``error: <message>`` on stderr, exit code 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


#: exit codes: bad input (the user can fix it), a failure (the machine or a bug), an interrupt
EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130
_debug = False

#: the signals a run is stopped with (``timeout``, Slurm, Docker, a closed terminal) and handled like Ctrl-C
STOP_SIGNALS = ("SIGTERM", "SIGHUP")


class Terminated(BaseException):
    """Raised in the main thread by a stop signal, so that every ``with``/``finally`` runs (temp folders removed,
    the output's lock released) before the CLI prints one line and exits 128 + the signal's number. A
    ``BaseException``, like ``KeyboardInterrupt``: no ``except Exception`` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _install_stop_handlers() -> dict[int, Any]:
    """Make SIGTERM/SIGHUP raise ``Terminated`` (once: a second signal during the clean-up is ignored); returns the
    handlers replaced. Only in the main thread, and only for signals left at their default (``nohup`` keeps)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    stopping = []

    def stop(signum: int, frame: Any) -> None:
        if not stopping:
            stopping.append(signum)
            raise Terminated(signum)

    replaced = {}
    for name in STOP_SIGNALS:
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) is signal.SIG_DFL:
            replaced[signum] = signal.signal(signum, stop)
    return replaced


def one_line(text: Any) -> str:
    """``text`` on one line: a multi-line message would read as a traceback."""
    return " ".join(str(text).split())


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {one_line(message)}", err=True)
    sys.exit(code)


class SLMGroup(click.Group):
    """A click group whose every failure is one ``error: ...`` line on stderr and an exit code, never a traceback.

    Bad input (an ``SLMError``, a usage error) exits 2; a failure of the machine (disk full, read-only folder) or an
    unexpected error exits 1, the latter with a hint to rerun with ``--debug``, which shows the traceback.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SLMError as exc:
            raise SLMUsageError(one_line(exc)) from None

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        replaced = _install_stop_handlers()
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except Terminated as exc:
            _fail(f"terminated ({signal.Signals(exc.signum).name})", 128 + exc.signum)
        except click.exceptions.Abort:
            _fail("interrupted", EXIT_INTERRUPTED)
        except KeyboardInterrupt:
            _fail("interrupted", EXIT_INTERRUPTED)
        except click.ClickException as exc:
            where = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) is not None else ""
            _fail(exc.format_message() + (where if isinstance(exc, click.UsageError) else ""),
                  EXIT_BAD_INPUT if isinstance(exc, (click.UsageError, SLMUsageError)) else exc.exit_code)
        except SLMError as exc:
            _fail(str(exc), EXIT_BAD_INPUT)
        except OSError as exc:
            if _debug:
                raise
            target = f": {exc.filename}" if getattr(exc, "filename", None) else ""
            _fail(f"{exc.strerror or exc}{target}", EXIT_FAILURE)
        except Exception as exc:  # noqa: BLE001 - the last line of defence of a command line
            if _debug:
                raise
            _fail(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug to see the traceback)", EXIT_FAILURE)
        finally:
            for signum, handler in replaced.items():
                signal.signal(signum, handler)
        sys.exit(result if isinstance(result, int) else 0)


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    global _debug
    _debug = bool(value) or bool(os.environ.get("OPTIMUM_SLM_DEBUG"))


def _set_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value:
        return
    from ..progress import set_quiet

    set_quiet(True)
    # transformers' own bars (weight loading) too; before its import the hub's switch is read from the environment
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    else:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def quiet_option(func):
    """``--quiet``: hide progress bars (accepted by the group and by every command)."""
    return click.option(
        "--quiet",
        "-q",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_set_quiet,
        help="Hide progress bars.",
    )(func)


def model_options(func=None, *, what: str = "Base model"):
    """The options that choose and load a model (shared by ``compress``, ``apply`` and ``heal``; ``what`` names the
    model in ``--model``'s help)."""
    if func is None:
        return lambda f: model_options(f, what=what)
    decorators = [
        click.option("--model", required=True, metavar="PATH_OR_ID",
                     help=f"{what}: checkpoint folder, hub id (offline cache), .gguf file or alias "
                          "(smollm2-135m, qwen2.5-coder-1.5b)."),
        click.option("--gguf-file", default=None, metavar="FILE",
                     help="GGUF file inside --model (a folder) to load and convert."),
        click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None,
                     help="Load the base in this dtype (default: the checkpoint's)."),
        click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto", show_default=True,
                     help="Where to run the model."),
        click.option("--allow-download", is_flag=True,
                     help="Let a hub id that is not in the local Hub cache be downloaded (off: offline first)."),
        click.option("--allow-pickle", is_flag=True,
                     help="Accept a pickle-only checkpoint (pytorch_model.bin). UNSAFE: a pickle can run code."),
    ]
    for decorate in reversed(decorators):
        func = decorate(func)
    return func


def parse_size(text: str) -> int:
    """``--max-memory``'s value in bytes (``2GiB``, ``500MB``, ``1.5GB``, ``4096``); a usage error otherwise."""
    from ..engine.budget import parse_size as parse

    try:
        return parse(text)
    except SLMError as exc:
        raise click.BadParameter(str(exc), param_hint="'--max-memory'") from None


def memory_option(func):
    """``--max-memory``: the budget that chooses the in-memory or the sequential (streaming) engine."""
    return click.option("--max-memory", default=None, metavar="SIZE",
                        help="Memory budget (e.g. 2GiB): a model whose weights exceed half of it is planned and "
                             "written with its layers streamed from the safetensors shards, one at a time "
                             "(default: stream when the weights exceed 70% of the available memory).")(func)


def folder_size(path: str) -> str:
    """The size of a file or folder, human-readable."""
    total = os.path.getsize(path) if os.path.isfile(path) else sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
    for unit in ("B", "KB", "MB", "GB"):
        if total < 1000 or unit == "GB":
            return f"{total:,.0f} {unit}" if unit == "B" else f"{total:,.1f} {unit}"
        total /= 1000
    return ""  # pragma: no cover


def duration(seconds: float) -> str:
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes}m{sec:02d}s" if minutes else f"{seconds:.1f}s"


