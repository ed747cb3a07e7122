"""Plan format v1 stays readable: every v1 file written by optimum-slm 0.1.0 and every plan stored in
``benchmarks/results/`` rebuilds byte-identical weights (fixtures made with 0.1.0, see fixtures/plans_v1)."""

from __future__ import annotations

import json
import os

import pytest

from conftest import make_model
from optimum_slm import CompressionPlan, apply_plan

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures", "plans_v1")
from weights import smollm2_shaped, weights_digest  # noqa: E402  (tests/fixtures/plans_v1, on the path via conftest)

with open(os.path.join(FIXTURES, "expected.json"), encoding="utf-8") as _fh:
    EXPECTED = json.load(_fh)
with open(os.path.join(os.path.dirname(HERE), "benchmarks", "results", "quality_smollm2.json"), encoding="utf-8") as _fh:
    # the plans benchmarks stored as self-contained v1 ops (later ones reference side-car tensors by name)
    BENCHMARK_PLANS = {k: ops for k, ops in json.load(_fh)["plans"].items()
                       if not any("tensors" in op for op in ops)}


@pytest.mark.parametrize("name", sorted(EXPECTED["plans"]))
def test_v1_plan_file_rebuilds_identical_weights(name):
    want = EXPECTED["plans"][name]
    plan = CompressionPlan.load(os.path.join(FIXTURES, f"{name}.json"))
    model = make_model(want["family"], 6)
    apply_plan(model, plan)
    assert weights_digest(model) == {k: want[k] for k in ("sha256", "num_hidden_layers", "layer_types")}


@pytest.fixture(scope="module")
def smollm2_base():
    return smollm2_shaped()


def test_every_benchmark_plan_is_covered():
    assert sorted(BENCHMARK_PLANS) == sorted(EXPECTED["benchmark_plans"])


@pytest.mark.parametrize("key", sorted(BENCHMARK_PLANS))
def test_benchmark_plan_rebuilds_identical_weights(key, smollm2_base):
    want = EXPECTED["benchmark_plans"][key]
    # a v1 plan document as 0.1.0 wrote it, around the ops stored with the benchmark
    data = {
        "format": "optimum-slm.plan",
        "version": 1,
        "base": {"name_or_path": "smollm2-shaped", "model_type": "llama", "num_layers": 30,
                 "fingerprint": want["fingerprint_v1"]},
        "method": key.split("@")[0].split("[")[0],
        "params": {},
        "ops": BENCHMARK_PLANS[key],
        "num_layers_after": want["num_hidden_layers"],
    }
    plan = CompressionPlan.from_dict(data)
    model = smollm2_shaped()
    apply_plan(model, plan)
    assert weights_digest(model) == {k: want[k] for k in ("sha256", "num_hidden_layers", "layer_types")}
