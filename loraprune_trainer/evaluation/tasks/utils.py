"""``process_docs`` (and WinoGrande's ``doc_to_*``) functions of the local zero-shot tasks.

Each ``process_*`` turns the rows of one upstream file format into the rows of the Hugging Face
dataset that lm-eval's official task reads, so the official ``doc_to_text`` / ``doc_to_choice`` /
``doc_to_target`` apply unchanged. A row that cannot be converted raises a ``ValueError`` that names
the task, the row and what was expected, rather than scoring a wrong label silently.
"""

from __future__ import annotations

import re

from datasets import Dataset


def _rows(dataset) -> list[dict]:
    return [dict(doc) for doc in dataset]


def process_boolq(dataset) -> Dataset:
    """SuperGLUE ``val.jsonl`` rows -> ``super_glue``/``boolq`` Hub rows.

    The file's ``label`` is ``"true"``/``"false"`` (a string; some copies store a JSON boolean); the Hub
    holds a class index, 0 = False ("no"), 1 = True ("yes"). ``passage`` is already "Title -- text" as
    the Hub holds it, and ``question`` has no question mark (the prompt adds one).
    """
    out = []
    for i, doc in enumerate(_rows(dataset)):
        label = doc.get("label")
        if isinstance(label, str):
            label = {"true": 1, "false": 0}.get(label.strip().lower(), label)
        elif isinstance(label, bool):
            label = int(label)
        if label not in (0, 1):
            raise ValueError(f"boolq row {i}: label {doc.get('label')!r} is not one of \"true\"/\"false\" "
                             "(SuperGLUE BoolQ val.jsonl format).")
        out.append({"question": doc["question"], "passage": doc["passage"], "idx": doc.get("idx", i),
                    "label": label})
    return Dataset.from_list(out)


def read_labels(path: str) -> list[int]:
    """The 0/1 labels of an upstream labels file (PIQA's ``valid-labels.lst``), one per line, in order."""
    with open(path, encoding="utf-8") as f:
        values = [line.strip() for line in f if line.strip()]
    for n, value in enumerate(values, 1):
        if value not in ("0", "1"):
            raise ValueError(f"{path}: label {n} is {value!r}, not 0 or 1 (one 0/1 label per line).")
    return [int(v) for v in values]


def process_piqa(dataset, labels_file: str | None = None) -> Dataset:
    """PIQA ``valid.jsonl`` rows (goal, sol1, sol2) plus ``valid-labels.lst`` -> Hub rows with ``label``.

    ``labels_file`` is the absolute path of the labels file, one 0/1 per row in order; the loader binds it
    (piqa.yaml names it, relative to the zero-shot folder, as ``metadata.labels_file``).
    """
    rows = _rows(dataset)
    if labels_file is None:
        raise ValueError("piqa: the labels are in a separate file (valid-labels.lst); load the task through "
                         "loraprune_trainer.evaluation.zeroshot, which passes its path as `labels_file`.")
    labels = read_labels(labels_file)
    if len(labels) != len(rows):
        raise ValueError(f"piqa: {labels_file} has {len(labels)} labels for {len(rows)} rows; the data and labels "
                         "files must be the matching pair (valid.jsonl / valid-labels.lst) of one PIQA release.")
    out = []
    for doc, label in zip(rows, labels):
        out.append({"goal": doc["goal"], "sol1": doc["sol1"], "sol2": doc["sol2"], "label": label})
    return Dataset.from_list(out)


def process_winogrande(dataset) -> Dataset:
    """WinoGrande ``dev.jsonl`` rows: already the Hub fields; ``answer`` is checked and kept a string
    ("1"/"2"), as the Hub holds it and :func:`winogrande_doc_to_text` expects."""
    out = []
    for i, doc in enumerate(_rows(dataset)):
        answer = str(doc.get("answer", "")).strip()
        if answer not in ("1", "2"):
            raise ValueError(f"winogrande row {i}: answer {doc.get('answer')!r} is not \"1\" or \"2\" (an unlabelled "
                             "test file? use dev.jsonl).")
        if "_" not in doc["sentence"]:
            raise ValueError(f"winogrande row {i}: the sentence has no \"_\" blank.")
        out.append({"sentence": doc["sentence"], "option1": doc["option1"], "option2": doc["option2"],
                    "answer": answer})
    return Dataset.from_list(out)


