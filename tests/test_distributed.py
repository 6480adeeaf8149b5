"""Multi-process pruning: identical masks on every rank, equal to one process with the same global
batch; FSDP2-sharded scoring equals unsharded scoring; unsupported backends fail clearly."""

import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from loraprune_trainer.distributed import UnsupportedBackendError, check_distributed_backend, sync_pruning_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "tiny_train.py")
CONFIGS = os.path.join(ROOT, "accelerate_configs")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": ROOT}


@pytest.mark.parametrize("criterion,distill,layers", [("lora", 0.0, None), ("taylor_gate", 0.0, None),
                                                      ("lora", 0.5, None), ("taylor_gate", 0.0, "taylor_gate"),
                                                      ("lora", 0.0, "block_influence")])
def test_two_process_ddp_masks_identical_and_equal_to_single_process(tmp_path, criterion, distill, layers):
    """2 gloo processes x batch 4 x accumulation 2 == 1 process x batch 8 x accumulation 2
    (``taylor_gate``: its gate gradients are all-reduced by the criterion, not by DDP; distillation:
    the teacher runs on the unwrapped model, the student through DDP; ``layers``: 2 of 4 decoder layers
    removed by that layer criterion, whose gates / cosine sums are all-reduced by the scorer)."""
    from scripts.tiny_train import dump, make_trainer

    depth = dict(num_layers=4, layer_pruning_ratio=0.5, layer_criterion=layers) if layers else {}
    single = make_trainer(str(tmp_path / "single-out"), per_device_batch=8, grad_accum=2, pruning_criterion=criterion,
                          distill_alpha=distill, **depth)
    single.train()
    dump(single, str(tmp_path / "single"))

    # `--multi_gpu` selects torch's elastic launcher; with no GPU, Accelerate runs the processes on
    # the CPU over gloo (its `--cpu` flag would start a single process).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), SCRIPT, "--dump", str(tmp_path / "ddp"),
           "--output_dir", str(tmp_path / "ddp-out"), "--per_device_batch", "4", "--grad_accum", "2",
           "--criterion", criterion, "--distill_alpha", str(distill)]
    if layers:
        cmd += ["--num_layers", "4", "--layer_pruning_ratio", "0.5", "--layer_criterion", layers]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    _assert_ranks_match_single(tmp_path / "ddp", tmp_path / "single", layers)


def _assert_ranks_match_single(dump_dir, single_dir, layers=None):
    """Both ranks' masks equal each other and the single process's; scores and losses agree."""
    ranks = [load_file(str(dump_dir / f"rank{r}.safetensors")) for r in range(2)]
    meta = [json.load(open(dump_dir / f"rank{r}.json")) for r in range(2)]
    ref = load_file(str(single_dir / "rank0.safetensors"))
    ref_meta = json.load(open(single_dir / "rank0.json"))
    assert [m["world_size"] for m in meta] == [2, 2]
    keep_keys = [k for k in ref if k.startswith("keep.")]
    assert keep_keys and any(int(ref[k].sum()) < ref[k].numel() for k in keep_keys), "nothing was pruned"
    if layers:
        assert int((1 - ref["keep.layers"]).sum()) == 2, "two decoder layers removed"
    for k in keep_keys:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
        assert torch.equal(ranks[0][k], ref[k]), k
    for k in [k for k in ref if k.startswith("scores.")]:
        torch.testing.assert_close(ranks[0][k], ranks[1][k], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0][k], ref[k], rtol=1e-4, atol=1e-12)
    # Scores came from all-reduced gradients: no rank disagreed with rank 0 before the broadcast.
    assert [m["rank_mismatches"] for m in meta] == [0, 0]
    for step, loss in ref_meta["losses"].items():
        assert meta[0]["losses"][step] == pytest.approx(loss, rel=1e-4)


# -- DeepSpeed ZeRO-2 on CPU (gloo): taylor_gate's gates live outside the engine ------------------------

