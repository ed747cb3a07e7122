"""The speed benchmark on tiny models: sane numbers, the speedup column, the CLI table and JSON, bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from optimum_slm import bench
from optimum_slm.cli.analysis import bench_command
from optimum_slm.compressor import SLMCompressor
from optimum_slm.errors import SLMError
from optimum_slm.registry import get_pass

from optimum_slm.arch import ArchAdapter
from conftest import make_model, plan_of

RUN = dict(batch_sizes=(1, 2), prompt_len=8, new_tokens=4, warmup=0, repeats=2)


@pytest.fixture(scope="module")
def results():
    base = make_model("llama", 6)
    small = make_model("llama", 6)
    ArchAdapter(small).remove_layers([3, 4, 5])
    return bench.bench_models([("base", base, None), ("half", small, None)], **RUN)


def test_results_are_sane(results):
    assert [(r.name, r.batch_size) for r in results] == [("base", 1), ("half", 1), ("base", 2), ("half", 2)]
    for r in results:
        # timings are only checked for sanity: their ratios depend on the machine's load
        assert r.prefill_ms > 0 and r.decode_ms_per_token > 0 and r.generate_ms > 0
        assert r.decode_tokens_per_s == pytest.approx(r.batch_size * 1e3 / r.decode_ms_per_token)
        assert r.e2e_tokens_per_s == pytest.approx(r.batch_size * r.new_tokens * 1e3 / r.generate_ms)
        assert r.peak_memory_mib >= 0 and r.memory_kind.startswith("cpu")
        assert len(r.samples["decode_ms_per_token"]) == 2
    base, half = results[0], results[1]
    assert base.num_layers == 6 and half.num_layers == 3 and half.params < base.params
    assert base.speedup_decode == 1.0 and base.ideal_speedup == 1.0
    assert half.ideal_speedup == 2.0 and half.speedup_decode > 0


def test_table_and_json(results):
    table = bench.format_table(results)
    assert "decode ×" in table and "ideal L/L′" in table and "| half | 3 |" in table and "2.00×" in table
    d = results[1].to_dict()
    assert set(d["stats"]["prefill_ms"]) == {"mean", "std", "median"}
    json.dumps(d)


def test_prompt_ids_repeat_the_paper_prompt(tiny_tokenizer):
    ids = bench.prompt_ids(tiny_tokenizer, 2, 20, 320)
    assert ids.shape == (2, 20) and bool((ids[0] == ids[1]).all())
    assert tiny_tokenizer.decode(ids[0]).startswith(bench.PAPER_PROMPT[:10])


def test_bad_input():
    m = make_model("llama", 2)
    with pytest.raises(SLMError, match="new_tokens"):
        bench.bench_models([("m", m, None)], new_tokens=1)
    with pytest.raises(SLMError, match="repeats"):
        bench.bench_models([("m", m, None)], repeats=0)
    with pytest.raises(SLMError, match="at least one"):
        bench.bench_models([])


def test_cli_compare_prints_speedup_and_json(tmp_path, tiny_checkpoint):
    compressor = SLMCompressor.from_pretrained(tiny_checkpoint)
    plan = plan_of(get_pass("drop", layers=[1, 2]), compressor.model, None)
    compressor.apply(plan, str(tmp_path / "small"))
    args = ["--model", tiny_checkpoint, "--compare", str(tmp_path / "small"), "--batch-sizes", "1",
            "--prompt-len", "6", "--new-tokens", "3", "--warmup", "0", "--repeats", "1", "--quiet"]
    res = CliRunner().invoke(bench_command, args)
    assert res.exit_code == 0, res.output
    assert "decode ×" in res.output and "| small | 4 |" in res.output and "1.50×" in res.output
    res = CliRunner().invoke(bench_command, args + ["--json"])
    data = json.loads(res.output)
    assert [r["num_layers"] for r in data] == [6, 4] and data[1]["ideal_speedup"] == 1.5
    res = CliRunner().invoke(bench_command, ["--model", tiny_checkpoint, "--batch-sizes", "1,x"])
    assert res.exit_code == 2
    res = CliRunner().invoke(bench_command, ["--model", str(tmp_path / "nope")])
    assert res.exit_code == 2 and res.output.strip().startswith("error:")


def test_decode_is_timed_on_its_own(monkeypatch):
    """A generate that reads as no slower than the prefill (a busy host) no longer makes decode ~0 s and tokens/s
    absurd: decode is its own loop of single-token steps on the prefill's KV cache."""
    monkeypatch.setattr(bench, "_generate", lambda model, ids, new_tokens, pad: (1e-9, new_tokens))
    m = make_model("llama", 2)
    (r,) = bench.bench_models([("m", m, None)], batch_sizes=(1,), prompt_len=8, new_tokens=4, warmup=0, repeats=1)
    assert r.decode_ms_per_token > 1e-3 and r.decode_tokens_per_s < 1e7  # at least a microsecond a token


def test_decode_steps_continue_the_prompt_greedily():
    """The timed loop produces the tokens generate would: greedy, on the cache (checked through a counting model)."""
    m = make_model("llama", 2)
    ids = bench.prompt_ids(None, 1, 8, m.config.vocab_size)
    calls = []
    handle = m.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                         with_kwargs=True)
    prefill, decode = bench._prefill_and_decode(m, ids, 5)
    handle.remove()
    assert prefill > 0 and decode > 0
    assert calls == [(1, 8)] + [(1, 1)] * 4  # one prefill, then new_tokens - 1 single-token steps


def test_repeats_that_disagree_give_one_warning_line(monkeypatch):
    times = iter([(0.010, 0.030), (0.010, 0.090), (0.011, 0.030)] * 4)
    monkeypatch.setattr(bench, "_prefill_and_decode", lambda model, ids, new_tokens: next(times))
    lines = []
    m = make_model("llama", 2)
    (r,) = bench.bench_models([("m", m, None)], batch_sizes=(1,), prompt_len=8, new_tokens=4, warmup=0, repeats=3,
                              warn=lines.append)
    assert r.spread["decode_ms_per_token"] == pytest.approx(2.0) and r.spread["prefill_ms"] == pytest.approx(0.1)
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "timings disagree by more than 20% across repeats in 1 of 2 measurements (worst: m decode at batch 1, " \
           "200%)" in lines[0]


def test_the_cli_prints_the_spread_warning(monkeypatch, tiny_checkpoint):
    times = iter([(0.010, 0.030), (0.010, 0.090)] * 4)
    monkeypatch.setattr(bench, "_prefill_and_decode", lambda model, ids, new_tokens: next(times))
    res = CliRunner().invoke(bench_command, ["--model", tiny_checkpoint, "--batch-sizes", "1", "--prompt-len", "6",
                                             "--new-tokens", "3", "--warmup", "0", "--repeats", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning: timings disagree")]
    assert len(warnings) == 1


@pytest.mark.parametrize("engine", ["vllm", "llama.cpp"])
def test_a_serving_engine_that_is_not_installed_is_one_line(tiny_checkpoint, engine):
    """``slm bench --engine`` times vLLM / llama.cpp when they are installed here; otherwise it says so in one line."""
    from optimum_slm.serving import ENGINES

    import importlib.util

    if importlib.util.find_spec(ENGINES[engine][0]) is not None:
        pytest.skip(f"{engine} is installed in this environment")
    result = CliRunner().invoke(bench_command, ["--model", tiny_checkpoint, "--engine", engine, "-q"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {engine} is not installed in this environment "
                                                   f"({ENGINES[engine][1]})"]
