"""Shared fixtures: tiny random models of every supported family, a tiny tokenizer, a small corpus."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys

import pytest
import torch
import transformers

# the v1 plan fixtures' helpers (weights_digest, smollm2_shaped) are shared by several tests
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "plans_v1"))

FAMILY_CONFIGS = {
    "llama": lambda n: transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=n,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    ),
    "mistral": lambda n: transformers.MistralConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=n,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=8,
    ),
    "qwen2": lambda n: transformers.Qwen2Config(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=n,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        use_sliding_window=True, sliding_window=8, max_window_layers=3,
    ),
    "qwen3": lambda n: transformers.Qwen3Config(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=n, head_dim=16,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        use_sliding_window=True, sliding_window=8, max_window_layers=3,
    ),
    "gemma2": lambda n: transformers.Gemma2Config(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=n, head_dim=16,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=8,
    ),
    "gemma3_text": lambda n: transformers.Gemma3TextConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=n, head_dim=16,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=8,
        sliding_window_pattern=3,
    ),
    "phi3": lambda n: transformers.Phi3Config(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=n,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ),
}
FAMILIES = sorted(FAMILY_CONFIGS)


def make_config(family: str, num_layers: int = 6):
    cfg = FAMILY_CONFIGS[family](num_layers)
    cfg._attn_implementation = "eager"
    return cfg


def make_model(family: str = "llama", num_layers: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(make_config(family, num_layers), dtype=torch.float32)
    # random init leaves norms at one; perturb every tensor so merge rules and norms are distinguishable
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tiny_llama():
    return make_model("llama", 6)


def calib_ids(n: int = 4, seq: int = 16, vocab: int = 320, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, seq), generator=g)


CORPUS_WORDS = (
    "the model layer merge window similarity threshold token sentence language paper method result "
    "compression depth width pruning calibration sample data offline network output input hidden state"
).split()


def write_corpus(path, n_docs: int = 40, words: int = 60, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    docs = [" ".join(rng.choice(CORPUS_WORDS) for _ in range(words)) for _ in range(n_docs)]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n\n".join(docs) + "\n")
    return str(path)


@pytest.fixture(autouse=True)
def _own_plan_cache(tmp_path, monkeypatch):
    """Each test gets an empty plan cache: a plan cached by one test must not answer another's request."""
    monkeypatch.setenv("OPTIMUM_SLM_PLAN_CACHE", str(tmp_path / "plan-cache"))


@pytest.fixture(autouse=True)
def _loud_again():
    """``--quiet`` flips process-wide switches; restore them so each test sees the defaults."""
    yield
    from optimum_slm.progress import set_quiet
    from transformers.utils import logging as hf_logging

    set_quiet(False)
    hf_logging.enable_progress_bar()


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer trained in-process (vocab 320), saved to a folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([" ".join(CORPUS_WORDS)] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    return fast


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_tokenizer):
    """A saved 6-layer tiny Llama with tokenizer: a folder ``load_model`` and the CLI accept."""
    model = make_model("llama", 6)
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


def plan_of(compression_pass, model, calibration=None):
    """A one-stage plan of ``compression_pass`` for ``model`` through the pipeline, without the plan cache."""
    from optimum_slm.pipeline import compress

    return compress(model, compression_pass, calibration, cache=False)


# ------------------------------------------------------------------------------------------------ the CLI's faults
#: a small calibration for CLI runs on the tiny checkpoint
CLI_CALIB = ["--calib-samples", "4", "--calib-seq-len", "16"]


def run(*args: str):
    """``slm --quiet ARGS`` in process (click's runner), exceptions propagated."""
    from click.testing import CliRunner

    from optimum_slm.cli import cli

    return CliRunner().invoke(cli, ["--quiet", *args], catch_exceptions=False)


def assert_one_line(result, code: int, message: str) -> None:
    """The CLI failed as a fault should: exit ``code``, one ``error:`` line holding ``message``, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == code, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and message in lines[0], lines[0]
