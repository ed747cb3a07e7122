"""Prompt preprocessing for the tasks whose lm-eval versions need code: HellaSwag and WinoGrande.

Both follow lm-eval's own tasks exactly, so the numbers are comparable with ``--tasks hellaswag,winogrande``.
"""

from __future__ import annotations

import re
from typing import Any

_BRACKETED = re.compile(r"\[.*?\]")


def clean_hellaswag(text: str) -> str:
    """Undo WikiHow scraping artefacts: ``[title]`` becomes a sentence break, other ``[tags]`` vanish."""
    text = text.strip().replace(" [title]", ". ")
    text = _BRACKETED.sub("", text)
    return text.replace("  ", " ")


def hellaswag_doc(doc: dict[str, Any]) -> dict[str, Any]:
    """``query`` = "<activity>: <ctx_a> <Ctx_b>", four cleaned ``choices`` and the integer ``gold``."""
    context = f"{doc['ctx_a']} {doc['ctx_b'].capitalize()}"
    return {
        "query": clean_hellaswag(f"{doc['activity_label']}: {context}"),
        "choices": [clean_hellaswag(ending) for ending in doc["endings"]],
        "gold": int(doc["label"]),
    }


def hellaswag_process_docs(dataset):
    """lm-eval ``process_docs`` hook: map every raw HellaSwag row to query/choices/gold."""
    return dataset.map(hellaswag_doc)


# WinoGrande uses lm-eval's "partial scoring": each option fills the blank to form a different CONTEXT, and the model
# scores the same continuation (the words after the blank) under each. lm-eval signals this by doc_to_text returning
# the gold index and doc_to_choice returning the contexts.
def _blank(doc: dict[str, Any]) -> int:
    return doc["sentence"].index("_")


def winogrande_doc_to_text(doc: dict[str, Any]) -> int:
    """The gold option index (0 or 1)."""
    return {"1": 0, "2": 1}[str(doc["answer"])]


def winogrande_doc_to_target(doc: dict[str, Any]) -> str:
    """The shared continuation: the sentence after the blank."""
    return doc["sentence"][_blank(doc) + 1 :].strip()


def winogrande_doc_to_choice(doc: dict[str, Any]) -> list[str]:
    """The two partial contexts: the sentence up to the blank with each option filled in."""
    prefix = doc["sentence"][: _blank(doc)]
    return [prefix + doc["option1"], prefix + doc["option2"]]
