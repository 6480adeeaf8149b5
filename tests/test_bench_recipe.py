"""bench/recipe.py end to end on a tiny random model and a fake data folder: runs of named settings (a width
and a depth one), their three perplexities, curve and record; resume; the report with the seed verdict and
the speed columns joined from an inference_speed.py JSON."""

from __future__ import annotations

import json
import os
import sys

import pytest
import yaml
from test_bench_quality import data_dir  # noqa: F401  (a pytest fixture)
from tiny import tiny_model, tiny_tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))

import recipe  # noqa: E402


@pytest.fixture
def config(tmp_path):
    folder = tmp_path / "model4"
    tiny_model("llama-gqa", num_layers=4, seed=0).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    cfg = {"model_name_or_path": str(folder), "dataset_name": "c4/c4_demo.jsonl",
           "eval_text": "wikitext-2-raw/wiki.test.raw", "eval_max_windows": 2, "param_pruning_ratio": 0.3,
           "attention_pruning_ratio": 0.0, "pruning_criterion": "taylor_gate", "prune_freq": 2, "max_steps": 8,
           "per_device_train_batch_size": 2, "max_length": 32, "learning_rate": 1e-3, "use_cpu": True,
           "bf16": False, "report_to": "none", "save_strategy": "no", "lora_r": 4, "lora_alpha": 8,
           "logging_steps": 4, "seed": 0, "activation_checkpointing": False}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_setting_flags_combine_and_refuse_unknown():
    assert recipe.setting_flags("demo") == []
    assert recipe.setting_flags("lr1e-3+cosine") == ["--learning_rate", "1e-3", "--lr_scheduler_type", "cosine"]
    assert recipe.knob("lstsq+lr1e-3") == "compensated cuts + learning rate"
    with pytest.raises(SystemExit, match="Unknown setting 'lr9'"):
        recipe.setting_flags("demo+lr9")


def test_token_budget_curves_pair_long_runs_with_the_study_budget(tmp_path):
    """The tokens plot draws each token-budget run against training tokens beside the same setting and seed
    at the study's budget; a long run without such a partner is drawn alone."""
    settings = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_length": 128}

    def run(setting, seed, steps):
        return {"run": f"{setting}-seed-{seed}", "setting": setting, "seed": seed,
                "summary": {"settings": dict(settings, max_steps=steps)},
                "curve": [{"step": s, "perplexity": 50.0 + s / 10} for s in range(0, steps + 1, 20)]}

    assert recipe.is_token_budget("lr1e-3+packed+tokens500k") and not recipe.is_token_budget("lr1e-3+packed")
    assert recipe.setting_flags("packed") == ["--packing", "true", "--packing_strategy", "wrapped"]
    runs = [run("lr1e-3+packed", 0, 160), run("lr1e-3+packed+tokens500k", 0, 976), run("p50+tokens500k", 1, 976),
            run("lr1e-3", 0, 160)]
    dense = {"eval": {"wikitext2/llm-pruner": {"perplexity": 54.0}}}
    path = tmp_path / "study.tokens.png"
    assert recipe.plot_token_curves(runs, dense, str(path)) == [
        ("lr1e-3+packed+tokens500k-seed-0", "lr1e-3+packed-seed-0"), ("p50+tokens500k-seed-1", None)]
    assert path.is_file()
    assert recipe.plot_token_curves(runs[:1], dense, str(tmp_path / "none.png")) == []
    assert not (tmp_path / "none.png").exists()


def test_verdict_needs_non_overlapping_ranges():
    base = {"setting": "demo", "seeds": 3, "wikitext2_min": 90.0, "wikitext2_max": 95.0}
    assert recipe.verdict({"seeds": 3, "wikitext2_min": 80.0, "wikitext2_max": 89.0}, base) == "better"
    assert recipe.verdict({"seeds": 3, "wikitext2_min": 85.0, "wikitext2_max": 91.0}, base) == "inside spread"
    assert recipe.verdict({"seeds": 3, "wikitext2_min": 96.0, "wikitext2_max": 99.0}, base) == "worse"
    assert recipe.verdict({"seeds": 1, "wikitext2_min": 50.0, "wikitext2_max": 50.0}, base) == "one seed"


