"""Digests of files: the sha256 of a file streamed, values remembered by the identity of the files they were computed
from (``remembered``), and the manifest of a checkpoint folder (``write_folder_manifest`` / ``check_folder_manifest``).

A remembered value is a shortcut, never the authority: it is used only when every file it was computed from has the
same path, size, ``mtime_ns``, inode and ``ctime_ns`` as then (``ctime`` cannot be set back by a user, so a file
rewritten and touched back to its old ``mtime`` still misses); anything else is computed again in full from the
files. A value is not remembered while a file was changed (mtime or ctime) less than ``_SETTLE_S`` seconds ago, so
a file rewritten in place within one timestamp tick, keeping its size, cannot reuse a value computed before the
rewrite. Records are JSON files
in a folder the caller names (the optimum-slm user cache); deleting them only costs a recomputation.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from typing import Any, Callable, Sequence

#: the manifest written into a checkpoint folder made by optimum-slm for its own reuse: sha256 of every other file
FOLDER_MANIFEST = "slm_weights.sha256.json"
#: bytes read at a time when hashing a file
_CHUNK = 8 << 20
#: a file modified less than this many seconds ago is hashed but its digest is not remembered
_SETTLE_S = 2.0


def file_identity(path: str) -> list[int]:
    """What identifies a file's content without reading it: size, mtime_ns, inode, ctime_ns."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def sha256_file(path: str) -> str:
    """The sha256 of a file's bytes, read in chunks (never the whole file in memory)."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def _identities(paths: Sequence[str]) -> dict[str, list[int]]:
    return {os.path.abspath(p): file_identity(p) for p in paths}


def remembered(folder: str | None, what: str, paths: Sequence[str], compute: Callable[[], Any]) -> Any:
    """``compute()``, or the value it returned before for the same ``what`` over the same files (see the module
    docstring for when a remembered value is trusted). ``folder`` None: always compute. ``compute``'s value must be
    JSON-serialisable."""
    if folder is None:
        return compute()
    before = _identities(paths)
    record = os.path.join(folder, hashlib.sha256(json.dumps([what, sorted(before)]).encode()).hexdigest()[:40]
                          + ".json")
    try:
        with open(record, encoding="utf-8") as fh:
            data = json.load(fh)
        if isinstance(data, dict) and data.get("what") == what and data.get("files") == before and "value" in data:
            return data["value"]
    except (OSError, ValueError):
        pass
    value = compute()
    try:
        after = _identities(paths)
        settled = all(time.time() - max(ident[1], ident[3]) / 1e9 > _SETTLE_S for ident in after.values())
        if after == before and settled:  # unchanged while it was computed, and not just written
            fd, tmp = tempfile.mkstemp(prefix=".memo.", dir=folder)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"what": what, "files": before, "value": value}, fh)
            os.replace(tmp, record)
    except OSError:  # a read-only cache only costs the shortcut
        pass
    return value


def file_sha256(path: str, memo: str | None = None) -> str:
    """``sha256_file(path)``, remembered in ``memo`` (a folder) by the file's identity."""
    return remembered(memo, "sha256", [path], lambda: sha256_file(path))


def _folder_files(folder: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != FOLDER_MANIFEST:
                out.append(rel)
    return out


def write_folder_manifest(folder: str, memo: str | None = None) -> str:
    """Write ``FOLDER_MANIFEST`` into ``folder``: the sha256 of every other file in it (weights, config, tokenizer,
    plan), atomically; returns its path."""
    digests = {rel: file_sha256(os.path.join(folder, rel), memo) for rel in _folder_files(folder)}
    path = os.path.join(folder, FOLDER_MANIFEST)
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"sha256": digests}, fh, indent=1, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)
    return path


def check_folder_manifest(folder: str, memo: str | None = None) -> str | None:
    """Why ``folder`` does not match the manifest written with it (None when every file is there, unchanged, and no
    other file was added)."""
    try:
        with open(os.path.join(folder, FOLDER_MANIFEST), encoding="utf-8") as fh:
            digests = json.load(fh).get("sha256")
    except (OSError, ValueError, AttributeError):
        return f"it has no readable {FOLDER_MANIFEST}"
    if not isinstance(digests, dict) or not digests:
        return f"its {FOLDER_MANIFEST} lists no files"
    present = _folder_files(folder)
    extra = sorted(set(present) - set(digests))
    if extra:
        return f"{extra[0]} is not in its manifest"
    for rel, want in sorted(digests.items()):
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        if file_sha256(path, memo) != want:
            return f"{rel} was changed after it was written"
    return None
