"""Calibration data: documents from a file, folder, alias or ``datasets`` name, sampled as the official SLM code does.

Sampling (official ``get_examples``): random documents with at least ``seq_len`` tokens, none twice, each cropped at
a random offset to exactly ``seq_len`` tokens; tokenised with ``add_special_tokens=True``; Python ``random`` with the
given seed. We draw documents from a seeded permutation, which is the same "random document, never twice" law and
always terminates.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import random
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Iterator, Sequence

import torch

from .assets import corpus_alias
from .calibration_defaults import FIT_SAMPLES, FIT_SEQ_LEN, SAMPLINGS
from .errors import CalibrationError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
logger = logging.getLogger(__name__)


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


def read_json_rows(path: str) -> list:
    """The rows of a ``.jsonl`` file (one JSON value a line) or a ``.json`` file (a list, or an object with ``data``
    or ``rows``); one line naming the file and line when it is not valid JSON."""
    text = _read_text(path)
    if path.endswith(".jsonl"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                rows.append(_parse_json(line, f"{path}:{n}"))
        return rows
    data = _parse_json(text, path)
    return data.get("data", data.get("rows", [data])) if isinstance(data, dict) else data


def _parse_json(text: str, where: str) -> Any:
    """One JSON value; one line naming ``where`` when it is not valid JSON, nested too deeply for Python's parser,
    or holds an integer too long for Python to read (over 4300 digits)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"{where} is not valid JSON: {exc.msg}") from None
    except RecursionError:
        raise CalibrationError(f"{where} is nested too deeply to be a corpus (rows are strings or flat objects)"
                               ) from None
    except ValueError as exc:  # Python's limit on integer digits
        first = (str(exc).splitlines() or ["not valid JSON"])[0]
        raise CalibrationError(f"{where} cannot be read as JSON: {first}") from None


def _read_json_docs(path: str, text_field: str) -> list[str]:
    rows = read_json_rows(path)
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


#: whether a ``datasets`` name given as a corpus may be downloaded (off: the local cache only); ``downloads_allowed``
_DOWNLOADS: contextvars.ContextVar[bool] = contextvars.ContextVar("optimum_slm_calibration_downloads", default=False)


@contextlib.contextmanager
def downloads_allowed(allowed: bool = True) -> Iterator[None]:
    """Within this block a ``datasets`` corpus name may be downloaded from the Hub when it is not in the local cache
    (``slm compress --allow-download``); outside it, and by default, only the local cache is read."""
    token = _DOWNLOADS.set(bool(allowed))
    try:
        yield
    finally:
        _DOWNLOADS.reset(token)


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """``datasets`` and ``huggingface_hub`` in offline mode for the block (both read the switch at call time)."""
    import datasets.config as ds_config
    import huggingface_hub.constants as hub_constants

    saved = ds_config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    ds_config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        ds_config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _load_hf_dataset(name: str, text_field: str) -> list[str]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets comes with lm-eval
        raise CalibrationError(f"{name!r} is not a file and the datasets package is missing") from None
    path, _, config = name.partition(":")
    allowed = _DOWNLOADS.get()
    try:
        with contextlib.nullcontext() if allowed else _hub_offline():
            ds = datasets.load_dataset(path, config or None, split="train")
    except Exception as exc:  # datasets raises many types; offline misses are the common case
        if not allowed and isinstance(exc, (ConnectionError, FileNotFoundError)):  # offline: nothing cached
            raise CalibrationError(f"cannot load dataset {name!r}: it is not in the local cache; pass --allow-download "
                                   "to download it (Python: within optimum_slm.calibration.downloads_allowed())"
                                   ) from None
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CalibrationError(f"cannot load dataset {name!r}: {first}") from None
    if text_field not in ds.column_names:
        raise CalibrationError(f"dataset {name!r} has no column {text_field!r}; columns: {ds.column_names}")
    return [str(t) for t in ds[text_field]]


def _permutation(n: int, seed: int) -> tuple[random.Random, list[int]]:
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    return rng, order


def _crop_rows(tokenizer, docs: list[str], order: list[int], rng: random.Random, n_samples: int, seq_len: int
               ) -> tuple[list[list[int]], int, int]:
    """The official crops: (rows, documents long enough seen, how many of ``order`` were read)."""
    rows: list[list[int]] = []
    long_enough = read = 0
    for read, i in enumerate(order, 1):
        ids = tokenizer(docs[i], add_special_tokens=True)["input_ids"]
        if len(ids) < seq_len:
            continue
        long_enough += 1
        start = rng.randint(0, len(ids) - seq_len)
        rows.append(list(ids[start : start + seq_len]))
        if len(rows) == n_samples:
            break
    return rows, long_enough, read


