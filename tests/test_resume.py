"""Exact resume: a run stopped mid-schedule and resumed from its checkpoint ends with the same masks,
scores and loss curve as a run that never stopped; mismatched checkpoints are refused."""

import json
import os

import pytest
import torch
from scripts.tiny_train import make_trainer

from loraprune_trainer.resume import PRUNING_SETTINGS_NAME, PRUNING_STATE_NAME, ResumeError

STEPS, SAVE = 12, 5  # prune_freq 2, ramp over steps 1..11: step 5 is mid-schedule


def _losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


# Width criteria, and depth pruning (4 layers, 2 removed) by layer gates and by block influence, whose
# running cosine sums must travel with the checkpoint too; RMSNorm weights trained next to LoRA (PEFT's
# modules_to_save) must come back from the checkpoint as well.
SETTINGS = {
    "lora": dict(pruning_criterion="lora"),
    "norms-taylor_gate": dict(pruning_criterion="taylor_gate",
                              lora_modules_to_save=["input_layernorm", "post_attention_layernorm", "norm"]),
    "taylor_gate": dict(pruning_criterion="taylor_gate"),
    "layers-taylor_gate": dict(pruning_criterion="taylor_gate", num_layers=4, layer_pruning_ratio=0.5),
    "layers-block_influence": dict(pruning_criterion="lora", num_layers=4, layer_pruning_ratio=0.5,
                                   layer_criterion="block_influence", pruning_warmup_ratio=0.5),
}


@pytest.fixture(scope="module", params=list(SETTINGS))
def runs(request, tmp_path_factory):
    """(uninterrupted trainer, checkpointing trainer, its output dir, settings), per setting."""
    base = tmp_path_factory.mktemp(f"resume-{request.param}")
    settings = SETTINGS[request.param]
    straight = make_trainer(str(base / "straight"), max_steps=STEPS, **settings)
    straight.train()
    saving = make_trainer(str(base / "saving"), max_steps=STEPS, save_steps=SAVE, **settings)
    saving.train()
    straight.test_settings = settings
    return straight, saving, base / "saving"


def test_checkpoint_holds_pruning_state_mid_schedule(runs):
    straight, _, out = runs
    folder = out / f"checkpoint-{SAVE}"
    assert (folder / PRUNING_STATE_NAME).is_file() and (folder / PRUNING_SETTINGS_NAME).is_file()
    from safetensors.torch import load_file

    saved = load_file(str(folder / PRUNING_STATE_NAME))
    pruned = sum(int((~saved[k].bool()).sum()) for k in saved if k.startswith("keep."))
    if straight.args.layer_criterion == "block_influence" and straight.args.layer_pruning_ratio:
        # Taken before the first mask update: the block-influence sums so far are what must carry over.
        assert pruned == 0 and float(saved["layer_stats.tokens"].min()) > 0
    else:
        assert 0 < pruned, "checkpoint was taken before any pruning: not mid-schedule"
    assert int(saved["num_score_updates"]) == SAVE
    meta = json.load(open(folder / PRUNING_SETTINGS_NAME))
    assert meta["total_steps"] == STEPS and meta["settings"]["prune_freq"] == 2


