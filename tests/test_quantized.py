"""8-bit (LLM.int8) and 4-bit (NF4) base weights on the CPU (bitsandbytes >= 0.50): scores close to
the float32 model's, training runs, and the export de-quantizes, cuts, merges and loads with stock
``from_pretrained``."""

import os
import warnings

import pytest
import torch
from safetensors import safe_open

bnb = pytest.importorskip("bitsandbytes", reason="quantized bases need the `quant` extra (bitsandbytes)")

from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from loraprune_trainer.criteria import LoRACriterion, TaylorGateCriterion, dense_base_weight, lora_parts  # noqa: E402
from loraprune_trainer.structure import discover_structure  # noqa: E402
from loraprune_trainer.trainer import count_base_parameters  # noqa: E402

QUANT = {
    "int8": lambda: BitsAndBytesConfig(load_in_8bit=True),
    "nf4": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny GQA Llama (hidden 64, 8 query heads over 4 KV heads, MLP 128) saved in float32. Every
    output size is a multiple of 32: bitsandbytes repacks NF4 weights in that block size for eval-mode
    forwards on CPUs with AVX512-BF16, and refuses other sizes."""
    from tiny import tiny_model

    folder = tmp_path_factory.mktemp("tiny-fp32")
    tiny_model("llama-gqa", hidden_size=64, num_attention_heads=8, num_key_value_heads=4,
               intermediate_size=128).save_pretrained(folder)
    return str(folder)


def _load(base_dir, quant=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if quant is None:
            return AutoModelForCausalLM.from_pretrained(base_dir)
        return AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=QUANT[quant](), device_map="cpu")


def _lora(model):
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def _scores(model, ids):
    model(input_ids=ids, labels=ids).loss.backward()
    # query_head units: 8 per layer rather than 2 KV groups, so the rank correlation means something
    return LoRACriterion().score(discover_structure(model, "query_head"))


@pytest.mark.parametrize("quant, min_rank_corr, max_rel_err", [("int8", 0.99, 0.05), ("nf4", 0.9, 0.3)])
def test_quantized_scores_close_to_fp32(base_dir, quant, min_rank_corr, max_rel_err):
    """Same LoRA weights, same batch: the de-quantized criterion ranks units like the float32 one."""
    torch.manual_seed(0)
    ref = _lora(_load(base_dir))
    with torch.no_grad():  # a non-zero B so that every term of G = gB A + B gA - gB gA is exercised
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(0))
    expected = _scores(ref, ids)
    quantized = _lora(_load(base_dir, quant))
    set_peft_model_state_dict(quantized, get_peft_model_state_dict(ref))
    got = _scores(quantized, ids)
    for kind in ("attention", "mlp"):  # pooled over layers: 16 query heads, 256 channels
        names = [n for n in expected if n.endswith(kind)]
        e, g = torch.cat([expected[n] for n in names]), torch.cat([got[n] for n in names])
        rel = float((g - e).norm() / e.norm())
        assert _spearman(g, e) >= min_rank_corr, kind
        assert rel <= max_rel_err, (kind, rel)
        assert not torch.equal(g, e)  # it really ran on the quantized weights


def test_int8_dequantization_matches_bitsandbytes_and_leaves_forward_working(base_dir):
    model = _load(base_dir, "int8")
    layer = model.model.layers[0].mlp.down_proj
    fp32 = _load(base_dir).model.layers[0].mlp.down_proj.weight
    before = dense_base_weight(layer)  # before the first forward: CB/SCB on the weight
    ids = torch.randint(0, 96, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(input_ids=ids)
        after = dense_base_weight(layer)  # after it: bitsandbytes moved them into layer.state
        reference = bnb.functional.int8_vectorwise_dequant(layer.state.CB, layer.state.SCB)
        torch.testing.assert_close(before, after)
        torch.testing.assert_close(after, reference.float())
        assert float((after - fp32).abs().max()) <= float(fp32.abs().max()) / 127 + 1e-6  # int8 rounding
        model(input_ids=ids)  # peft's dequantize_module_weight breaks this call on CPU; ours must not


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_count_base_parameters_uses_logical_shapes(base_dir, quant):
    assert count_base_parameters(_load(base_dir, quant)) == count_base_parameters(_load(base_dir))


@pytest.mark.parametrize("quant, dtype", [("int8", None), ("nf4", torch.bfloat16)])
def test_quantized_training_and_export(base_dir, tmp_path, quant, dtype):
    from scripts.tiny_train import make_trainer

    trainer = make_trainer(str(tmp_path / "out"), max_steps=6, model=_load(base_dir, quant))
    trainer.train()
    state = trainer.pruning_state
    assert state.pruned_channels() > 0 and state.pruned_heads() > 0

    # What the export must write for one cut matrix: rows of dequant(W) + s B A for the kept channels.
    structure = trainer.structure
    mlp = structure.mlp[0]
    gate = structure.layers[0].get_submodule("mlp.gate_proj")
    a, b, s = lora_parts(gate)
    expected = (dense_base_weight(gate) + s * (b.detach().float() @ a.detach().float()))[state.kept_indices(mlp.name)]

    out = tmp_path / "pruned"
    report = trainer.save_pruned_model(str(out), dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert loaded.dtype == (dtype or torch.float32)
    assert report["parameters"]["model_after"] == sum(p.numel() for p in loaded.parameters())
    assert loaded.config.intermediate_size == int(state.keep[mlp.name].sum())
    assert not hasattr(loaded.config, "quantization_config")
    torch.testing.assert_close(loaded.model.layers[0].mlp.gate_proj.weight.float(), expected.to(loaded.dtype).float())
    # No quantization side tensors (SCB, weight_format, absmax, quant_map, quant_state) in the file.
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(loaded.state_dict()) - ({"lm_head.weight"} if loaded.config.tie_word_embeddings else set())
    logits = loaded(input_ids=torch.randint(0, 96, (2, 8))).logits
    assert logits.isfinite().all()


def _gate_scores(model, ids):
    structure = discover_structure(model, "query_head")
    crit = TaylorGateCriterion()
    crit.attach(structure, model)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    scores = crit.score(structure)
    crit.detach()
    return scores


@pytest.mark.parametrize("quant, min_rank_corr", [("int8", 0.95), ("nf4", 0.8)])
def test_taylor_gate_scores_on_quantized_base(base_dir, quant, min_rank_corr):
    """The gate sits on activations, so it needs nothing from the quantized weights: its scores
    follow the float32 model's up to the quantization error of the forward pass."""
    torch.manual_seed(0)
    ref = _lora(_load(base_dir))
    ids = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(0))
    expected = _gate_scores(ref, ids)
    quantized = _lora(_load(base_dir, quant))
    set_peft_model_state_dict(quantized, get_peft_model_state_dict(ref))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _gate_scores(quantized, ids)
    for kind in ("attention", "mlp"):
        names = [n for n in expected if n.endswith(kind)]
        e, g = torch.cat([expected[n] for n in names]), torch.cat([got[n] for n in names])
        assert _spearman(g, e) >= min_rank_corr, kind
        assert not torch.equal(g, e)


