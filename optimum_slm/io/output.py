"""File-system helpers for everything that writes: output folders claimed before work and written atomically,
permissions that follow the user's umask."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator

from ..errors import SLMError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path: str) -> None:
    """Give ``path`` (and, for a folder, everything in it) the permissions an ordinary ``open``/``mkdir`` would:
    0666 / 0777 minus the umask. Temp files and folders (``mkstemp``, ``mkdtemp``) are created 0600 / 0700, and
    some writers keep that, so outputs would otherwise be unreadable to colleagues."""
    mask = _umask()
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


# ------------------------------------------------------------------------------------------------ output folders
logger = logging.getLogger(__name__)

#: output folders this process holds a claim on (claims nest: the CLI claims, then the compressor)
_held: dict[str, int] = {}


def check_output_dir(save_directory: str | os.PathLike, overwrite: bool = False) -> str:
    """Refuse a non-empty existing output folder unless ``overwrite``; returns the absolute path."""
    path = os.path.abspath(os.fspath(save_directory))
    if os.path.exists(path) and not os.path.isdir(path):
        raise SLMError(f"output path {path} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise SLMError(f"output directory {path} is not empty (use --overwrite / overwrite=True)")
    return path


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_path(target: str) -> str:
    return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.lock")


def _take_lock(target: str) -> str:
    lock = _lock_path(target)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(lock, encoding="utf-8") as fh:
                    pid = int(fh.read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid_alive(pid) and pid != os.getpid():
                raise SLMError(f"another run (pid {pid}) is writing {target}; wait for it or choose another --output"
                               ) from None
            logger.warning("removing the stale lock %s of a run that was killed", lock)
            os.unlink(lock)
            continue
        except OSError as exc:
            raise SLMError(f"cannot write in {os.path.dirname(target)}: {exc.strerror or exc}") from None
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(f"{os.getpid()}\n")
        return lock
    raise SLMError(f"cannot lock {target}")  # pragma: no cover - a race lost twice


def _remove_stale_temps(target: str) -> None:
    """Temp folders of earlier runs on ``target`` (we hold its lock, so their runs are gone)."""
    parent, name = os.path.dirname(target), os.path.basename(target)
    for entry in os.listdir(parent):
        if entry.startswith((f".{name}.tmp-", f"{name}.old-")):
            logger.warning("removing %s, left by a run that was killed", os.path.join(parent, entry))
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


@contextmanager
def claim_output(save_directory: str | os.PathLike, overwrite: bool = False,
                 need_bytes: int | None = None) -> Iterator[str]:
    """Claim an output folder for this run, before any work: refuse a non-empty one (unless ``overwrite``), a
    folder another live run is writing, a parent that cannot be written, and (``need_bytes``) a disk without room.

    The claim is a lock file ``.<name>.lock`` beside the folder, created exclusively and removed at the end; the
    lock and temp folders of killed runs are cleaned up. Yields the absolute path.
    """
    target = check_output_dir(save_directory, overwrite)
    if _held.get(target):
        _held[target] += 1
        try:
            yield target
        finally:
            _held[target] -= 1
        return
    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise SLMError(f"cannot create {parent}: {exc.strerror or exc}") from None
    lock = _take_lock(target)
    _held[target] = 1
    try:
        _remove_stale_temps(target)
        if need_bytes:
            free = shutil.disk_usage(parent).free
            if free < need_bytes:
                raise SLMError(f"not enough room for the output in {parent}: about {need_bytes / 1e6:,.0f} MB needed, "
                               f"{free / 1e6:,.0f} MB free")
        yield target
    finally:
        _held.pop(target, None)
        try:
            os.unlink(lock)
        except OSError:
            pass


class AtomicDir:
    """A temp folder beside ``target`` that replaces ``target`` on success and vanishes on failure.

    Without ``overwrite``, a ``target`` that became non-empty meanwhile is refused rather than replaced.
    """

    def __init__(self, target: str, overwrite: bool = True):
        self.target = target
        self.overwrite = overwrite

    def __enter__(self) -> str:
        parent = os.path.dirname(self.target) or "."
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.target)}.tmp-", dir=parent)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        try:
            check_output_dir(self.target, self.overwrite)
        except SLMError:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        follow_umask(self.tmp)  # mkdtemp made it 0700, and some writers leave files 0600
        old = None
        if os.path.exists(self.target):
            old = os.path.join(os.path.dirname(self.target), os.path.basename(self.target) + ".old-"
                               + os.path.basename(self.tmp))
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False
