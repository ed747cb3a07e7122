"""Calibration data: documents from a file, folder, alias or ``datasets`` name, sampled as the official SLM code does.

Sampling (official ``get_examples``): random documents with at least ``seq_len`` tokens, none twice, each cropped at
a random offset to exactly ``seq_len`` tokens; tokenised with ``add_special_tokens=True``; Python ``random`` with the
given seed. We draw documents from a seeded permutation, which is the same "random document, never twice" law and
always terminates.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import torch

from .assets import corpus_alias
from .errors import CalibrationError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")


def _split_txt(text: str) -> list[str]:
    docs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            docs.append("\n".join(current))
            current = []
    if current:
        docs.append("\n".join(current))
    return docs


def _read_text(path: str) -> str:
    """A corpus file's text; one line naming the file when it is not UTF-8 text or cannot be read."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{path} is not UTF-8 text (byte {exc.start}); convert it, e.g. iconv -f latin1 -t utf-8"
                               ) from None
    except OSError as exc:
        raise CalibrationError(f"cannot read {path}: {exc.strerror or exc}") from None


def _read_json_docs(path: str, text_field: str) -> list[str]:
    text = _read_text(path)
    if path.endswith(".jsonl"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise CalibrationError(f"{path}:{n} is not valid JSON") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path} is not valid JSON: {exc.msg}") from None
        if isinstance(data, dict):
            rows = data.get("data", data.get("rows", [data]))
        else:
            rows = data
        if not isinstance(rows, list):
            raise CalibrationError(f"{path} must hold a list of documents (strings or objects with "
                                   f"{text_field!r}), got {type(rows).__name__}")
    docs = []
    for n, row in enumerate(rows, 1):
        if isinstance(row, str):
            docs.append(row)
        elif isinstance(row, dict):
            if text_field not in row:
                raise CalibrationError(f"{path}: a row has no field {text_field!r} (use --text-field)")
            value = row[text_field]
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise CalibrationError(f"{path}: row {n}'s {text_field!r} is not text")
            docs.append(str(value))
        else:
            raise CalibrationError(f"{path}: row {n} is {type(row).__name__}, not a document (a string or an object "
                                   f"with {text_field!r})")
    return docs


def _read_file(path: str, text_field: str) -> list[str]:
    if path.endswith(".txt"):
        return _split_txt(_read_text(path))
    if path.endswith((".jsonl", ".json")):
        return _read_json_docs(path, text_field)
    raise CalibrationError(f"unsupported corpus file {path!r}; use .txt, .jsonl or .json")


def load_documents(source: str, text_field: str = "text") -> list[str]:
    """The documents of a calibration source (see ``load_calibration``)."""
    alias = corpus_alias(source)
    if alias is not None:
        return alias
    if os.path.isdir(source):
        files = sorted(
            os.path.join(root, f)
            for root, _, names in os.walk(source)
            for f in names
            if f.endswith(TEXT_SUFFIXES)
        )
        if not files:
            raise CalibrationError(f"directory {source!r} holds no .txt/.jsonl/.json files")
        return [doc for f in files for doc in _read_file(f, text_field)]
    if os.path.isfile(source):
        return _read_file(source, text_field)
    if source.endswith(TEXT_SUFFIXES) or source.startswith(("/", ".", "~")):
        raise CalibrationError(f"calibration source not found: {source}")
    return _load_hf_dataset(source, text_field)


def _load_hf_dataset(name: str, text_field: str) -> list[str]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets comes with lm-eval
        raise CalibrationError(f"{name!r} is not a file and the datasets package is missing") from None
    path, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(path, config or None, split="train")
    except Exception as exc:  # datasets raises many types; offline misses are the common case
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CalibrationError(
            f"cannot load dataset {name!r} (offline cache only; HF_HUB_OFFLINE may block downloads): {first}"
        ) from None
    if text_field not in ds.column_names:
        raise CalibrationError(f"dataset {name!r} has no column {text_field!r}; columns: {ds.column_names}")
    return [str(t) for t in ds[text_field]]


