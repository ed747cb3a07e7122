"""A content-addressed cache of compression plans, shared by every front door (CLI, Python API, lm-eval).

A plan is keyed by what determines it: the base model's fingerprint, each stage's pass and requested parameters,
the sha256 of the calibration token ids (not the corpus path, so an edited corpus misses), the dtype the search ran
in, and the optimum-slm version (a new release may search differently). Entries are plan files ``<key>.json`` (with
``<key>.safetensors`` when the plan has tensors) and ``<key>.sha256``, the digest of the JSON as written. An entry is
used only when its digest matches, it loads cleanly AND its content agrees with the key (base fingerprint, methods
and parameters, calibration hash; checked by the pipeline); anything else is a miss, recomputed and overwritten,
with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Mapping, Sequence

from .._version import __version__
from ..errors import PlanError
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
            with open(self._digest_path(key), encoding="utf-8") as fh:
                recorded = fh.read().strip()
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

    def put(self, key: str, plan: CompressionPlan) -> str:
        """Store ``plan`` under ``key`` (atomic writes: the digest last, so a torn entry reads as a miss)."""
        path = self.path(key)
        plan.save(path)
        tmp = self._digest_path(key) + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(hashlib.sha256(plan.to_json().encode("utf-8")).hexdigest() + "\n")
        os.replace(tmp, self._digest_path(key))
        return path

    def _digest_path(self, key: str) -> str:
        return os.path.join(self.directory, f"{key}.sha256")
