"""The timing benches' plumbing on tiny models (not their timings, which only mean something on a quiet
machine): inference_speed.py with exported models (--saved) and chosen shapes (--shapes), and width_speed.py."""

from __future__ import annotations

import json
import os
import sys

from tiny import tiny_model, tiny_tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))

import inference_speed  # noqa: E402
import width_speed  # noqa: E402


def test_inference_speed_saved_models_and_shapes(tmp_path):
    from loraprune_trainer.oneshot import oneshot_prune

    base = tmp_path / "base"
    model, tok = tiny_model("llama-gqa", num_layers=4), tiny_tokenizer()
    model.save_pretrained(base)
    tok.save_pretrained(base)
    pruned = oneshot_prune(model, tok, None, criterion="magnitude", pruning_ratio=0.0, layer_ratio=0.5,
                           layer_criterion="last")
    pruned.model.save_pretrained(tmp_path / "half")
    out = tmp_path / "speed.json"
    inference_speed.main(["--model", str(base), "--ratios", "--no-lora", "--saved", f"half={tmp_path / 'half'}",
                          "--shapes", "1x8", "2x16", "--gen-batches", "1", "--new-tokens", "2", "--repeats", "1",
                          "--allow-busy", "--out", str(out)])
    data = json.loads(out.read_text())
    shapes = {(r["kind"], r["model"], r["batch"], r["seq"]) for r in data["rows"]}
    assert ("forward", "half", 1, 8) in shapes and ("forward", "dense", 2, 16) in shapes
    assert ("forward", "dense", 1, 16) not in shapes, "--shapes replaces the batches x seqs grid"
    half = next(r for r in data["rows"] if r["model"] == "half" and r["kind"] == "forward")
    assert 1.5 < half["ideal_speedup"] < 2.0  # half the layers; the LM head is not pruned
    assert data["parameters"]["half"] < data["parameters"]["dense"]


def test_width_speed_rows(tmp_path):
    assert [width_speed.alignment(w) for w in (1126, 1128, 1120, 1088, 1536)] == [2, 8, 32, 64, 128]
    out = tmp_path / "w.json"
    width_speed.main(["--hidden", "16", "--full", "64", "--widths", "32", "33", "--tokens", "8", "--repeats", "2",
                      "--allow-busy", "--out", str(out)])
    rows = {r["width"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {32, 33, 64} and rows[64]["time_vs_full"] == 1.0
    assert rows[32]["ideal_vs_full"] == 0.5 and rows[33]["multiple_of"] == 1


def test_gpu_check_stops_at_once_without_cuda():
    import subprocess

    import torch

    if torch.cuda.is_available():  # on a GPU machine the script runs for minutes: nothing to check here
        return
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    proc = subprocess.run(["bash", os.path.join(root, "scripts", "gpu_check.sh")], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PY": sys.executable})
    assert proc.returncode == 2
    assert "no CUDA GPU here" in proc.stderr


def test_scale_fit_separates_fixed_and_per_layer_costs():
    import scale

    assert scale.fit({1: 3.0, 2: 5.0}) == (1.0, 2.0)
    assert scale.fit({2: 10.0, 4: 14.0, 3: 99.0}) == (6.0, 2.0)  # the extreme counts define the line


def test_scale_runs_every_variant_at_two_depths(tmp_path, monkeypatch):
    """bench/scale.py end to end with the 8B shapes swapped for tiny ones (the plumbing, not the cost)."""
    import scale

    folder = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(folder)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(f"w{i % 90}" for i in range(k, k + 60))}) + "\n"
                            for k in range(16)))
    monkeypatch.setattr(scale, "LLAMA3_8B_LAYER", dict(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                                       num_key_value_heads=2, head_dim=8))
    out = tmp_path / "scale.json"
    scale.main(["--layers", "1", "2", "--variants", "sft", "lora", "vanilla", "--seq", "16", "--steps", "2",
                "--warmup", "1", "--threads", "1", "--tokenizer", str(folder), "--dataset", str(data),
                "--allow-busy", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [r["variant"] for r in result["rows"]] == ["sft", "lora", "vanilla"]
    for row in result["rows"]:
        assert row["step_s_1l"] > 0 and row["mem_mib_2l"] > 0
        assert row["step_s_32_layers"] == row["step_s_fixed"] + 32 * row["step_s_per_layer"]
    assert set(result["table4"]) == {"memory_saving_%", "speedup_%", "paper"}