def sample_token_crops(
    tokenizer, docs: list[str], n_samples: int, seq_len: int, seed: int
) -> torch.Tensor:
    """``n_samples`` random ``seq_len``-token crops from distinct documents with at least ``seq_len`` tokens."""
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    rows: list[list[int]] = []
    long_enough = 0
    for i in order:
        ids = tokenizer(docs[i], add_special_tokens=True)["input_ids"]
        if len(ids) < seq_len:
            continue
        long_enough += 1
        start = rng.randint(0, len(ids) - seq_len)
        rows.append(list(ids[start : start + seq_len]))
        if len(rows) == n_samples:
            break
    if len(rows) < n_samples:
        raise CalibrationError(
            f"only {long_enough} of {len(docs)} documents have >= {seq_len} tokens; need {n_samples} "
            "(use a larger corpus, fewer samples or a shorter --calib-seq-len)"
        )
    out = torch.tensor(rows, dtype=torch.long)
    # the documents the sampling did not reach: text the calibration never saw (the quality check reads them)
    out.slm_unseen_documents = [docs[i] for i in order[order.index(i) + 1 :]]
    return out


def load_calibration(
    tokenizer,
    source: str | Iterable[str],
    n_samples: int = 10,
    seq_len: int = 128,
    seed: int = 1234,
    text_field: str = "text",
) -> torch.Tensor:
    """Calibration token ids, a ``LongTensor [n_samples, seq_len]``.

    ``source``: a ``.txt`` file (documents separated by blank lines), a ``.jsonl``/``.json`` file (field
    ``text_field``), a directory of such files, a corpus alias (``wiki-leads``), a ``datasets`` name (offline cache;
    ``name:config``), or a list of strings. Deterministic for a seed. The returned tensor carries
    ``.slm_calibration`` (source, sizes, seed) for the plan.
    """
    if n_samples < 1 or seq_len < 1:
        raise CalibrationError(f"n_samples and seq_len must be positive, got {n_samples} and {seq_len}")
    if isinstance(source, str):
        docs, name = load_documents(source, text_field), source
    else:
        docs, name = [str(d) for d in source], "<documents>"
    ids = sample_token_crops(tokenizer, docs, n_samples, seq_len, seed)
    ids.slm_calibration = {"source": name, "n_samples": n_samples, "seq_len": seq_len, "seed": seed}
    return ids


def unseen_documents(ids: torch.Tensor) -> list[str]:
    """The documents of the corpus ``ids`` were sampled from that the sampling never read (empty for bare ids)."""
    return list(getattr(ids, "slm_unseen_documents", None) or [])


#: upper bounds on a calibration request, refused before any text is read
MAX_SAMPLES = 1_000_000
MAX_SEQ_LEN = 1_000_000


@dataclass(frozen=True)
class CalibrationConfig:
    """Where calibration token ids come from and how many: the one description every front door passes on.

    ``source``: a corpus (see ``load_calibration``); ``n_samples`` sequences of ``seq_len`` tokens, sampled with
    ``seed``; ``text_field`` names the text of .jsonl/.json/datasets rows.
    """

    source: str | None = None
    n_samples: int = 10
    seq_len: int = 128
    seed: int = 1234
    text_field: str = "text"

    def __post_init__(self) -> None:
        for name, value, low, high in (("n_samples", self.n_samples, 1, MAX_SAMPLES),
                                       ("seq_len", self.seq_len, 2, MAX_SEQ_LEN)):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise CalibrationError(f"calibration {name} must be an integer in {low}..{high}, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise CalibrationError(f"calibration seed must be an integer, got {self.seed!r}")

    def load(self, tokenizer) -> torch.Tensor:
        """The token ids ``[n_samples, seq_len]`` (with ``.slm_calibration`` describing them)."""
        if self.source is None:
            raise CalibrationError("no calibration source given (--calib-data / CalibrationConfig(source=...))")
        if tokenizer is None:
            raise CalibrationError("a tokenizer is needed to build calibration data from text")
        return load_calibration(tokenizer, self.source, self.n_samples, self.seq_len, self.seed, self.text_field)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe_calibration(ids: torch.Tensor) -> dict[str, Any]:
    """The plan's ``calibration`` block for a token-id tensor."""
    info = dict(getattr(ids, "slm_calibration", None) or {"source": "<tensor>", "seed": None})
    info["n_samples"], info["seq_len"] = int(ids.shape[0]), int(ids.shape[1])
    info["sha256"] = hashlib.sha256(ids.to(torch.int64).cpu().contiguous().numpy().tobytes()).hexdigest()
    return info
