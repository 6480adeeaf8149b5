"""Tiny random LLaMA-family models and datasets, built offline from configs."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen3Config)

# name -> (config class, kwargs). GQA and MHA; head_dim set explicitly where it differs from hidden/heads.
TINY = {
    "llama-mha": (LlamaConfig, dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, intermediate_size=48)),
    "llama-gqa": (LlamaConfig, dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, intermediate_size=40)),
    "llama-gqa-hd": (LlamaConfig, dict(hidden_size=32, num_attention_heads=8, num_key_value_heads=2, head_dim=6,
                                       intermediate_size=40)),
    "mistral-gqa": (MistralConfig, dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3,
                                         intermediate_size=36, sliding_window=None)),
    "qwen2-gqa": (Qwen2Config, dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, intermediate_size=44)),
    "qwen3-gqa": (Qwen3Config, dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    intermediate_size=40)),
}

VOCAB = 96


def tiny_model(name: str = "llama-gqa", num_layers: int = 2, seed: int = 0, **overrides):
    cls, kwargs = TINY[name]
    config = cls(vocab_size=VOCAB, num_hidden_layers=num_layers, max_position_embeddings=128,
                 tie_word_embeddings=False, **{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float()
    # Random-init biases are zero; make them matter so bias slicing is exercised.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.02)
    return model.eval()


def tiny_tokenizer():
    """A word-level tokenizer over a fixed vocabulary, no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(VOCAB - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    return fast


def tiny_text_dataset(n: int = 32, length: int = 24, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(4, VOCAB, (length,), generator=g).tolist()
        rows.append({"text": " ".join(f"w{i - 4}" for i in ids)})
    return Dataset.from_list(rows)
