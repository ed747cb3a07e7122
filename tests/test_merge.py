"""Merge-rule formulas on hand-made tensors."""

from __future__ import annotations

import pytest
import torch

from optimum_slm.merge import MERGE_RULES, get_merge_rule
from optimum_slm.errors import PassError

KINDS = {"q.weight": "projection", "norm.weight": "norm", "q.bias": "bias"}


def _layer(v: float, n: float, b: float):
    return {
        "q.weight": torch.full((2, 2), v),
        "norm.weight": torch.full((2,), n),
        "q.bias": torch.full((2,), b),
    }


WINDOW = [_layer(1.0, 10.0, 100.0), _layer(2.0, 20.0, 200.0), _layer(4.0, 40.0, 400.0)]


def test_official_keeps_top_projections_bottom_norms_and_biases():
    out = MERGE_RULES["official"](WINDOW, KINDS)
    assert torch.equal(out["q.weight"], WINDOW[2]["q.weight"])
    assert torch.equal(out["norm.weight"], WINDOW[0]["norm.weight"])
    assert torch.equal(out["q.bias"], WINDOW[0]["q.bias"])
    assert MERGE_RULES["official"].anchor == "bottom"


def test_official_reproduces_running_copy_rounding():
    # the official in-place update c + (θ_i - c) is not always bit-identical to θ_i in low precision
    a = torch.tensor([0.1, 1e-4, 3.0], dtype=torch.float16)
    b = torch.tensor([1000.0, 7.0, -2.5], dtype=torch.float16)
    states = [{"q.weight": a}, {"q.weight": b}]
    out = MERGE_RULES["official"](states, {"q.weight": "projection"})
    c = a.clone()
    for s in states:
        c = c + (s["q.weight"] - c)
    assert torch.equal(out["q.weight"], c)


def test_paper_formula():
    out = MERGE_RULES["paper"](WINDOW, KINDS)
    # θ_l + (θ_{l+1} − θ_l) + (θ_h − θ_l) = 1 + 1 + 3
    assert torch.equal(out["q.weight"], torch.full((2, 2), 5.0))
    assert torch.equal(out["norm.weight"], WINDOW[0]["norm.weight"])
    assert torch.equal(out["q.bias"], WINDOW[0]["q.bias"])


def test_mean_averages_everything():
    out = MERGE_RULES["mean"](WINDOW, KINDS)
    assert torch.allclose(out["q.weight"], torch.full((2, 2), 7.0 / 3))
    assert torch.allclose(out["norm.weight"], torch.full((2,), 70.0 / 3))
    assert torch.allclose(out["q.bias"], torch.full((2,), 700.0 / 3))


def test_keep_bottom_and_keep_top():
    bottom = MERGE_RULES["keep-bottom"](WINDOW, KINDS)
    top = MERGE_RULES["keep-top"](WINDOW, KINDS)
    for k in KINDS:
        assert torch.equal(bottom[k], WINDOW[0][k])
        assert torch.equal(top[k], WINDOW[2][k])
    assert MERGE_RULES["keep-top"].anchor_index(3, 7) == 7
    assert MERGE_RULES["keep-bottom"].anchor_index(3, 7) == 3


def test_rules_do_not_alias_inputs():
    out = MERGE_RULES["official"](WINDOW, KINDS)
    out["q.weight"].add_(1)
    assert torch.equal(WINDOW[2]["q.weight"], torch.full((2, 2), 4.0))


def test_single_layer_window_and_unknown_rule():
    with pytest.raises(ValueError):
        MERGE_RULES["mean"](WINDOW[:1], KINDS)
    with pytest.raises(PassError, match="unknown merge rule 'avg'"):
        get_merge_rule("avg")
