"""Small file-system helpers shared by everything that writes: permissions that follow the user's umask."""

from __future__ import annotations

import os


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
