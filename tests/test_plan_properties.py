"""Property tests: any mutation of a valid plan file either loads and rebuilds a consistent model (the identical one
when only descriptive fields changed) or is refused with one ``PlanError`` line — never a traceback."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import make_model
from optimum_slm import CompressionPlan, PlanError, apply_plan
from optimum_slm.plan import drop_op, merge_op
from optimum_slm.plan.fingerprint import fingerprint, fingerprint_files
from weights import weights_digest

BASE = make_model("llama", 6)
SCALES = {"merge.3-4.attn": torch.linspace(0.9, 1.1, 64), "merge.3-4.mlp": torch.linspace(1.1, 0.9, 64)}
PLAN = CompressionPlan.for_model(
    BASE, "hand", [merge_op(3, 4, "calibrated", tensors={"attn": "merge.3-4.attn", "mlp": "merge.3-4.mlp"}),
                   drop_op([1])],
    params={"ratio": 0.34}, trace={"tried": [{"window": [3, 4], "sim": 0.9, "passed": True}]},
    calibration={"source": "x", "n_samples": 2, "seq_len": 8, "seed": 1, "sha256": "0" * 64},
    tensors=SCALES)
REFERENCE = weights_digest(apply_plan(copy.deepcopy(BASE), PLAN))
DOCUMENT = PLAN.to_dict()

#: fields that describe how a plan was found; changing them must never change the model
DESCRIPTIVE = {("created_with",), ("base", "name_or_path")} | {
    ("stages", 0, key) for key in ("method", "params", "calibration", "trace")}


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


PATHS = [p for p in _paths(DOCUMENT) if p]
JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.integers(-(10**20), 10**20),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6),
    st.lists(st.integers(-2, 8), max_size=4), st.dictionaries(st.text(max_size=4), st.integers(0, 8), max_size=2),
)


def _set(document, path, value, delete: bool):
    target = document
    for key in path[:-1]:
        target = target[key]
    if delete:
        if isinstance(target, dict):
            del target[path[-1]]
        else:
            target.pop(path[-1])
    else:
        target[path[-1]] = value


def _check(path: tuple, tmp_path, tensors_file: bytes | None = None) -> None:
    plan_file = tmp_path / "slm_plan.json"
    try:
        plan = CompressionPlan.load(plan_file)
    except PlanError as exc:
        assert "\n" not in str(exc)
        return
    model = copy.deepcopy(BASE)
    try:
        apply_plan(model, plan)
    except PlanError as exc:
        assert "\n" not in str(exc)
        assert weights_digest(model) == weights_digest(BASE)  # refused before any change
        return
    assert model.config.num_hidden_layers == plan.num_layers_after
    if any(path[: len(d)] == d for d in DESCRIPTIVE) or tensors_file is not None:
        assert weights_digest(model) == REFERENCE, path


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(PATHS), value=JSON_VALUES, delete=st.booleans())
def test_json_mutations_are_refused_or_consistent(tmp_path, path, value, delete):
    document = copy.deepcopy(DOCUMENT)
    _set(document, path, value, delete)
    PLAN.save(tmp_path / "slm_plan.json")  # the side-car
    (tmp_path / "slm_plan.json").write_text(json.dumps(document))
    _check(path, tmp_path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(0, 10**6), flip=st.integers(1, 255))
def test_side_car_byte_flips_are_refused_or_harmless(tmp_path, position, flip):
    PLAN.save(tmp_path / "slm_plan.json")
    side = tmp_path / "slm_plan.tensors"
    data = bytearray(side.read_bytes())
    data[position % len(data)] ^= flip
    side.write_bytes(bytes(data))
    _check(("tensors",), tmp_path, tensors_file=bytes(data))


def test_the_unmutated_plan_rebuilds_the_reference(tmp_path):
    PLAN.save(tmp_path / "slm_plan.json")
    assert weights_digest(apply_plan(copy.deepcopy(BASE), CompressionPlan.load(tmp_path / "slm_plan.json"))) == \
        REFERENCE


@pytest.mark.parametrize("path", sorted(DESCRIPTIVE, key=str))
def test_descriptive_fields_never_change_the_model(tmp_path, path):
    document = copy.deepcopy(DOCUMENT)
    _set(document, path, {"edited": 1} if path[-1] in ("params", "trace", "calibration") else "edited", False)
    PLAN.save(tmp_path / "slm_plan.json")
    (tmp_path / "slm_plan.json").write_text(json.dumps(document))
    plan = CompressionPlan.load(tmp_path / "slm_plan.json")
    assert weights_digest(apply_plan(copy.deepcopy(BASE), plan)) == REFERENCE


# ------------------------------------------------------------------------------------------------ fingerprints
def _fp_base(tied: bool):
    import transformers

    from conftest import make_config

    torch.manual_seed(1)
    config = make_config("llama", 2)
    config.tie_word_embeddings = tied
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


FP_BASES = {tied: _fp_base(tied) for tied in (False, True)}
FP_REFERENCE = {tied: fingerprint(model) for tied, model in FP_BASES.items()}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tied=st.booleans(), which=st.integers(0, 10**6), position=st.integers(0, 10**7),
       value=st.floats(-1e4, 1e4, allow_nan=False, width=32))
def test_any_single_value_change_changes_the_v3_fingerprint(tmp_path, tied, which, position, value):
    """Any one value of any tensor changed (by more than bfloat16 rounding) changes the v3 fingerprint, and the
    fingerprint computed from the saved files equals the loaded model's."""
    model = copy.deepcopy(FP_BASES[tied])
    names = [name for name, _ in model.named_parameters()]
    flat = model.get_parameter(names[which % len(names)]).data.view(-1)
    i = position % flat.numel()
    assume(torch.tensor(value).bfloat16() != flat[i].bfloat16())
    flat[i] = value
    fp = fingerprint(model)
    assert fp != FP_REFERENCE[tied]
    model.save_pretrained(tmp_path / "ckpt")
    assert fingerprint_files(tmp_path / "ckpt", remember=False) == fp
