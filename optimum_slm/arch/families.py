"""Model families as data: each family's decoder-layer tensors, residual branches and per-layer config fields."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedArchitectureError

PROJECTION = "projection"
NORM = "norm"
BIAS = "bias"


@dataclass(frozen=True)
class Branch:
    """A residual branch of a decoder layer: ``module``'s output is added to the residual stream.

    ``fold`` names where a per-channel output scale is folded so the checkpoint stays vanilla: ``rows`` scales the
    output rows of the projection ``target`` (weight and bias); ``gemma-norm`` rescales a Gemma RMSNorm ``target``
    whose output is x·(1 + w), so w ← (1 + w)·s − 1.

    ``projection`` is the branch's last linear layer (``o_proj`` / ``down_proj``): a d×d map on what it outputs
    folds into it exactly. Where it is not ``module`` (Gemma's sandwich norms), a norm sits between it and the
    residual add, so a fitted map is applied before that norm and paired with a refitted norm gain.
    """

    name: str
    module: str
    target: str
    fold: str = "rows"
    projection: str = ""

    @property
    def post_norm(self) -> str | None:
        """The norm between the branch's projection and the residual add (Gemma-2/3), None where there is none."""
        return self.module if self.fold == "gemma-norm" else None


LLAMA_BRANCHES = (
    Branch("attn", "self_attn", "self_attn.o_proj", projection="self_attn.o_proj"),
    Branch("mlp", "mlp", "mlp.down_proj", projection="mlp.down_proj"),
)
GEMMA_BRANCHES = (
    Branch("attn", "post_attention_layernorm", "post_attention_layernorm", "gemma-norm", "self_attn.o_proj"),
    Branch("mlp", "post_feedforward_layernorm", "post_feedforward_layernorm", "gemma-norm", "mlp.down_proj"),
)


@dataclass(frozen=True)
class Family:
    """How one model family lays out a decoder layer and its per-layer config fields."""

    name: str
    model_types: tuple[str, ...]
    #: parameter names (relative to a decoder layer) of the attention and MLP projection weights
    projections: tuple[str, ...]
    #: parameter names of the layer's norm weights
    norms: tuple[str, ...]
    #: optional projection biases (present only when the config enables them)
    biases: tuple[str, ...] = ()
    #: config fields that hold one entry per layer and are sliced with the kept layers
    per_layer_lists: tuple[str, ...] = ()
    #: config fields that hold a count "the first N layers" (Qwen's ``max_window_layers``)
    layer_count_fields: tuple[str, ...] = ()
    #: config fields that hold lists of layer indices, remapped to the new numbering
    layer_index_lists: tuple[str, ...] = ()
    #: the residual branches in forward order (attention, then MLP)
    branches: tuple[Branch, ...] = LLAMA_BRANCHES
    #: channel groups for width pruning: the MLP's gate/up rows ↔ down columns (``fused``: one gate_up_proj whose
    #: rows are [gate; up], Phi-3) and the attention's q/k/v rows ↔ o columns (``fused``: one qkv_proj, rows
    #: [q; k; v])
    fused_mlp: bool = False
    fused_qkv: bool = False
    #: config flags that give the MLP / attention projections biases (FLAP's bias compensation needs them);
    #: None where the family has no such switch
    mlp_bias_flag: str | None = None
    attention_bias_flag: str | None = None


_LLAMA_PROJ = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
_LLAMA_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")
_ATTN_BIASES = (
    "self_attn.q_proj.bias",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.bias",
    "mlp.gate_proj.bias",
    "mlp.up_proj.bias",
    "mlp.down_proj.bias",
)
_GEMMA_NORMS = _LLAMA_NORMS + ("pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight")
_QK_NORMS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",), _LLAMA_PROJ, _LLAMA_NORMS, _ATTN_BIASES, mlp_bias_flag="mlp_bias",
           attention_bias_flag="attention_bias"),
    Family("mistral", ("mistral",), _LLAMA_PROJ, _LLAMA_NORMS, _ATTN_BIASES, per_layer_lists=("layer_types",)),
    Family(
        "qwen2",
        ("qwen2",),
        _LLAMA_PROJ,
        _LLAMA_NORMS,
        _ATTN_BIASES,
        per_layer_lists=("layer_types",),
        layer_count_fields=("max_window_layers",),
    ),
    Family(
        "qwen3",
        ("qwen3",),
        _LLAMA_PROJ,
        _LLAMA_NORMS + _QK_NORMS,
        _ATTN_BIASES,
        per_layer_lists=("layer_types",),
        layer_count_fields=("max_window_layers",),
    ),
    Family(
        "gemma2", ("gemma2",), _LLAMA_PROJ, _GEMMA_NORMS, per_layer_lists=("layer_types",), branches=GEMMA_BRANCHES
    ),
    Family(
        "gemma3",
        ("gemma3_text",),
        _LLAMA_PROJ,
        _GEMMA_NORMS + _QK_NORMS,
        per_layer_lists=("layer_types",),
        branches=GEMMA_BRANCHES,
    ),
    Family(
        "phi3",
        ("phi3",),
        ("self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight", "mlp.down_proj.weight"),
        _LLAMA_NORMS,
        ("self_attn.qkv_proj.bias", "self_attn.o_proj.bias", "mlp.gate_up_proj.bias", "mlp.down_proj.bias"),
        per_layer_lists=("layer_types",),
        fused_mlp=True,
        fused_qkv=True,
    ),
)

_BY_MODEL_TYPE = {mt: fam for fam in FAMILIES for mt in fam.model_types}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_BY_MODEL_TYPE))


def map_fold(family: Family) -> str:
    """How a fitted d×d branch map (slm-plus, replaceme) reaches a vanilla checkpoint of ``family``: the line
    ``slm list`` shows for it."""
    folds = {b.fold for b in family.branches}
    if not all(b.projection for b in family.branches) or not folds <= {"rows", "gemma-norm"}:
        return "no exact fold for a fitted map: slm-plus uses merge=calibrated (branch scales)"
    if folds == {"rows"}:
        return "fitted maps folded into o_proj / down_proj (exact)"
    return ("fitted maps folded into o_proj / down_proj before the post-branch norms, whose gains are refitted "
            "(exact)")


def text_config(model_or_config) -> object:
    """The decoder's config (multimodal wrappers nest it)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    get = getattr(cfg, "get_text_config", None)
    return get(decoder=True) if get is not None else cfg


def family_for_type(model_type: str | None) -> Family | None:
    """The family of a ``model_type`` string, None when unknown."""
    return _BY_MODEL_TYPE.get(model_type)


def family_for(model_or_config) -> Family:
    """The ``Family`` of a model or config; ``UnsupportedArchitectureError`` for an unknown ``model_type``."""
    model_type = getattr(text_config(model_or_config), "model_type", None)
    fam = _BY_MODEL_TYPE.get(model_type)
    if fam is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture model_type={model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return fam
