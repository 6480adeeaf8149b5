"""bench/quality.py end to end on a tiny random model and a fake data folder (offline, a few seconds).

Covers the optional measurements: C4 validation perplexity (``--eval-sets c4``, ``--c4-docs``), zero-shot
accuracy from the local suite (``--zeroshot-tasks``, ``--zeroshot-limit``), the recovery curve of iterative
runs (``--curve-every``), resume, the clear error for a missing zero-shot folder, and that report() still
reads run JSONs written before these fields existed.
"""

from __future__ import annotations

import json
import os
import random
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "bench"))

import quality  # noqa: E402
from tiny import VOCAB, tiny_model, tiny_tokenizer  # noqa: E402

ZEROSHOT_FIXTURE = os.path.join(HERE, "data", "zeroshot")


def _words(rng: random.Random, n: int) -> str:
    """``n`` words of the tiny tokenizer's vocabulary (w0 .. w91), so nothing maps to <unk>."""
    return " ".join(f"w{rng.randrange(VOCAB - 4)}" for _ in range(n))


def _write_jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """A data folder laid out like the project's ($LORAPRUNE_DATA_DIR), with tiny-vocabulary text and the
    zero-shot fixture."""
    rng = random.Random(0)
    root = tmp_path / "data"
    for sub in ("wikitext-2-raw", "ptb", "c4"):
        (root / sub).mkdir(parents=True)
    # ~2,400 tokens in lines: longer than the curve's first prefix guess, so curve_text's prefix is exercised.
    (root / "wikitext-2-raw" / "wiki.test.raw").write_text("\n".join(_words(rng, 40) for _ in range(60)) + "\n")
    (root / "ptb" / "ptb.valid.txt").write_text("\n".join(_words(rng, 20) for _ in range(30)) + "\n")
    _write_jsonl(root / "c4" / "c4_demo.jsonl", [_words(rng, 24) for _ in range(210)])  # 0..199 train, 200.. calib
    _write_jsonl(root / "c4" / "c4_validation_sample.jsonl", [_words(rng, 40) for _ in range(30)])
    os.symlink(ZEROSHOT_FIXTURE, root / "zeroshot")  # <data dir>/zeroshot: the default zero-shot folder
    monkeypatch.setenv("LORAPRUNE_DATA_DIR", str(root))
    monkeypatch.delenv("LORAPRUNE_ZEROSHOT_DIR", raising=False)
    return root


@pytest.fixture
def model_dir(tmp_path):
    """A tiny random Llama (GQA) and word-level tokenizer saved as a folder, for ``--model``."""
    folder = tmp_path / "model"
    tiny_model("llama-gqa", num_layers=2, seed=0).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def test_zeroshot_task_list_matches_the_library():
    from loraprune_trainer.evaluation import ZEROSHOT_DIR_ENV, ZEROSHOT_TASKS

    assert tuple(quality.ZEROSHOT_TASKS) == tuple(ZEROSHOT_TASKS)
    assert quality.ZEROSHOT_DIR_ENV == ZEROSHOT_DIR_ENV


def test_defaults_are_unchanged():
    args = quality.parse_args([])
    assert args.eval_sets == ["wikitext2", "ptb"]
    assert args.zeroshot_tasks == [] and args.curve_every == 0
    assert args.steps == 4 and args.windows == 4 and args.protocols == ["llm-pruner", "full-context"]
    with pytest.raises(SystemExit):
        quality.parse_args(["--curve-every", "-1"])


def test_oneshot_cut_without_finetune_and_compensation(tmp_path, data_dir, model_dir):
    """--modes oneshot --steps 0: the cut alone, with and without a least-squares refit; the refit is recorded
    and changes the model (and so its perplexity) at equal size."""
    out = tmp_path / "comp"
    common = ["--model", model_dir, "--out", str(out), "--ratios", "0.5", "--criteria", "taylor_gate", "--modes",
              "oneshot", "--steps", "0", "--batch", "2", "--max-length", "32", "--windows", "2", "--protocols",
              "llm-pruner", "--eval-sets", "wikitext2", "--calib-samples", "4"]
    quality.main(common)
    quality.main(common + ["--compensation", "lstsq", "--tag=-lstsq"])
    plain = json.loads((out / "oneshot-taylor_gate-r0.5.json").read_text())
    refit = json.loads((out / "oneshot-taylor_gate-r0.5-lstsq.json").read_text())
    assert plain["tokens_trained"] == refit["tokens_trained"] == 0 and plain["parameters"] == refit["parameters"]
    assert refit["settings"]["compensation"] == "lstsq" and plain["settings"]["compensation"] == "none"
    ppl = [r["metrics"]["wikitext2/llm-pruner"]["perplexity"] for r in (plain, refit)]
    assert ppl[0] != ppl[1]
    with pytest.raises(SystemExit):
        quality.parse_args(["--steps", "0", "--modes", "iterative"])


