"""Architecture adapter: the one module that knows each model family's quirks.

Nothing else in the package touches ``layer_idx``, ``layer_types`` or per-layer config fields. Families are data
(``FAMILIES``); ``ArchAdapter`` applies them to a loaded ``PreTrainedModel``.

Why each fix matters (transformers 5):
* attention modules index the KV cache by ``layer_idx``: a stale index raises ``IndexError`` in ``generate``;
* Qwen2/Qwen3/Gemma2/Gemma3 pick masks and RoPE tables by ``config.layer_types[i]`` at the *new* position, so an
  unsliced ``layer_types`` silently corrupts outputs;
* ``num_hidden_layers`` decides how many layers ``from_pretrained`` builds, so a stale value reloads random layers.
"""


from __future__ import annotations

import copy
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..errors import PlanError, UnsupportedArchitectureError
from ..io.shards import is_lazy, lazy_state
from .families import BIAS, NORM, PROJECTION, family_for, text_config
from .sublayers import STAND_INS, SUBLAYER_MODULES, is_removed


class ArchAdapter:
    """Reads and rewrites the decoder stack of one loaded causal LM."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.family = family_for(model)
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        if decoder is None or not hasattr(decoder, "layers"):
            raise UnsupportedArchitectureError(
                f"model of type {type(model).__name__} exposes no decoder with .layers"
            )
        self.decoder = decoder

    # ------------------------------------------------------------------ reading
    @property
    def config(self):
        return text_config(self.model)

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    @property
    def num_layers(self) -> int:
        return len(self.decoder.layers)

    @property
    def final_norm(self) -> nn.Module:
        return self.decoder.norm

    def layer_types(self) -> list[str] | None:
        types = getattr(self.config, "layer_types", None)
        return list(types) if types is not None else None

    def tensor_kinds(self, layer: nn.Module) -> dict[str, str]:
        """Map every parameter of a decoder layer to ``projection``, ``norm`` or ``bias``.

        A parameter the family does not list raises: merging must never silently skip a tensor.
        """
        fam = self.family
        kinds: dict[str, str] = {}
        for name, _ in layer.named_parameters():
            if name in fam.projections:
                kinds[name] = PROJECTION
            elif name in fam.norms:
                kinds[name] = NORM
            elif name in fam.biases:
                kinds[name] = BIAS
            else:
                raise UnsupportedArchitectureError(
                    f"{fam.name}: decoder-layer parameter {name!r} is not known to the architecture adapter"
                )
        return kinds

    def logits(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits from the post-norm hidden state (with Gemma's final soft-capping)."""
        head = self.model.get_output_embeddings()
        logits = head(final_hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def branch_modules(self, layer: nn.Module) -> dict[str, nn.Module]:
        """The modules whose outputs a layer adds to its residual stream, by branch name."""
        return {b.name: layer.get_submodule(b.module) for b in self.family.branches}

    def fold_branch_scales(self, layer: nn.Module, scales: Mapping[str, torch.Tensor]) -> None:
        """Multiply each branch's output by a per-channel scale, folded into the layer's weights."""
        with torch.no_grad():
            for b in self.family.branches:
                if b.name not in scales:
                    continue
                if b.fold == "rows" and not self.has_sublayer(layer, b.name):
                    continue  # a removed branch adds zeros: any scale of it is exact as it is
                target = layer.get_submodule(b.target)
                s = scales[b.name].to(device=target.weight.device, dtype=torch.float32)
                if b.fold == "rows":
                    target.weight.copy_((target.weight.float() * s[:, None]).to(target.weight.dtype))
                    if getattr(target, "bias", None) is not None:
                        target.bias.copy_((target.bias.float() * s).to(target.bias.dtype))
                elif b.fold == "gemma-norm":
                    target.weight.copy_(((1.0 + target.weight.float()) * s - 1.0).to(target.weight.dtype))
                else:  # pragma: no cover - families are data defined above
                    raise ValueError(f"unknown fold {b.fold!r}")

    def scale_branches(self, layer: nn.Module, scale: float) -> None:
        """Multiply every residual branch's output of ``layer`` by the number ``scale`` (``fold_branch_scales``
        with one value on every channel: the ``o_proj``/``down_proj`` rows and biases, or Gemma's post-branch norm
        gains)."""
        s = torch.full((int(self.config.hidden_size),), float(scale), dtype=torch.float32)
        self.fold_branch_scales(layer, {b.name: s for b in self.family.branches})

    def scaled_stream_input(self, scales: Sequence[float]) -> Callable[[], None]:
        """The input embedding multiplied by each of ``scales`` in turn (w ← w·s, computed in float32, cast back
        after each), so the residual stream entering the first layer is scaled by their product; returns a
        function that installs it.

        The new tensors are computed here and installed by the returned function as new parameters, never written
        in place: a lazy model's copy shares its embedding with the model it was copied from. An output head tied
        to the embedding gets the new tensor too (the checkpoint stays tied), and the final norm's gain is divided
        by each scale in turn (Gemma's 1 + w: w ← (1 + w)/s − 1) so that the logits keep their scale."""
        embedding = self.model.get_input_embeddings()
        head = self.model.get_output_embeddings()
        tied = head is not None and head.weight is embedding.weight
        norm = self.final_norm
        offset = any(b.fold == "gemma-norm" for b in self.family.branches)  # Gemma-2/3 norms multiply by 1 + w
        with torch.no_grad():
            weight = embedding.weight.detach()
            gain = norm.weight.detach() if tied else None
            for s in scales:
                weight = (weight.float() * float(s)).to(weight.dtype)
                if gain is not None:
                    g = gain.float()
                    gain = (((1.0 + g) / float(s) - 1.0) if offset else g / float(s)).to(gain.dtype)

        def install() -> None:
            embedding.weight = nn.Parameter(weight, requires_grad=embedding.weight.requires_grad)
            if tied:
                head.weight = embedding.weight
                norm.weight = nn.Parameter(gain, requires_grad=norm.weight.requires_grad)

        return install

    def _branch(self, name: str):
        return next(b for b in self.family.branches if b.name == name)

    def post_norm(self, layer: nn.Module, branch: str = "mlp") -> nn.Module | None:
        """The norm between a branch's projection and the residual add (Gemma-2/3's sandwich norms), else None."""
        name = self._branch(branch).post_norm
        return None if name is None else layer.get_submodule(name)

    @staticmethod
    def norm_unit(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """What a Gemma RMSNorm multiplies by its gain: x / sqrt(mean(x²) + eps), computed as the norm does (in
        float32)."""
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)

    @staticmethod
    def norm_gain(norm: nn.Module) -> torch.Tensor:
        """A Gemma RMSNorm's per-channel multiplier 1 + w (float32)."""
        return 1.0 + norm.weight.detach().float()

    def check_output_map(self, layer: nn.Module | None = None, branch: str = "mlp") -> None:
        """Refuse (one line) a family where a d×d map on a branch's output (``mlp`` or ``attn``) has no exact fold.

        Two folds exist: into the branch's output projection where its output enters the residual stream linearly
        (``rows``), and, under a post-branch Gemma norm (``gemma-norm``), into the projection before the norm
        together with a refitted norm gain (see ``fold_output_map``)."""
        b = self._branch(branch)
        if b.fold not in ("rows", "gemma-norm") or not b.projection:
            raise UnsupportedArchitectureError(
                f"{self.family.name}: the {branch.upper()} output reaches the residual stream through {b.target}, "
                "where a least-squares map cannot be folded exactly into a weight; use a merge rule without a fitted "
                "map (slm-plus: --merge calibrated)")

    def supports_output_map(self) -> bool:
        """Whether every branch of this family has an exact fold for a fitted map."""
        try:
            for b in self.family.branches:
                self.check_output_map(None, b.name)
        except UnsupportedArchitectureError:
            return False
        return True

    def fold_output_map(self, layer: nn.Module, t: torch.Tensor, branch: str = "mlp",
                        gain: torch.Tensor | None = None) -> None:
        """Fold a fitted map T ([hidden, hidden]) into a branch.

        Without a post-branch norm the branch's output becomes x·T: T folds into its output projection (``down_proj``,
        or ``o_proj`` for ``attn``) as W ← Tᵀ·W, b ← b·T. Under a Gemma post-branch norm the branch's output becomes
        ``gain`` ⊙ unit(z·T), z being the projection's output: T folds into the projection the same way and
        ``gain`` (the norm's new multiplier 1 + w, a [hidden] vector) into the norm as w ← gain − 1. Both folds
        are exact: the checkpoint computes what the fit computed."""
        self.check_output_map(layer, branch)
        b = self._branch(branch)
        norm = self.post_norm(layer, branch)
        if (gain is None) != (norm is None):
            raise PlanError(f"{self.family.name}: a map on the {branch.upper()} output "
                            + ("needs a refitted norm gain (the family has a norm after the branch)" if gain is None
                               else "takes no norm gain (the family has no norm after the branch)"))
        target = layer.get_submodule(b.projection)
        with torch.no_grad():
            t64 = t.to(device=target.weight.device, dtype=torch.float64)
            target.weight.copy_((t64.T @ target.weight.double()).to(target.weight.dtype))
            if getattr(target, "bias", None) is not None:
                target.bias.copy_((target.bias.double() @ t64).to(target.bias.dtype))
        if norm is not None:
            self.set_norm_gain(layer, branch, gain)

    def map_fold_modules(self, branch: str) -> tuple[str, ...]:
        """The sub-modules of a layer (relative names) whose tensors ``fold_output_map`` on ``branch`` writes: the
        branch's output projection and, under a post-branch norm, that norm."""
        b = self._branch(branch)
        return tuple(name for name in (b.projection, b.post_norm) if name)

    def set_norm_gain(self, layer: nn.Module, branch: str, gain: torch.Tensor) -> None:
        """Give a branch's post-branch Gemma norm the per-channel multiplier ``gain`` (w ← gain − 1)."""
        norm = self.post_norm(layer, branch)
        if norm is None:
            raise PlanError(f"{self.family.name}: the {branch.upper()} has no norm after it to take a gain")
        with torch.no_grad():
            g = gain.to(device=norm.weight.device, dtype=torch.float32)
            norm.weight.copy_((g - 1.0).to(norm.weight.dtype))

    # ------------------------------------------------------------------ widths (channel groups)
    def widths(self) -> dict[str, int]:
        """The base widths width ops refer to: MLP channels, query heads, KV heads (groups), head dim."""
        cfg = self.config
        heads = int(cfg.num_attention_heads)
        return {
            "intermediate_size": int(cfg.intermediate_size),
            "num_attention_heads": heads,
            "num_key_value_heads": int(getattr(cfg, "num_key_value_heads", None) or heads),
            "head_dim": int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
        }

    def narrow_mlp(self, layer: nn.Module, keep: torch.Tensor, down_bias: torch.Tensor | None = None) -> None:
        """Keep the MLP's intermediate channels ``keep`` (in place on ``layer``): gate/up rows, down columns.

        ``down_bias`` (FLAP's compensation) becomes ``down_proj``'s bias, with zero gate/up biases, which the
        family's ``mlp_bias`` switch must allow.
        """
        mlp = layer.mlp
        keep = keep.to(torch.long)
        with_bias = True if down_bias is not None else None  # None: keep whatever biases the MLP has
        if self.family.fused_mlp:
            size = mlp.gate_up_proj.out_features // 2
            rows = torch.cat([keep, keep + size])
            mlp.gate_up_proj = _slice_linear(mlp.gate_up_proj, rows=rows, bias=with_bias)
        else:
            mlp.gate_proj = _slice_linear(mlp.gate_proj, rows=keep, bias=with_bias)
            mlp.up_proj = _slice_linear(mlp.up_proj, rows=keep, bias=with_bias)
        mlp.down_proj = _slice_linear(mlp.down_proj, cols=keep, bias=with_bias, new_bias=down_bias)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = int(keep.numel())

    def attention_rows(self, groups: list[int], heads: list[list[int]] | None = None) -> tuple[torch.Tensor, ...]:
        """(query rows, key/value rows) of the kept KV ``groups`` (and, within each, the kept query ``heads``)."""
        w = self.widths()
        hd, rep = w["head_dim"], w["num_attention_heads"] // w["num_key_value_heads"]
        q_heads = [g * rep + j for k, g in enumerate(groups) for j in (heads[k] if heads else range(rep))]
        q_rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in q_heads])
        kv_rows = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in groups])
        return q_rows, kv_rows

    def narrow_attention(self, layer: nn.Module, groups: list[int], heads: list[list[int]] | None = None,
                         o_bias: torch.Tensor | None = None) -> None:
        """Keep whole KV ``groups`` (GQA stays valid) and optionally the same number of query ``heads`` in each.

        In place on ``layer``: q rows and o columns of the kept query heads, k/v rows of the kept groups (their
        biases too). ``o_bias`` (FLAP's compensation) becomes ``o_proj``'s bias.
        """
        attn = layer.self_attn
        q_rows, kv_rows = self.attention_rows(groups, heads)
        w = self.widths()
        with_bias = True if o_bias is not None else None
        if self.family.fused_qkv:
            q_size = w["num_attention_heads"] * w["head_dim"]
            kv_size = w["num_key_value_heads"] * w["head_dim"]
            rows = torch.cat([q_rows, q_size + kv_rows, q_size + kv_size + kv_rows])
            attn.qkv_proj = _slice_linear(attn.qkv_proj, rows=rows)
        else:
            attn.q_proj = _slice_linear(attn.q_proj, rows=q_rows, bias=with_bias)
            attn.k_proj = _slice_linear(attn.k_proj, rows=kv_rows, bias=with_bias)
            attn.v_proj = _slice_linear(attn.v_proj, rows=kv_rows, bias=with_bias)
        attn.o_proj = _slice_linear(attn.o_proj, cols=q_rows, bias=with_bias, new_bias=o_bias)
        kept_heads = len(groups) * (len(heads[0]) if heads else w["num_attention_heads"] // w["num_key_value_heads"])
        attn.num_key_value_groups = kept_heads // len(groups)
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = len(groups)
        if hasattr(attn, "num_heads"):
            attn.num_heads = kept_heads
        if getattr(attn, "config", None) is not None:
            # modules that read head counts from their config (Phi-3's fused qkv split) get their own, narrowed one
            attn.config = copy.copy(attn.config)
            attn.config.num_attention_heads = kept_heads
            attn.config.num_key_value_heads = len(groups)
            attn.config.head_dim = w["head_dim"]

    def set_layer_widths(self, per_layer: list[dict[str, int]]) -> None:
        """Record per-layer (non-uniform) widths in the config as ``slm_layer_widths`` (one entry per layer, the
        narrowed widths only); the config's own fields keep the base's widths, from which ``rebuild_layer_widths``
        narrows a freshly built model before its weights load."""
        configs = [self.config] + ([self.model.config] if self.model.config is not self.config else [])
        head_dim = self.widths()["head_dim"]
        for cfg in configs:
            cfg.slm_layer_widths = [dict(w) for w in per_layer]
            cfg.head_dim = head_dim
            if any(w.get("mlp_bias") for w in per_layer):
                setattr(cfg, self.family.mlp_bias_flag, True)
            if any(w.get("attention_bias") for w in per_layer):
                setattr(cfg, self.family.attention_bias_flag, True)

    # ------------------------------------------------------------------ removed sub-layers (width zero)
    def remove_sublayer(self, layer: nn.Module, branch: str) -> None:
        """Take the attention (``attn``) or the MLP (``mlp``) out of ``layer`` (in place): a parameter-free stand-in
        (``sublayers``) makes the layer add nothing for it, so it computes its other branch alone."""
        name = SUBLAYER_MODULES[branch]
        old = getattr(layer, name)
        stand_in = STAND_INS[branch](getattr(old, "layer_idx", None)) if branch == "attn" else STAND_INS[branch]()
        setattr(layer, name, stand_in)

    @staticmethod
    def has_sublayer(layer: nn.Module, branch: str) -> bool:
        """Whether ``layer`` still has its attention (``attn``) or MLP (``mlp``)."""
        return not is_removed(getattr(layer, SUBLAYER_MODULES[branch]))

    def removed_sublayers(self) -> dict[int, frozenset[str]]:
        """The branches (``attn`` / ``mlp``) each layer has lost, by current layer index (layers that lost one)."""
        out = {}
        for i, layer in enumerate(self.layers):
            gone = frozenset(b for b in SUBLAYER_MODULES if not self.has_sublayer(layer, b))
            if gone:
                out[i] = gone
        return out

    def rebuild_layer_widths(self) -> None:
        """Narrow a model built from a config with ``slm_layer_widths`` to those widths (weights are loaded after).
        A width of zero (``intermediate_size`` 0, ``num_key_value_heads`` 0) is a removed MLP / attention."""
        per_layer = getattr(self.config, "slm_layer_widths", None) or []
        if len(per_layer) != self.num_layers:
            raise ValueError(f"slm_layer_widths lists {len(per_layer)} layers, the model has {self.num_layers}")
        w = self.widths()
        rep = w["num_attention_heads"] // w["num_key_value_heads"]
        for layer, widths in zip(self.layers, per_layer):
            bias = None
            if widths.get("intermediate_size") == 0:
                self.remove_sublayer(layer, "mlp")
            elif "intermediate_size" in widths:
                if widths.get("mlp_bias"):
                    bias = torch.zeros(int(self.config.hidden_size))
                self.narrow_mlp(layer, torch.arange(widths["intermediate_size"]), down_bias=bias)
            if widths.get("num_key_value_heads") == 0:
                self.remove_sublayer(layer, "attn")
            elif "num_key_value_heads" in widths:
                groups = list(range(widths["num_key_value_heads"]))
                per_group = widths["num_attention_heads"] // widths["num_key_value_heads"]
                heads = None if per_group == rep else [list(range(per_group)) for _ in groups]
                o_bias = torch.zeros(int(self.config.hidden_size)) if widths.get("attention_bias") else None
                self.narrow_attention(layer, groups, heads, o_bias=o_bias)

    def set_widths(self, *, intermediate_size: int | None = None, num_attention_heads: int | None = None,
                   num_key_value_heads: int | None = None, mlp_bias: bool = False,
                   attention_bias: bool = False) -> None:
        """Write uniform narrowed widths into the config (head_dim made explicit, so a reload keeps it)."""
        configs = [self.config] + ([self.model.config] if self.model.config is not self.config else [])
        head_dim = self.widths()["head_dim"]
        for cfg in configs:
            if intermediate_size is not None:
                cfg.intermediate_size = int(intermediate_size)
            if num_attention_heads is not None:
                cfg.head_dim = head_dim
                cfg.num_attention_heads = int(num_attention_heads)
                cfg.num_key_value_heads = int(num_key_value_heads)
            if mlp_bias:
                setattr(cfg, self.family.mlp_bias_flag, True)
            if attention_bias:
                setattr(cfg, self.family.attention_bias_flag, True)

    # ------------------------------------------------------------------ surgery
    def set_layers(self, slots: Sequence[tuple[int, nn.Module]]) -> None:
        """Replace the decoder stack.

        ``slots`` lists the new stack bottom to top as ``(type_index, module)``: ``type_index`` is the ORIGINAL index
        of the layer whose per-layer config (layer type, sliding window) the slot keeps. Renumbers ``layer_idx`` and
        rewrites every per-layer config field.
        """
        old_n = self.num_layers
        kept = [idx for idx, _ in slots]
        if any(not 0 <= i < old_n for i in kept):
            raise IndexError(f"slot type index out of range 0..{old_n - 1}: {kept}")
        self.decoder.layers = nn.ModuleList([m for _, m in slots])
        self._renumber()
        self._fix_config(old_n, kept)

    def remove_layers(self, drop: Iterable[int]) -> list[int]:
        """Delete the given layers (current numbering); returns the kept indices."""
        drop = set(drop)
        kept = [i for i in range(self.num_layers) if i not in drop]
        self.set_layers([(i, self.layers[i]) for i in kept])
        return kept

    def _renumber(self) -> None:
        for new_idx, layer in enumerate(self.decoder.layers):
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new_idx

    def _fix_config(self, old_n: int, kept: list[int]) -> None:
        configs = [self.config]
        if self.model.config is not self.config:
            configs.append(self.model.config)
        for cfg in configs:
            for field in self.family.per_layer_lists:
                values = getattr(cfg, field, None)
                if isinstance(values, (list, tuple)) and len(values) == old_n:
                    setattr(cfg, field, [values[i] for i in kept])
            for field in self.family.layer_count_fields:
                value = getattr(cfg, field, None)
                if isinstance(value, int):
                    setattr(cfg, field, sum(1 for i in kept if i < value))
            for field in self.family.layer_index_lists:
                values = getattr(cfg, field, None)
                if isinstance(values, (list, tuple)):
                    remap = {old: new for new, old in enumerate(kept)}
                    setattr(cfg, field, [remap[i] for i in values if i in remap])
            if hasattr(cfg, "num_hidden_layers"):
                cfg.num_hidden_layers = len(kept)


def layer_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    """A decoder layer's parameters by relative name (detached views, no copy; a lazy layer's are read from its
    checkpoint)."""
    if is_lazy(layer) and any(p.is_meta for p in layer.parameters()):
        return lazy_state(layer)
    return {name: p.detach() for name, p in layer.named_parameters()}


def window_states(layers: list[nn.Module]) -> list[Mapping[str, torch.Tensor]]:
    """``layer_state`` of each layer of a merge window, on one device: a device map may spread a window over
    several, and a merge rule combines their tensors (lazy layers read to the CPU)."""
    states = [layer_state(layer) for layer in layers]
    first = next((t for s in states if isinstance(s, dict) for t in s.values()), None)
    if first is None:
        return states
    return [{k: v.to(first.device) for k, v in s.items()} if isinstance(s, dict) else s for s in states]


def load_layer_state(layer: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Write ``state`` into ``layer``'s parameters in place (same names and shapes)."""
    params = dict(layer.named_parameters())
    missing = set(params) - set(state)
    if missing:
        raise KeyError(f"merged state lacks {sorted(missing)}")
    if any(p.is_meta for p in params.values()):  # a copy of a lazy layer: its tensors are given, not copied into
        layer.load_state_dict({name: state[name].to(dtype=p.dtype) for name, p in params.items()}, strict=False,
                              assign=True)
        return
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name].to(dtype=p.dtype, device=p.device))


def param_count(model: nn.Module) -> int:
    """Number of unique parameters (tied embeddings counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _slice_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                  bias: bool | None = None, new_bias: torch.Tensor | None = None) -> nn.Linear:
    """A new ``nn.Linear`` with the given output ``rows`` / input ``cols`` of ``linear``'s weight.

    ``bias``: True gives the result a bias (the sliced old one, ``new_bias`` or zeros), None keeps the old one's
    presence, False drops it.
    """
    weight = linear.weight.detach()
    if rows is not None:
        weight = weight[rows.to(weight.device)]
    if cols is not None:
        weight = weight[:, cols.to(weight.device)]
    has_bias = linear.bias is not None if bias is None else bias
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if has_bias:
            if new_bias is not None:
                out.bias.copy_(new_bias.to(out.bias))
            elif linear.bias is not None:
                old = linear.bias.detach()
                out.bias.copy_(old[rows.to(old.device)] if rows is not None else old)
            else:
                out.bias.zero_()
    return out
