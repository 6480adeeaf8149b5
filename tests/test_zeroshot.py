"""The zero-shot suite read from local files: task configs, item formatting against lm-eval's official
tasks, scoring, --limit, the folder flag / environment variable, and errors.

Everything runs offline on tests/data/zeroshot/ (four real items per task in the upstream formats) and a
tiny random model. The full splits are checked too when LORAPRUNE_DATA_DIR points at a data folder with
a zeroshot/ subfolder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import pytest

from loraprune_trainer.data import portable_path
from loraprune_trainer.evaluation import ZEROSHOT_DIR_ENV, ZEROSHOT_TASKS, local_task_config, local_task_configs
from loraprune_trainer.evaluation import zeroshot as zs
from tiny import tiny_model, tiny_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "data", "zeroshot")

# Each task's data file in a zero-shot folder (the layout of the upstream releases).
DOCS_FILE = {
    "boolq": "boolq/val.jsonl",
    "piqa": "piqa/valid.jsonl",
    "hellaswag": "hellaswag/val.jsonl",
    "winogrande": "winogrande/dev.jsonl",
    "arc_easy": "arc_easy/ARC-Easy-Test.jsonl",
    "arc_challenge": "arc_challenge/ARC-Challenge-Test.jsonl",
    "openbookqa": "openbookqa/test.jsonl",
}
# lm-eval's own definition of each task, relative to lm_eval/tasks/.
OFFICIAL_YAML = {
    "boolq": "super_glue/boolq/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}

# One fixture item per task in the form the Hub dataset that lm-eval's task reads holds it, written out by
# hand: (index in the fixture file, Hub row).
HUB_DOCS = {
    "boolq": (3, {"question": "are they going to make a punisher season 2",
                  "passage": "The Punisher (season 2) -- The season is set for release in 2019.",
                  "idx": 2644, "label": 1}),
    "piqa": (3, {"goal": "laser", "sol1": "burns face ", "sol2": "burns air ", "label": 0}),
    # The local file joins the Hub's ctx_a ("A man is sitting on a roof.") and ctx_b ("he"); the equivalent Hub
    # row keeps the whole context in ctx_a, so the official ctx_a + " " + ctx_b.capitalize() leaves it as it is.
    "hellaswag": (0, {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof. he", "ctx_b": "",
                      "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                                  "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
                      "label": "3"}),
    "winogrande": (0, {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
                       "option1": "Sarah", "option2": "Maria", "answer": "2"}),
    "arc_easy": (1, {"id": "NYSEDREGENTS_2015_8_28", "question": "All living and nonliving material is composed of",
                     "choices": {"text": ["air", "elements", "water", "soil"], "label": ["1", "2", "3", "4"]},
                     "answerKey": "2"}),
    "arc_challenge": (3, {"id": "NYSEDREGENTS_2012_8_42",
                          "question": "If the force used to push a shopping cart increases, the cart's "
                                      "acceleration will",
                          "choices": {"text": ["decrease", "increase", "remain the same"], "label": ["1", "2", "3"]},
                          "answerKey": "2"}),
    "openbookqa": (1, {"id": "1129", "question_stem": "There is most likely going to be fog around:",
                       "choices": {"text": ["a marsh", "a tundra", "the plains", "a desert"],
                                   "label": ["A", "B", "C", "D"]},
                       "answerKey": "A"}),
}


@pytest.fixture(autouse=True)
def _no_zeroshot_env(monkeypatch):
    """A developer's own LORAPRUNE_ZEROSHOT_DIR must not leak into these tests."""
    monkeypatch.delenv(ZEROSHOT_DIR_ENV, raising=False)


