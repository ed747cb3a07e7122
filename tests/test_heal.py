"""Healing (``slm heal``, ``optimum_slm.heal``, a recipe's ``heal`` stage): what it writes, what it trains, the
best-checkpoint and early-stop logic, the data splits, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import transformers
from click.testing import CliRunner
from conftest import make_model, write_corpus
from safetensors.torch import load_file

from optimum_slm.cli import cli
from optimum_slm.healing import HEAL_FILE, HealConfig, HealError, heal, heal_model, load_heal_data, validation_loss
from optimum_slm.healing.data import IGNORE, PROMPT_NO_INPUT, PROMPT_WITH_INPUT
from optimum_slm.healing.train import _schedule
from optimum_slm.recipe import PassStage, Recipe, RecipeError

SLM = [sys.executable, "-c", "from optimum_slm.cli import main; main()"]
#: a short, fast run that does learn on the tiny corpus: no warm-up, a high rate, an evaluation every 2 steps
FAST = ["--cutoff-len", "32", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-2", "--warmup-steps", "0",
        "--eval-steps", "2", "--max-steps", "4"]


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def compressed(tmp_path, tiny_tokenizer, corpus):
    """A 4-layer tiny Llama compressed to 2 layers by ``slm compress``: checkpoint + plan + card."""
    base = tmp_path / "base"
    make_model("llama", 4).save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    out = tmp_path / "compressed"
    result = run("-q", "compress", "--model", str(base), "--method", "sleb", "--num-layers", "2", "--calib-data",
                 corpus, "--calib-samples", "4", "--calib-seq-len", "16", "--output", str(out))
    assert result.exit_code == 0, result.output
    return str(out)


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.mark.parametrize("method", ["lora", "tail"])
def test_heal_writes_a_plain_checkpoint_with_plan_and_card(compressed, corpus, tmp_path, method):
    out = tmp_path / "healed"
    result = run("-q", "heal", "--model", compressed, "--data", corpus, "--method", method, "--tail-layers", "1",
                 *FAST, "--output", str(out))
    assert result.exit_code == 0, result.output
    assert "healed (" in result.output and "validation loss" in result.output
    model = transformers.AutoModelForCausalLM.from_pretrained(out)  # vanilla transformers, no peft
    assert model.config.num_hidden_layers == 2
    assert not any("lora" in name for name in model.state_dict())
    before, after = _weights(compressed), _weights(out)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if method == "lora":  # adapters on every projection, merged into the weights
        assert {k for k in changed if k.endswith("proj.weight")} == {k for k in before if k.endswith("proj.weight")}
        assert not any("norm" in k or "embed" in k for k in changed)
    else:  # the last layer, the final norm and lm_head (tied to the embeddings here) only
        assert changed and all(k.startswith(("model.layers.1.", "model.norm", "model.embed_tokens", "lm_head"))
                               for k in changed)
        assert any(k.startswith("model.layers.1.") for k in changed)
    with open(os.path.join(compressed, "slm_plan.json"), "rb") as a, open(out / "slm_plan.json", "rb") as b:
        assert a.read() == b.read()
    card = (out / "README.md").read_text()
    with open(os.path.join(compressed, "README.md"), encoding="utf-8") as fh:
        assert card.startswith(fh.read().rstrip("\n"))
    assert "## Healing" in card and f"`{method}`" in card
    (record,) = json.loads((out / HEAL_FILE).read_text())
    assert record["method"] == method and record["steps"] == 4 and record["tokens_trained"] > 0
    assert record["val_loss_best"] < record["val_loss_before"]
    assert [h["step"] for h in record["val_history"]] == [0, 2, 4]


def test_healing_twice_keeps_both_records(compressed, corpus, tmp_path):
    once, twice = tmp_path / "once", tmp_path / "twice"
    for src, dst in ((compressed, once), (once, twice)):
        result = run("-q", "heal", "--model", str(src), "--data", corpus, *FAST, "--output", str(dst))
        assert result.exit_code == 0, result.output
    assert len(json.loads((twice / HEAL_FILE).read_text())) == 2
    card = (twice / "README.md").read_text()
    assert "## Healing\n" in card and "## Healing (run 2)" in card


@pytest.mark.parametrize("method", ["lora", "tail"])
def test_the_written_weights_are_the_best_evaluation(method, tiny_tokenizer, corpus):
    """The returned model is the best evaluation's (restored after later steps, LoRA merged): its validation loss,
    measured again, is the recorded best."""
    model = make_model("llama", 2)
    config = HealConfig(data=corpus, method=method, cutoff_len=32, batch_size=2, grad_accum=1, lr=3e-2,
                        warmup_steps=0, eval_steps=1, max_steps=6, patience=0, tail_layers=1)
    data = load_heal_data(tiny_tokenizer, config)
    healed, record = heal_model(model, tiny_tokenizer, config, data)
    losses = [h["val_loss"] for h in record["val_history"]]
    assert record["val_loss_best"] == min(losses) and len(losses) == 7
    again = validation_loss(healed, data.val, 2, tiny_tokenizer.pad_token_id, torch.device("cpu"))
    assert again == pytest.approx(record["val_loss_best"], rel=1e-4)
    assert all(not p.requires_grad for p in healed.parameters())


def test_early_stop_keeps_the_input_when_training_only_hurts(tiny_tokenizer, corpus):
    model = make_model("llama", 2)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    config = HealConfig(data=corpus, method="tail", tail_layers=1, cutoff_len=32, batch_size=2, grad_accum=1,
                        lr=50.0, max_grad_norm=1e6, warmup_steps=0, eval_steps=1, max_steps=50, patience=2)
    healed, record = heal_model(model, tiny_tokenizer, config)
    assert record["steps"] == 2 and record["stopped"].startswith("early stop at step 2")
    assert record["best_step"] == 0 and "input weights" in record["kept"]
    assert all(torch.equal(original[k], v) for k, v in healed.state_dict().items())


def test_a_time_budget_stops_after_the_step_that_reaches_it_and_evaluates_it(tiny_tokenizer, corpus):
    """``max_minutes`` ends the run at the first step past the budget (here any step), evaluates that step although
    it is not an ``eval_steps`` multiple, and keeps the best evaluation: the weights returned are the recorded best."""
    model = make_model("llama", 2)
    config = HealConfig(data=corpus, method="tail", tail_layers=1, cutoff_len=32, batch_size=2, grad_accum=1,
                        lr=3e-2, warmup_steps=0, eval_steps=100, max_steps=50, max_minutes=1e-9)
    data = load_heal_data(tiny_tokenizer, config)
    healed, record = heal_model(model, tiny_tokenizer, config, data)
    assert record["steps"] == 1 and record["stopped"] == "reached --max-minutes (1e-09) at step 1"
    assert [h["step"] for h in record["val_history"]] == [0, 1]
    again = validation_loss(healed, data.val, 2, tiny_tokenizer.pad_token_id, torch.device("cpu"))
    assert again == pytest.approx(record["val_loss_best"], rel=1e-4)
    # a budget the run never reaches changes nothing: it runs its steps
    config = HealConfig(data=corpus, method="tail", tail_layers=1, cutoff_len=32, batch_size=2, grad_accum=1,
                        lr=3e-2, warmup_steps=0, eval_steps=100, max_steps=3, max_minutes=60.0)
    _, record = heal_model(make_model("llama", 2), tiny_tokenizer, config, data)
    assert record["steps"] == 3 and record["stopped"] == "reached --max-steps"


def test_schedule_is_linear_warmup_then_linear_decay():
    assert [_schedule(s, 4, 10) for s in (0, 2, 4, 7, 10)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    assert _schedule(0, 0, 5) == 1.0


def test_text_split_never_shares_a_document(tiny_tokenizer, tmp_path):
    import random

    rng = random.Random(1)
    words = "alpha beta gamma delta model layer token".split()
    docs = [f"doc{i:03d}x " + " ".join(rng.choice(words) for _ in range(30)) for i in range(30)]
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(docs) + "\n")
    config = HealConfig(data=str(path), cutoff_len=24, val_size=5)
    data = load_heal_data(tiny_tokenizer, config)
    assert data.data_format == "text" and len(data.val) == 5 and len(data.train) > 20
    text = {part: tiny_tokenizer.decode([t for e in getattr(data, part) for t in e.input_ids]) for part in
            ("train", "val")}
    seen = {part: {i for i in range(30) if f"doc{i:03d}x" in text[part]} for part in text}
    assert seen["val"] and seen["train"] and not seen["val"] & seen["train"]
    assert all(len(e.input_ids) == 24 and e.labels == e.input_ids for e in data.train + data.val)
    other = load_heal_data(tiny_tokenizer, HealConfig(data=str(path), cutoff_len=24, val_size=5, val_seed=7))
    assert [e.input_ids for e in other.val] != [e.input_ids for e in data.val]
    assert [e.input_ids for e in load_heal_data(tiny_tokenizer, config).val] == [e.input_ids for e in data.val]


def test_instruction_rows_train_on_the_response_only(tiny_tokenizer, tmp_path):
    rows = [{"instruction": f"merge the layers {i}", "input": "the model" if i % 2 else "",
             "output": "the window output token"} for i in range(12)]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = load_heal_data(tiny_tokenizer, HealConfig(data=str(path), cutoff_len=512, val_size=2))
    assert data.data_format == "instruction" and len(data.train) == 10 and len(data.val) == 2
    def prompt_of(row):
        return (PROMPT_WITH_INPUT if row["input"] else PROMPT_NO_INPUT).format(**row)

    for example in data.train + data.val:
        text = tiny_tokenizer.decode(example.input_ids)
        (row,) = [r for r in rows if text.startswith(prompt_of(r))]
        n = len(tiny_tokenizer(prompt_of(row))["input_ids"])
        assert example.labels[:n] == [IGNORE] * n
        assert example.labels[n:] == example.input_ids[n:]
        assert example.input_ids[-1] == tiny_tokenizer.eos_token_id
        assert tiny_tokenizer.decode(example.labels[n:-1]) == "the window output token"
    model = make_model("llama", 2)
    healed, record = heal_model(model, tiny_tokenizer, HealConfig(data=str(path), cutoff_len=512, val_size=2,
                                                                   max_steps=2, batch_size=2, grad_accum=1,
                                                                   warmup_steps=0))
    assert record["steps"] == 2 and record["data"]["format"] == "instruction"


def test_python_api_heal_and_recipe_stage(compressed, corpus, tmp_path):
    record = heal(compressed, tmp_path / "api", data=corpus, method="tail", tail_layers=1, cutoff_len=32,
                  max_steps=2, warmup_steps=0, batch_size=2, grad_accum=1)
    assert record["steps"] == 2 and os.path.isfile(tmp_path / "api" / HEAL_FILE)

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stages:\n  - method: sleb\n    num_layers: 2\n  - heal: lora\n"
                      f"    data: {corpus}\n    cutoff_len: 32\n    max_steps: 2\n    warmup_steps: 0\n")
    base = tmp_path / "base"
    out = tmp_path / "recipe-out"
    result = run("-q", "compress", "--model", str(base), "--recipe", str(recipe), "--calib-data", corpus,
                 "--calib-samples", "4", "--calib-seq-len", "16", "--output", str(out))
    assert result.exit_code == 0, result.output
    assert "healed (lora)" in result.output and "slm_heal.json" in result.output
    assert json.loads((out / "slm_plan.json").read_text())["stages"][0]["method"] == "sleb"
    assert json.loads((out / HEAL_FILE).read_text())[0]["steps"] == 2
    assert "## Healing" in (out / "README.md").read_text()
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2


@pytest.mark.parametrize("stages, message", [
    ([{"heal": "lora", "data": "x.txt"}, {"method": "sleb", "num_layers": 1}], "must be the last stage"),
    ([{"heal": "lora", "data": "x.txt"}], "must be the last stage and follow a compression stage"),
    ([{"method": "sleb", "num_layers": 1}, {"heal": "lora"}], "needs 'data'"),
    ([{"method": "sleb", "num_layers": 1}, {"heal": "full", "data": "x.txt"}], "heal method must be one of"),
    ([{"method": "sleb", "num_layers": 1}, {"heal": "lora", "data": "x.txt", "steps": 3}],
     "unknown heal setting 'steps'"),
])
def test_recipe_heal_stage_is_checked(stages, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict({"stages": stages})


def test_a_heal_stage_becomes_the_recipes_heal_config():
    recipe = Recipe.from_dict({"stages": [{"method": "sleb", "num_layers": 1},
                                          {"heal": "tail", "data": "wiki-leads", "max_steps": 3}]})
    assert recipe.stages == (PassStage("sleb", {"num_layers": 1}),)
    config = recipe.heal
    assert config.method == "tail" and config.max_steps == 3 and config.learning_rate == 1e-5
    assert recipe.to_dict()["stages"][-1] == {"heal": "tail", "data": "wiki-leads", "max_steps": 3}


@pytest.mark.parametrize("args, message", [
    (["--lr", "-1"], "lr must be a positive finite number"),
    (["--lr", "nan"], "lr must be a positive finite number"),
    (["--max-steps", "0"], "max_steps must be an integer >= 1"),
    (["--max-minutes", "0"], "max_minutes must be a positive finite number"),
    (["--max-minutes", "inf"], "max_minutes must be a positive finite number"),
    (["--lora-dropout", "1"], "lora_dropout must be"),
    (["--tail-layers", "9", "--method", "tail"], "tail_layers 9 exceeds the model's 2 decoder layers"),
    (["--lora-targets", "q_proj,qkv_proj"], "LoRA target 'qkv_proj' is not a linear module"),
    (["--val-size", "100000"], "leaves nothing to train on"),
    (["--data", "missing.txt"], "not found"),
    (["--data-format", "instruction"], "is not a JSON/JSONL file of rows with 'instruction'"),
])
def test_bad_heal_input_is_one_line_and_writes_nothing(compressed, corpus, tmp_path, args, message):
    out = tmp_path / "out"
    argv = ["heal", "--model", compressed, "--data", corpus, *FAST, "--output", str(out)]
    for k in range(0, len(args), 2):  # a given option replaces the same option of the defaults above
        if args[k] in argv:
            argv[argv.index(args[k]) + 1] = args[k + 1]
        else:
            argv += args[k : k + 2]
    done = subprocess.run([*SLM, "-q", *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
    assert not out.exists()


def test_a_plan_of_another_model_is_refused(compressed, corpus, tmp_path):
    other = tmp_path / "other"
    result = run("-q", "compress", "--model", str(tmp_path / "base"), "--method", "sleb", "--num-layers", "1",
                 "--calib-data", corpus, "--calib-samples", "4", "--calib-seq-len", "16", "--plan-only",
                 "--output", str(other))
    assert result.exit_code == 0, result.output
    os.replace(other / "slm_plan.json", os.path.join(compressed, "slm_plan.json"))  # 4 -> 3 layers; this has 2
    result = run("-q", "heal", "--model", compressed, "--data", corpus, *FAST, "--output", str(tmp_path / "o"))
    assert result.exit_code == 2
    assert "describes a model with 3 layers but the checkpoint has 2" in result.output
    assert not (tmp_path / "o").exists()


def test_killing_heal_leaves_no_output(compressed, tmp_path):
    corpus = write_corpus(tmp_path / "big.txt", n_docs=400)
    out = tmp_path / "healed"
    args = ["heal", "--model", compressed, "--data", corpus, "--cutoff-len", "32", "--batch-size", "2",
            "--grad-accum", "1", "--eval-steps", "1000", "--warmup-steps", "0", "--output", str(out), "--overwrite"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for delay in (2.0, 4.5):
        proc = subprocess.Popen([*SLM, "-q", *args, "--max-steps", "100000"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(delay)
        assert proc.poll() is None  # still training
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert not out.exists()
    done = subprocess.run([*SLM, "-q", *args, "--max-steps", "2"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert os.path.isfile(out / HEAL_FILE)
    assert [f for f in os.listdir(tmp_path) if f.startswith(".healed.")] == []  # lock and temp folders cleaned


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "qlora"}, "heal method must be one of"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"epochs": float("inf")}, "epochs must be a positive finite number"),
    ({"patience": -1}, "patience must be an integer >= 0"),
    ({"lora_targets": ""}, "lora_targets is empty"),
    ({"precision": "fp8"}, "precision must be one of"),
])
def test_heal_config_refuses_bad_settings(kwargs, message):
    with pytest.raises(HealError, match=message):
        HealConfig(data="x", **kwargs)


def test_lm_eval_recipe_heal_stage_evaluates_the_healed_model(tiny_checkpoint, corpus, tmp_path):
    """``lm_eval --model slm`` with a recipe ending in ``heal``: the model it evaluates is the compressed model
    trained by the same healing run ``slm compress --recipe`` performs (same seed, same data)."""
    pytest.importorskip("lm_eval")
    from lm_eval_slm.model import SLMLM

    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - method: sleb\n    num_layers: 2\n  - heal: tail\n"
                      f"    data: {corpus}\n    tail_layers: 1\n    cutoff_len: 32\n    max_steps: 3\n"
                      "    eval_steps: 1\n    lr: 0.01\n    warmup_steps: 0\n")
    calib = ["--calib-data", corpus, "--calib-samples", "4", "--calib-seq-len", "16"]
    result = run("-q", "compress", "--model", tiny_checkpoint, "--recipe", str(recipe), *calib, "--output",
                 str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    lm = SLMLM(base=tiny_checkpoint, recipe=str(recipe), calib=corpus, calib_samples=4, calib_seq_len=16,
               device="cpu", batch_size=1)
    assert lm.slm_plan.heal_record["steps"] == 3
    written = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    probe = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(lm.model(probe).logits, written(probe).logits, atol=1e-5)
