"""Perplexity with its protocol, and the loaders of the evaluation text (local files or the Hub).

Perplexity numbers are only comparable within one protocol (window, stride, BOS handling, text
join, dtype), so :func:`perplexity` returns the protocol together with the number and
:func:`~loraprune_trainer.evaluation.records.write_result` never writes one without the other.

Protocols (named presets):

- ``"llm-pruner"``: the protocol of LLM-Pruner and LoRAPrune. The split is joined with ``"\\n\\n"``
  (done by :func:`load_text` for Hub rows), tokenized once, cut into non-overlapping 128-token
  windows (the remainder is dropped), and the mean token NLL over every predicted token of every
  window is exponentiated.
- ``"full-context"``: the same with windows of the model's context length, capped at 2048
  (Wanda / SliceGPT style).
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F

from ..data import DATA_DIR_ENV, portable_path, resolve_data_path, searched_locations
from .records import (_model_device, _model_dtype, _sha256_file, _sha256_text, _text_config, library_versions,
                      model_name, portable_path_or_name)

PROTOCOLS: dict[str, dict] = {
    "llm-pruner": {"window": 128, "description": "non-overlapping 128-token windows over the once-tokenized split "
                                                  "(joined with \\n\\n), remainder dropped, mean token NLL, exp"},
    "full-context": {"window": None, "context_cap": 2048,
                     "description": "non-overlapping windows of min(max_position_embeddings, 2048) tokens over the "
                                    "once-tokenized split, remainder dropped, mean token NLL, exp"},
}

# Hub datasets and the local files that hold the same split (the loader accepts either).
HUB_DATASETS = {
    "wikitext2": {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "test", "field": "text",
                  "local": "wikitext-2-raw/wiki.test.raw"},
    "ptb": {"path": "ptb_text_only", "name": "penn_treebank", "split": "validation", "field": "sentence",
            "local": "ptb/ptb.valid.txt"},
}

# File names inside a dataset folder, by split.
_FOLDER_FILES = {
    "test": ("wiki.test.raw", "ptb.test.txt"),
    "validation": ("wiki.valid.raw", "ptb.valid.txt"),
    "train": ("wiki.train.raw", "ptb.train.txt"),
}
_SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}
# With no split given, a folder's evaluation file is the one the standard protocol uses.
_DEFAULT_FOLDER_FILES = ("wiki.test.raw", "ptb.valid.txt")

def _resolve_folder(folder: str, split: str | None) -> str:
    if split is not None:
        names = _FOLDER_FILES.get(_SPLIT_ALIASES.get(split, split))
        if names is None:
            raise ValueError(f"Unknown split {split!r} for a dataset folder; use one of {sorted(_FOLDER_FILES)}.")
    else:
        names = _DEFAULT_FOLDER_FILES
    # Also look one level down, so the data root (wikitext-2-raw/, ptb/) is not required as the folder.
    found = []
    for root in [folder] + sorted(os.path.join(folder, d) for d in os.listdir(folder)
                                  if os.path.isdir(os.path.join(folder, d))):
        found += [os.path.join(root, n) for n in names if os.path.isfile(os.path.join(root, n))]
    if not found:
        raise FileNotFoundError(
            f"Folder {folder!r} holds none of {list(names)}: pass the text file itself (.raw/.txt/.jsonl/.json) "
            "or a folder that contains the split's file."
        )
    if len(found) > 1:
        raise ValueError(f"Folder {folder!r} holds several candidate files {found}: pass the file itself.")
    return found[0]


def _read_json_texts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            rows = [json.loads(line) for line in f if line.strip()]
        else:
            rows = json.load(f)
    if isinstance(rows, dict) and "text" in rows and isinstance(rows["text"], list):
        rows = [{"text": t} for t in rows["text"]]
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "text" in r for r in rows):
        raise ValueError(f"{path}: every record needs a \"text\" field (a list of objects, or one per line in .jsonl).")
    return [str(r["text"]) for r in rows]


def load_text(source: str, split: str | None = None, *, normalize_newlines: bool = True) -> tuple[str, dict]:
    """The evaluation text of ``source`` and where it came from.

    ``source`` is a Hub name (``"wikitext2"``: WikiText-2 raw test; ``"ptb"``: PTB validation; rows
    joined with ``"\\n\\n"`` as LLM-Pruner does), a local file (``.raw``/``.txt`` read as is;
    ``.jsonl``/``.json`` with a ``"text"`` field per record, joined with ``"\\n\\n"``), or a folder that
    contains ``wiki.test.raw`` / ``ptb.valid.txt`` (or the file of ``split``).

    ``normalize_newlines`` turns ``\r\n`` (and lone ``\r``) into ``\n``: some copies of WikiText-2 are
    stored with CRLF line ends, which the Hub rows do not contain and which would add ``\r`` tokens
    (about 1% more tokens with a byte-level BPE), changing the number. Whether it changed anything is
    recorded as ``metadata["newlines"]``; ``sha256`` is always of the file's bytes.

    Returns ``(text, metadata)``; metadata holds ``source``, ``path`` (None for the Hub), ``split``,
    ``join``, ``sha256`` (of the file, or of the joined text for Hub rows) and ``num_chars``.
    """
    if not isinstance(source, str) or not source:
        raise ValueError(f"`source` must be a Hub name ({sorted(HUB_DATASETS)}) or a path, got {source!r}.")
    if source in HUB_DATASETS and not os.path.exists(source):
        return _load_hub_text(source, split)
    path = resolve_data_path(source)
    if path is None:
        raise FileNotFoundError(
            f"Dataset {source!r} not found (looked in {searched_locations(source)}), and it is not a Hub name "
            f"({', '.join(sorted(HUB_DATASETS))}). Pass an existing .raw/.txt/.jsonl/.json file or a folder "
            f"containing wiki.test.raw / ptb.valid.txt, or a path inside the data folder ({DATA_DIR_ENV})."
        )
    if os.path.isdir(path):
        path = _resolve_folder(path, split)
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json"):
        text, join = "\n\n".join(_read_json_texts(path)), "records' \"text\" joined with \\n\\n"
    else:
        with open(path, encoding="utf-8", newline="") as f:  # newline="": read the bytes as they are
            text, join = f.read(), "file as is"
    newlines = "as stored"
    if normalize_newlines and "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        newlines = "CRLF/CR normalised to LF"
    # Recorded relative to the data folder (plus the sha256), so result files hold no machine's paths.
    meta = {"source": portable_path(path), "path": portable_path(path), "split": split, "join": join, "newlines": newlines,
            "sha256": _sha256_file(path), "num_chars": len(text)}
    return text, meta


def _load_hub_text(name: str, split: str | None) -> tuple[str, dict]:
    spec = HUB_DATASETS[name]
    split = _SPLIT_ALIASES.get(split, split) if split else spec["split"]
    try:
        from datasets import load_dataset

        rows = load_dataset(spec["path"], spec["name"], split=split)
    except Exception as e:  # offline, no cache, or a network error: all mean "use a local file"
        raise FileNotFoundError(
            f"Could not load {name!r} ({spec['path']}/{spec['name']}, split {split!r}) from the Hugging Face Hub "
            f"({type(e).__name__}: {str(e)[:200]}). Without Hub access pass the local file instead, e.g. "
            f"`{spec['local']}` from a copy of the dataset (`--datasets {name}=/path/to/{spec['local']}`)."
        ) from e
    text = "\n\n".join(rows[spec["field"]])
    meta = {"source": name, "path": None, "hub": f"{spec['path']}/{spec['name']}", "split": split,
            "join": f"rows' \"{spec['field']}\" joined with \\n\\n", "sha256": _sha256_text(text),
            "num_chars": len(text), "fingerprint": getattr(rows, "_fingerprint", None)}
    return text, meta


def _resolve_window(model, protocol: str, window: int | None) -> int:
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown protocol {protocol!r}; choose one of {sorted(PROTOCOLS)}.")
    if window is not None:
        return int(window)
    preset = PROTOCOLS[protocol]
    if preset["window"] is not None:
        return preset["window"]
    context = getattr(_text_config(model), "max_position_embeddings", None)
    if context is None:
        raise ValueError(f"Protocol {protocol!r} needs `config.max_position_embeddings`; pass `window=` instead.")
    return min(int(context), preset["context_cap"])


def _special_tokens_added(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids the tokenizer adds before and after the text by default (e.g. ``[bos]``, ``[]``)."""
    probe = "hello world"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain):])
    return [], []  # the special tokens change the text's tokens; record nothing rather than guess