def _rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _hub_rows(task: str, folder: str = FIXTURE) -> list[dict]:
    """The fixture's rows in Hub form, converted here independently of the library (Hub schemas:
    super_glue/boolq, piqa, winogrande_xl, ai2_arc, openbookqa main)."""
    rows = _rows(os.path.join(folder, DOCS_FILE[task]))
    if task == "boolq":
        return [{"question": r["question"], "passage": r["passage"], "idx": r["idx"],
                 "label": {"false": 0, "true": 1}[r["label"]]} for r in rows]
    if task == "piqa":
        with open(os.path.join(folder, "piqa", "valid-labels.lst")) as f:
            labels = [int(x) for x in f.read().split()]
        return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": y} for r, y in zip(rows, labels)]
    if task == "winogrande":
        return [{k: r[k] for k in ("sentence", "option1", "option2", "answer")} for r in rows]
    if task == "hellaswag":  # the Hub holds the label as a string and the context in two parts
        return [{"activity_label": r["activity_label"], "ctx_a": r["ctx"], "ctx_b": "", "endings": r["endings"],
                 "label": str(r["label"])} for r in rows]
    out = []
    for r in rows:
        choices = {"text": [c["text"] for c in r["question"]["choices"]],
                   "label": [c["label"] for c in r["question"]["choices"]]}
        stem_field = "question_stem" if task == "openbookqa" else "question"
        out.append({"id": r["id"], stem_field: r["question"]["stem"], "choices": choices, "answerKey": r["answerKey"]})
    return out


def _official_config(task: str) -> dict:
    """lm-eval's installed task config for ``task``, ``!function`` and ``include`` resolved."""
    import lm_eval.tasks

    path = os.path.join(os.path.dirname(lm_eval.tasks.__file__), OFFICIAL_YAML[task])
    if not os.path.isfile(path):
        pytest.skip(f"this lm-eval version keeps {task} elsewhere than {OFFICIAL_YAML[task]}")
    try:
        from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval >= 0.4.10

        return load_yaml(path, resolve_func=True)
    except ImportError:
        from lm_eval.utils import load_yaml_config

        return load_yaml_config(path, mode="full")


def _official_task(task: str, docs: list[dict]):
    """lm-eval's official task, unchanged except that its dataset is ``docs`` (Hub rows) instead of a download."""
    from datasets import Dataset, DatasetDict
    from lm_eval.tasks import TaskManager

    config = _official_config(task)
    config["custom_dataset"] = lambda **_: DatasetDict({s: Dataset.from_list(docs)
                                                        for s in ("train", "validation", "test")})
    return TaskManager(include_defaults=False).load([config])["tasks"][task]


def _our_task(task: str, folder: str = FIXTURE):
    from lm_eval.tasks import TaskManager

    config, _ = local_task_config(task, folder)
    return TaskManager(include_defaults=False).load([config])["tasks"][task]


def _requests(task) -> dict[int, list[tuple]]:
    """Per document: the (context, continuation) pairs lm-eval scores."""
    task.build_all_requests()
    out = {}
    for inst in task.instances:
        out.setdefault(inst.doc_id, []).append(inst.args)
    return out


def _rendered(task) -> list[tuple]:
    """Per document: what doc_to_text / doc_to_choice / doc_to_target give (the gold answer included)."""
    return [(task.doc_to_text(d), task.doc_to_choice(d), task.doc_to_target(d)) for d in task.eval_docs]


# -- the shipped task configs --------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ZEROSHOT_TASKS)
def test_task_config_is_the_official_one_but_for_the_data(task):
    pytest.importorskip("lm_eval", reason="lm-eval is an optional dependency (the `eval` / `test` extras)")
    ours, official = zs.load_task_yaml(task), _official_config(task)
    # Only where the data come from (and how upstream rows become Hub rows) may differ.
    data_keys = {"dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split", "test_split",
                 "process_docs", "tag", "metadata"}
    callables = {k for k in ours if callable(ours[k])} - data_keys  # WinoGrande's doc_to_*: compared by behaviour
    assert {k: v for k, v in ours.items() if k not in data_keys | callables} == \
           {k: v for k, v in official.items() if k not in data_keys | callables}
    assert ours["metadata"]["version"] == official["metadata"]["version"]
    # The same split is scored.
    assert (ours.get("test_split") or ours.get("validation_split")) == \
           (official.get("test_split") or official.get("validation_split"))
    assert ours["dataset_path"] == "json" and ours["task"] == task
    assert ours["dataset_kwargs"]["data_files"] == {ours.get("test_split") or ours["validation_split"]: DOCS_FILE[task]}


