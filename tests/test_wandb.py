"""W&B logging, offline: the keys, tables, images and artifact a tiny run writes into its local
transaction log; the sweep file is valid for wandb and its parameters are flags train.py accepts."""

import json
import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = os.path.join(ROOT, "configs", "sweep.yaml")

wandb = pytest.importorskip("wandb", reason="W&B logging is an optional extra: pip install loraprune-trainer[wandb]")


def _records(run_dir: str) -> list[dict]:
    """Every record of an offline run's .wandb transaction log, as JSON (wandb's own reader)."""
    wandb_bin = os.path.join(os.path.dirname(sys.executable), "wandb")
    out = subprocess.run([wandb_bin, "leet", "inspect", "--json", run_dir], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """A tiny pruning run reported to W&B offline, with evaluation and an export."""
    from scripts.tiny_train import make_trainer
    from tiny import tiny_text_dataset

    base = tmp_path_factory.mktemp("wandb")
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(base), "WANDB_CACHE_DIR": str(base / "cache"),
           "WANDB_DATA_DIR": str(base / "data"), "WANDB_CONFIG_DIR": str(base / "config"), "WANDB_SILENT": "true",
           "WANDB_PROJECT": "loraprune-test"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        trainer = make_trainer(str(base / "out"), max_steps=8, report_to="wandb", run_name="tiny",
                               eval_dataset=tiny_text_dataset(8, seed=1), eval_strategy="steps", eval_steps=4)
        trainer.train()
        report = trainer.save_pruned_model(str(base / "pruned"))
        run_dir = os.path.dirname(wandb.run.dir)
        wandb.finish()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return trainer, report, run_dir, _records(run_dir)


def test_history_has_pruning_scalars_and_eval_perplexity(offline_run):
    trainer, _, _, records = offline_run
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    keys = set().union(*history)
    for key in ("train/loss", "train/prune/attention_sparsity", "train/prune/mlp_sparsity", "train/prune/params",
                "train/prune/params_ratio", "train/prune/heads_pruned", "train/prune/channels_pruned", "train/prune/layers_pruned",
                "train/prune/score_attention_mean", "train/prune/score_mlp_min_kept",
                "train/prune/score_mlp_max_pruned", "eval/loss", "eval/perplexity", "prune/layers.path",
                "prune/masks.path"):
        assert key in keys, key
    last = [h for h in history if "train/prune/params" in h][-1]
    assert last["train/prune/params"] == trainer.pruning_metrics()["prune/params"]
    assert last["train/prune/mlp_sparsity"] == pytest.approx(0.6)  # 50% keeps 20 of 40: 16 with width_multiple 8
    import math

    evals = [h for h in history if "eval/loss" in h]
    assert len(evals) == 2 and all(h["eval/perplexity"] == pytest.approx(math.exp(h["eval/loss"])) for h in evals)
    # Within a layer, pruning removes the lowest scores: the lowest kept MLP score is above the
    # highest pruned one in at least the logged aggregate's sense of "scores are meaningful".
    assert last["train/prune/score_mlp_mean"] > 0


def test_layer_table_matches_final_masks(offline_run):
    trainer, _, run_dir, records = offline_run
    from loraprune_trainer.wandb_logging import layer_rows

    tables = sorted((r["history"]["item"] for r in records if r["type"] == "history"
                     and "prune/layers.path" in r["history"]["item"]), key=lambda h: h["_step"])
    with open(os.path.join(run_dir, "files", tables[-1]["prune/layers.path"])) as f:
        table = json.load(f)
    assert table["columns"] == ["layer", "layer_kept", "attention_units_kept", "query_heads_kept",
                                "mlp_channels_kept", "layer_score"]
    assert table["data"] == layer_rows(trainer.pruning_state)
    # llama-gqa: 2 KV groups of 3 heads, 40 channels, 50% (16 kept: a multiple of 8); no depth pruning
    assert table["data"] == [[0, 1, 1, 3, 16, 0.0], [1, 1, 1, 3, 16, 0.0]]
    image = [h for h in (r["history"]["item"] for r in records if r["type"] == "history") if "prune/masks.path" in h]
    assert os.path.getsize(os.path.join(run_dir, "files", image[-1]["prune/masks.path"])) > 0


def test_report_artifact_and_summary(offline_run):
    _, report, _, records = offline_run
    artifacts = [r["artifact"] for r in records if r["type"] == "artifact" and r["artifact"].get("type") == "pruning-report"]
    assert len(artifacts) == 1
    paths = [c["path"] for c in artifacts[0]["manifest"]["contents"]]
    assert paths == ["pruning_report.json"]
    meta = json.loads(artifacts[0]["metadata"])
    assert meta["parameters"]["model_after"] == report["parameters"]["model_after"]
    summary_keys = set()
    for r in records:
        if r["type"] == "summary":
            summary_keys |= set(r["summary"].get("update", {}))
    assert "prune/final_params" in summary_keys and "prune/final_mlp_sparsity" in summary_keys


def test_mask_heatmap_figure():
    from tiny import tiny_model

    from loraprune_trainer.masks import PruningState
    from loraprune_trainer.structure import discover_structure
    from loraprune_trainer.wandb_logging import mask_heatmap

    state = PruningState(discover_structure(tiny_model("llama-gqa", num_layers=3)))
    state.prune_to("layers.1.mlp", 10)
    fig = mask_heatmap(state)
    try:
        attn_ax, mlp_ax = fig.axes[:2]
        assert mlp_ax.get_title() == "MLP channels: 110/120 kept"
        image = mlp_ax.get_images()[0].get_array()
        assert image.shape == (3, 40) and int(image.sum()) == 110 and int(image[1].sum()) == 30
        assert attn_ax.get_images()[0].get_array().shape == (3, 2)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_logging_helpers_are_noops_without_a_run(tmp_path):
    from loraprune_trainer.wandb_logging import active_run, log_report_artifact, log_summary

    assert active_run() is None
    log_summary({"eval/perplexity": 1.0})  # must not raise or start a run
    log_report_artifact(str(tmp_path), {"parameters": {}})
    assert active_run() is None


def test_package_works_without_wandb_installed():
    # TRL itself imports wandb when it is installed, so hide it: `import wandb` then raises ImportError.
    code = ("import sys; sys.modules['wandb'] = None\n"
            "import loraprune_trainer.trainer, loraprune_trainer.wandb_logging as w\n"
            "assert w.active_run() is None\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]


# -- the sweep ---------------------------------------------------------------------------------------

def _sweep():
    with open(SWEEP) as f:
        return yaml.safe_load(f)


def test_sweep_config_passes_wandb_schema():
    sweeps = pytest.importorskip("sweeps", reason="wandb's sweep schema ships in the `sweeps` package "
                                                    "(pip install --no-deps sweeps jsonschema jsonref)")
    config = sweeps.SweepConfig(_sweep())  # raises jsonschema.ValidationError on a bad file
    assert config["method"] in ("grid", "random", "bayes")
    assert sweeps.schema_violations_from_proposed_config(_sweep()) == []
    bad = {**_sweep(), "method": "gird"}
    assert sweeps.schema_violations_from_proposed_config(bad)


def _pick(spec):
    if "values" in spec:
        return spec["values"][-1]
    if "value" in spec:
        return spec["value"]
    return (spec["min"] + spec["max"]) / 2


def test_sweep_command_parses_with_train_py():
    """Expand the sweep's command as the wandb agent does, then parse it with train.py's parser."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    sweep = _sweep()
    assert sweep["program"] == "train.py" and os.path.isfile(os.path.join(ROOT, sweep["program"]))
    assert sweep["metric"]["name"] == "eval/perplexity" and sweep["metric"]["goal"] == "minimize"
    # The knobs the recipe study (bench/recipe.py) found to matter are swept; those it found inert are not.
    assert {"param_pruning_ratio", "pruning_criterion", "learning_rate", "use_rslora", "lora_r",
            "lora_alpha"} <= set(sweep["parameters"])
    assert not {"prune_freq", "ema_lambda", "pruning_cooldown_ratio", "compensation"} & set(sweep["parameters"])
    values = {name: _pick(spec) for name, spec in sweep["parameters"].items()}
    flags = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})["args"]
    command = sweep["command"]
    assert command[:3] == ["${env}", "${interpreter}", "${program}"] and "${args}" in command
    argv = []
    for chunk in command[3:]:
        argv += flags if chunk == "${args}" else [str(chunk)]

    sys.path.insert(0, ROOT)
    try:
        import train
    finally:
        sys.path.remove(ROOT)
    cwd = os.getcwd()
    os.chdir(ROOT)  # the command's --config path is relative to the repository, where the agent runs
    try:
        script_args, training_args, model_args = train.make_parser().parse_args_and_config(args=argv)
    finally:
        os.chdir(cwd)
    assert training_args.report_to == ["wandb"]
    for name, value in values.items():  # every swept value reached the field of that name
        parsed = getattr(training_args, name) if hasattr(training_args, name) else getattr(model_args, name)
        assert parsed == pytest.approx(value) if isinstance(value, float) else parsed == value, name
    assert model_args.use_rslora is True and model_args.lora_r == 128 and model_args.lora_alpha == 256
