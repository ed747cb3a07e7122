"""A content-addressed cache of compression plans, so re-evaluating the same compressed model skips the search.

A plan is keyed by what determines it: the base model's fingerprint, the pass name, its validated parameters, the
sha256 of the calibration token ids (not the corpus path, so an edited corpus misses), the dtype the search ran in,
and the optimum-slm version (a new release may search differently). Entries are plain plan files ``<key>.json``;
an unreadable entry is treated as a miss and overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Mapping

from ._version import __version__
from .errors import PlanError
from .loading import cache_dir
from .plan import CompressionPlan, _jsonable

logger = logging.getLogger(__name__)


def plan_key(
    fingerprint: str,
    method: str,
    params: Mapping[str, Any],
    calibration_sha256: str | None,
    dtype: str | None = None,
) -> str:
    """The cache key (hex sha256) of a plan computed by ``method`` with ``params`` on a base and calibration."""
    core = {
        "fingerprint": fingerprint,
        "method": method,
        "params": _jsonable(dict(params)),
        "calibration": calibration_sha256,
        "dtype": dtype,
        "optimum_slm": __version__,
    }
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


class PlanCache:
    """Plans on disk under ``directory`` (default: the ``plans`` folder of the optimum-slm user cache)."""

    def __init__(self, directory: str | os.PathLike | None = None):
        if directory is None:
            self.directory = cache_dir("plans")
        else:
            self.directory = os.path.abspath(os.fspath(directory))
            os.makedirs(self.directory, exist_ok=True)

    def path(self, key: str) -> str:
        """Where the plan for ``key`` lives (whether or not it exists)."""
        return os.path.join(self.directory, f"{key}.json")

    def get(self, key: str) -> CompressionPlan | None:
        """The cached plan for ``key``, or None on a miss or an unreadable entry."""
        path = self.path(key)
        if not os.path.exists(path):
            return None
        try:
            return CompressionPlan.load(path)
        except PlanError as exc:
            logger.warning("ignoring unreadable cached plan %s: %s", path, exc)
            return None

    def put(self, key: str, plan: CompressionPlan) -> str:
        """Store ``plan`` under ``key`` (atomic write); returns its path."""
        path = self.path(key)
        plan.save(path)
        return path