@pytest.mark.parametrize("task", ZEROSHOT_TASKS)
def test_items_are_formatted_as_the_official_task_formats_them(task):
    pytest.importorskip("lm_eval", reason="lm-eval is an optional dependency (the `eval` / `test` extras)")
    index, hub_doc = HUB_DOCS[task]
    hub_docs = _hub_rows(task)
    assert hub_docs[index] == hub_doc  # the test's own conversion agrees with the hand-written Hub row
    ours, official = _our_task(task), _official_task(task, hub_docs)
    assert len(ours.eval_docs) == len(official.eval_docs) == 4
    # Field for field, our converted rows are the Hub rows (extra upstream fields aside).
    for doc, expected in zip(ours.eval_docs, hub_docs):
        assert {k: doc[k] for k in expected} == expected
    assert _rendered(ours) == _rendered(official)
    assert _requests(ours) == _requests(official)


def test_known_items_exact_requests():
    """Two items spelled out: WinoGrande's partial scoring, and an ARC item with numeric answer keys."""
    pytest.importorskip("lm_eval", reason="lm-eval is an optional dependency (the `eval` / `test` extras)")
    wino = _our_task("winogrande")
    sentence = "Sarah was a much better surgeon than Maria so"
    assert _requests(wino)[0] == [(f"{sentence} Sarah", " always got the easier cases."),
                                  (f"{sentence} Maria", " always got the easier cases.")]
    assert wino.doc_to_text(wino.eval_docs[0]) == 1  # answer "2": the second context is gold
    arc = _our_task("arc_easy")
    assert _requests(arc)[1] == [("Question: All living and nonliving material is composed of\nAnswer:", f" {c}")
                                 for c in ("air", "elements", "water", "soil")]
    assert arc.doc_to_target(arc.eval_docs[1]) == 1  # answerKey "2" is the second choice
    hella = _our_task("hellaswag")
    assert _requests(hella)[0] == [("Roof shingle removal: A man is sitting on a roof. he", f" {e}") for e in
                                   ("is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                                    "is holding a rubik's cube.", "starts pulling up roofing on a roof.")]
    assert hella.doc_to_target(hella.eval_docs[0]) == 3 and hella.doc_to_target(hella.eval_docs[1]) == 0
    # The official cleaning applies: WikiHow's leftover [link] markers go, one double space is collapsed.
    query, choices, _ = _rendered(hella)[2]
    assert "[" not in query and "Visit a site like to find" in query
    assert "before going to bed. Do not be" in _rendered(hella)[3][1][1]
    boolq = _our_task("boolq")
    assert _requests(boolq)[3] == [("The Punisher (season 2) -- The season is set for release in 2019.\nQuestion: are "
                                    "they going to make a punisher season 2?\nAnswer:", f" {a}") for a in ("no", "yes")]


# -- scoring, limit, recording ------------------------------------------------------------------------------
def test_every_suite_task_scores_a_tiny_model():
    pytest.importorskip("lm_eval", reason="lm-eval is an optional dependency (the `eval` / `test` extras)")
    from loraprune_trainer.evaluation import zero_shot

    result = zero_shot(tiny_model("llama-gqa", seed=1), tiny_tokenizer(), list(ZEROSHOT_TASKS), zeroshot_dir=FIXTURE,
                       batch_size=4)
    assert list(result["tasks"]) == list(ZEROSHOT_TASKS)
    for task, entry in result["tasks"].items():
        official_metrics = [m["metric"] for m in _official_config(task)["metric_list"]]
        assert [m for m in ("acc", "acc_norm") if m in entry] == official_metrics, task
        assert all(0.0 <= entry[m] <= 1.0 for m in official_metrics)
        assert entry["num_samples"] == entry["num_samples_total"] == 4
        p = entry["protocol"]
        assert (p["task"], p["num_fewshot"], p["limit"], p["num_items"], p["metrics"]) == (task, 0, None, 4,
                                                                                          official_metrics)
        assert p["lm_eval"] and p["task_version"] == entry["version"]
        data = p["data"]
        assert data["source"] == "local files" and data["folder"] == portable_path(FIXTURE) and data["num_rows"] == 4
        expected_files = [DOCS_FILE[task]] + (["piqa/valid-labels.lst"] if task == "piqa" else [])
        assert list(data["files"]) == expected_files
        for rel, f in data["files"].items():
            assert f["path"] == portable_path(os.path.join(FIXTURE, rel))  # no machine path recorded
            f["path"] = os.path.join(FIXTURE, rel)
            assert f["sha256"] == hashlib.sha256(open(f["path"], "rb").read()).hexdigest()
    top = result["protocol"]
    assert top["zeroshot_dir"] == portable_path(FIXTURE) and top["zeroshot_dir_source"] == "argument"
    assert top["local_tasks"] == list(ZEROSHOT_TASKS) and top["num_fewshot"] == 0


def test_limit_scores_the_first_items_and_is_recorded(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is an optional dependency (the `eval` / `test` extras)")
    from loraprune_trainer.evaluation import zero_shot

    # The same folder cut to its first two items must give the same numbers as --limit 2.
    cut = tmp_path / "first2"
    shutil.copytree(FIXTURE, cut)
    for rel in list(DOCS_FILE.values()) + ["piqa/valid-labels.lst"]:
        lines = (cut / rel).read_text().splitlines(keepends=True)
        (cut / rel).write_text("".join(lines[:2]))
    model, tok = tiny_model("llama-gqa", seed=3), tiny_tokenizer()
    limited = zero_shot(model, tok, ZEROSHOT_TASKS, zeroshot_dir=FIXTURE, limit=2)
    first2 = zero_shot(model, tok, ZEROSHOT_TASKS, zeroshot_dir=str(cut))
    assert limited["protocol"]["limit"] == 2 and first2["protocol"]["limit"] is None
    for task in ZEROSHOT_TASKS:
        a, b = limited["tasks"][task], first2["tasks"][task]
        assert (a["num_samples"], a["num_samples_total"], b["num_samples"]) == (2, 4, 2)
        assert a["protocol"]["limit"] == 2 and a["protocol"]["num_items"] == 2
        assert {m: a[m] for m in ("acc", "acc_norm") if m in a} == {m: b[m] for m in ("acc", "acc_norm") if m in b}


# -- folder from the flag or the environment; stock tasks without either ---------------------------------------
def _save_tiny_folder(path):
    model, tok = tiny_model("llama-mha"), tiny_tokenizer()
    model.save_pretrained(path)
    tok.save_pretrained(path)


def test_cli_flag_and_env_var(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval", reason="lm-eval is an optional dependency (the `eval` / `test` extras)")
    from loraprune_trainer.eval import main

    _save_tiny_folder(tmp_path / "model")
    args = ["--model", str(tmp_path / "model"), "--tasks", "piqa,arc_easy", "--limit", "3", "--device", "cpu",
            "--batch_size", "4"]
    main(args + ["--zeroshot_dir", FIXTURE, "--out", str(tmp_path / "flag.json")])
    flag = json.loads((tmp_path / "flag.json").read_text())["zero_shot"]
    summary = json.loads(capsys.readouterr().out)
    assert summary["piqa/num_items"] == 3 and "arc_easy/acc_norm" in summary

    monkeypatch.setenv(ZEROSHOT_DIR_ENV, FIXTURE)
    main(args + ["--out", str(tmp_path / "env.json")])
    env = json.loads((tmp_path / "env.json").read_text())["zero_shot"]

    assert flag["protocol"]["zeroshot_dir_source"] == "argument"
    assert env["protocol"]["zeroshot_dir_source"] == f"env {ZEROSHOT_DIR_ENV}"
    for result in (flag, env):
        assert result["protocol"]["limit"] == 3 and result["protocol"]["zeroshot_dir"] == portable_path(FIXTURE)
        for task in ("piqa", "arc_easy"):
            entry = result["tasks"][task]
            assert entry["num_samples"] == 3 and entry["protocol"]["limit"] == 3
            assert entry["protocol"]["data"]["files"][DOCS_FILE[task]]["path"] == portable_path(
                os.path.join(FIXTURE, DOCS_FILE[task]))
    assert flag["tasks"] == env["tasks"]

    # The flag wins over the environment variable.
    monkeypatch.setenv(ZEROSHOT_DIR_ENV, str(tmp_path / "elsewhere"))
    assert zs.resolve_zeroshot_dir(FIXTURE) == (FIXTURE, "argument")


def test_without_folder_task_names_go_to_lm_eval_unchanged(monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is an optional dependency (the `eval` / `test` extras)")
    import lm_eval

    seen = {}

    def fake_simple_evaluate(model, tasks, **kwargs):
        seen["tasks"] = tasks
        return {"results": {}, "n-samples": {}, "versions": {}, "configs": {}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_simple_evaluate)
    monkeypatch.setattr(zs, "_task_manager", lambda TaskManager, tasks, include_path: None)  # no 8 s task index
    model, tok = tiny_model(), tiny_tokenizer()
    zs.zero_shot(model, tok, "piqa,arc_easy,lambada_openai")
    assert seen["tasks"] == ["piqa", "arc_easy", "lambada_openai"]  # the stock (Hub) tasks, as before
    monkeypatch.setenv(ZEROSHOT_DIR_ENV, FIXTURE)
    out = zs.zero_shot(model, tok, "piqa,arc_easy,lambada_openai")
    # With a folder the suite's tasks become inline configs reading it; other names still go through.
    assert [t if isinstance(t, str) else t["task"] for t in seen["tasks"]] == ["piqa", "arc_easy", "lambada_openai"]
    assert isinstance(seen["tasks"][0], dict) and seen["tasks"][2] == "lambada_openai"
    assert seen["tasks"][0]["dataset_kwargs"]["data_files"] == {"validation": os.path.join(FIXTURE, DOCS_FILE["piqa"])}
    assert out["protocol"]["local_tasks"] == ["piqa", "arc_easy"]
    assert out["tasks"]["lambada_openai"]["protocol"]["data"]["source"] == "lm-eval task"


def test_env_var_empty_means_unset(monkeypatch):
    monkeypatch.setenv(ZEROSHOT_DIR_ENV, "")
    assert zs.resolve_zeroshot_dir(None) == (None, None)
    assert local_task_configs("piqa") == ({}, None, None)


# -- errors, before any model is loaded -------------------------------------------------------------------------
def test_missing_folder_is_clear_and_comes_before_the_model(tmp_path, monkeypatch):
    from loraprune_trainer.eval import main

    pytest.importorskip("lm_eval", reason="lm-eval is an optional dependency (the `eval` / `test` extras)")
    missing = tmp_path / "no-such-folder"
    # The model does not exist either: the folder error must come first.
    expected = f"{re.escape(str(missing))}.*does not exist.*--zeroshot_dir(.|\n)*boolq/val.jsonl"
    with pytest.raises(FileNotFoundError, match=expected):
        main(["--model", str(tmp_path / "no-model"), "--tasks", "piqa", "--zeroshot_dir", str(missing)])
    monkeypatch.setenv(ZEROSHOT_DIR_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(missing))}.*{ZEROSHOT_DIR_ENV}"):
        main(["--model", str(tmp_path / "no-model"), "--tasks", "piqa"])


def test_missing_task_file_names_path_and_format(tmp_path):
    from loraprune_trainer.eval import main

    pytest.importorskip("lm_eval", reason="lm-eval is an optional dependency (the `eval` / `test` extras)")
    folder = tmp_path / "zs"
    shutil.copytree(FIXTURE, folder)
    (folder / "piqa" / "valid-labels.lst").unlink()
    expected = os.path.join(str(folder), "piqa", "valid-labels.lst")
    with pytest.raises(FileNotFoundError, match=f"'piqa' needs {re.escape(expected)}.*valid-labels.lst \\(one 0/1"):
        main(["--model", str(tmp_path / "no-model"), "--tasks", "arc_easy,piqa", "--zeroshot_dir", str(folder)])
    # A task that is not asked for may be missing.
    shutil.rmtree(folder / "boolq")
    local, _, _ = local_task_configs(["arc_easy"], str(folder))
    assert list(local) == ["arc_easy"]


@pytest.mark.parametrize("task,edit,match", [
    ("boolq", lambda rows: rows[1].update(label="maybe"), "boolq row 1: label 'maybe'"),
    ("winogrande", lambda rows: rows[0].update(answer=""), "winogrande row 0: answer ''"),
    ("arc_easy", lambda rows: rows[2].update(answerKey="Z"), "arc row 2: answerKey 'Z' is not one of"),
    ("openbookqa", lambda rows: rows[0].pop("question"), "openbookqa row 0: expected the upstream form"),
    ("hellaswag", lambda rows: rows[1].update(label=4), "hellaswag row 1: label 4 is not an index 0-3"),
    ("hellaswag", lambda rows: rows[0].update(endings=["only one"]), "hellaswag row 0: expected `endings`"),
    ("piqa", lambda rows: rows.pop(), "3 rows.*matching pair"),
    ("piqa", lambda rows: rows[0].pop("sol2"), "lacks a field"),
])
def test_malformed_files_are_named(tmp_path, task, edit, match):
    folder = tmp_path / "zs"
    shutil.copytree(FIXTURE, folder)
    rows = _rows(str(folder / DOCS_FILE[task]))
    edit(rows)
    (folder / DOCS_FILE[task]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=match) as err:
        local_task_config(task, str(folder))
    assert DOCS_FILE[task] in str(err.value)


def test_paper_mean_is_over_the_papers_six_tasks_with_their_metrics():
    from loraprune_trainer.evaluation import PAPER_TASKS, paper_mean

    assert PAPER_TASKS == ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
    tasks = {t: {"acc": 0.1 * (i + 1), "acc_stderr": 0.01, "acc_norm": 0.05 * (i + 1), "acc_norm_stderr": 0.02}
             for i, t in enumerate(ZEROSHOT_TASKS)}
    tasks["winogrande"].pop("acc_norm")  # WinoGrande has acc only
    table = paper_mean(tasks)
    # acc for PIQA, WinoGrande, ARC-e; acc_norm for HellaSwag, ARC-c, OBQA; BoolQ (0.1) never enters.
    expected = [tasks["piqa"]["acc"], tasks["hellaswag"]["acc_norm"], tasks["winogrande"]["acc"],
                tasks["arc_easy"]["acc"], tasks["arc_challenge"]["acc_norm"], tasks["openbookqa"]["acc_norm"]]
    assert table["mean"] == pytest.approx(sum(expected) / 6)
    assert table["stderr"] == pytest.approx((3 * 0.01 ** 2 + 3 * 0.02 ** 2) ** 0.5 / 6)
    assert table["metrics"]["hellaswag"] == "acc_norm" and table["metrics"]["piqa"] == "acc"
    # A table without one of the six has no headline mean.
    partial = paper_mean({t: v for t, v in tasks.items() if t != "hellaswag"})
    assert partial["mean"] is None and partial["missing"] == ["hellaswag"]


def test_few_shot_with_local_files_is_refused():
    with pytest.raises(ValueError, match="num_fewshot=5.*only the evaluation splits"):
        local_task_configs("arc_easy", FIXTURE, num_fewshot=5)


# -- packaging ---------------------------------------------------------------------------------------------------
def test_task_yamls_are_package_data():
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml with tomllib")

    for task in ZEROSHOT_TASKS:
        assert os.path.isfile(os.path.join(zs.TASKS_DIR, f"{task}.yaml"))
    with open(os.path.join(HERE, "..", "pyproject.toml"), "rb") as f:
        package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
    assert "*.yaml" in package_data["loraprune_trainer.evaluation.tasks"]
    assert os.path.isfile(os.path.join(zs.TASKS_DIR, "__init__.py"))  # a package, so setuptools finds it


# -- the full splits, when a data folder is available -------------------------------------------------------------
FULL_SPLITS = {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376, "arc_challenge": 1172,
               "openbookqa": 500}


def _real_folder() -> str:
    folder = os.path.join(os.environ.get("LORAPRUNE_DATA_DIR", ""), "zeroshot")
    if not os.environ.get("LORAPRUNE_DATA_DIR") or not os.path.isdir(folder):
        pytest.skip("set LORAPRUNE_DATA_DIR to a data folder with zeroshot/ to check the full splits")
    return folder


def test_full_splits_load_with_their_item_counts():
    folder = _real_folder()
    local, _, _ = local_task_configs(ZEROSHOT_TASKS, folder)
    assert {t: data["num_rows"] for t, (_, data) in local.items()} == FULL_SPLITS


@pytest.mark.parametrize("task", ZEROSHOT_TASKS)
def test_full_split_formatted_as_official(task):
    pytest.importorskip("lm_eval", reason="lm-eval is an optional dependency (the `eval` / `test` extras)")
    folder = _real_folder()
    ours, official = _our_task(task, folder), _official_task(task, _hub_rows(task, folder))
    assert _rendered(ours) == _rendered(official)
