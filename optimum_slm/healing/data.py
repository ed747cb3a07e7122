"""Healing data: packed language-model text or Alpaca-style instructions, split into training and validation.

Text (a .txt/.jsonl/.json file, a folder, ``wiki-leads``, a ``datasets`` name): documents in a seeded order, joined by
EOS, cut into ``cutoff_len`` sequences; the validation sequences come from the first documents of that order and
training from the rest, so no document is in both. Instructions (JSON/JSONL rows with ``instruction``, ``output`` and
optionally ``input``): the Alpaca prompt the paper's ``lora_retrain.py`` uses, truncated at ``cutoff_len``, EOS
appended when it fits, labels masked on the prompt (``train_on_inputs=False``); validation is a seeded sample of
the rows.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from ..calibration import _separator, load_documents, read_json_rows
from ..errors import CalibrationError
from .config import AUTO_VAL_FRACTION, MAX_AUTO_VAL, HealConfig, HealError

IGNORE = -100
#: the Alpaca prompt (alpaca-lora ``templates/alpaca.json``), which the paper's LoRA retraining uses
PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
INSTRUCTION_FIELDS = ("instruction", "output")


@dataclass
class Example:
    """One training sequence: token ids and the labels the loss reads (``IGNORE`` where it does not)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def label_tokens(self) -> int:
        # the first position predicts nothing (labels shift by one inside the loss)
        return sum(1 for t in self.labels[1:] if t != IGNORE)


@dataclass
class HealData:
    """The training and validation examples of one healing run, and where they came from."""

    train: list[Example]
    val: list[Example]
    source: str
    data_format: str

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "format": self.data_format, "train_examples": len(self.train),
                "train_tokens": sum(len(e.input_ids) for e in self.train),
                "val_examples": len(self.val), "val_tokens": sum(len(e.input_ids) for e in self.val)}


def _auto_val_size(n: int) -> int:
    return max(1, min(MAX_AUTO_VAL, int(round(AUTO_VAL_FRACTION * n))))


def _instruction_rows(path: str) -> list[dict[str, Any]] | None:
    """The rows of a JSON/JSONL file when they are Alpaca instructions (judged by the first row), else None."""
    if not (os.path.isfile(path) and path.endswith((".json", ".jsonl"))):
        return None
    try:
        rows = read_json_rows(path)
    except CalibrationError as exc:
        raise HealError(str(exc)) from None
    if not isinstance(rows, list) or not rows or not isinstance(rows[0], dict):
        return None
    return rows if all(f in rows[0] for f in INSTRUCTION_FIELDS) else None


def _instruction_example(tokenizer, row: Any, n: int, where: str, cutoff_len: int) -> Example:
    if not isinstance(row, dict) or not all(isinstance(row.get(f), str) for f in INSTRUCTION_FIELDS) \
            or not isinstance(row.get("input", ""), (str, type(None))):
        raise HealError(f"{where}: row {n} needs text fields 'instruction' and 'output' (and optionally 'input')")
    given = row.get("input") or ""
    prompt = (PROMPT_WITH_INPUT if given else PROMPT_NO_INPUT).format(instruction=row["instruction"], input=given)
    eos = getattr(tokenizer, "eos_token_id", None)

    def encode(text: str, add_eos: bool) -> list[int]:
        ids = list(tokenizer(text, truncation=True, max_length=cutoff_len)["input_ids"])
        if add_eos and isinstance(eos, int) and (not ids or ids[-1] != eos) and len(ids) < cutoff_len:
            ids.append(eos)
        return ids

    full = encode(prompt + row["output"], add_eos=True)
    prompt_len = len(encode(prompt, add_eos=False))
    return Example(full, [IGNORE] * min(prompt_len, len(full)) + full[prompt_len:])


def _split(items: list, val_size: int | None, what: str, source: str) -> tuple[list, list]:
    if len(items) < 2:
        raise HealError(f"heal data {source!r} holds {len(items)} {what}; at least 2 are needed (one to train on, "
                        "one to validate)")
    size = _auto_val_size(len(items)) if val_size is None else val_size
    if size >= len(items):
        raise HealError(f"heal val_size {size} leaves nothing to train on: {source!r} holds {len(items)} {what}")
    return items[size:], items[:size]


def load_heal_data(tokenizer, config: HealConfig) -> HealData:
    """Read, tokenise and split ``config.data`` (see the module docstring)."""
    if config.data is None:
        raise HealError("no heal data given (--data / HealConfig(data=...))")
    if tokenizer is None:
        raise HealError("healing needs the model's tokenizer")
    rows = _instruction_rows(config.data) if config.data_format in ("auto", "instruction") else None
    if config.data_format == "instruction" and rows is None:
        raise HealError(f"heal data {config.data!r} is not a JSON/JSONL file of rows with 'instruction' and 'output'")
    if rows is not None:
        order = list(range(len(rows)))
        random.Random(config.val_seed).shuffle(order)
        examples = [_instruction_example(tokenizer, rows[i], i + 1, config.data, config.cutoff_len) for i in order]
        train, val = _split(examples, config.val_size, "rows", config.data)
        return HealData(train, val, config.data, "instruction")
    try:
        docs = load_documents(config.data, config.text_field)
    except CalibrationError as exc:
        raise HealError(f"heal data: {exc}") from None
    if not docs:
        raise HealError(f"heal data {config.data!r} holds no documents")
    return _pack_text(tokenizer, docs, config)


def _pack_text(tokenizer, docs: list[str], config: HealConfig) -> HealData:
    order = list(range(len(docs)))
    random.Random(config.val_seed).shuffle(order)
    sep = _separator(tokenizer)
    streams = [list(tokenizer(docs[i], add_special_tokens=False)["input_ids"]) + sep for i in order]
    total = sum(len(s) for s in streams) // config.cutoff_len
    if total < 2:
        raise HealError(f"heal data {config.data!r} holds {sum(len(s) for s in streams):,} tokens: fewer than two "
                        f"{config.cutoff_len}-token sequences (lower --cutoff-len or give more text)")
    size = _auto_val_size(total) if config.val_size is None else config.val_size
    if size >= total:
        raise HealError(f"heal val_size {size} leaves nothing to train on: {config.data!r} holds about {total:,} "
                        f"sequences of {config.cutoff_len} tokens")
    # the validation documents: the first of the order, until they hold `size` sequences
    need, taken, held = size * config.cutoff_len, 0, 0
    while held < len(streams) and taken < need:
        taken += len(streams[held])
        held += 1
    val = _cut([t for s in streams[:held] for t in s], config.cutoff_len)[:size]
    train = _cut([t for s in streams[held:] for t in s], config.cutoff_len)
    if len(val) < size or not train:
        raise HealError(f"heal val_size {size} leaves nothing to train on: {config.data!r} holds about {total:,} "
                        f"sequences of {config.cutoff_len} tokens, and whole documents go to validation")
    return HealData(train, val, config.data, "text")


def _cut(stream: list[int], length: int) -> list[Example]:
    return [Example(stream[k : k + length], stream[k : k + length])
            for k in range(0, len(stream) - length + 1, length)]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (``IGNORE`` on padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a fresh seeded shuffle each epoch."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def micro_batches(examples: Sequence[Example], order: Sequence[int], batch_size: int) -> Iterator[list[Example]]:
    for k in range(0, len(order), batch_size):
        yield [examples[i] for i in order[k : k + batch_size]]


def steps_per_epoch(n_train: int, sequences_per_step: int) -> int:
    return max(1, math.ceil(n_train / sequences_per_step))