def winogrande_doc_to_text(doc) -> int:
    """Index of the gold context: lm-eval's partial evaluation scores one continuation after two contexts,
    so the "text" is the answer's index ("1" -> 0, "2" -> 1)."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc) -> str:
    """The shared continuation: the sentence after the blank, stripped."""
    blank = doc["sentence"].index("_") + 1
    return doc["sentence"][blank:].strip()


def winogrande_doc_to_choice(doc) -> list[str]:
    """The two contexts: the sentence up to the blank with each option filled in."""
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


def _flatten_question(task: str, i: int, doc: dict) -> tuple[str, dict, str]:
    """(stem, {"text": [...], "label": [...]}, answerKey) of an ARC / OpenBookQA upstream row."""
    question = doc.get("question")
    if not isinstance(question, dict) or "stem" not in question or "choices" not in question:
        raise ValueError(f"{task} row {i}: expected the upstream form question.stem / question.choices[{{text, "
                         f"label}}] / answerKey, got fields {sorted(doc)}.")
    choices = {"text": [c["text"] for c in question["choices"]], "label": [c["label"] for c in question["choices"]]}
    answer = doc.get("answerKey")
    # The official target is choices.label.index(answerKey) (OpenBookQA strips it first): a key that is
    # not a label would fail deep inside lm-eval.
    if not isinstance(answer, str) or answer.strip() not in choices["label"]:
        raise ValueError(f"{task} row {i}: answerKey {answer!r} is not one of the labels {choices['label']}.")
    return question["stem"], choices, answer


def process_arc(dataset) -> Dataset:
    """ARC ``*-Test.jsonl`` rows -> ``allenai/ai2_arc`` Hub rows (id, question, choices, answerKey)."""
    out = []
    for i, doc in enumerate(_rows(dataset)):
        stem, choices, answer = _flatten_question("arc", i, doc)
        out.append({"id": doc.get("id"), "question": stem, "choices": choices, "answerKey": answer})
    return Dataset.from_list(out)


def process_openbookqa(dataset) -> Dataset:
    """OpenBookQA ``test.jsonl`` rows -> ``allenai/openbookqa`` main Hub rows (id, question_stem, choices,
    answerKey)."""
    out = []
    for i, doc in enumerate(_rows(dataset)):
        stem, choices, answer = _flatten_question("openbookqa", i, doc)
        out.append({"id": doc.get("id"), "question_stem": stem, "choices": choices, "answerKey": answer})
    return Dataset.from_list(out)


def _hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag text cleaning (hellaswag/utils.py ``preprocess``): WikiHow's ``[title]`` becomes a
    sentence break, other bracketed markers are dropped, and one double space is collapsed."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def process_hellaswag(dataset) -> Dataset:
    """HellaSwag rows with a joined ``ctx`` (activity_label, ctx, endings[4], label 0-3) -> the rows lm-eval's
    official ``process_docs`` produces (``query``, ``choices``, ``gold``, and the Hub's string ``label``).

    lm-eval builds the context as ``ctx_a + " " + ctx_b.capitalize()``; with ``ctx`` already joined this is the
    same as ``ctx_a = ctx, ctx_b = ""`` (the trailing space is stripped), i.e. the fragment after the last
    sentence keeps its original case.
    """
    out = []
    for i, doc in enumerate(_rows(dataset)):
        endings, label = doc.get("endings"), doc.get("label")
        if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
            raise ValueError(f"hellaswag row {i}: expected `endings` to be a list of 4 strings, got {endings!r}.")
        if isinstance(label, str) and label.strip().isdigit():
            label = int(label)
        if isinstance(label, bool) or label not in (0, 1, 2, 3):
            raise ValueError(f"hellaswag row {i}: label {doc.get('label')!r} is not an index 0-3 into `endings` (an "
                             "unlabelled test file? use the validation split).")
        if not isinstance(doc.get("ctx"), str) or not isinstance(doc.get("activity_label"), str):
            raise ValueError(f"hellaswag row {i}: expected string fields `activity_label` and `ctx`, got fields "
                             f"{sorted(doc)}.")
        # ctx_a / ctx_b as the equivalent Hub row holds them: the whole context in ctx_a.
        out.append({"activity_label": doc["activity_label"], "ctx": doc["ctx"], "ctx_a": doc["ctx"], "ctx_b": "",
                    "endings": endings,
                    "label": str(label),
                    "query": _hellaswag_preprocess(doc["activity_label"] + ": " + doc["ctx"] + " "),
                    "choices": [_hellaswag_preprocess(e) for e in endings], "gold": label})
    return Dataset.from_list(out)
