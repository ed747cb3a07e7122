"""Layer analysis: the minibatch linear CKA formula, its invariances, the profiles, and ``slm analyze`` end to end."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from click.testing import CliRunner

from optimum_slm import analysis
from optimum_slm.reports import plots
from optimum_slm.cli.analysis import analyze_command
from optimum_slm.errors import SLMError
from optimum_slm.plan import CompressionPlan, drop_op, merge_op
from optimum_slm.metrics import linear_cka

from conftest import calib_ids, make_model, write_corpus


def direct_cka(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    """The official formula written out with explicit loops over minibatches (float64)."""
    def hsic(k, l):
        n = k.shape[0]
        h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
        kc, lc = h @ k @ h, h @ l @ h
        return torch.trace(kc @ lc) / (n * (n - 3))

    xy = xx = yy = 0.0
    for x, y in zip(xs, ys):
        x = x.reshape(x.shape[0], -1).double()
        y = y.reshape(y.shape[0], -1).double()
        k, l = x @ x.T, y @ y.T
        xy, xx, yy = xy + hsic(k, l), xx + hsic(k, k), yy + hsic(l, l)
    return float(xy / torch.sqrt(xx * yy))


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_cka_matches_the_direct_formula_on_hand_made_matrices():
    x = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0], [3.0, 1.0, 0.0], [1.0, 1.0, 1.0], [2.0, 0.0, 1.0]])
    y = torch.tensor([[1.0, 2.0], [0.0, 1.0], [2.0, 2.0], [1.0, 0.0], [0.0, 3.0]])
    value = analysis.cka(x, y)
    assert value == pytest.approx(direct_cka([x], [y]), rel=1e-10)
    assert value == pytest.approx(linear_cka(x, y), rel=1e-10)  # one batch: the feature-space formula agrees
    assert 0.0 < value < 1.0


def test_minibatch_cka_sums_hsic_over_batches():
    xs = [rand(6, 4, 3, seed=1), rand(6, 4, 3, seed=2)]  # [batch, seq, hidden], flattened per example
    ys = [x.tanh() + 0.3 * rand(*x.shape, seed=7) for x in xs]
    matrix = analysis.minibatch_cka([xs, ys])
    assert matrix[0, 1] == pytest.approx(direct_cka(xs, ys), rel=1e-10)
    assert matrix[0, 1] == matrix[1, 0]
    assert torch.allclose(matrix.diagonal(), torch.ones(2, dtype=torch.float64))


def test_cka_invariances():
    x, y = rand(12, 5, seed=3), rand(12, 4, seed=4)
    q, _ = torch.linalg.qr(rand(5, 5, seed=5))
    assert analysis.cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert analysis.cka(x, x @ q) == pytest.approx(1.0, abs=1e-10)  # orthogonal transform
    assert analysis.cka(x @ q, y) == pytest.approx(analysis.cka(x, y), rel=1e-10)
    assert analysis.cka(3.7 * x, y) == pytest.approx(analysis.cka(x, y), rel=1e-10)  # isotropic scaling
    # a non-isotropic scaling is NOT an invariance: the test would catch a formula that normalised features
    assert analysis.cka(x * torch.tensor([10.0, 1, 1, 1, 1], dtype=torch.float64), y) != pytest.approx(
        analysis.cka(x, y), rel=1e-3)


def test_tiny_batches_use_the_biased_normaliser():
    x, y = rand(3, 4, seed=8), rand(3, 4, seed=9)
    assert analysis.cka(x, y) == pytest.approx(linear_cka(x, y), rel=1e-10)


def test_patches_are_runs_of_mutually_similar_layers():
    m = [[1, .97, .96, .5], [.97, 1, .98, .5], [.96, .98, 1, .5], [.5, .5, .5, 1]]
    assert analysis.top_patches(m, 0.95) == [(0, 2)]
    assert analysis.top_patches(m, 0.99) == []


def test_analyze_layers_profiles_match_hidden_states():
    model = make_model("llama", 5)
    ids = calib_ids(6, 12)
    result = analysis.analyze_layers(model, ids, batch_size=3)
    n = result["num_layers"]
    cka = torch.tensor(result["cka"])
    assert cka.shape == (n, n) and torch.allclose(cka, cka.T) and torch.allclose(cka.diagonal(), torch.ones(n))
    assert len(result["adjacent_cosine"]) == len(result["adjacent_cka"]) == n - 1
    assert len(result["block_influence"]) == n
    # cross-check the engine's recorded outputs against transformers' own hidden states
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states  # hs[i] = input of layer i; hs[n] is post-norm
    cos = torch.nn.functional.cosine_similarity(hs[1].reshape(6, -1).double(), hs[2].reshape(6, -1).double())
    assert result["adjacent_cosine"][0] == pytest.approx(float(cos.mean()), rel=1e-5)
    token_cos = torch.nn.functional.cosine_similarity(hs[0].double(), hs[1].double(), dim=-1)
    assert result["block_influence"][0] == pytest.approx(1 - float(token_cos.mean()), rel=1e-5)
    json.dumps(result)  # JSON-ready


def _png(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_analyze_cli_end_to_end_with_plan(tmp_path, tiny_checkpoint):
    from optimum_slm.loading import load_model

    model, _ = load_model(tiny_checkpoint)
    plan = CompressionPlan.for_model(model, "test", [merge_op(1, 2), drop_op([4])])
    plan.save(str(tmp_path / "plan.json"))
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "analysis"
    res = CliRunner().invoke(analyze_command, [
        "--model", tiny_checkpoint, "--calib-data", corpus, "--output", str(out), "--plan", str(tmp_path / "plan.json"),
        "--calib-samples", "4", "--calib-seq-len", "16", "--quiet"])
    assert res.exit_code == 0, res.output
    assert _png(out / "cka.png") and _png(out / "profile.png")
    data = json.loads((out / "analysis.json").read_text())
    assert data["num_layers"] == 6 and len(data["cka"]) == 6
    assert data["plan"] == {"method": "test", "windows": [[1, 2]], "dropped": [4]}
    assert data["calibration"]["n_samples"] == 4 and data["calibration"]["source"] == corpus
    assert "patches" in res.output


def test_analyze_cli_rejects_a_plan_for_another_model(tmp_path, tiny_checkpoint):
    plan = CompressionPlan.for_model(make_model("llama", 4), "test", [drop_op([1])])
    plan.save(str(tmp_path / "plan.json"))
    res = CliRunner().invoke(analyze_command, [
        "--model", tiny_checkpoint, "--calib-data", write_corpus(tmp_path / "c.txt"), "--output", str(tmp_path / "o"),
        "--plan", str(tmp_path / "plan.json"), "--calib-samples", "2", "--calib-seq-len", "8", "--quiet"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1].startswith("error: plan is for a 4-layer base")
    assert not os.path.exists(tmp_path / "o" / "cka.png")


def test_missing_matplotlib_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SLMError, match=r"optimum-slm\[plots\]"):
        plots._pyplot()