def _window_starts(num_tokens: int, window: int, stride: int) -> list[int]:
    """Start offsets of every full window; the remainder that does not fill a window is dropped."""
    return list(range(0, num_tokens - window + 1, stride))


def perplexity(model, tokenizer, text: str, protocol: str = "llm-pruner", window: int | None = None,
               stride: int | None = None, batch_size: int = 8, max_windows: int | None = None,
               show_progress: bool = True, metadata: dict | None = None) -> dict:
    """Perplexity of ``model`` on ``text`` under a named protocol.

    The text is tokenized once (the tokenizer's default special tokens, e.g. one BOS at the stream
    start, are kept; windows get no BOS of their own), cut into windows ``input_ids[s : s + window]``
    with ``s = 0, stride, 2 stride, ...`` (the remainder is dropped) and batched as ``[B, window]``.
    Each window's logits ``[B, window, vocab]`` predict its tokens ``1 .. window-1``; with
    ``stride < window`` a later window scores only its last ``stride`` tokens, so every token is
    scored once. ``perplexity = exp(mean token NLL)`` over all scored tokens.

    ``model`` may be a plain transformers model, a PEFT model, or a model with mask hooks; it is put
    in eval mode and every module's train/eval flag is restored afterwards. ``max_windows`` keeps only
    the first windows, for quick runs, and is recorded. ``metadata`` (e.g. from :func:`load_text`)
    is stored under ``protocol["dataset"]``.

    Returns ``{"perplexity", "nll", "num_tokens_scored", "num_windows", "protocol": {...}}``.
    """
    preset_window = _resolve_window(model, protocol, None)
    window = preset_window if window is None else int(window)
    stride = window if stride is None else int(stride)
    if window < 2:
        raise ValueError(f"`window` must be at least 2 tokens (one context, one prediction), got {window}.")
    if not 1 <= stride <= window:
        raise ValueError(f"`stride` must be in [1, window={window}] (a larger stride would skip text), got {stride}.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"`max_windows` must be at least 1 or None, got {max_windows}.")
    if not isinstance(text, str) or not text:
        raise ValueError("`text` is empty: load it with `load_text(...)`.")

    prefix, suffix = _special_tokens_added(tokenizer)
    # verbose=False: the whole split is far longer than model_max_length, on purpose.
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)  # [N]
    starts = _window_starts(ids.numel(), window, stride)
    available = len(starts)
    if available == 0:
        raise ValueError(f"The text has {ids.numel()} tokens, fewer than one window of {window}: use a longer text "
                         "or a smaller `window`.")
    if max_windows is not None:
        starts = starts[:max_windows]

    device = _model_device(model)
    modes = {m: m.training for m in model.modules()}
    nll_sum, scored = 0.0, 0
    try:
        model.eval()
        batches = range(0, len(starts), batch_size)
        if show_progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=f"perplexity ({protocol}, window {window})", unit="batch")
        with torch.no_grad():
            for b in batches:
                chunk = starts[b:b + batch_size]
                batch = torch.stack([ids[s:s + window] for s in chunk]).to(device)  # [B, window]
                logits = model(input_ids=batch, use_cache=False).logits  # [B, window, vocab]
                # NLL of token t+1 given tokens <= t, [B, window-1]; one row at a time so the float32 copy
                # of the logits is [window, vocab], not [B, window, vocab] (GBs at 2048 x 50k).
                nll = torch.stack([F.cross_entropy(logits[i, :-1].float(), batch[i, 1:], reduction="none")
                                   for i in range(batch.shape[0])])
                # Tokens a previous (overlapping) window already scored are skipped.
                first_new = torch.tensor([0 if s == 0 else window - stride - 1 for s in chunk], device=device)
                positions = torch.arange(window - 1, device=device)
                keep = positions[None, :] >= first_new[:, None]  # [B, window-1]
                nll_sum += float(nll[keep].double().sum())
                scored += int(keep.sum())
    finally:
        for m, training in modes.items():
            m.training = training

    mean_nll = nll_sum / scored
    bos_id = getattr(tokenizer, "bos_token_id", None)
    record = {
        "name": protocol,
        "description": PROTOCOLS[protocol]["description"] if (window, stride) == (preset_window, preset_window)
        else f"preset overridden: window {window}, stride {stride} (preset window {preset_window})",
        "window": window,
        "stride": stride,
        "remainder": "dropped",
        "aggregation": "exp(mean token NLL over all scored tokens)",
        "tokenization": "whole text tokenized once",
        "bos_at_stream_start": bool(bos_id is not None and bos_id in prefix and int(ids[0]) == bos_id),
        "special_tokens_prepended": prefix,
        "special_tokens_appended": suffix,
        "bos_token_id": bos_id,
        "per_window_bos": False,
        "num_tokens_total": int(ids.numel()),
        "num_windows_available": available,
        "max_windows": max_windows,
        "dtype": _model_dtype(model),
        "device": str(device),
        "batch_size": batch_size,
        "model": model_name(model),
        "tokenizer": portable_path_or_name(getattr(tokenizer, "name_or_path", None)),
        "dataset": dict(metadata) if metadata else None,
        "versions": library_versions(),
    }
    return {"perplexity": math.exp(mean_nll), "nll": mean_nll, "num_tokens_scored": scored,
            "num_windows": len(starts), "protocol": record}



def parse_dataset_specs(specs: list[str] | dict[str, str]) -> dict[str, str]:
    """``["wikitext2=/data/wiki.test.raw", "ptb"]`` -> ``{"wikitext2": "/data/wiki.test.raw", "ptb": "ptb"}``.
    A bare Hub name stands for itself; a bare path is named after its file."""
    if isinstance(specs, dict):
        return dict(specs)
    out = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep:
            source = spec
            name = spec if spec in HUB_DATASETS else os.path.splitext(os.path.basename(spec.rstrip("/")))[0]
        if not name or not source:
            raise ValueError(f"Bad dataset spec {spec!r}: use NAME=FILE (e.g. wikitext2=wiki.test.raw) or a Hub name.")
        if name in out:
            raise ValueError(f"Dataset name {name!r} is given twice.")
        out[name] = source
    return out


def load_texts(specs: list[str] | dict[str, str]) -> dict[str, tuple[str, dict]]:
    """:func:`load_text` for every dataset spec, so a missing file fails before any model is loaded."""
    return {name: load_text(source) for name, source in parse_dataset_specs(specs).items()}


