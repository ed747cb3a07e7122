"""Pass registry: built-ins, a plugin registered at run time, errors."""

from __future__ import annotations

import pytest

from conftest import make_model, plan_of
from optimum_slm import PassError, get_pass, hookimpl, list_passes, register_plugin
from optimum_slm.passes.base import CompressionPass, PassParam, PassResult
from optimum_slm.plan import drop_op
from optimum_slm.registry import unregister_plugin


class DropLast(CompressionPass):
    name = "drop-last-test"
    description = "Drop the last n layers below the top one (test plugin)."
    params = (PassParam("n", "int", 1, "how many"),)

    needs_calibration = False

    def run(self, engine):
        n = engine.num_layers
        return PassResult([drop_op(range(n - 1 - self.config["n"], n - 1))])


class Plugin:
    @hookimpl
    def register_passes(self, register):
        register(DropLast)


def test_builtins_listed_with_descriptions():
    passes = list_passes()
    assert "drop" in passes and "slm" in passes
    assert all(isinstance(d, str) and d for d in passes.values())


def test_runtime_plugin_registration():
    plugin = Plugin()
    register_plugin(plugin, "test-plugin")
    try:
        assert "drop-last-test" in list_passes()
        plan = plan_of(get_pass("drop-last-test", n="2"), make_model("llama", 6), None)
        assert plan.ops == [{"op": "drop", "layers": [3, 4]}]
        assert plan.method == "drop-last-test"
    finally:
        unregister_plugin(plugin)
    assert "drop-last-test" not in list_passes()


def test_unknown_pass_lists_available():
    with pytest.raises(PassError) as err:
        get_pass("nope")
    assert "unknown pass 'nope'; available:" in str(err.value) and "slm" in str(err.value)


def test_unknown_and_bad_params():
    with pytest.raises(PassError, match="has no parameter 'tresh'; valid: threshold"):
        get_pass("slm", tresh=0.5)
    with pytest.raises(PassError, match="ratio must be in"):
        get_pass("slm", ratio=1.5)
    with pytest.raises(PassError, match="either ratio or num_layers"):
        get_pass("slm", ratio=0.2, num_layers=3)
    with pytest.raises(PassError, match="parameter 'threshold'"):
        get_pass("slm", threshold="high")
    with pytest.raises(PassError, match="needs layers"):
        get_pass("drop")
    assert get_pass("drop", layers="1,3-4").config["layers"] == [1, 3, 4]