def test_deepspeed_zero2_on_cpu_masks_equal_single_process(tmp_path):
    """2 processes under DeepSpeed ZeRO-2 (CPU accelerator, gloo) x batch 4 x accumulation 2 == 1 process x
    batch 8 x accumulation 2, for `taylor_gate` widths and layer gates on 2 of 4 layers: the engine steps
    inside `accelerator.backward`, but the gate gradients are not parameters, so it never touches them."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is installed by scripts/setup.sh (extra `deepspeed`)")
    from scripts.tiny_train import dump, make_trainer

    depth = dict(num_layers=4, layer_pruning_ratio=0.5, layer_criterion="taylor_gate")
    single = make_trainer(str(tmp_path / "single-out"), per_device_batch=8, grad_accum=2,
                          pruning_criterion="taylor_gate", **depth)
    single.train()
    dump(single, str(tmp_path / "single"))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(CONFIGS, "deepspeed_zero2_cpu.yaml"), "--main_process_port", str(_free_port()), SCRIPT,
           "--dump", str(tmp_path / "ds"), "--output_dir", str(tmp_path / "ds-out"), "--per_device_batch", "4",
           "--grad_accum", "2", "--criterion", "taylor_gate", "--num_layers", "4", "--layer_pruning_ratio", "0.5",
           "--layer_criterion", "taylor_gate", "--export", str(tmp_path / "ds-pruned")]
    proc = subprocess.run(cmd, env={**_env(), "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _assert_ranks_match_single(tmp_path / "ds", tmp_path / "single", layers="taylor_gate")
    # The export under DeepSpeed (ZeRO-2 keeps weights whole on every rank) equals the single process's.
    from transformers import AutoModelForCausalLM

    single.save_pruned_model(str(tmp_path / "single-pruned"))
    ours = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ds-pruned")).state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "single-pruned")).state_dict()
    assert ours.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5)


# -- FSDP2: DTensor shards of LoRA params, grads and base weights are gathered for scoring ----------

def _peft_tiny():
    from peft import LoraConfig, get_peft_model
    from tiny import tiny_model

    model = get_peft_model(tiny_model("llama-gqa"),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero, which would zero gA; make every term of G non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def _fsdp2_worker(rank: int, world: int, port: int, out: str):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from loraprune_trainer.criteria import LoRACriterion, TaylorGateCriterion
    from loraprune_trainer.structure import discover_structure

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
        reference = _peft_tiny()
        reference(input_ids=ids, labels=ids).loss.backward()
        expected = LoRACriterion().score(discover_structure(reference))

        model = _peft_tiny()
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        lora_b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
        assert hasattr(lora_b, "full_tensor"), "FSDP2 did not shard the LoRA parameters"
        half = ids[rank * 2:(rank + 1) * 2]  # equal halves: the mean of the two means is the full mean
        model(input_ids=half, labels=half).loss.backward()
        scores = LoRACriterion().score(discover_structure(model))
        errors = {k: float((scores[k] - expected[k]).abs().max() / expected[k].abs().max()) for k in expected}
        model.zero_grad()

        # taylor_gate: the gates sit on (unsharded) activations; the criterion averages their
        # gradients over the ranks, which must give the full batch's gradient.
        reference.zero_grad()
        gate = TaylorGateCriterion()
        gate.attach(discover_structure(reference), reference)
        reference(input_ids=ids, labels=ids).loss.backward()
        expected = gate.score(discover_structure(reference))
        gate.attach(discover_structure(model), model)
        model(input_ids=half, labels=half).loss.backward()
        scores = gate.score(discover_structure(model))
        errors.update({f"taylor_gate/{k}": float((scores[k] - expected[k]).abs().max() / expected[k].abs().max())
                       for k in expected})

        # Layer gates (depth pruning): scalars on the sharded layers' residual outputs, averaged over ranks.
        from loraprune_trainer.depth import LayerGateScorer

        reference.zero_grad()
        model.zero_grad()
        reference.train()  # layer gates act in training forwards (tiny models come in eval mode)
        model.train()
        layer_gate = LayerGateScorer()
        layer_gate.attach(discover_structure(reference))
        reference(input_ids=ids, labels=ids).loss.backward()
        expected_layers = layer_gate.score()
        layer_gate.attach(discover_structure(model))
        model(input_ids=half, labels=half).loss.backward()
        got_layers = layer_gate.score()
        layer_gate.detach()
        errors["layers"] = float((got_layers - expected_layers).abs().max() / expected_layers.abs().max())
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(errors, f)
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharded_scores_equal_unsharded(tmp_path):
    torch.multiprocessing.spawn(_fsdp2_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        errors = json.load(open(tmp_path / f"rank{rank}.json"))
        assert len(errors) == 9
        assert max(errors.values()) < 1e-5, errors


# -- the safety net: rank 0's masks win ------------------------------------------------------------

def _sync_worker(rank: int, world: int, port: int, out: str):
    import torch.distributed as dist
    from tiny import tiny_model

    from loraprune_trainer.masks import PruningState
    from loraprune_trainer.structure import discover_structure

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        state = PruningState(discover_structure(tiny_model("llama-gqa")))
        name = "layers.0.mlp"
        state.scores[name] += rank  # a rank-dependent state, as non-deterministic kernels could give
        state.keep[name][rank] = False
        differing = sync_pruning_state(state)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"differing": differing, "keep": state.keep[name].tolist(),
                       "score0": float(state.scores[name][0])}, f)
    finally:
        dist.destroy_process_group()


def test_sync_pruning_state_broadcasts_rank0(tmp_path):
    torch.multiprocessing.spawn(_sync_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (json.load(open(tmp_path / f"rank{r}.json")) for r in range(2))
    assert r0["differing"] == 0 and r1["differing"] == 2  # rank 1 had index 1 pruned, index 0 kept
    assert r0["keep"] == r1["keep"] and r0["keep"][0] is False and r0["keep"][1] is True
    assert r0["score0"] == r1["score0"] == 0.0


def test_sync_is_a_noop_in_one_process():
    from tiny import tiny_model

    from loraprune_trainer.masks import PruningState
    from loraprune_trainer.structure import discover_structure

    state = PruningState(discover_structure(tiny_model("llama-gqa")))
    version = state.version
    assert sync_pruning_state(state) == 0 and state.version == version


# -- backends that cannot see full LoRA gradients ------------------------------------------------

def _fake_trainer(deepspeed=False, fsdp_version=None, zero_stage=2, criterion="lora", compensation="none"):
    plugin = SimpleNamespace(fsdp_version=fsdp_version) if fsdp_version else None
    ds = SimpleNamespace(zero_stage=zero_stage) if deepspeed else None
    return SimpleNamespace(is_deepspeed_enabled=deepspeed, is_fsdp_enabled=fsdp_version is not None,
                           args=SimpleNamespace(pruning_criterion=criterion, compensation=compensation),
                           accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin,
                                                                             deepspeed_plugin=ds)))


def test_deepspeed_refusals_name_the_reason_and_the_way_out():
    with pytest.raises(UnsupportedBackendError, match="`pruning_criterion='lora'` does not run under DeepSpeed.*"
                                                      "taylor_gate.*DDP.*FSDP2"):
        check_distributed_backend(_fake_trainer(deepspeed=True, criterion="lora"))
    with pytest.raises(UnsupportedBackendError, match="vanilla"):
        check_distributed_backend(_fake_trainer(deepspeed=True, criterion="vanilla"))
    with pytest.raises(UnsupportedBackendError, match="ZeRO-3: .* Use ZeRO-2"):
        check_distributed_backend(_fake_trainer(deepspeed=True, zero_stage=3, criterion="taylor_gate"))
    with pytest.raises(UnsupportedBackendError, match="compensation='lstsq'.*DeepSpeed"):
        check_distributed_backend(_fake_trainer(deepspeed=True, criterion="taylor_gate", compensation="lstsq"))
    for criterion in ("taylor_gate", "wanda", "magnitude", "random"):
        check_distributed_backend(_fake_trainer(deepspeed=True, criterion=criterion))


def test_fsdp1_is_refused_fsdp2_accepted():
    with pytest.raises(UnsupportedBackendError, match="fsdp_version: 2"):
        check_distributed_backend(_fake_trainer(fsdp_version=1))
    check_distributed_backend(_fake_trainer(fsdp_version=2))
    check_distributed_backend(_fake_trainer())


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(CONFIGS) if f.endswith(".yaml")))
def test_accelerate_configs_parse(name):
    """Every shipped config loads with Accelerate's own config reader, and names a known backend."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = os.path.join(CONFIGS, name)
    config = load_config_from_file(path)
    raw = yaml.safe_load(open(path))
    assert str(config.distributed_type).split(".")[-1] == raw["distributed_type"]
    if raw["distributed_type"] == "FSDP":
        assert raw["fsdp_config"]["fsdp_version"] == 2
    if raw["distributed_type"] == "DEEPSPEED":
        assert raw["deepspeed_config"]["zero_stage"] in (2, 3)
