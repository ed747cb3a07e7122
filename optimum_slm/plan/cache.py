"""A content-addressed cache of compression plans, shared by every front door (CLI, Python API, lm-eval).

A plan is keyed by what determines it: the base model's fingerprint, each stage's pass and requested parameters,
the sha256 of the calibration token ids (not the corpus path, so an edited corpus misses), the dtype the search ran
in, and the optimum-slm version (a new release may search differently). Entries are plan files ``<key>.json`` (with
``<key>.safetensors`` when the plan has tensors) and ``<key>.sha256``: the digest of the JSON as written, and a
second line binding that digest to the key (``entry_binding``). An entry is used only when its digest matches, it
loads cleanly, its content answers the request (base fingerprint, methods and parameters, calibration hashes), the
key re-derived from its content is the key it is stored under (both checked by the pipeline) AND it is bound to that
key (``PlanCache.check_binding``); anything else is a miss, recomputed and overwritten, with a warning. These checks
catch edited, truncated, moved and stale entries; they are not a signature (whoever can write the cache folder can
write a consistent entry), so the folder is trusted like the code that reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Any, Mapping, Sequence

from .._version import __version__
from ..errors import PlanError
from ..io.output import follow_umask
from ..loading import cache_dir
from .fingerprint import jsonable
from .schema import CompressionPlan

logger = logging.getLogger(__name__)


def plan_key(fingerprint: str, stages: Sequence[tuple[str, Mapping[str, Any]]], calibration_sha256: str | None,
             dtype: str | None = None) -> str:
    """The cache key (hex sha256) of a plan computed by ``stages`` [(method, params)] on a base and calibration."""
    core = {
        "fingerprint": fingerprint,
        "stages": [[method, jsonable(dict(params))] for method, params in stages],
        "calibration": calibration_sha256,
        "dtype": dtype,
        "optimum_slm": __version__,
    }
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


def entry_binding(key: str, digest: str) -> str:
    """The second line of an entry's ``.sha256`` file: its JSON digest bound to the key it is stored under."""
    return hashlib.sha256(f"optimum-slm plan cache entry\n{key}\n{digest}".encode()).hexdigest()


class PlanCache:
    """Plans on disk under ``directory`` (default: ``OPTIMUM_SLM_PLAN_CACHE``, else the ``plans`` folder of the
    optimum-slm user cache).

    ``read=False`` makes every lookup a miss while still storing new plans (``--no-cache``: recompute, refresh).
    """

    def __init__(self, directory: str | os.PathLike | None = None, read: bool = True):
        self.read = read
        if directory is None and os.environ.get("OPTIMUM_SLM_PLAN_CACHE"):
            directory = os.environ["OPTIMUM_SLM_PLAN_CACHE"]
        if directory is None:
            self.directory = cache_dir("plans")
        else:
            self.directory = os.path.abspath(os.fspath(directory))
            os.makedirs(self.directory, exist_ok=True)

    def path(self, key: str) -> str:
        """Where the plan for ``key`` lives (whether or not it exists)."""
        return os.path.join(self.directory, f"{key}.json")

    def get(self, key: str) -> CompressionPlan | None:
        """The cached plan for ``key``, or None on a miss, an edited or an unreadable entry."""
        path = self.path(key)
        if not self.read or not os.path.exists(path):
            return None
        try:
            with open(path, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
            recorded = self._record(key)[0]
        except OSError:
            recorded, digest = None, ""
        if recorded != digest:
            logger.warning("ignoring cached plan %s: it was changed after it was written (recomputing)", path)
            return None
        try:
            return CompressionPlan.load(path)
        except PlanError as exc:
            logger.warning("ignoring unreadable cached plan %s (recomputing): %s", path, exc)
            return None

    def check_binding(self, key: str) -> str | None:
        """Why the entry stored under ``key`` is not bound to that key (None when it is): its ``.sha256`` file's
        second line must be ``entry_binding(key, <digest of the JSON>)``."""
        try:
            lines = self._record(key)
            with open(self.path(key), "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
        except OSError as exc:
            return f"it cannot be read ({exc.strerror or exc})"
        if len(lines) < 2 or lines[1] != entry_binding(key, digest):
            return "it is not bound to the key it is stored under (moved, edited, or written by an older version)"
        return None

    def put(self, key: str, plan: CompressionPlan) -> str:
        """Store ``plan`` under ``key`` (atomic writes: the digest last, so a torn entry reads as a miss; temp files
        are private to the writer, so processes storing one key at once do not collide)."""
        path = self.path(key)
        plan.save(path)
        digest = hashlib.sha256(plan.to_json().encode("utf-8")).hexdigest()
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".sha256.tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(f"{digest}\n{entry_binding(key, digest)}\n")
            follow_umask(tmp)
            os.replace(tmp, self._digest_path(key))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    def _record(self, key: str) -> list[str]:
        """The lines of the entry's ``.sha256`` file (raises OSError when it is missing)."""
        with open(self._digest_path(key), encoding="utf-8") as fh:
            return [line.strip() for line in fh.read().splitlines()]

    def _digest_path(self, key: str) -> str:
        return os.path.join(self.directory, f"{key}.sha256")
