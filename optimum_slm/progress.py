"""Progress bars for long steps; ``set_quiet(True)`` (the CLI's ``--quiet``) or ``OPTIMUM_SLM_QUIET=1`` hides them."""

from __future__ import annotations

import os
from typing import Any

from tqdm.auto import tqdm

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    return _quiet or bool(os.environ.get("OPTIMUM_SLM_QUIET"))


def progress_bar(**kwargs: Any) -> tqdm:
    """A tqdm bar on stderr that respects the quiet setting (give ``total`` so it shows an ETA)."""
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(disable=is_quiet(), **kwargs)


def advance_to(bar: tqdm | None, done: int) -> None:
    """Move ``bar`` to ``done`` steps (searches whose position, not a count of calls, measures progress)."""
    if bar is not None and done > bar.n:
        bar.update(done - bar.n)