def test_grid_with_c4_zeroshot_and_curve_then_resume(tmp_path, data_dir, model_dir):
    out = tmp_path / "quality"
    argv = ["--model", model_dir, "--out", str(out), "--ratios", "0.5", "--criteria", "lora", "--modes", "iterative",
            "--steps", "3", "--batch", "2", "--max-length", "32", "--windows", "2", "--protocols", "llm-pruner",
            "--eval-sets", "wikitext2", "c4", "--c4-docs", "10",
            "--zeroshot-tasks", "piqa", "arc_easy", "--zeroshot-limit", "2",
            "--curve-every", "1", "--curve-windows", "2"]
    quality.main(argv)

    run = json.loads((out / "iterative-lora-r0.5.json").read_text())
    # C4 perplexity with its protocol and the number of documents read.
    c4 = run["metrics"]["c4/llm-pruner"]
    assert c4["perplexity"] > 1 and c4["num_windows"] == 2
    dataset = c4["protocol"]["dataset"]
    assert dataset["num_docs"] == 10 and dataset["c4_docs"] == 10 and dataset["num_docs_in_file"] == 30
    assert "joined with" in dataset["join"] and "SparseGPT" in dataset["note"]
    assert c4["protocol"]["name"] == "llm-pruner" and c4["protocol"]["window"] == 128
    assert "ptb/llm-pruner" not in run["metrics"] and "wikitext2/llm-pruner" in run["metrics"]

    # Zero-shot: per-task acc (+ stderr) as lm-eval reports them, the suite means, the limit.
    zs = run["zeroshot"]
    assert set(zs["tasks"]) == {"piqa", "arc_easy"} and zs["limit"] == 2
    for task in zs["tasks"].values():
        assert 0.0 <= task["acc"] <= 1.0 and "acc_stderr" in task
        assert 0.0 <= task["acc_norm"] <= 1.0 and "acc_norm_stderr" in task  # both tasks define acc_norm
        assert task["num_samples"] == 2
    assert zs["mean_acc"] == pytest.approx(sum(t["acc"] for t in zs["tasks"].values()) / 2)
    assert zs["mean_acc_norm"] == pytest.approx(sum(t["acc_norm"] for t in zs["tasks"].values()) / 2)
    assert zs["protocol"]["zeroshot_dir"] == "$LORAPRUNE_DATA_DIR/zeroshot"  # the data folder, not its path

    # Curve: step 0 plus one point per step, tokens growing, the masked model's perplexity.
    curve = run["curve"]
    assert [p["step"] for p in curve] == [0, 1, 2, 3]
    assert curve[0]["tokens_seen"] == 0 and all(a["tokens_seen"] < b["tokens_seen"] for a, b in zip(curve, curve[1:]))
    assert all(p["perplexity"] > 1 for p in curve)
    assert curve[0]["attention_sparsity"] == 0 and curve[-1]["params_ratio"] < 1  # pruned by the end
    assert run["curve_protocol"]["every"] == 1 and run["curve_protocol"]["perplexity"]["max_windows"] == 2
    assert run["tokens_trained"] == curve[-1]["tokens_seen"]
    # The masked model at the end computes what the cut, merged model computes: same windows (--windows 2 =
    # --curve-windows 2; the curve's prefix text starts with the same tokens), same perplexity.
    assert curve[-1]["perplexity"] == pytest.approx(run["metrics"]["wikitext2/llm-pruner"]["perplexity"], rel=1e-4)
    # The step-0 point is the unpruned model (LoRA B = 0): the dense reference on the same windows.
    dense = json.loads((out / "dense.json").read_text())
    assert dense["curve"][0]["perplexity"] == pytest.approx(curve[0]["perplexity"], rel=1e-5)
    assert "zeroshot" in dense and "c4/llm-pruner" in dense["metrics"]

    # Load average at start and end stay recorded.
    assert "load_average_at_start" in run["machine"] and "load_average_at_end" in run

    # report(): summary with the new columns, the bar chart and the curve plot.
    summary = json.loads((tmp_path / "quality.json").read_text())
    assert "c4/llm-pruner" in summary["table"] and "zs_acc" in summary["table"]
    assert (tmp_path / "quality.png").exists() and (tmp_path / "quality.curve.png").exists()

    # Resume: a second invocation skips both finished runs.
    stamps = {p: os.stat(out / p).st_mtime_ns for p in ("dense.json", "iterative-lora-r0.5.json")}
    quality.main(argv)
    assert {p: os.stat(out / p).st_mtime_ns for p in stamps} == stamps