def test_runs_resume_and_report(tmp_path, data_dir, config):  # noqa: F811
    out, models = tmp_path / "study", tmp_path / "models"
    argv = ["--config", config, "--settings", "demo", "depth6", "--seeds", "0", "--windows", "2", "--c4-docs", "5",
            "--curve-every", "4", "--curve-windows", "2", "--out", str(out), "--save-models", str(models)]
    recipe.main(argv)
    width = json.loads((out / "demo-seed-0.json").read_text())
    depth = json.loads((out / "depth6-seed-0.json").read_text())
    for run in (width, depth):
        assert set(run["eval"]) == {"wikitext2/llm-pruner", "ptb/llm-pruner", "c4/llm-pruner"}
        assert [p["step"] for p in run["curve"]] == [0, 4, 8]
        assert run["command"].startswith("accelerate launch --config_file accelerate_configs/cpu.yaml train.py")
    assert width["summary"]["decoder_layers"]["after"] == 4
    assert depth["summary"]["decoder_layers"]["after"] == 3  # 0.2 of 4 layers rounds to 1
    assert "--layer_pruning_ratio" in depth["flags"]
    text = json.dumps(depth)
    assert "recipe-" not in text and str(models / "depth6-seed-0") in text, "temporary paths replaced by the kept one"
    assert (models / "depth6-seed-0" / "config.json").is_file()
    assert json.loads((models / "depth6-seed-0" / "config.json").read_text())["num_hidden_layers"] == 3

    stamp = os.path.getmtime(out / "demo-seed-0.json")
    recipe.main(argv)  # resume: nothing runs again
    assert os.path.getmtime(out / "demo-seed-0.json") == stamp

    # Speed from inference_speed.py --saved joins the rows by setting name.
    speed_rows = [{"kind": k, "model": m, "batch": b, "measured_speedup": v, "ideal_speedup": v + 0.1}
                  for m, v in (("dense", 1.0), ("depth6", 1.3), ("demo", 1.1))
                  for k, b in (("generate", 1), ("generate", 16), ("forward", 1), ("forward", 16))]
    (tmp_path / "study.speed.json").write_text(json.dumps({"rows": speed_rows}))
    summary = recipe.report(str(out))
    rows = {r["setting"]: r for r in summary["rows"]}
    assert rows["depth6"]["gen_b1_speedup"] == 1.3 and rows["demo"]["fwd_b16_ideal"] == pytest.approx(1.2)
    assert rows["depth6"]["layers"] == 3 and rows["demo"]["layers"] == 4
    assert [a["verdict_vs_demo"] for a in summary["spread"]] == ["", "one seed"]
    assert rows["demo"]["knob"] == "(the base: the demo before the study)" and rows["depth6"]["knob"] == "depth"
    curve_s = json.loads((out / "demo-seed-0.json").read_text())["curve_eval_s"]
    assert rows["demo"]["train_min"] == pytest.approx((width["train_wall_s"] - curve_s) / 60)
    assert rows["demo"]["load_end"] == width["load_average_at_end"][0]
    for suffix in (".json", ".png", ".curve.png", ".speed.png"):
        assert (tmp_path / f"study{suffix}").is_file(), suffix


def test_full_hellaswag_pass_joins_the_row_and_the_results_page():
    """A run scored on all of HellaSwag (quality_zeroshot.py --limit 0) shows it beside its 500-item paper mean,
    and the results page compares it with the dense model's own full pass."""
    import make_results_md

    def zs(acc_norm, n, **extra):
        return {"tasks": {"hellaswag": {"acc": acc_norm - 0.05, "acc_norm": acc_norm, "acc_norm_stderr": 0.005,
                                        "num_samples": n}}, **extra}

    run = {"run": "lr1e-3+packed+tokens500k-seed-0", "setting": "lr1e-3+packed+tokens500k", "seed": 0,
           "summary": {"settings": {}, "parameters": {"decoder_layers_ratio": 0.8}},
           "eval": {"wikitext2/llm-pruner": {"perplexity": 70.0}}, "train_wall_s": 60.0,
           "zeroshot": zs(0.40, 500, paper_mean=0.42), "zeroshot_full": zs(0.37, 10042, command="python x.py")}
    row = recipe.run_row(run, None)
    assert row["paper_mean"] == 0.42 and row["hellaswag_full"] == 0.37
    assert "hellaswag_full" not in recipe.run_row({**run, "zeroshot_full": None}, None)

    dense = {"zeroshot": zs(0.42, 500), "zeroshot_full": zs(0.406, 10042)}
    line = make_results_md._recipe_full_hellaswag([run], dense)
    assert line.startswith("**HellaSwag on the full set** (10,042 items; acc_norm in %; dense SmolLM2 40.6")
    assert "37.0 (± 0.5; acc 32.0), -3.6 points from dense (on the first 500 items: 40.0, -2.0 from dense)" in line
    assert "command `python x.py`" in line
    assert make_results_md._recipe_full_hellaswag([{**run, "zeroshot_full": None}], dense) is None


def test_study_base_is_the_demo_before_the_study():
    """The README says the demo is the study's base plus its two winners, learning rate 1e-3 and packed training
    text: nothing else may drift."""
    root = os.path.join(os.path.dirname(__file__), "..")
    with open(os.path.join(root, "bench", "recipe_base.yaml")) as f:
        base = yaml.safe_load(f)
    with open(os.path.join(root, "configs", "smollm2_demo.yaml")) as f:
        demo = yaml.safe_load(f)
    assert {k for k in base.keys() | demo.keys() if base.get(k) != demo.get(k)} == {
        "learning_rate", "packing", "packing_strategy"}
    assert (base["learning_rate"], demo["learning_rate"]) == (3e-4, 1e-3)
    assert "packing" not in base and (demo["packing"], demo["packing_strategy"]) == (True, "wrapped")
    # The study's flags for the winners are exactly what the demo adds to the base.
    assert recipe.setting_flags("lr1e-3+packed") == ["--learning_rate", "1e-3", "--packing", "true",
                                                 "--packing_strategy", "wrapped"]
