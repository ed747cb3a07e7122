"""``HealConfig``: every setting of a healing run, checked when it is built (before any model is loaded).

The defaults are the published recipes. ``lora`` is the SLM paper's (its ``evaluate/lora_retrain.py``, from
Alpaca-LoRA): r = 8, alpha = 16, dropout 0.05 on q, k, v, o, gate, down, up; lr 1e-4; 2 epochs; batch 64 as micro-batch
4 x gradient accumulation 16; warm-up 100 steps then linear decay; AdamW; cutoff 256 tokens; evaluation every 100
steps, the best checkpoint by validation loss kept; validation 2,000 examples with seed 42. ``tail`` is the recipe
of "Reassessing Layer Pruning in LLMs" (arXiv 2411.15558, its ``partial_fine-tuning.py``): train the last three
decoder layers, the final norm and ``lm_head``, everything else frozen; lr 1e-5, otherwise the same schedule.
This module imports nothing heavy, so the command line can check options cheaply.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import SLMError
from ..io.names import HEAL_FILE  # noqa: F401 - healing.HEAL_FILE, the name of the record

HEAL_METHODS = ("lora", "tail")
DATA_FORMATS = ("auto", "text", "instruction")
PRECISIONS = ("auto", "fp32", "bf16")
#: the paper's LoRA targets: every projection of a Llama-style decoder layer
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj")
#: learning rate of each method when ``lr`` is not given
DEFAULT_LR = {"lora": 1e-4, "tail": 1e-5}
#: the validation slice when ``val_size`` is not given: this fraction of the examples, at most MAX_AUTO_VAL
AUTO_VAL_FRACTION, MAX_AUTO_VAL = 0.05, 2000


class HealError(SLMError):
    """A healing run that cannot start: bad settings, unusable data, a model it cannot train."""


@dataclass(frozen=True)
class HealConfig:
    """How to heal a compressed model (see the module docstring for where each default comes from).

    ``data`` is a text source (.txt, .jsonl/.json with ``text_field``, a folder, ``wiki-leads``, a ``datasets`` name;
    language-model loss on packed ``cutoff_len`` sequences) or instruction JSON/JSONL with the Alpaca fields
    ``instruction``, ``input``, ``output`` (loss on the response only); ``data_format`` ``auto`` tells them apart by
    the fields of the first row. ``val_size`` examples (sequences for text) are held out with ``val_seed`` and
    evaluated every ``eval_steps`` optimizer steps; training stops when ``patience`` evaluations in a row fail to
    beat the best (0: never stop early), and the best weights are kept. ``max_steps`` caps the optimizer steps of
    ``epochs`` passes over the data; ``max_minutes`` caps the training's wall time (the run stops after the step
    that reaches it, evaluates that step unless it just did, and keeps the best evaluation as always: a budget in
    minutes is what a user on a CPU or a shared GPU can plan by, where a step count is not). One optimizer step sees
    ``batch_size * grad_accum`` sequences.
    """

    data: str | None = None
    method: str = "lora"
    text_field: str = "text"
    data_format: str = "auto"
    cutoff_len: int = 256
    val_size: int | None = None
    val_seed: int = 42
    seed: int = 42
    epochs: float = 2.0
    max_steps: int | None = None
    max_minutes: float | None = None
    lr: float | None = None
    batch_size: int = 4
    grad_accum: int = 16
    warmup_steps: int = 100
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_steps: int = 100
    patience: int = 3
    precision: str = "auto"
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = field(default=LORA_TARGETS)
    tail_layers: int = 3

    def __post_init__(self) -> None:
        if self.method not in HEAL_METHODS:
            raise HealError(f"heal method must be one of {', '.join(HEAL_METHODS)}, got {self.method!r}")
        if self.data is not None and (not isinstance(self.data, str) or not self.data.strip()):
            raise HealError(f"heal data must be a path, corpus alias or dataset name, got {self.data!r}")
        if self.data_format not in DATA_FORMATS:
            raise HealError(f"heal data format must be one of {', '.join(DATA_FORMATS)}, got {self.data_format!r}")
        if self.precision not in PRECISIONS:
            raise HealError(f"heal precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        ints = (("cutoff_len", self.cutoff_len, 2), ("batch_size", self.batch_size, 1),
                ("grad_accum", self.grad_accum, 1), ("warmup_steps", self.warmup_steps, 0),
                ("eval_steps", self.eval_steps, 1), ("patience", self.patience, 0), ("lora_r", self.lora_r, 1),
                ("tail_layers", self.tail_layers, 1), ("seed", self.seed, None), ("val_seed", self.val_seed, None))
        optional = (("val_size", self.val_size, 1), ("max_steps", self.max_steps, 1))
        for name, value, low in ints + tuple(item for item in optional if item[1] is not None):
            if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
                bound = f" >= {low}" if low is not None else ""
                raise HealError(f"heal {name} must be an integer{bound}, got {value!r}")
        positive = (("epochs", self.epochs), ("lora_alpha", self.lora_alpha), ("max_grad_norm", self.max_grad_norm))
        given = (("lr", self.lr), ("max_minutes", self.max_minutes))
        for name, value in positive + tuple(item for item in given if item[1] is not None):
            if not _finite(value) or value <= 0:
                raise HealError(f"heal {name} must be a positive finite number, got {value!r}")
        for name, value, high in (("lora_dropout", self.lora_dropout, 1.0), ("weight_decay", self.weight_decay, None)):
            if not _finite(value) or value < 0 or (high is not None and value >= high):
                raise HealError(f"heal {name} must be a finite number >= 0{f' and < {high}' if high else ''}, "
                                f"got {value!r}")
        targets = self.lora_targets
        if isinstance(targets, str):
            object.__setattr__(self, "lora_targets", tuple(t.strip() for t in targets.split(",") if t.strip()))
        elif not isinstance(targets, (tuple, list)) or not all(isinstance(t, str) and t for t in targets):
            raise HealError(f"heal lora_targets must be module names like q_proj,v_proj, got {targets!r}")
        else:
            object.__setattr__(self, "lora_targets", tuple(targets))
        if not self.lora_targets:
            raise HealError("heal lora_targets is empty")

    @property
    def learning_rate(self) -> float:
        """``lr``, or the method's published default."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def sequences_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["lora_targets"] = list(self.lora_targets)
        out["lr"] = self.learning_rate
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "heal") -> "HealConfig":
        """A config from a mapping (a recipe's ``heal`` stage); unknown keys are refused by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise HealError(f"{where}: unknown heal setting {unknown[0]!r}; valid: {', '.join(sorted(known))}")
        try:
            return cls(**values)
        except TypeError as exc:  # pragma: no cover - every field has a default
            raise HealError(f"{where}: {exc}") from None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
        and value not in (float("inf"), float("-inf"))
