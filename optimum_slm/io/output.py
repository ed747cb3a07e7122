"""File-system helpers for everything that writes: output folders claimed before work and written atomically,
permissions that follow the user's umask."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from ..errors import SLMError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: the lock records its run, without flock
    fcntl = None  # type: ignore[assignment]


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

#: output folders this process holds a claim on (claims nest: the CLI claims, then the compressor); the claim is an
#: ``flock`` on the output's lock file, which the kernel drops when the process dies, however it dies
_held: dict[str, int] = {}

#: the file inside every temp folder this project makes (beside an output, under TMPDIR); it holds the owning run's
#: token. Clean-up removes only folders that carry it (or are empty) and whose owner is gone.
TEMP_MARKER = ".slm-temp"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start_time(pid: int) -> int:
    """When process ``pid`` started (``/proc/<pid>/stat`` field 22, clock ticks since boot); 0 where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def run_token(pid: int | None = None) -> str:
    """``<pid>-<start time>``: names a run so that a later process that reuses its pid is not taken for it."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}-{_start_time(pid)}"


def _parse_token(text: str) -> tuple[int, int] | None:
    parts = text.strip().split("-")
    if not parts or not parts[0].isdigit():
        return None
    start = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    return int(parts[0]), start


def owner_alive(token: str) -> bool:
    """Whether the run ``token`` names (``run_token``; a bare pid too) is still running. Unparsable: alive."""
    parsed = _parse_token(token)
    if parsed is None:
        return True
    pid, start = parsed
    if not pid_alive(pid):
        return False
    if start:
        now = _start_time(pid)
        return not now or now == start  # another start time: the pid was reused by a later process
    return True


def make_marked_dir(prefix: str, parent: str, register: Callable[[str], Any] | None = None) -> str:
    """A new folder ``<prefix><run token>-<random>`` (mode 0700) in ``parent`` holding the marker ``.slm-temp``: the
    mark by which a later run recognises (and removes, once this run is gone) a folder this project made.

    ``register(path)`` is called before the folder is made: the owner's clean-up is in place before there is
    anything to clean, so a stop signal at any point leaves nothing."""
    token = run_token()
    for _ in range(100):
        path = os.path.join(parent, f"{prefix}{token}-{secrets.token_hex(4)}")
        if os.path.lexists(path):
            continue
        try:
            if register is not None:
                register(path)
            os.mkdir(path, 0o700)
            with open(os.path.join(path, TEMP_MARKER), "w", encoding="utf-8") as fh:
                fh.write(f"{token} {socket.gethostname()}\n")
            return path
        except FileExistsError:  # taken between the look and the mkdir: draw another name
            continue
        except BaseException:  # a full disk, a stop signal: leave nothing
            shutil.rmtree(path, ignore_errors=True)
            raise
    raise FileExistsError(f"no free temp folder name in {parent}")  # pragma: no cover


def remove_marked_dir(path: str) -> None:
    """Remove a folder ``make_marked_dir`` made, its marker last: a removal cut short (a kill) leaves the folder
    still marked, or empty, for a later run to finish."""
    try:
        entries = os.listdir(path)
    except OSError:
        return
    for entry in entries:
        if entry == TEMP_MARKER:
            continue
        item = os.path.join(path, entry)
        if os.path.isdir(item) and not os.path.islink(item):
            shutil.rmtree(item, ignore_errors=True)
        else:
            try:
                os.unlink(item)
            except OSError:
                pass
    for remove, item in ((os.unlink, os.path.join(path, TEMP_MARKER)), (os.rmdir, path)):
        try:
            remove(item)
        except OSError:
            pass


def remove_dead_marked(parent: str, prefixes: tuple[str, ...], what: str) -> None:
    """Remove the folders in ``parent`` named ``<prefix><token>-...`` that this project made (they carry the marker;
    an empty one, or one holding only an empty marker, may have been killed before writing it) and whose run is
    gone. Nothing else is touched."""
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in entries:
        prefix = next((p for p in prefixes if entry.startswith(p)), None)
        path = os.path.join(parent, entry)
        if prefix is None or os.path.islink(path) or not os.path.isdir(path):
            continue
        marker = os.path.join(path, TEMP_MARKER)
        try:
            with open(marker, encoding="utf-8", errors="replace") as fh:
                token, _, host = fh.read().strip().partition(" ")
        except OSError:
            token, host = None, ""
        if token is None or _parse_token(token) is None:
            # no marker, or one a kill cut short between creating and writing it: only a folder named like ours, of
            # a dead run, holding nothing else, is removed
            named = entry[len(prefix):].split("-")  # <pid>-<start>-<random>
            if len(named) != 3 or not (named[0].isdigit() and named[1].isdigit()) or owner_alive(
                    f"{named[0]}-{named[1]}"):
                continue
            try:
                if token is not None and os.listdir(path) == [TEMP_MARKER]:
                    os.unlink(marker)
                os.rmdir(path)  # fails unless empty: never deletes anything the run did not make
            except OSError:
                pass
            continue
        if (host and host != socket.gethostname()) or owner_alive(token):
            continue  # a live run's, or one of another machine (its processes cannot be seen from here)
        logger.warning("removing %s, left by a %s that was killed", path, what)
        remove_marked_dir(path)


def local_paths(*candidates: Any) -> list[str]:
    """The candidates that name something on this machine (model folders, files): what an output must not replace
    or contain. Hub ids, corpus names and None are dropped."""
    found = []
    for c in candidates:
        if isinstance(c, (str, os.PathLike)) and os.fspath(c) and os.path.exists(os.fspath(c)):
            found.append(os.path.abspath(os.fspath(c)))
    return found


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or below it (both real, absolute)."""
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:
        return False


