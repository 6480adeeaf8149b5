"""train.py end to end on a tiny local model folder, and the dataset loader's forms."""

import json
import os
import sys

import pytest
import yaml
from tiny import tiny_model, tiny_text_dataset, tiny_tokenizer
from transformers import AutoModelForCausalLM

from loraprune_trainer.data import load_training_dataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import train  # noqa: E402


@pytest.fixture
def tiny_folder(tmp_path):
    path = tmp_path / "tiny-model"
    tiny_model("llama-gqa").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def test_train_py_end_to_end_with_yaml_config(tmp_path, tiny_folder, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", tiny_text_dataset(24).to_list())
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text(" ".join(tiny_text_dataset(40, length=30, seed=1)["text"]))
    monkeypatch.setenv("MY_DATA", str(tmp_path))
    config = {
        "model_name_or_path": tiny_folder, "dataset_name": "${MY_DATA}/train.jsonl", "eval_text": str(eval_file),
        "output_dir": str(tmp_path / "run"), "pruning_ratio": 0.5, "prune_freq": 2, "max_steps": 10,
        "per_device_train_batch_size": 4, "max_length": 32, "learning_rate": 1e-3, "use_cpu": True, "bf16": False,
        "report_to": "none", "save_strategy": "no", "activation_checkpointing": False, "lora_r": 4,
        "lora_alpha": 8, "logging_steps": 5,
    }
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(config))
    # a command-line flag overrides the YAML
    args = train.make_parser().parse_args_and_config(["--config", str(cfg), "--mlp_pruning_ratio", "0.25"])
    assert args[1].mlp_pruning_ratio == 0.25 and args[1].pruning_ratio == 0.5
    summary = train.main(*args)

    out = capsys.readouterr().out
    assert "parameters (whole model)" in out and "perplexity" in out
    pruned = AutoModelForCausalLM.from_pretrained(summary["pruned_dir"])
    assert pruned.config.intermediate_size == 24  # 40 channels, 25% pruned keeps 30: 24 with width_multiple 8
    assert pruned.config.num_key_value_heads == 1  # 2 KV groups, 50% pruned
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["parameters"]["model_after"] < saved["parameters"]["model_before"]
    before, after = (dict(saved[k]["protocol"], model=None) for k in ("perplexity_before", "perplexity_after"))
    assert before == after, "before/after numbers must share one protocol"


def test_train_py_depth_pruning_flags(tmp_path, capsys):
    """`--layer_pruning_ratio` / `--layer_criterion` through train.py: 2 of 4 layers go, the export has 2."""
    folder = tmp_path / "tiny4"
    tiny_model("llama-gqa", num_layers=4).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    data = write_jsonl(tmp_path / "train.jsonl", tiny_text_dataset(24).to_list())
    args = train.make_parser().parse_args_and_config([
        "--model_name_or_path", str(folder), "--dataset_name", data, "--output_dir", str(tmp_path / "run"),
        "--pruning_ratio", "0", "--layer_pruning_ratio", "0.5", "--layer_criterion", "block_influence",
        "--prune_freq", "2", "--max_steps", "6", "--per_device_train_batch_size", "4", "--max_length", "32",
        "--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--save_strategy", "no", "--lora_r", "4",
        "--lora_alpha", "8", "--learning_rate", "1e-2", "--lora_modules_to_save", "norm"])
    summary = train.main(*args)
    exported = AutoModelForCausalLM.from_pretrained(summary["pruned_dir"])
    original = AutoModelForCausalLM.from_pretrained(str(folder))
    assert (exported.model.norm.weight - original.model.norm.weight).abs().max() > 1e-4, "the final norm trained"
    assert summary["decoder_layers"]["before"] == 4 and summary["decoder_layers"]["after"] == 2
    assert AutoModelForCausalLM.from_pretrained(summary["pruned_dir"]).config.num_hidden_layers == 2
    assert summary["settings"]["layers_pruned"] == 2 and summary["settings"]["layer_criterion"] == "block_influence"
    assert "decoder layers" in capsys.readouterr().out


def test_train_py_missing_data_fails_before_loading_model(tmp_path):
    args = train.make_parser().parse_args_and_config([
        "--model_name_or_path", "/nonexistent/model", "--dataset_name", str(tmp_path / "missing.jsonl"),
        "--output_dir", str(tmp_path / "run"), "--use_cpu", "--bf16", "false"])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        train.main(*args)


def test_unset_environment_variable_is_named(tmp_path):
    args = train.make_parser().parse_args_and_config([
        "--model_name_or_path", "x", "--dataset_name", "${NOT_SET_ANYWHERE_123}/c4.jsonl",
        "--output_dir", str(tmp_path / "run"), "--use_cpu", "--bf16", "false"])
    with pytest.raises(ValueError, match="environment variable that is not set"):
        train.main(*args)


def test_dataset_forms(tmp_path):
    text = tmp_path / "lines.txt"
    text.write_text("first line\n\nsecond line\n")
    assert load_training_dataset(str(text))["text"] == ["first line", "second line"]

    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Add.", "input": "1 and 2", "output": "3"},
                                  {"instruction": "Greet.", "input": "", "output": "Hi"}]))
    ds = load_training_dataset(str(alpaca))
    assert ds.column_names == ["prompt", "completion"]
    assert ds[0]["prompt"] == "Add.\n\n1 and 2\n\n" and ds[1]["completion"] == "Hi"

    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}], "id": 1}])
    assert load_training_dataset(chat).column_names == ["messages"]

    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b", "x": 0}] * 3)
    assert len(load_training_dataset(pc, max_samples=2)) == 2

    from datasets import Dataset

    Dataset.from_list([{"text": "parquet row"}, {"text": "  "}]).to_parquet(str(tmp_path / "rows.parquet"))
    assert load_training_dataset(str(tmp_path / "rows.parquet"))["text"] == ["parquet row"]

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(ValueError, match="match no supported form"):
        load_training_dataset(bad)
    with pytest.raises(ValueError, match="Unsupported dataset file type"):
        (tmp_path / "data.xml").write_text("<a/>")
        load_training_dataset(str(tmp_path / "data.xml"))


def test_learning_rate_default_is_a_lora_rate(tmp_path):
    """SFTConfig's 2e-5 is a full fine-tuning rate; LoRAPruneConfig and train.py default to the paper's 1e-4,
    and an explicit rate still wins."""
    from loraprune_trainer import LoRAPruneConfig

    common = ["--output_dir", str(tmp_path), "--use_cpu", "true", "--bf16", "false"]
    assert train.make_parser().parse_args_and_config(common)[1].learning_rate == 1e-4
    assert train.make_parser().parse_args_and_config(common + ["--learning_rate", "2e-3"])[1].learning_rate == 2e-3
    assert LoRAPruneConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False).learning_rate == 1e-4