def _separator(tokenizer) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        return [eos]
    return list(tokenizer("\n\n", add_special_tokens=False)["input_ids"])


class _Stream(list):
    read = 0


def pack_stream(tokenizer, docs: list[str], order: Sequence[int], need: int | None = None) -> list[int]:
    """The token ids of the documents of ``order`` joined by EOS, up to ``need`` tokens (all when None); the list's
    ``read`` says how many documents it took."""
    sep = _separator(tokenizer)
    stream = _Stream()
    for stream.read, i in enumerate(order, 1):
        stream.extend(tokenizer(docs[i], add_special_tokens=False)["input_ids"])
        stream.extend(sep)
        if need is not None and len(stream) >= need:
            break
    return stream


def pack_documents(tokenizer, docs: list[str], order: Sequence[int], n_samples: int, seq_len: int
                   ) -> tuple[torch.Tensor, int]:
    """``[n_samples, seq_len]`` ids cut from the documents of ``order`` concatenated, each followed by the
    tokenizer's EOS (a blank line when it has none); returns the ids and how many of ``order`` were read."""
    need = n_samples * seq_len
    stream = pack_stream(tokenizer, docs, order, need)
    read = stream.read
    if len(stream) < need:
        raise CalibrationError(f"the corpus holds {len(stream):,} tokens (documents joined by EOS); {n_samples} x "
                               f"{seq_len} needs {need:,} (use a larger corpus or fewer/shorter sequences)")
    return torch.tensor(stream[:need], dtype=torch.long).view(n_samples, seq_len), read


class CalibrationDraw:
    """One calibration request's documents in sampling order, and how far sampling has read them.

    The search set is read first; the fit set (``fit_ids``), drawn on demand, packs the documents that follow; the
    documents after both are the unseen text the quality check reads. So the three never share a document.
    """

    def __init__(self, tokenizer, docs: list[str], order: list[int], read: int,
                 fit_samples: int | None = None, fit_seq_len: int = 256):
        self.tokenizer, self.docs, self.order, self.read = tokenizer, docs, order, read
        self.fit_samples, self.fit_seq_len = fit_samples, fit_seq_len
        self._fit: torch.Tensor | None = None

    def fit_ids(self) -> torch.Tensor | None:
        """The fit set ``[fit_samples, fit_seq_len]`` (packed), drawn once; None when no fit set was asked for."""
        if self.fit_samples is None:
            return None
        if self._fit is None:
            rest = self.order[self.read :]
            try:
                ids, read = pack_documents(self.tokenizer, self.docs, rest, self.fit_samples, self.fit_seq_len)
            except CalibrationError:
                # a small corpus: as many whole sequences as the documents left hold, said out loud
                available = len(pack_stream(self.tokenizer, self.docs, rest)) // self.fit_seq_len
                if available < 1:
                    warnings.warn(f"the calibration corpus has no text left for a fit set of {self.fit_seq_len}-token "
                                  "sequences; maps are fitted on the search set", stacklevel=2)
                    return None
                warnings.warn(f"the calibration corpus holds {available} fit-set sequences of {self.fit_seq_len} "
                              f"tokens after the search set, not the {self.fit_samples} asked for; fitting on "
                              f"{available * self.fit_seq_len:,} tokens", stacklevel=2)
                ids, read = pack_documents(self.tokenizer, self.docs, rest, available, self.fit_seq_len)
            self.read += read
            self._fit = ids
        return self._fit

    def unseen(self) -> list[str]:
        return [self.docs[i] for i in self.order[self.read :]]


def sample_token_crops(
    tokenizer, docs: list[str], n_samples: int, seq_len: int, seed: int, sampling: str = "crop",
    fit_samples: int | None = None, fit_seq_len: int = 256,
) -> tuple[torch.Tensor, str, CalibrationDraw]:
    """``n_samples`` x ``seq_len`` calibration ids, the sampling used, and the draw (the fit set and the unseen
    documents that follow).

    ``sampling``: ``crop`` (official SLM: random ``seq_len``-token crops of distinct documents with at least
    ``seq_len`` tokens), ``pack`` (documents in seeded random order joined by EOS and cut into sequences), ``auto``
    (crop when enough documents are long enough, else pack).
    """
    if sampling not in SAMPLINGS:
        raise CalibrationError(f"calibration sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    rng, order = _permutation(len(docs), seed)
    used = "pack"
    if sampling != "pack":
        rows, long_enough, read = _crop_rows(tokenizer, docs, order, rng, n_samples, seq_len)
        if len(rows) == n_samples:
            out, used = torch.tensor(rows, dtype=torch.long), "crop"
        elif sampling == "crop":
            raise CalibrationError(
                f"only {long_enough} of {len(docs)} documents have >= {seq_len} tokens; need {n_samples} "
                "(use --calib-sampling pack, a larger corpus, fewer samples or a shorter --calib-seq-len)"
            )
        else:
            logger.info("only %d of %d documents have >= %d tokens: packing documents instead of cropping",
                        long_enough, len(docs), seq_len)
    if used == "pack":
        try:
            out, read = pack_documents(tokenizer, docs, order, n_samples, seq_len)
        except CalibrationError as exc:
            if sampling == "pack":
                raise
            raise CalibrationError(f"only {long_enough} of {len(docs)} documents have >= {seq_len} tokens, and packed, "
                                   f"{exc}") from None
    return out, used, CalibrationDraw(tokenizer, docs, order, read, fit_samples, fit_seq_len)


def _ids_sha256(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).cpu().contiguous().numpy().tobytes()).hexdigest()


