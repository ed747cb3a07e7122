"""The ``slm`` pass: official control flow branch by branch, equality with the slow official port, target ratio."""

from __future__ import annotations

import pytest
import torch

from conftest import calib_ids, make_model, plan_of
from optimum_slm import apply_plan, get_pass
from optimum_slm.errors import PassError
from optimum_slm.passes.depth.slm import WindowEvaluator
from optimum_slm.passes.depth.slm_official_port import official_slm_windows


def _scripted(monkeypatch, table: dict, default: float = 0.99, strict: bool = True):
    """Replace the similarity of each (committed, candidate) model by scripted values; records the calls."""
    calls = []

    def score(self, committed, candidate):
        key = (tuple(committed), tuple(candidate))
        calls.append(key)
        if candidate[0] == candidate[1]:
            return default
        return table[key] if strict else table.get(key, default)

    monkeypatch.setattr(WindowEvaluator, "score", score)
    return calls


def test_control_flow_grow_commit_slide_and_pending_bottom(monkeypatch):
    model = make_model("llama", 8)  # high starts at 6 (layer 7 is never in a window)
    calls = _scripted(
        monkeypatch,
        {
            ((), (5, 6)): 0.90,  # pass -> grow
            ((), (4, 6)): 0.80,  # pass -> grow
            ((), (3, 6)): 0.50,  # fail -> commit [4, 6], next window tops at 3
            (((4, 6),), (2, 3)): 0.40,  # 2-layer window fails -> slide
            (((4, 6),), (1, 2)): 0.90,  # pass -> grow
            (((4, 6),), (0, 2)): 0.95,  # pass, low reaches -1: pending window is dropped
        },
    )
    plan = plan_of(get_pass("slm", threshold=0.72), model, calib_ids(2, 8))
    assert plan.windows == [(4, 6)]
    assert plan.num_layers_after == 6
    assert calls == [
        ((), (5, 6)), ((), (4, 6)), ((), (3, 6)),
        (((4, 6),), (3, 3)),  # the official no-op window after a commit
        (((4, 6),), (2, 3)), (((4, 6),), (1, 2)), (((4, 6),), (0, 2)),
    ]
    tried = [(tuple(t["window"]), t["passed"]) for t in plan.trace["tried"]]
    assert tried == [((5, 6), True), ((4, 6), True), ((3, 6), False), ((2, 3), False), ((1, 2), True), ((0, 2), True)]


def test_strict_greater_than_threshold(monkeypatch):
    model = make_model("llama", 6)
    _scripted(monkeypatch, {((), (3, 4)): 0.72, ((), (2, 3)): 0.72, ((), (1, 2)): 0.72, ((), (0, 1)): 0.72})
    # equal is not above: every 2-layer window slides, nothing is merged, and a plan that removes nothing is refused
    with pytest.raises(PassError, match="threshold 0.72 merges no window .highest similarity seen 0.72"):
        plan_of(get_pass("slm", threshold=0.72), model, calib_ids(2, 8))


def test_commit_at_each_level(monkeypatch):
    model = make_model("llama", 6)
    _scripted(
        monkeypatch,
        {
            ((), (3, 4)): 0.9, ((), (2, 4)): 0.1,  # commit [3, 4]
            (((3, 4),), (1, 2)): 0.9, (((3, 4),), (0, 2)): 0.1,  # commit [1, 2]
        },
    )
    plan = plan_of(get_pass("slm"), model, calib_ids(2, 8))
    assert plan.windows == [(3, 4), (1, 2)]
    assert plan.ops == [
        {"op": "merge", "layers": [3, 4], "rule": "official"},
        {"op": "merge", "layers": [1, 2], "rule": "official"},
    ]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_fast_pass_equals_slow_official_port(family):
    model = make_model(family, 7)
    ids = calib_ids(3, 12)
    for threshold in (0.3, 0.6, 0.8):
        slow_windows, slow_trace = official_slm_windows(model, ids, threshold)
        if not slow_windows:  # the official loop merged nothing: the pass refuses a plan that removes nothing
            with pytest.raises(PassError, match="merges no window"):
                plan_of(get_pass("slm", threshold=threshold), model, ids)
            continue
        plan = plan_of(get_pass("slm", threshold=threshold), model, ids)
        assert plan.windows == slow_windows
        fast = {tuple(t["window"]): t["sim"] for t in plan.trace["tried"]}
        slow = {tuple(t["window"]): t["sim"] for t in slow_trace}
        assert fast.keys() == slow.keys()
        assert all(abs(fast[k] - slow[k]) < 1e-4 for k in fast)


def test_similarity_of_committed_plan_matches_model_built_from_plan():
    model = make_model("llama", 7)
    ids = calib_ids(3, 12)
    plan = plan_of(get_pass("slm", threshold=0.5), model, ids)
    assert plan.windows, "the random model merges at this threshold"
    last_pass = [t for t in plan.trace["tried"] if t["passed"] and tuple(t["window"]) == plan.windows[-1]]
    with torch.no_grad():
        ref = model.model(ids).last_hidden_state
        compressed = apply_plan(make_model("llama", 7), plan)
        out = compressed.model(ids).last_hidden_state
    sim = torch.cosine_similarity(ref.reshape(3, -1), out.reshape(3, -1), dim=1).mean().item()
    assert last_pass and abs(sim - last_pass[-1]["sim"]) < 1e-4


def test_target_count_mode_is_exact_and_deterministic(tmp_path):
    model = make_model("llama", 8)
    ids = calib_ids(3, 12)
    plan = plan_of(get_pass("slm", num_layers=3), model, ids)
    assert plan.removed_layers == 3
    threshold = plan.params["threshold"]
    again = plan_of(get_pass("slm", threshold=threshold), model, ids)
    assert again.windows == plan.windows
    assert plan.trace["search"] and plan.trace["target_removed"] == 3
    plan.save(tmp_path / "a.json")
    plan_of(get_pass("slm", num_layers=3), model, ids).save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_unreachable_target_warns_and_takes_closest_below(monkeypatch):
    model = make_model("llama", 6)
    # every window passes: windows grow to the bottom and are never committed, except [3, 4] fails at (2, 4)
    table = {((), (3, 4)): 0.9, ((), (2, 4)): 0.1, (((3, 4),), (1, 2)): 0.95, (((3, 4),), (0, 2)): 0.95}
    _scripted(monkeypatch, table, default=0.95, strict=False)
    with pytest.warns(UserWarning, match="no threshold removes exactly 3"):
        plan = plan_of(get_pass("slm", num_layers=3), model, calib_ids(2, 8))
    assert plan.removed_layers == 1
    assert "note" in plan.trace


def test_constraints_protect_and_max_window(monkeypatch):
    model = make_model("llama", 8)
    _scripted(monkeypatch, {}, default=0.99, strict=False)
    plan = plan_of(get_pass("slm", protect=[3], max_window=2), model, calib_ids(2, 8))
    for lo, hi in plan.windows:
        assert hi - lo + 1 <= 2 and not lo <= 3 <= hi


def test_plan_leaves_model_unchanged_and_needs_calibration():
    model = make_model("llama", 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan_of(get_pass("slm", num_layers=2), model, calib_ids(2, 8))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.config.num_hidden_layers == 6
    with pytest.raises(Exception, match="needs calibration"):
        plan_of(get_pass("slm"), model, None)