def test_missing_zeroshot_folder_names_path_and_env(tmp_path, data_dir, monkeypatch):
    missing = tmp_path / "no-such-zeroshot"
    monkeypatch.setenv("LORAPRUNE_ZEROSHOT_DIR", str(missing))
    # --model does not exist either: the folder must be checked first, before any model load.
    with pytest.raises(FileNotFoundError) as e:
        quality.main(["--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "q"),
                      "--zeroshot-tasks", "piqa"])
    assert str(missing) in str(e.value) and "LORAPRUNE_ZEROSHOT_DIR" in str(e.value)


def test_report_reads_runs_written_before_the_new_fields(tmp_path):
    """A folder of run JSONs in the older layout (no c4, zeroshot, curve): report() works, draws no curve plot."""
    out = tmp_path / "old"
    out.mkdir()
    metrics = {"wikitext2/llm-pruner": {"perplexity": 30.0, "num_tokens_scored": 508, "num_windows": 4,
                                        "protocol": {"name": "llm-pruner"}},
               "ptb/llm-pruner": {"perplexity": 50.0, "num_tokens_scored": 508, "num_windows": 4,
                                  "protocol": {"name": "llm-pruner"}}}
    base = {"settings": {"steps": 4}, "machine": {}, "command": "python bench/quality.py"}
    runs = [dict(run="dense", mode="dense", criterion=None, ratio=None, parameters=1000, metrics=metrics, eval_s=1.0,
                 wall_s=2.0, **base)]
    for crit, scale in (("lora", 1.5), ("random", 3.0)):
        m = {k: {**v, "perplexity": v["perplexity"] * scale} for k, v in metrics.items()}
        runs.append(dict(run=f"iterative-{crit}-r0.5", mode="iterative", criterion=crit, ratio=0.5, parameters=600,
                         metrics=m, train_s=5.0, tokens_trained=512, steps=4, target={}, final_loss=3.0, eval_s=1.0,
                         wall_s=7.0, **base))
    for r in runs:
        (out / f"{r['run']}.json").write_text(json.dumps(r))
    quality.main(["--out", str(out), "--report-only"])
    summary = json.loads((tmp_path / "old.json").read_text())
    assert len(summary["runs"]) == 3 and summary["verdict"]["lora_best"] == 2
    assert "c4/" not in summary["table"] and "zs_acc" not in summary["table"]
    assert (tmp_path / "old.png").exists() and not (tmp_path / "old.curve.png").exists()


