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