def describe_calibration(ids: torch.Tensor, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plan's ``calibration`` block for token ids: ``provenance`` (source, seed, sampling; unknown for bare
    ids), the sizes and the ids' sha256."""
    info = dict(provenance or {"source": "<tensor>", "seed": None})
    info["n_samples"], info["seq_len"] = int(ids.shape[0]), int(ids.shape[1])
    info["sha256"] = _ids_sha256(ids)
    return info


def _describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        text = f"{str(value.dtype).replace('torch.', '')} tensor of shape {list(value.shape)}"
    else:
        text = type(value).__name__
    return ("an " if text[0] in "aeiou" else "a ") + text


def _check_ids(ids: Any, what: str) -> None:
    """Token ids are a 2-D LongTensor with at least one sequence of at least one token (the range against a model's
    vocabulary is checked where the model is known: ``pipeline.plan_compression``)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long or ids.numel() < 1:
        hint = ""
        if isinstance(ids, torch.Tensor) and ids.dim() == 1:
            hint = " (one sequence: ids[None])"
        elif isinstance(ids, torch.Tensor) and ids.dtype != torch.long and ids.dim() == 2:
            hint = " (token ids are integers: .long())" if not ids.is_floating_point() else \
                " (token ids are integers, e.g. tokenizer(text, return_tensors='pt').input_ids)"
        raise CalibrationError(f"{what} must be token ids, a LongTensor [n_samples, seq_len], got "
                               f"{_describe_value(ids)}{hint}")


class CalibrationSet:
    """The calibration data of one request: the search set, the fit set and the text neither read.

    ``ids`` is the search set ``[n_samples, seq_len]`` (what passes score candidates on); ``fit_ids()`` the fit set
    (packed from the documents after the search set's, drawn on first use; None when none was asked for or the ids
    came bare); ``unseen()`` the documents both left, which the quality check reads. ``describe()`` is the plan's
    ``calibration`` block. Built by ``CalibrationConfig.draw`` / ``load_calibration``, or ``CalibrationSet(ids)``
    around bare ids (then the plan records ``source: <tensor>`` and a ``fit`` given separately).
    """

    def __init__(self, ids: torch.Tensor, provenance: dict[str, Any] | None = None,
                 draw: CalibrationDraw | None = None, fit: torch.Tensor | None = None):
        _check_ids(ids, "calibration ids")
        if fit is not None:
            _check_ids(fit, "fit")
        self.ids, self.provenance, self.draw, self._fit = ids, dict(provenance or {}), draw, fit

    def with_fit(self, fit: torch.Tensor) -> "CalibrationSet":
        """This set with ``fit`` as its fit set (a fit set given beside the search set)."""
        return CalibrationSet(self.ids, self.provenance, self.draw, fit)

    @property
    def source(self) -> str:
        """The corpus the ids were drawn from (``calibration corpus`` for bare ids)."""
        return self.provenance.get("source") or "calibration corpus"

    def fit_ids(self) -> torch.Tensor | None:
        """The fit set: the one given, else the one drawn with the search set (None when there is neither)."""
        if self._fit is not None:
            return self._fit
        return self.draw.fit_ids() if self.draw is not None else None

    def unseen(self) -> list[str]:
        """The documents of the corpus that neither the search set nor the fit set read (empty for bare ids)."""
        return self.draw.unseen() if self.draw is not None else []

    def describe(self) -> dict[str, Any]:
        """The plan's ``calibration`` block of the search set."""
        return describe_calibration(self.ids, self.provenance or None)

    def describe_fit(self, fit: torch.Tensor) -> dict[str, Any]:
        """The plan's ``calibration.fit`` block for ``fit`` (the drawn fit set is packed; bare ids are described as
        such)."""
        if self.draw is not None and fit is self.draw.fit_ids():
            return describe_calibration(fit, {"sampling": "pack"})
        if fit is self.ids:
            return self.describe()
        return describe_calibration(fit)