def test_taylor_gate_trains_on_int8_base(base_dir, tmp_path):
    from scripts.tiny_train import make_trainer

    trainer = make_trainer(str(tmp_path / "out"), max_steps=6, model=_load(base_dir, "int8"),
                           pruning_criterion="taylor_gate")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert trainer.pruning_state.pruned_channels() > 0 and trainer.pruning_state.num_score_updates > 0
    assert all(s.std() > 0 for s in trainer.pruning_state.scores.values())


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_distillation_on_quantized_base(base_dir, tmp_path, quant):
    """The teacher is the same quantized weights with the adapters disabled: no second copy."""
    from scripts.tiny_train import make_trainer

    trainer = make_trainer(str(tmp_path / "out"), max_steps=4, model=_load(base_dir, quant), distill_alpha=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(h["distill/kl"] >= 0 and h["grad_norm"] > 0 for h in logs)
    assert trainer.pruning_state.pruned_channels() > 0


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_layer_pruning_on_quantized_base(base_dir, tmp_path, quant):
    """Depth pruning on an 8/4-bit base: the layer gates sit on module outputs, so the quantized linears
    are untouched; the export drops the removed layer and de-quantizes and merges the kept one."""
    from scripts.tiny_train import make_trainer

    trainer = make_trainer(str(tmp_path / "out"), max_steps=6, model=_load(base_dir, quant), pruning_ratio=0.0,
                           layer_pruning_ratio=0.5, pruning_criterion="taylor_gate")
    trainer.train()
    state = trainer.pruning_state
    assert state.num_pruned_layers() == 1 and state.layer_scores.abs().sum() > 0
    kept = int(state.layer_keep.nonzero()[0])
    gate = trainer.structure.layers[kept].get_submodule("mlp.gate_proj")
    a, b, s = lora_parts(gate)
    expected = dense_base_weight(gate) + s * (b.detach().float() @ a.detach().float())
    report = trainer.save_pruned_model(str(tmp_path / "pruned"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned"))
    assert loaded.config.num_hidden_layers == 1 and report["kept_layers"] == [kept]
    torch.testing.assert_close(loaded.model.layers[0].mlp.gate_proj.weight, expected)
    assert loaded(input_ids=torch.randint(0, 96, (2, 8))).logits.isfinite().all()