def test_param_ratio_oneshot_saved_models_and_later_zeroshot(tmp_path, data_dir, model_dir):
    """--param-ratio gives one-shot runs the trainer's per-layer counts; --save-models keeps every final model;
    quality_zeroshot.py adds zero-shot to the finished runs from those models, resumes, and names what is missing."""
    import quality_zeroshot

    out, saved = tmp_path / "grid", tmp_path / "models"
    quality.main(["--model", model_dir, "--out", str(out), "--ratios", "0.3", "--param-ratio", "0.3",
                  "--attention-ratio", "0", "--criteria", "magnitude", "--modes", "iterative", "oneshot",
                  "--steps", "2", "--batch", "2", "--max-length", "32", "--windows", "2", "--protocols", "llm-pruner",
                  "--eval-sets", "wikitext2", "--save-models", str(saved)])
    iterative = json.loads((out / "iterative-magnitude-r0.3.json").read_text())
    oneshot = json.loads((out / "oneshot-magnitude-r0.3.json").read_text())
    target = iterative["target"]
    assert oneshot["oneshot"]["units_pruned_per_layer"] == {
        "attention": target["attention_units_pruned_per_layer"], "mlp": target["mlp_channels_pruned_per_layer"]}
    assert target["attention_units_pruned_per_layer"] == 0 and target["mlp_channels_pruned_per_layer"] > 0
    assert oneshot["parameters"] == iterative["parameters"] < json.loads((out / "dense.json").read_text())["parameters"]
    # Saved: a complete folder per pruned run (none for dense), no partial folder left behind.
    assert sorted(os.listdir(saved)) == ["iterative-magnitude-r0.3", "oneshot-magnitude-r0.3"]

    argv = ["--out", str(out), "--models", str(saved), "--model", model_dir, "--tasks", "piqa", "--limit", "2"]
    quality_zeroshot.main(argv)
    for rid in ("dense", "iterative-magnitude-r0.3", "oneshot-magnitude-r0.3"):
        zs = json.loads((out / f"{rid}.json").read_text())["zeroshot"]
        assert zs["limit"] == 2 and set(zs["tasks"]) == {"piqa"} and zs["tasks"]["piqa"]["num_samples"] == 2
        assert 0.0 <= zs["mean_acc"] <= 1.0 and len(zs["load_average_at_start"]) == 3
    summary = json.loads((tmp_path / "grid.json").read_text())
    assert "zs_acc" in summary["table"]

    # Resume: nothing is re-evaluated; a different limit goes under its own key.
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}
    quality_zeroshot.main(argv)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")} == stamps
    # A task added later (as HellaSwag was) is scored alone and merged into the result at the same limit.
    before = json.loads((out / "dense.json").read_text())["zeroshot"]
    quality_zeroshot.main(["--out", str(out), "--models", str(saved), "--model", model_dir, "--tasks", "piqa",
                           "arc_easy", "--limit", "2", "--runs", "dense"])
    after = json.loads((out / "dense.json").read_text())["zeroshot"]
    assert set(after["tasks"]) == {"piqa", "arc_easy"} and after["tasks"]["piqa"] == before["tasks"]["piqa"]
    assert [p["tasks"] for p in after["passes"]] == [["piqa"], ["arc_easy"]]
    assert after["mean_acc"] == pytest.approx((after["tasks"]["piqa"]["acc"] + after["tasks"]["arc_easy"]["acc"]) / 2)
    assert after["paper_mean"] is None  # four of the paper's six tasks were not scored
    quality_zeroshot.main(argv[:-1] + ["0"] + ["--runs", "oneshot-magnitude-r0.3", "--cache", str(tmp_path / "zs")])
    record = json.loads((out / "oneshot-magnitude-r0.3.json").read_text())
    assert record["zeroshot_full"]["limit"] is None and record["zeroshot"]["limit"] == 2
    cache = record["zeroshot_full"]["protocol"]["cache"]  # --cache keeps every scored request
    assert cache["requests_cached_before"] == 0 and cache["requests_cached_after"] > 0

    # A run without a saved model is named before anything is loaded.
    with pytest.raises(SystemExit) as e:
        quality_zeroshot.main(["--out", str(out), "--models", str(tmp_path / "nowhere"), "--model", model_dir,
                               "--runs", "dense", "oneshot-magnitude-r0.3"])
    assert "oneshot-magnitude-r0.3" in str(e.value) and "--save-models" in str(e.value)


def test_verdict_compares_criteria_only_at_the_same_distillation_weight():
    """A plain run must not be ranked against a distilled one: each (ratio, mode, alpha) is its own group."""
    def run(criterion, alpha, ppl):
        return {"criterion": criterion, "ratio": 0.2, "mode": "iterative", "settings": {"distill_alpha": alpha},
                "metrics": {"wikitext2/llm-pruner": {"perplexity": ppl}}}

    verdict = quality.beats_baselines([run("lora", 0.0, 100.0), run("taylor_gate", 0.0, 90.0),
                                       run("lora", 0.5, 80.0), run("taylor_gate", 0.5, 85.0)])
    by_alpha = {c["distill_alpha"]: c for c in verdict["cells"]}
    assert sorted(by_alpha) == [0.0, 0.5]
    assert by_alpha[0.0]["best"] == "taylor_gate" and by_alpha[0.0]["others"] == {"taylor_gate": 90.0}
    assert by_alpha[0.5]["best"] == "lora" and by_alpha[0.5]["lora"] == 80.0
    assert verdict["lora_best"] == 1 and verdict["cells_total"] == 2
