"""The executor: ``apply_plan`` rebuilds the compressed model from its base, atomically.

Everything is checked before the first weight changes: the base's identity (layer count, model type, hidden size,
fingerprint under the plan's scheme), every op against the running shape, every tensor against the model's widths.
Ops then build their new layers as private copies in an ``ApplyContext``; the model itself is rewritten only by the
final swap of its layer list (and of its input embedding tensor, which ``rescale`` ops scale: a new tensor, computed
before the swap). A plan that fails on any op leaves the model bit-identical.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

from ..arch import ArchAdapter
from ..engine.lazy import check_not_offloaded, is_lazy, is_lazy_model, materialized_copy
from ..engine.spill import SpillStore
from ..errors import PlanError
from .fingerprint import fingerprint_with
from .ops import kind_of
from .width_ops import layer_widths
from .schema import CompressionPlan


class ApplyContext:
    """The decoder stack being rebuilt: alive slots in base numbering, each ``(type_index, module)``.

    ``type_index`` is the ORIGINAL index whose per-layer config (attention type, sliding window) the slot keeps.
    """

    def __init__(self, adapter: ArchAdapter, spill: SpillStore | None = None):
        self.adapter = adapter
        #: for a lazy model: where the layers built here go between ops, so memory holds one op's layers at most
        self.spill = spill
        self.base_layers = list(adapter.layers)
        self.order = list(range(len(self.base_layers)))
        self.slots = {i: (i, layer) for i, layer in enumerate(self.base_layers)}
        self._owned: set[int] = set()  # ids of modules built here (safe to change in place)
        #: factors the input embedding is multiplied by, in op order (``rescale`` ops), installed with the final swap
        self.embedding_scales: list[float] = []

    def replace(self, slot: int, type_index: int, module: nn.Module) -> None:
        """Put ``module`` (a new object, never one of the model's layers modified in place) at ``slot``."""
        if slot not in self.slots:
            raise PlanError(f"layer {slot} was already removed")
        self.slots[slot] = (type_index, module)
        self._owned.add(id(module))

    def writable(self, slot: int) -> nn.Module:
        """The module at ``slot``, copied first when it is still one of the model's own layers (copy on write)."""
        if slot not in self.slots:
            raise PlanError(f"layer {slot} was already removed")
        type_index, module = self.slots[slot]
        if id(module) not in self._owned:
            module = materialized_copy(module)  # a lazy layer's copy gets its weights from the checkpoint
            self.replace(slot, type_index, module)
        elif self.spill is not None and is_lazy(module):
            self.spill.restore(module)  # built by an earlier op and spilled: read back to be changed again
        return module

    def release(self) -> None:
        """After an op: with a spill store, write the layers built so far to it (they become lazy layers)."""
        if self.spill is None:
            return
        for _, module in self.slots.values():
            if id(module) in self._owned and not is_lazy(module) and not any(p.is_meta for p in module.parameters()):
                self.spill.spill(module)

    def remove(self, slots: Iterable[int]) -> None:
        gone = set(slots)
        missing = gone - set(self.slots)
        if missing:
            raise PlanError(f"layer {min(missing)} was already removed")
        self.order = [i for i in self.order if i not in gone]
        for i in gone:
            del self.slots[i]

    def stack(self) -> list[tuple[int, nn.Module]]:
        return [self.slots[i] for i in self.order]


def check_base(model: nn.Module, plan: CompressionPlan, strict: bool = True) -> ArchAdapter:
    """Refuse a model that is not the plan's base; returns its adapter."""
    adapter = ArchAdapter(model)
    if adapter.num_layers != plan.num_layers:
        raise PlanError(f"plan is for a {plan.num_layers}-layer base, the model has {adapter.num_layers} layers")
    if adapter.config.model_type != plan.base["model_type"]:
        raise PlanError(f"plan is for model_type {plan.base['model_type']!r}, the model is {adapter.config.model_type!r}")
    hidden = plan.base.get("hidden_size")
    if hidden is not None and hidden != adapter.config.hidden_size:
        raise PlanError(f"plan is for hidden size {hidden}, the model has {adapter.config.hidden_size}")
    if strict:
        scheme = plan.base.get("fingerprint_scheme", "v1")
        fp = fingerprint_with(scheme, model)
        if fp != plan.base["fingerprint"]:
            raise PlanError(
                f"plan was made for another base (fingerprint {plan.base['fingerprint'][:12]}, model {fp[:12]}); "
                "pass strict=False to apply it anyway"
            )
    return adapter


def apply_plan(model: nn.Module, plan: CompressionPlan | None = None, strict: bool = True) -> nn.Module:
    """Rebuild the compressed model from its base, in place and atomically; returns ``model``.

    Refuses a model whose fingerprint differs from the plan's base unless ``strict=False``, and a plan without ops
    (it would leave the base as it is). On a lazy model (``load_lazy_model``) every layer an op builds is written to
    a temporary spill file after the op and read back when needed, so applying holds one op's layers, whatever the
    plan narrows or merges.
    """
    how = "apply_plan(model, plan) takes the model (an nn.Module, from load_model) and a CompressionPlan " \
          "(CompressionPlan.load(path) reads a plan file)"
    if not isinstance(model, nn.Module):
        raise PlanError(f"{how}; the model given is {type(model).__name__} {_short(model)}")
    if not isinstance(plan, CompressionPlan):
        raise PlanError(f"{how}; the plan given is {type(plan).__name__} {_short(plan)}")
    if not plan.ops:
        raise PlanError("the plan has no ops: applying it would leave the base unchanged (plan a larger ratio or "
                        "more layers)")
    check_not_offloaded(model)
    adapter = check_base(model, plan, strict)
    shape = plan.validate(hidden_size=int(adapter.config.hidden_size))  # tensor widths against this very model
    if plan.base.get("widths") not in (None, adapter.widths()):
        raise PlanError(f"plan is for widths {plan.base['widths']}, the model has {adapter.widths()}")
    ctx = ApplyContext(adapter, SpillStore.of(model) if is_lazy_model(model) else None)
    for op in plan.ops:
        kind_of(op).apply(ctx, op, plan.tensors)
        ctx.release()
    uniform, per_layer = layer_widths(shape)
    # computed before the swap (a failure leaves the model as it was), installed with it
    install_embedding = adapter.scaled_stream_input(ctx.embedding_scales) if ctx.embedding_scales else None
    adapter.set_layers(ctx.stack())  # the only change to the model (with the config's widths and embedding below)
    if install_embedding is not None:
        install_embedding()
    if uniform:
        adapter.set_widths(intermediate_size=uniform.get("intermediate_size"),
                           num_attention_heads=uniform.get("num_attention_heads"),
                           num_key_value_heads=uniform.get("num_key_value_heads"),
                           mlp_bias=bool(uniform.get("mlp_bias")), attention_bias=bool(uniform.get("attention_bias")))
    elif uniform is None:
        adapter.set_layer_widths(per_layer)
    return model


def _short(value) -> str:
    """``value``'s repr cut to one short line (for a message about a wrong argument)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."