def _refuse_place(path: str, protect: Sequence[str]) -> None:
    real = os.path.realpath(path)
    hint = "name a new folder for the output"
    if os.path.dirname(real) == real:
        raise SLMError(f"output {path} is the filesystem root: {hint}")
    try:
        cwd = os.getcwd()
    except OSError:  # the current directory was removed
        cwd = None
    for place, what in ((cwd, "the current directory"), (os.path.expanduser("~"), "your home directory")):
        if not place or not os.path.isabs(place):
            continue
        place = os.path.realpath(place)
        if real == place:
            raise SLMError(f"output {path} is {what}: {hint}")
        if _inside(place, real):
            raise SLMError(f"output {path} contains {what} ({place}): {hint}")
    for p in protect:
        p_real = os.path.realpath(p)
        if real == p_real:
            raise SLMError(f"output {path} is this run's input: {hint}")
        if _inside(p_real, real):
            raise SLMError(f"output {path} contains this run's input {p}: {hint}")
        if _inside(real, p_real):
            raise SLMError(f"output {path} is inside this run's input {p}: {hint}")


def check_output_dir(save_directory: str | os.PathLike, overwrite: bool = False, protect: Sequence[str] = ()) -> str:
    """Refuse an output that cannot be one: an empty path (an unset variable), the filesystem root, the current or
    home directory (or a folder holding them), one of ``protect`` (the run's inputs: the model, the calibration
    file), a folder holding one or inside one; and a non-empty existing folder unless ``overwrite``. Returns the
    absolute path."""
    if not os.fspath(save_directory).strip():
        raise SLMError("the output path is empty (an unset variable?): name a folder for the output")
    path = os.path.abspath(os.fspath(save_directory))
    _refuse_place(path, protect)
    if os.path.exists(path) and not os.path.isdir(path):
        raise SLMError(f"output path {path} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise SLMError(f"output directory {path} is not empty (use --overwrite / overwrite=True)")
    return path


def _lock_path(target: str) -> str:
    return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.lock")


def _busy(target: str, lock: str) -> SLMError:
    try:
        with open(lock, encoding="utf-8") as fh:
            owner = fh.read().strip()
    except OSError:
        owner = ""
    pid = owner.split("-")[0] if owner else ""
    who = f" (pid {pid})" if pid.isdigit() else ""
    return SLMError(f"another run{who} is writing {target}; wait for it or choose another --output")


def _take_lock(target: str) -> int:
    """Lock ``target`` for this run: ``flock`` on ``.<name>.lock``, held until ``_release``. Two runs starting
    together cannot both take it, and a lock whose run died (the kernel dropped its ``flock``) is taken over. A lock
    file held without ``flock`` (an older version) counts while the run it names is alive."""
    lock = _lock_path(target)
    for _ in range(100):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as exc:
            raise SLMError(f"cannot write in {os.path.dirname(target)}: {exc.strerror or exc}") from None
        locked = False
        try:
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    locked = True
            except BlockingIOError:
                raise _busy(target, lock) from None
            except OSError:  # a file system without flock: the run recorded below still guards
                pass
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except OSError:
                same = False
            if not same:  # its holder finished and removed it after we opened it: lock the new one
                os.close(fd)
                continue
            with open(lock, encoding="utf-8", errors="replace") as fh:
                owner = fh.read().strip()
            # a lock file written by an older version (a bare pid) is not held with flock: its run counts while
            # alive; a current one is (we hold its flock now, so its run is gone)
            legacy = not locked or "-" not in owner
            if owner and legacy and owner.split("-")[0] != str(os.getpid()) and owner_alive(owner):
                locked = False  # not ours to remove
                raise _busy(target, lock)
            if owner:
                logger.warning("taking over the lock %s of a run that was killed", lock)
            os.ftruncate(fd, 0)
            os.write(fd, f"{run_token()}\n".encode())
            return fd
        except BaseException:  # refused, or stopped mid-way: close it, and remove it when it was ours
            if locked:
                _release(target, fd)
            else:
                os.close(fd)
            raise
    raise SLMError(f"cannot lock {target}")  # pragma: no cover - the lock file replaced a hundred times


def _release(target: str, fd: int) -> None:
    try:
        os.unlink(_lock_path(target))  # while still holding it: a waiting run then locks a fresh file
    except OSError:
        pass
    os.close(fd)


def _remove_stale_temps(target: str) -> None:
    """Temp folders of earlier runs on ``target`` whose run is gone (only ours: named and marked by this project)."""
    remove_dead_marked(os.path.dirname(target), (f".{os.path.basename(target)}.tmp-",), "run")


@contextmanager
def claim_output(save_directory: str | os.PathLike, overwrite: bool = False, need_bytes: int | None = None,
                 protect: Sequence[str] = ()) -> Iterator[str]:
    """Claim an output folder for this run, before any work: refuse what ``check_output_dir`` refuses (with
    ``protect``, the run's inputs), a folder another live run is writing, a parent that cannot be written, and
    (``need_bytes``) a disk without room.

    The claim is a lock on ``.<name>.lock`` beside the folder, held for the run and removed at the end; the temp
    folders of killed runs on it are cleaned up. Yields the absolute path.
    """
    target = check_output_dir(save_directory, overwrite, protect)
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
    fd = _take_lock(target)
    try:
        _held[target] = 1
        _remove_stale_temps(target)
        if need_bytes:
            free = shutil.disk_usage(parent).free
            if free < need_bytes:
                raise SLMError(f"not enough room for the output in {parent}: about {need_bytes / 1e6:,.0f} MB needed, "
                               f"{free / 1e6:,.0f} MB free")
        yield target
    finally:
        _held.pop(target, None)
        _release(target, fd)


class AtomicDir:
    """A temp folder beside ``target`` that replaces ``target`` on success and vanishes on failure.

    Everything it makes lives in one marked folder ``.<name>.tmp-<run token>-<random>`` beside ``target``: the new
    content (``new/``, what ``__enter__`` returns) and, while it is replaced, the old ``target`` (``old/``). A killed
    run leaves only that folder, which the next run on ``target`` removes. Without ``overwrite``, a ``target`` that
    became non-empty meanwhile is refused rather than replaced.
    """

    def __init__(self, target: str, overwrite: bool = True):
        self.target = target
        self.overwrite = overwrite

    def __enter__(self) -> str:
        parent = os.path.dirname(self.target) or "."
        os.makedirs(parent, exist_ok=True)
        self.box = None
        try:
            make_marked_dir(f".{os.path.basename(self.target)}.tmp-", parent,
                            register=lambda path: setattr(self, "box", path))
            self.tmp = os.path.join(self.box, "new")
            os.mkdir(self.tmp)
        except BaseException:  # a stop signal, a full disk: leave nothing
            if self.box is not None:
                remove_marked_dir(self.box)
            raise
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            remove_marked_dir(self.box)
            return False
        old, moved = os.path.join(self.box, "old"), False
        try:
            check_output_dir(self.target, self.overwrite)
            follow_umask(self.tmp)  # mkdtemp made it 0700, and some writers leave files 0600
            if os.path.lexists(self.target):
                os.replace(self.target, old)
                moved = True
            os.replace(self.tmp, self.target)
        except BaseException:
            if moved and not os.path.lexists(self.target):
                try:
                    os.replace(old, self.target)  # the new content could not take its place: the old one goes back
                except OSError:
                    raise  # the old content stays in the temp folder rather than being removed
            remove_marked_dir(self.box)
            raise
        remove_marked_dir(self.box)
        return False