def load_calibration(
    tokenizer,
    source: str | Iterable[str],
    n_samples: int = 10,
    seq_len: int = 128,
    seed: int = 1234,
    text_field: str = "text",
    sampling: str = "auto",
    fit_samples: int | None = None,
    fit_seq_len: int = 256,
) -> CalibrationSet:
    """Calibration data: a ``CalibrationSet`` whose ``ids`` are a ``LongTensor [n_samples, seq_len]``.

    ``source``: a ``.txt`` file (documents separated by blank lines), a ``.jsonl``/``.json`` file (field
    ``text_field``), a directory of such files, a corpus alias (``wiki-leads``), a ``datasets`` name (offline cache;
    ``name:config``), or a list of strings. Deterministic for a seed. ``sampling``: see ``sample_token_crops``.
    ``fit_samples`` x ``fit_seq_len``: the fit set (packed from the documents the search set did not use), drawn
    when a pass fits a map (``CalibrationSet.fit_ids``). The set records its source, sizes, seed and sampling for the
    plan.
    """
    if n_samples < 1 or seq_len < 1:
        raise CalibrationError(f"n_samples and seq_len must be positive, got {n_samples} and {seq_len}")
    if isinstance(source, str):
        docs, name = load_documents(source, text_field), source
    else:
        docs, name = [str(d) for d in source], "<documents>"
    ids, used, draw = sample_token_crops(tokenizer, docs, n_samples, seq_len, seed, sampling, fit_samples, fit_seq_len)
    provenance = {"source": name, "n_samples": n_samples, "seq_len": seq_len, "seed": seed, "sampling": used}
    return CalibrationSet(ids, provenance, draw)


#: upper bounds on a calibration request, refused before any text is read
MAX_SAMPLES = 1_000_000
MAX_SEQ_LEN = 1_000_000


@dataclass(frozen=True)
class CalibrationConfig:
    """Where calibration token ids come from and how many: the one description every front door passes on.

    Two roles, one corpus. The *search set*: ``n_samples`` sequences of ``seq_len`` tokens sampled with ``seed``
    (``sampling``: ``auto``/``crop``/``pack``, see ``sample_token_crops``), what passes score candidates on. The
    *fit set*: ``fit_samples`` x ``fit_seq_len`` tokens packed from the documents after the search set's, read only
    by passes that fit least-squares maps (``replaceme``, the ``*-lstsq`` merge rules), streamed in batches.
    ``text_field`` names the text of .jsonl/.json/datasets rows.
    """

    source: str | None = None
    n_samples: int = 10
    seq_len: int = 128
    seed: int = 1234
    text_field: str = "text"
    sampling: str = "auto"
    fit_samples: int = FIT_SAMPLES
    fit_seq_len: int = FIT_SEQ_LEN

    def __post_init__(self) -> None:
        for name, value, low, high in (("n_samples", self.n_samples, 1, MAX_SAMPLES),
                                       ("seq_len", self.seq_len, 2, MAX_SEQ_LEN),
                                       ("fit_samples", self.fit_samples, 1, MAX_SAMPLES),
                                       ("fit_seq_len", self.fit_seq_len, 2, MAX_SEQ_LEN)):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise CalibrationError(f"calibration {name} must be an integer in {low}..{high}, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise CalibrationError(f"calibration seed must be an integer, got {self.seed!r}")
        if self.sampling not in SAMPLINGS:
            raise CalibrationError(f"calibration sampling must be one of {', '.join(SAMPLINGS)}, got "
                                   f"{self.sampling!r}")

    def load(self, tokenizer) -> CalibrationSet:
        """The drawn ``CalibrationSet``: search-set ids ``[n_samples, seq_len]``, the fit set on demand, the unseen
        text."""
        if self.source is None:
            raise CalibrationError("no calibration source given (--calib-data / CalibrationConfig(source=...))")
        if tokenizer is None:
            raise CalibrationError("a tokenizer is needed to build calibration data from text")
        return load_calibration(tokenizer, self.source, self.n_samples, self.seq_len, self.seed, self.text_field,
                                self.sampling, self.fit_samples, self.fit_seq_len)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "calibration") -> "CalibrationConfig":
        """A config from a mapping (a recipe's ``calibration``); unknown keys are refused by name."""
        known = [f.name for f in fields(cls)]
        if not isinstance(values, dict):
            raise CalibrationError(f"{where} must be a mapping, got {type(values).__name__}")
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise CalibrationError(f"{where}: unknown calibration key {unknown[0]!r}; valid: {', '.join(known)}")
        return cls(**values)


