"""The compression-pass interface: typed parameters, validation, and ``run(engine) -> PassResult``.

A pass reads the engine it is given (the model, its calibration ids, recorded activations) and returns ops in the
engine's layer numbering, a trace and any fitted tensors. It never builds an engine, loads data, saves files or
fingerprints a model: ``optimum_slm.pipeline.compress`` does that, once, for every front door.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch

from ..errors import PassError


#: longest integer list a parameter may expand to (a range like 0-300000000 is refused before it is allocated)
_MAX_LIST = 100_000


def _parse_int_list(value: Any) -> list[int]:
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").strip("[]").split(",") if v]
        out: list[int] = []
        for v in value:
            if "-" in v[1:]:  # ranges like 3-5
                a, b = (int(x) for x in v.split("-", 1))
                if b - a > _MAX_LIST:
                    raise ValueError(f"range {v} is longer than {_MAX_LIST} values")
                out.extend(range(a, b + 1))
            else:
                out.append(int(v))
        return out
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise ValueError(f"expected a list of integers, got {value!r}")


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    raise ValueError(f"expected a boolean, got {value!r}")


def _parse_float(value: Any) -> float:
    parsed = float(value)
    if not math.isfinite(parsed):
        raise ValueError(f"expected a finite number, got {value!r}")
    return parsed


PARSERS: dict[str, Callable[[Any], Any]] = {
    "int": int,
    "float": _parse_float,
    "str": str,
    "bool": _parse_bool,
    "int_list": _parse_int_list,
}


@dataclass(frozen=True)
class PassParam:
    """One pass parameter: name, type (``int``, ``float``, ``str``, ``bool``, ``int_list``), default, help."""

    name: str
    type: str
    default: Any
    help: str
    choices: Sequence[str] | None = None

    def parse(self, value: Any) -> Any:
        if value is None:
            return None
        try:
            if self.type == "int" and isinstance(value, float) and not value.is_integer():
                raise ValueError(f"expected an integer, got {value!r}")
            parsed = PARSERS[self.type](value)
        except (TypeError, ValueError) as exc:
            raise PassError(f"parameter {self.name!r}: {exc}") from None
        if self.choices is not None and parsed not in self.choices:
            raise PassError(f"parameter {self.name!r} must be one of {', '.join(self.choices)}; got {parsed!r}")
        return parsed


#: the target-size parameters every depth pass takes
RATIO = PassParam("ratio", "float", None, "fraction of decoder layers to remove, in (0, 1): round(ratio x L)")
NUM_LAYERS = PassParam("num_layers", "int", None, "number of decoder layers to remove")
PROTECT = PassParam("protect", "int_list", None, "base layer indices that are never removed or merged")
#: the least-squares map parameters of passes that fit one (None: the defaults, bottom-up and 0)
FIT_ORDER = PassParam("fit_order", "str", None, "maps of several windows: bottom-up (default) or independent",
                      choices=("bottom-up", "independent"))
RIDGE = PassParam("ridge", "float", None, "least-squares ridge, x the mean diagonal of MᵀM (default 0: plain); "
                  "the *-lstsq rules shrink towards the identity, replaceme towards zero (official)")
OUTLIER_CLIP = PassParam("outlier_clip", "float", None, "outlier-aware fit: a fit token whose row energy exceeds "
                         "outlier_clip² x the batch median (attention sinks) is weighted down to it (default off: "
                         "every token alike)")


@dataclass
class PassResult:
    """What a pass found: ops (in the engine's layer numbering), a trace, fitted tensors referenced by the ops."""

    ops: list[dict[str, Any]]
    trace: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    #: the parameters to record, when the search settled one (slm's threshold in target mode); default: as given
    params: dict[str, Any] | None = None
    #: wall-clock seconds of parts of the run (e.g. ``fit_seconds``): reported, never written into the plan
    timings: dict[str, float] = field(default_factory=dict)


class CompressionPass:
    """Base class of every pass. Subclasses set ``name``, ``description``, ``params`` and implement ``run``.

    ``run`` must leave the model's weights and structure unchanged.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    params: ClassVar[tuple[PassParam, ...]] = ()
    #: parameters that change how a plan is computed, not which plan (left out of the plan's ``params``)
    runtime_params: ClassVar[tuple[str, ...]] = ("batch_size",)
    #: whether ``run`` reads calibration data (the pipeline loads it, and refuses to run without it, when True)
    needs_calibration: ClassVar[bool] = True
    #: whether ``run`` works on a lazy model through the sequential engine: it reads a layer's weights only inside
    #: ``engine.loaded(layer)``, through ``arch.layer_state`` or ``engine.copy_layer``, and gradients only through
    #: ``engine.layer_gradients``. Off by default: a plug-in pass written against the in-memory engine may touch
    #: weights directly, and is refused under ``--max-memory`` rather than failing half-way
    streams: ClassVar[bool] = False
    #: recorded parameters the search itself settles (left out when a cached plan is checked against a request)
    search_outputs: ClassVar[tuple[str, ...]] = ()
    #: whether ``run`` works on a model whose layers may lack their attention or MLP (``drop_attn`` / ``drop_mlp``
    #: of an earlier stage, or a checkpoint written from such a plan). Off by default: a pass that reads a layer's
    #: projections or merges its weights would meet a parameter-free stand-in, and is refused in one line instead
    handles_removed_sublayers: ClassVar[bool] = False

    def __init__(self, **params: Any):
        known = {p.name: p for p in self.params}
        unknown = sorted(set(params) - set(known))
        if unknown:
            valid = ", ".join(p.name for p in self.params) or "(none)"
            raise PassError(f"pass {self.name!r} has no parameter {unknown[0]!r}; valid: {valid}")
        #: the parameters as given (a recipe records these; ``config`` adds the defaults ``validate`` settles)
        self.given_params: dict[str, Any] = {k: v for k, v in params.items() if v is not None}
        self.config: dict[str, Any] = {}
        for p in self.params:
            self.config[p.name] = p.parse(params[p.name]) if params.get(p.name) is not None else p.default
        self.validate()

    @property
    def needs_fit_set(self) -> bool:
        """Whether ``run`` streams the fit set (``engine.stream_fit``); the pipeline then draws it and records it."""
        return False

    def validate(self) -> None:
        """Check parameter combinations (override; call super)."""
        ridge = self.config.get("ridge")
        if ridge is not None and not 0 <= ridge < float("inf"):
            raise PassError(f"ridge must be a finite number >= 0, got {ridge}")
        clip = self.config.get("outlier_clip")
        if clip is not None and not 1.0 <= clip < float("inf"):
            raise PassError(f"outlier_clip must be a finite number >= 1 (the clip in multiples of the median row "
                            f"norm), got {clip}")
        ratio = self.config.get("ratio")
        if ratio is not None and not 0 < ratio < 1:
            raise PassError(f"ratio must be in (0, 1), got {ratio}")
        n = self.config.get("num_layers")
        if n is not None and n < 1:
            raise PassError(f"num_layers must be >= 1, got {n}")
        if ratio is not None and n is not None:
            raise PassError("give either ratio or num_layers, not both")

    def run(self, engine) -> PassResult:  # pragma: no cover - abstract
        """Plan on ``engine`` (an ``optimum_slm.engine.ForwardEngine``); see ``PassResult``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers for subclasses
    def target_count(self, num_layers: int, required: bool = True) -> int | None:
        """Layers to remove from ``ratio`` or ``num_layers``; None when neither is given and not ``required``."""
        if self.config.get("num_layers") is not None:
            n = int(self.config["num_layers"])
        elif self.config.get("ratio") is not None:
            n = int(round(self.config["ratio"] * num_layers))
        elif required:
            raise PassError(f"pass {self.name!r} needs ratio or num_layers")
        else:
            return None
        if not 1 <= n < num_layers:
            raise PassError(f"cannot remove {n} of {num_layers} layers")
        return n

    def public_params(self) -> dict[str, Any]:
        """Parameters as given (defaults included) for the plan's ``params``, run-time settings left out."""
        return {k: v for k, v in self.config.items() if v is not None and k not in self.runtime_params}

    def protected(self, num_layers: int) -> set[int]:
        protect = self.config.get("protect") or []
        bad = [i for i in protect if not 0 <= i < num_layers]
        if bad:
            raise PassError(f"protect: layer {bad[0]} out of range 0..{num_layers - 1}")
        return set(protect)
