"""Evaluation harness: perplexity protocols, text loading, result files, CLI, lm-eval wiring."""

from __future__ import annotations

import hashlib
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from loraprune_trainer.data import portable_path
from loraprune_trainer.evaluation import PROTOCOLS, load_text, perplexity, write_result
from tiny import VOCAB, tiny_model, tiny_text_dataset, tiny_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
TASK_DIR = os.path.join(HERE, "data", "lm_eval_tasks")


def _text(n: int = 12, length: int = 40, seed: int = 0) -> str:
    return " ".join(tiny_text_dataset(n, length, seed)["text"])


def _hand_perplexity(model, ids: torch.Tensor, window: int) -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping windows, one window at a time, via log_softmax."""
    nlls = []
    with torch.no_grad():
        for s in range(0, ids.numel() - window + 1, window):
            w = ids[s:s + window]
            logp = torch.log_softmax(model(input_ids=w[None]).logits[0].double(), dim=-1)  # [window, vocab]
            for t in range(window - 1):
                nlls.append(-logp[t, w[t + 1]].item())
    return math.exp(sum(nlls) / len(nlls)), len(nlls)


# -- perplexity ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("window,batch_size", [(16, 3), (32, 8)])
def test_perplexity_matches_hand_computation(window, batch_size):
    model, tok = tiny_model("llama-gqa"), tiny_tokenizer()
    text = _text()
    ids = torch.tensor(tok(text)["input_ids"])
    expected, count = _hand_perplexity(model, ids, window)
    result = perplexity(model, tok, text, window=window, batch_size=batch_size, show_progress=False)
    assert result["num_tokens_scored"] == count == (ids.numel() // window) * (window - 1)
    assert result["num_windows"] == ids.numel() // window
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert result["nll"] == pytest.approx(math.log(expected), rel=1e-5)
    # A random model is near uniform over the vocabulary, not trivially 1.
    assert 0.5 * VOCAB < result["perplexity"] < 2 * VOCAB


def test_llm_pruner_protocol_uses_128_windows_and_drops_remainder():
    model, tok = tiny_model("llama-mha"), tiny_tokenizer()
    text = _text(n=10, length=40)  # 400 tokens: 3 windows of 128, 16 dropped
    ids = torch.tensor(tok(text)["input_ids"])
    assert ids.numel() == 400
    expected, count = _hand_perplexity(model, ids, 128)
    result = perplexity(model, tok, text, protocol="llm-pruner", show_progress=False)
    p = result["protocol"]
    assert (p["name"], p["window"], p["stride"], p["remainder"]) == ("llm-pruner", 128, 128, "dropped")
    assert (result["num_windows"], result["num_tokens_scored"], p["num_tokens_total"]) == (3, 3 * 127, 400)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_full_context_protocol_uses_model_context_capped():
    model, tok = tiny_model("llama-gqa"), tiny_tokenizer()
    model.config.max_position_embeddings = 64  # only the protocol reads it; RoPE does not depend on it
    text = _text()
    result = perplexity(model, tok, text, protocol="full-context", show_progress=False)
    assert result["protocol"]["window"] == 64 and result["protocol"]["name"] == "full-context"
    ids = torch.tensor(tok(text)["input_ids"])
    assert result["perplexity"] == pytest.approx(_hand_perplexity(model, ids, 64)[0], rel=1e-5)
    big = tiny_model("llama-gqa")
    big.config.max_position_embeddings = 4096
    assert perplexity(big, tok, _text(n=60, length=40), protocol="full-context",
                      show_progress=False)["protocol"]["window"] == PROTOCOLS["full-context"]["context_cap"]


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_protocol_fields_recorded(protocol):
    model, tok = tiny_model("llama-gqa"), tiny_tokenizer()
    meta = {"source": "x", "sha256": "abc"}
    result = perplexity(model, tok, _text(n=16), protocol=protocol, window=None, max_windows=1, metadata=meta,
                        show_progress=False)
    p = result["protocol"]
    for key in ("name", "window", "stride", "bos_at_stream_start", "special_tokens_prepended", "per_window_bos",
                "dtype", "num_tokens_total", "num_windows_available", "max_windows", "dataset", "versions"):
        assert key in p, key
    assert p["name"] == protocol and p["max_windows"] == 1 and result["num_windows"] == 1
    assert p["num_windows_available"] > 1  # the limit really cut work
    assert p["dtype"] == "float32" and p["dataset"] == meta and p["per_window_bos"] is False
    assert p["versions"]["torch"] == torch.__version__


def test_bos_prepended_once_is_recorded_and_scored_as_context():
    model, tok = tiny_model("llama-gqa"), tiny_tokenizer()
    from tokenizers import processors

    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    text = _text()
    ids = torch.tensor(tok(text)["input_ids"])
    assert ids[0] == 1 and (ids == 1).sum() == 1  # one BOS, at the stream start only
    result = perplexity(model, tok, text, window=16, show_progress=False)
    assert result["protocol"]["bos_at_stream_start"] is True
    assert result["protocol"]["special_tokens_prepended"] == [1]
    assert result["perplexity"] == pytest.approx(_hand_perplexity(model, ids, 16)[0], rel=1e-5)
    plain = perplexity(model, tiny_tokenizer(), text, window=16, show_progress=False)
    assert plain["protocol"]["bos_at_stream_start"] is False and plain["perplexity"] != result["perplexity"]


def test_overlapping_stride_scores_every_token_once():
    model, tok = tiny_model("llama-gqa"), tiny_tokenizer()
    text = _text(n=4, length=20)  # 80 tokens
    ids = torch.tensor(tok(text)["input_ids"])
    result = perplexity(model, tok, text, window=32, stride=16, show_progress=False)
    # windows at 0, 16, 32, 48: the first scores 31 tokens, each later one its last 16.
    assert result["num_windows"] == 4 and result["num_tokens_scored"] == 31 + 3 * 16 == ids.numel() - 1
    nlls = []
    with torch.no_grad():
        for s in (0, 16, 32, 48):
            w = ids[s:s + 32]
            nll = F.cross_entropy(model(input_ids=w[None]).logits[0, :-1].double(), w[1:], reduction="none")
            nlls += nll.tolist() if s == 0 else nll[-16:].tolist()
    assert result["perplexity"] == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)


def test_perplexity_restores_training_modes():
    model, tok = tiny_model("llama-gqa"), tiny_tokenizer()
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back exactly
    before = {n: m.training for n, m in model.named_modules()}
    perplexity(model, tok, _text(), window=16, show_progress=False)
    assert {n: m.training for n, m in model.named_modules()} == before


def test_perplexity_bad_arguments():
    model, tok = tiny_model("llama-gqa"), tiny_tokenizer()
    with pytest.raises(ValueError, match="Unknown protocol"):
        perplexity(model, tok, _text(), protocol="wanda")
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tok, _text(), window=16, stride=32)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, tok, "w1 w2 w3", window=16)


def test_perplexity_of_peft_model_matches_merged():
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_model("llama-gqa"), tiny_tokenizer()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    text = _text()
    result = perplexity(peft_model, tok, text, window=32, show_progress=False)
    merged = peft_model.merge_and_unload()
    assert result["perplexity"] == pytest.approx(perplexity(merged, tok, text, window=32,
                                                            show_progress=False)["perplexity"], rel=1e-5)


# -- load_text ----------------------------------------------------------------------------------------
def test_load_text_raw_file_as_is(tmp_path):
    raw = " = Title = \n\n line one \n line two\n"
    path = tmp_path / "wiki.test.raw"
    path.write_bytes(raw.encode())
    text, meta = load_text(str(path))
    assert text == raw
    assert meta["sha256"] == hashlib.sha256(raw.encode()).hexdigest()
    assert meta["path"] == portable_path(str(path)) and meta["num_chars"] == len(raw)
    assert not os.path.isabs(meta["path"])  # recorded without the machine's absolute path
    # A folder resolves to its evaluation file, also one level down.
    assert load_text(str(tmp_path))[0] == raw


def test_load_text_normalises_crlf(tmp_path):
    raw = b" = Title = \r\n line one \r\n"
    (tmp_path / "w.raw").write_bytes(raw)
    text, meta = load_text(str(tmp_path / "w.raw"))
    assert text == " = Title = \n line one \n" and meta["newlines"] == "CRLF/CR normalised to LF"
    assert meta["sha256"] == hashlib.sha256(raw).hexdigest()  # the file's bytes, not the normalised text
    kept, meta = load_text(str(tmp_path / "w.raw"), normalize_newlines=False)
    assert kept == raw.decode() and meta["newlines"] == "as stored"


def test_load_text_folder_by_split(tmp_path):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.valid.txt").write_text("valid text\n")
    (tmp_path / "ptb" / "ptb.test.txt").write_text("test text\n")
    assert load_text(str(tmp_path))[0] == "valid text\n"
    assert load_text(str(tmp_path / "ptb"), split="test")[0] == "test text\n"
    assert load_text(str(tmp_path / "ptb"), split="valid")[1]["split"] == "valid"


def test_load_text_json_and_jsonl(tmp_path):
    rows = [{"text": "a b"}, {"text": "c"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert load_text(str(tmp_path / "d.jsonl"))[0] == "a b\n\nc"
    assert load_text(str(tmp_path / "d.json"))[0] == "a b\n\nc"
    (tmp_path / "bad.json").write_text(json.dumps([{"body": "x"}]))
    with pytest.raises(ValueError, match='"text" field'):
        load_text(str(tmp_path / "bad.json"))


def test_load_text_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found.*wiki.test.raw"):
        load_text(str(tmp_path / "nope.raw"))
    with pytest.raises(FileNotFoundError, match="holds none of"):
        load_text(str(tmp_path))


def test_load_text_hub_rows_are_joined_with_blank_lines(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no local folder called "wikitext2"
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([{"text": " = A = \n"}, {"text": ""}, {"text": " b c \n"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    text, meta = load_text("wikitext2")
    assert calls == [("wikitext", "wikitext-2-raw-v1", "test")]
    assert text == " = A = \n\n\n\n\n b c \n"
    assert meta["path"] is None and meta["split"] == "test"
    assert meta["sha256"] == hashlib.sha256(text.encode()).hexdigest()


def test_load_text_hub_offline_names_local_alternative(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no local folder called "ptb"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no cache to fall back on
    import datasets

    def offline(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match="ptb.valid.txt"):
        load_text("ptb")


# -- masked model in training vs its exported folder -------------------------------------------------------
def test_masked_model_in_training_equals_exported_folder(tmp_path):
    from peft import LoraConfig

    from loraprune_trainer import LoRAPruneConfig, LoRAPruneTrainer
    from loraprune_trainer.evaluation import evaluate_folder

    args = LoRAPruneConfig(output_dir=str(tmp_path / "run"), pruning_ratio=0.5, prune_freq=2, max_steps=8,
                           per_device_train_batch_size=4, learning_rate=1e-3, use_cpu=True, bf16=False,
                           report_to="none", save_strategy="no", max_length=32, seed=0,
                           gradient_checkpointing=False, dataloader_num_workers=0, logging_steps=100)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    tok = tiny_tokenizer()
    trainer = LoRAPruneTrainer(model=tiny_model("llama-gqa"), args=args, train_dataset=tiny_text_dataset(),
                               processing_class=tok, peft_config=lora)
    trainer.train()
    assert trainer.pruning_state.pruned_channels() > 0 and trainer.pruning_state.pruned_heads() > 0

    text_file = tmp_path / "eval.txt"
    text_file.write_text(_text(n=8, length=40, seed=3))
    text, meta = load_text(str(text_file))
    trainer.model.train()  # as it is mid-training: the evaluation must switch to eval and back
    masked = perplexity(trainer.model, tok, text, window=32, batch_size=4, metadata=meta, show_progress=False)
    assert trainer.model.training
    out = tmp_path / "pruned"
    trainer.save_pruned_model(str(out))
    exported = evaluate_folder(str(out), datasets=[f"tiny={text_file}"], window=32, batch_size=4, device="cpu",
                               show_progress=False, out=str(tmp_path / "res.json"))
    compact = exported["perplexity"]["tiny"]
    assert compact["perplexity"] == pytest.approx(masked["perplexity"], rel=1e-4)
    assert compact["num_tokens_scored"] == masked["num_tokens_scored"]
    assert compact["protocol"]["dataset"]["sha256"] == meta["sha256"]
    # The pruned model really is smaller, and its perplexity differs from the dense start.
    assert exported["model"]["num_parameters"] < sum(p.numel() for p in tiny_model("llama-gqa").parameters())
    assert exported["model"]["pruning_report"]["parameters"]["model_ratio"] < 1
    dense = perplexity(tiny_model("llama-gqa"), tok, text, window=32, show_progress=False)
    assert dense["perplexity"] != pytest.approx(masked["perplexity"], rel=1e-4)
    on_disk = json.loads((tmp_path / "res.json").read_text())
    assert on_disk["perplexity"]["tiny"]["perplexity"] == compact["perplexity"]
    assert on_disk["perplexity"]["tiny"]["protocol"]["window"] == 32


# -- result files ----------------------------------------------------------------------------------------
def test_write_result_is_atomic_and_requires_protocol(tmp_path):
    model, tok = tiny_model("llama-gqa"), tiny_tokenizer()
    result = perplexity(model, tok, _text(), window=16, show_progress=False)
    path = write_result(str(tmp_path / "sub" / "r.json"), {"wikitext2": result})
    assert json.loads(open(path).read())["wikitext2"]["protocol"]["window"] == 16
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["r.json"]  # no temporary file left behind
    with pytest.raises(ValueError, match="without its protocol"):
        write_result(str(tmp_path / "bad.json"), {"wikitext2": {"perplexity": 12.3}})
    assert not (tmp_path / "bad.json").exists()


# -- CLI -------------------------------------------------------------------------------------------------
def _save_tiny_folder(path):
    model, tok = tiny_model("llama-mha"), tiny_tokenizer()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def test_cli_writes_results_with_protocol(tmp_path, capsys):
    from loraprune_trainer.eval import main

    model, tok = _save_tiny_folder(tmp_path / "model")
    (tmp_path / "a.txt").write_text(_text(n=8, length=40, seed=1))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in tiny_text_dataset(8, 40, 2)["text"]))
    out = tmp_path / "results.json"
    main(["--model", str(tmp_path / "model"), "--datasets", f"wikitext2={tmp_path / 'a.txt'}",
          f"ptb={tmp_path / 'b.jsonl'}", "--protocol", "llm-pruner", "--max_windows", "2", "--batch_size", "2",
          "--device", "cpu", "--out", str(out), "--no_progress"])
    result = json.loads(out.read_text())
    for name, source in (("wikitext2", tmp_path / "a.txt"), ("ptb", tmp_path / "b.jsonl")):
        r = result["perplexity"][name]
        assert r["protocol"]["name"] == "llm-pruner" and r["protocol"]["max_windows"] == 2
        assert r["num_windows"] == 2 and r["num_tokens_scored"] == 2 * 127
        assert r["protocol"]["dataset"]["path"] == portable_path(str(source))
        text, _ = load_text(str(source))
        expected = perplexity(model, tok, text, max_windows=2, show_progress=False)["perplexity"]
        assert r["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert json.loads(capsys.readouterr().out)["wikitext2"] == pytest.approx(result["perplexity"]["wikitext2"]
                                                                             ["perplexity"], rel=1e-3)


def test_cli_missing_dataset_fails_before_loading_model(tmp_path):
    from loraprune_trainer.eval import main

    # The model does not exist either: the dataset error must come first.
    with pytest.raises(FileNotFoundError, match="missing.raw"):
        main(["--model", str(tmp_path / "no-model"), "--datasets", f"wikitext2={tmp_path / 'missing.raw'}"])
    with pytest.raises(ValueError, match="Nothing to evaluate"):
        main(["--model", str(tmp_path / "no-model")])
    from loraprune_trainer.evaluation import main as console_main  # the `loraprune-eval` entry point

    with pytest.raises(FileNotFoundError, match="missing.raw"):
        console_main(["--model", "x", "--datasets", f"ptb={tmp_path / 'missing.raw'}"])


# -- lm-eval zero-shot on a local task ---------------------------------------------------------------------
def _hand_mc_accuracy(model, tok, rows):
    """acc / acc_norm of a multiple-choice task: argmax of the summed log-probability of " " + choice
    given the query (acc_norm divides by the choice's length in characters, as lm-eval does)."""
    acc = acc_norm = 0
    with torch.no_grad():
        for row in rows:
            ctx = tok(row["query"], add_special_tokens=False)["input_ids"]
            lls = []
            for choice in row["choices"]:
                cont = tok(row["query"] + " " + choice, add_special_tokens=False)["input_ids"][len(ctx):]
                ids = torch.tensor(ctx + cont)
                logp = torch.log_softmax(model(input_ids=ids[None, :-1]).logits[0].double(), -1)
                lls.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
            acc += int(max(range(len(lls)), key=lambda i: lls[i]) == row["label"])
            norm = [ll / len(c) for ll, c in zip(lls, row["choices"])]
            acc_norm += int(max(range(len(norm)), key=lambda i: norm[i]) == row["label"])
    return acc / len(rows), acc_norm / len(rows)


def test_zero_shot_local_task_matches_hand_computation():
    pytest.importorskip("lm_eval", reason="lm-eval is an optional dependency (the `eval` / `test` extras)")
    from loraprune_trainer.evaluation import zero_shot

    model, tok = tiny_model("llama-gqa", seed=1), tiny_tokenizer()
    rows = json.loads(open(os.path.join(TASK_DIR, "loraprune_tiny_mc.json")).read())
    result = zero_shot(model, tok, "loraprune_tiny_mc", include_path=TASK_DIR, batch_size=4)
    task = result["tasks"]["loraprune_tiny_mc"]
    assert task["num_samples"] == task["num_samples_total"] == len(rows) == 8
    assert 0.0 <= task["acc"] <= 1.0 and 0.0 <= task["acc_norm"] <= 1.0
    assert (task["acc"], task["acc_norm"]) == pytest.approx(_hand_mc_accuracy(model, tok, rows))
    p = result["protocol"]
    assert p["num_fewshot"] == 0 and p["limit"] is None and p["versions"]["lm_eval"]
    limited = zero_shot(model, tok, ["loraprune_tiny_mc"], include_path=TASK_DIR, limit=3)
    assert limited["tasks"]["loraprune_tiny_mc"]["num_samples"] == 3 and limited["protocol"]["limit"] == 3


def test_zero_shot_unknown_task_is_clear(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is an optional dependency (the `eval` / `test` extras)")
    from loraprune_trainer.evaluation import zero_shot

    with pytest.raises(FileNotFoundError, match="Task folder"):
        zero_shot(tiny_model(), tiny_tokenizer(), "x", include_path=str(tmp_path / "none"))


def test_zero_shot_on_peft_model_in_training_mode():
    pytest.importorskip("lm_eval", reason="lm-eval is an optional dependency (the `eval` / `test` extras)")
    from peft import LoraConfig, get_peft_model

    from loraprune_trainer.evaluation import zero_shot

    tok = tiny_tokenizer()
    peft_model = get_peft_model(tiny_model("llama-gqa", seed=2),
                                LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft_model.train()
    rows = json.loads(open(os.path.join(TASK_DIR, "loraprune_tiny_mc.json")).read())
    task = zero_shot(peft_model, tok, "loraprune_tiny_mc", include_path=TASK_DIR)["tasks"]["loraprune_tiny_mc"]
    assert peft_model.training  # restored
    peft_model.eval()
    assert (task["acc"], task["acc_norm"]) == pytest.approx(_hand_mc_accuracy(peft_model, tok, rows))


def test_model_fingerprint_follows_weights_and_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM

    from loraprune_trainer.evaluation.records import model_fingerprint

    model, tok = _save_tiny_folder(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model_fingerprint(model, tok) == model_fingerprint(reloaded, tok)
    with torch.no_grad():  # one weight, deep inside a tensor larger than the strided sample
        reloaded.model.layers[0].mlp.down_proj.weight[3, 5] += 1e-3
    assert model_fingerprint(reloaded, tok) != model_fingerprint(model, tok)
    other_tok = tiny_tokenizer()
    other_tok.add_tokens(["extra_word"])
    assert model_fingerprint(model, other_tok) != model_fingerprint(model, tok)


def _mc_requests(rows) -> int:
    return sum(len(r["choices"]) for r in rows)


def test_zero_shot_cache_resumes_after_a_crash_and_never_serves_another_model(tmp_path):
    """--zeroshot_cache: answers are stored as they are scored, so a pass that dies resumes where it stopped; a
    larger limit reuses a smaller one's items; a model that computes something else (other weights, or the same
    weights under a mask hook) gets its own file, and every result equals the hand computation."""
    pytest.importorskip("lm_eval", reason="lm-eval is an optional dependency (the `eval` / `test` extras)")
    from loraprune_trainer.evaluation import zero_shot

    rows = json.loads(open(os.path.join(TASK_DIR, "loraprune_tiny_mc.json")).read())
    cache = tmp_path / "cache"
    tok = tiny_tokenizer()
    model = tiny_model("llama-gqa", seed=1).eval()
    expected = _hand_mc_accuracy(model, tok, rows)

    def run(m, **kw):
        r = zero_shot(m, tok, "loraprune_tiny_mc", include_path=TASK_DIR, batch_size=2, cache_dir=str(cache), **kw)
        return r["tasks"]["loraprune_tiny_mc"], r["protocol"]["cache"]

    task, info = run(model, limit=3)
    assert info["requests_cached_before"] == 0 and info["requests_cached_after"] == _mc_requests(rows[:3])
    task, info = run(model)
    assert info["requests_cached_before"] == _mc_requests(rows[:3])
    assert info["requests_cached_after"] == _mc_requests(rows)
    assert (task["acc"], task["acc_norm"]) == pytest.approx(expected)
    assert len(os.listdir(cache)) == 1 and os.path.basename(info["file"]) in os.listdir(cache)

    # A second model whose forward dies on its third call (the cache probe, then two batches of 2 requests).
    other = tiny_model("llama-gqa", seed=2).eval()
    calls = []

    def die_on_third_call(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")

    handle = other.register_forward_pre_hook(die_on_third_call)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(other)
    handle.remove()
    task, info = run(other)
    assert info["requests_cached_before"] == 2  # the first batch survived the crash
    assert info["requests_cached_after"] == _mc_requests(rows)
    assert (task["acc"], task["acc_norm"]) == pytest.approx(_hand_mc_accuracy(other, tok, rows))

    # Same weights as the first model, but a hook (as pruning masks are) changes what it computes.
    handle = model.model.layers[0].mlp.register_forward_hook(lambda module, args, out: out * 0)
    try:
        task, info = run(model)
        assert info["requests_cached_before"] == 0
        assert (task["acc"], task["acc_norm"]) == pytest.approx(_hand_mc_accuracy(model, tok, rows))
    finally:
        handle.remove()
    assert len(os.listdir(cache)) == 3

    (tmp_path / "a_file").write_text("")
    with pytest.raises(NotADirectoryError, match="pass a folder"):
        zero_shot(model, tok, "loraprune_tiny_mc", include_path=TASK_DIR, cache_dir=str(tmp_path / "a_file"))


def test_cli_zeroshot_cache_is_recorded(tmp_path, capsys):
    pytest.importorskip("lm_eval", reason="lm-eval is an optional dependency (the `eval` / `test` extras)")
    from loraprune_trainer.eval import main

    _save_tiny_folder(tmp_path / "model")
    argv = ["--model", str(tmp_path / "model"), "--tasks", "loraprune_tiny_mc", "--task_dir", TASK_DIR,
            "--device", "cpu", "--zeroshot_cache", str(tmp_path / "cache"), "--no_progress"]
    first = main(argv + ["--out", str(tmp_path / "a.json")])["zero_shot"]
    second = main(argv + ["--out", str(tmp_path / "b.json")])["zero_shot"]
    before, after = first["protocol"]["cache"], second["protocol"]["cache"]
    assert before["requests_cached_before"] == 0
    assert after["requests_cached_before"] == before["requests_cached_after"] > 0
    assert second["tasks"]["loraprune_tiny_mc"]["acc"] == first["tasks"]["loraprune_tiny_mc"]["acc"]
    recorded = json.loads((tmp_path / "b.json").read_text())["zero_shot"]["protocol"]["cache"]
    assert recorded["file"] == portable_path(second["protocol"]["cache"]["file"])
