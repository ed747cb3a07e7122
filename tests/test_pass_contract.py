"""The contract every registered pass honours, on a tiny random model of every supported family.

For each pass x family (the full matrix: every pass in ``registry.pass_classes()`` x every family of
``arch.SUPPORTED_MODEL_TYPES``, 6 layers, hidden 64, a few calibration tokens), planning through the pipeline
(``cache=False``):

* either refuses the family with one clean ``UnsupportedArchitectureError`` line (and ``PASSES`` says it refuses
  that family: the fitted maps of ``replaceme`` and ``slm-plus`` on Gemma-2/3's sandwich norms), or returns a plan
  that ``validate()``s (any other ``SLMError``, or any other exception, fails);
* leaves the model unchanged: the same weights (bit for bit), ``requires_grad`` flags, no ``.grad``, still in eval;
* round-trips: ``save`` then ``CompressionPlan.load`` gives the same ``to_json()`` and equal side-car tensors;
* applying the loaded plan to a fresh copy gives weights identical to applying the original plan, and the result
  runs a forward pass with finite logits and has ``num_layers_after`` layers.

``PASSES`` holds each pass's parameters for these models; a registered pass missing from it fails (a new pass must be
added), and so does an entry for a pass that is not registered.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from conftest import FAMILIES, calib_ids, make_model
from optimum_slm.arch import SUPPORTED_MODEL_TYPES, ArchAdapter
from optimum_slm.errors import SLMError, UnsupportedArchitectureError
from optimum_slm.pipeline import compress
from optimum_slm.plan import CompressionPlan, apply_plan
from optimum_slm.registry import get_pass, pass_classes

NUM_LAYERS = 6


@dataclass(frozen=True)
class Spec:
    params: dict[str, Any]
    #: families the pass refuses on these models, with one ``UnsupportedArchitectureError`` line
    refused_on: frozenset[str] = field(default_factory=frozenset)


#: every registered pass: parameters that make it act on a 6-layer toy model, and the families it refuses
PASSES: dict[str, Spec] = {
    "angular": Spec({"num_layers": 2}),
    "drop": Spec({"layers": [1, 3]}),
    "laco": Spec({"num_layers": 2, "merge_layers": 3}),
    "linearpatch": Spec({"num_layers": 2}),
    "prune-comp": Spec({"num_layers": 2}),
    "replaceme": Spec({"num_layers": 2}),
    "shortened-magnitude": Spec({"num_layers": 2, "keep_first": 1, "keep_last": 1}),
    "shortened-ppl": Spec({"num_layers": 2, "keep_first": 1, "keep_last": 1}),
    "shortened-taylor": Spec({"num_layers": 2, "keep_first": 1, "keep_last": 1}),
    "shortgpt": Spec({"num_layers": 2}),
    "sleb": Spec({"num_layers": 2}),
    "slm": Spec({"num_layers": 2}),
    "slm-plus": Spec({"num_layers": 2}),
    "flap": Spec({"ratio": 0.3}),
    "minitron-width": Spec({"ratio": 0.3}),
    "taylor-width": Spec({"ratio": 0.3}),
}

REGISTERED = sorted(pass_classes())
#: named variants of registered passes (a pass with parameters that switch its algorithm), held to the same contract
VARIANTS: dict[str, tuple[str, Spec]] = {
    "slm-plus granularity=sublayer": ("slm-plus", Spec({"num_layers": 2, "granularity": "sublayer"})),
}


def test_every_registered_pass_has_a_table_entry():
    missing = sorted(set(REGISTERED) - set(PASSES))
    stale = sorted(set(PASSES) - set(REGISTERED))
    assert not missing, f"registered passes missing from PASSES in tests/test_pass_contract.py: {missing}"
    assert not stale, f"PASSES lists passes that are not registered: {stale}"


def test_every_supported_family_is_covered():
    assert sorted(SUPPORTED_MODEL_TYPES) == FAMILIES


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    if a.keys() != b.keys():
        return [f"keys differ: {sorted(set(a) ^ set(b))[:5]}"]
    return [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", REGISTERED + sorted(VARIANTS))
def test_pass_contract(name, family, tmp_path):
    if name in VARIANTS:
        name, spec = VARIANTS[name]
    elif name not in PASSES:
        pytest.fail(f"pass {name!r} is registered but has no entry in PASSES (tests/test_pass_contract.py)")
    else:
        spec = PASSES[name]
    model = make_model(family, NUM_LAYERS)
    before = _snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    ids = calib_ids(2, 12)
    the_pass = get_pass(name, **spec.params)
    fit = calib_ids(4, 20, seed=1) if the_pass.needs_fit_set else None  # > hidden (64) tokens: a determined map

    try:
        plan = compress(model, the_pass, ids, fit=fit, cache=False)
    except SLMError as exc:
        message = str(exc).strip()
        assert message and "\n" not in message, f"a refusal must be one line, got {message!r}"
        assert family in spec.refused_on and isinstance(exc, UnsupportedArchitectureError), \
            f"{name} refused {family} unexpectedly: {type(exc).__name__}: {message}"
        refused = True
    else:
        refused = False
        assert family not in spec.refused_on, f"{name} was expected to refuse {family}, but planned"

    # planning (or refusing) left the model alone
    changed = _differences(before, _snapshot(model))
    assert not changed, f"{name} changed the model's weights while planning: {changed[:5]}"
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters()), f"{name} left gradients on the model"
    assert not model.training
    if refused:
        return

    plan.validate()
    assert plan.num_layers == NUM_LAYERS and 0 < plan.num_layers_after <= NUM_LAYERS
    assert plan.method == name

    path = tmp_path / "slm_plan.json"
    plan.save(path)
    loaded = CompressionPlan.load(path)
    assert loaded.to_json() == plan.to_json()
    assert sorted(loaded.tensors) == sorted(plan.tensors)
    for key, tensor in plan.tensors.items():
        assert loaded.tensors[key].dtype == tensor.dtype and torch.equal(loaded.tensors[key], tensor), key

    from_plan = apply_plan(copy.deepcopy(model), plan)
    from_loaded = apply_plan(copy.deepcopy(model), loaded)
    changed = _differences(_snapshot(from_plan), _snapshot(from_loaded))
    assert not changed, f"the loaded plan builds different weights: {changed[:5]}"
    assert ArchAdapter(from_loaded).num_layers == plan.num_layers_after
    assert from_loaded.config.num_hidden_layers == plan.num_layers_after
    with torch.no_grad():
        logits = from_loaded(calib_ids(2, 10, seed=3)).logits
    assert torch.isfinite(logits).all()