def test_resumed_run_matches_uninterrupted(runs, tmp_path):
    straight, _, out = runs
    resumed = make_trainer(str(out), max_steps=STEPS, save_steps=SAVE, **straight.test_settings)
    # The fresh trainer starts with nothing pruned; everything must come from the checkpoint.
    assert all(bool(k.all()) for k in resumed.pruning_state.keep.values())
    resumed.train(resume_from_checkpoint=str(out / f"checkpoint-{SAVE}"))
    assert torch.equal(resumed.pruning_state.layer_keep, straight.pruning_state.layer_keep)
    torch.testing.assert_close(resumed.pruning_state.layer_scores, straight.pruning_state.layer_scores,
                               rtol=1e-5, atol=1e-12)
    if straight.args.layer_pruning_ratio:
        assert straight.pruning_state.num_pruned_layers() == 2

    for name, keep in straight.pruning_state.keep.items():
        assert torch.equal(resumed.pruning_state.keep[name], keep), name
        torch.testing.assert_close(resumed.pruning_state.scores[name], straight.pruning_state.scores[name],
                                   rtol=1e-5, atol=1e-12)
    assert resumed.pruning_state.num_score_updates == straight.pruning_state.num_score_updates
    if straight.test_settings.get("lora_modules_to_save"):
        norms = {n: p for n, p in straight.model.named_parameters() if "modules_to_save" in n}
        assert norms, "no trained norm copies: modules_to_save did not reach PEFT"
        # RMSNorm weights start at ones: a copy still at ones did not train, and its restore would prove nothing.
        assert any(not torch.equal(w, torch.ones_like(w)) for w in norms.values()), "norm copies never trained"
        resumed_params = dict(resumed.model.named_parameters())
        for name, weight in norms.items():
            torch.testing.assert_close(resumed_params[name], weight, rtol=1e-5, atol=1e-7)
    expected, got = _losses(straight), _losses(resumed)
    # log_history holds the checkpoint's steps 1..SAVE (restored) and the newly trained ones.
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(SAVE + 1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step


def test_resume_true_uses_last_checkpoint(runs, tmp_path):
    import shutil

    straight, _, out = runs
    for step in (SAVE, 2 * SAVE):  # only the mid-run checkpoints, not one written at the end
        shutil.copytree(out / f"checkpoint-{step}", tmp_path / f"checkpoint-{step}")
    resumed = make_trainer(str(tmp_path), max_steps=STEPS, save_steps=SAVE,
                           **straight.test_settings)
    resumed.train(resume_from_checkpoint=True)  # checkpoint-10, then steps 11..12
    assert resumed.state.global_step == STEPS and sorted(_losses(resumed))[-2:] == [11, 12]
    for name, keep in straight.pruning_state.keep.items():
        assert torch.equal(resumed.pruning_state.keep[name], keep), name


def test_checkpoint_from_other_pruning_config_is_refused(runs):
    straight, _, out = runs
    other = make_trainer(str(out), max_steps=STEPS, **{**straight.test_settings, 'pruning_ratio': 0.25})
    with pytest.raises(ResumeError, match=r"different pruning settings \(pruning_ratio: checkpoint 0.5 vs now 0.25"):
        other.train(resume_from_checkpoint=str(out / f"checkpoint-{SAVE}"))


def test_checkpoint_with_other_step_count_is_refused(runs):
    straight, _, out = runs
    longer = make_trainer(str(out), max_steps=2 * STEPS, **straight.test_settings)
    with pytest.raises(ResumeError, match=f"had {STEPS} training steps, this one has {2 * STEPS}"):
        longer.train(resume_from_checkpoint=str(out / f"checkpoint-{SAVE}"))


def test_checkpoint_without_pruning_state_is_refused(runs, tmp_path):
    import shutil

    straight, _, out = runs
    plain = tmp_path / "plain-checkpoint"
    shutil.copytree(out / f"checkpoint-{SAVE}", plain)
    os.remove(plain / PRUNING_STATE_NAME)
    trainer = make_trainer(str(tmp_path / "out"), max_steps=STEPS, **straight.test_settings)
    with pytest.raises(ResumeError, match="not written by LoRAPruneTrainer"):
        trainer.train(resume_from_checkpoint=str(plain))


def test_checkpoint_for_other_model_is_refused(runs, tmp_path):
    straight, _, out = runs
    trainer = make_trainer(str(tmp_path / "out"), max_steps=STEPS, arch="llama-mha",
                           **straight.test_settings)
    with pytest.raises(ResumeError, match="another model structure"):
        trainer.train(resume_from_checkpoint=str(out / f"checkpoint-{SAVE}"))
