"""Peak memory of pruning SmolLM2 with a float32 base vs an 8-bit (LLM.int8) base (and, with
``--modes fp32 int8 nf4``, a 4-bit NF4 base), side by side in one run.

The GGUF model is de-quantized once into a temporary safetensors folder; every mode then loads
that same folder in its own subprocess (float32, or quantized while loading by bitsandbytes) and
runs ``LoRAPruneTrainer`` for a few steps with scoring and mask updates. Memory is the process's
peak resident set size (``ru_maxrss``, CPU) or ``torch.cuda.max_memory_allocated`` (GPU), plus
the bytes the model's parameters occupy. ``train_peak_*`` are peaks while training (sampled in a
thread, after freed loading buffers are returned to the OS); ``process_peak_rss_mib`` also includes
loading, where bitsandbytes quantizes float32 tensors on the fly. ``*_anon_*`` count anonymous
memory only (``RssAnon``): after a quantized load, VmRSS still includes the float32 checkpoint's
file pages that were read to quantize it (clean page cache, dropped under memory pressure), which
would hide the saving. On a CPU, bitsandbytes' int8 matmul de-quantizes in
float16 per call, so steps are slower than float32: the point here is memory.

    python bench/quantized_memory.py                      # fp32 vs int8, 4 steps, batch 2 x 64 tokens
    python bench/quantized_memory.py --modes fp32 int8 nf4 --steps 6
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-gguf")
    p.add_argument("--modes", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8", "nf4"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--pruning-ratio", type=float, default=0.2)
    p.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "quantized_memory.json"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _rss_mib() -> float:
    return _status_mib("VmRSS")


def _anon_mib() -> float:
    """Anonymous resident memory: what the process allocated. Unlike VmRSS it leaves out file pages
    still mapped from the checkpoint (clean page cache the kernel can drop), which after loading a
    quantized model are the whole float32 file that was read to quantize it."""
    return _status_mib("RssAnon")


def _release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc), so the resident size shows live memory only: loading
    a quantized model materialises float32 tensors that are freed but would otherwise stay resident."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssSampler:
    """Peak resident size over a stretch of code, sampled every ``interval`` seconds in a thread
    (``ru_maxrss`` cannot be reset, so it cannot isolate training from loading)."""

    def __init__(self, interval: float = 0.02):
        import threading

        self.interval, self.peak, self.peak_anon = interval, _rss_mib(), _anon_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak, self.peak_anon = max(self.peak, _rss_mib()), max(self.peak_anon, _anon_mib())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak, self.peak_anon = max(self.peak, _rss_mib()), max(self.peak_anon, _anon_mib())


def prepare(args, folder: str) -> None:
    """De-quantize the GGUF once into ``folder`` (safetensors + tokenizer), in this subprocess."""
    from loraprune_trainer.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def worker(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from loraprune_trainer import LoRAPruneConfig, LoRAPruneTrainer

    cuda = torch.cuda.is_available()
    rss_start, anon_start = _rss_mib(), _anon_mib()
    quant = {
        "fp32": None,
        "int8": BitsAndBytesConfig(load_in_8bit=True),
        "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    }[args.worker]
    kwargs = {"quantization_config": quant, "device_map": "cuda:0" if cuda else "cpu"} if quant else {}
    with common.stopwatch() as load_time:
        model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    param_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    for p in model.parameters():  # fault in every weight page, so no mmap-backed page counts later
        p.data.float().sum() if p.is_floating_point() else p.data.sum()
    _release_freed_memory()
    rss_loaded, peak_loaded, anon_loaded = _rss_mib(), _peak_rss_mib(), _anon_mib()

    texts = common.c4_texts(0, args.batch * args.steps)
    config = LoRAPruneConfig(
        output_dir=tempfile.mkdtemp(prefix="qmem-"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        max_length=args.max_length, learning_rate=1e-4, pruning_ratio=args.pruning_ratio, prune_freq=1,
        pruning_warmup_ratio=0.0, pruning_cooldown_ratio=0.0, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=not cuda, bf16=False, gradient_checkpointing=False, seed=0, disable_tqdm=True,
    )
    trainer = LoRAPruneTrainer(model, config, train_dataset=Dataset.from_dict({"text": texts}),
                               processing_class=tokenizer,
                               peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                      task_type="CAUSAL_LM"))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    _release_freed_memory()
    rss_trainer = _rss_mib()
    with common.stopwatch() as train_time, RssSampler() as sampler:
        trainer.train()
    shutil.rmtree(config.output_dir, ignore_errors=True)
    peak = _peak_rss_mib()
    return {
        "mode": args.worker,
        "param_mib": param_bytes / 2**20,
        "rss_after_imports_mib": rss_start,
        "rss_after_load_mib": rss_loaded,
        "peak_rss_load_mib": peak_loaded,
        "anon_after_imports_mib": anon_start,
        "anon_after_load_mib": anon_loaded,
        "model_anon_mib": anon_loaded - anon_start,
        "train_peak_anon_mib": sampler.peak_anon,
        "rss_trainer_built_mib": rss_trainer,
        "train_peak_rss_mib": sampler.peak,
        "train_peak_above_load_mib": sampler.peak - rss_loaded,
        "process_peak_rss_mib": peak,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "load_s": load_time(),
        "s_per_step": train_time() / args.steps,
        "pruned_heads": trainer.pruning_state.pruned_heads(),
        "pruned_channels": trainer.pruning_state.pruned_channels(),
        "params_ratio": trainer.pruning_metrics()["prune/params_ratio"],
    }


def _run(argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} failed:\n{proc.stderr[-4000:]}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker == "prepare":
        prepare(args, args.folder)
        return {}
    if args.worker:
        result = worker(args)
        common.write_json(args.worker_out, result)
        return result

    folder = tempfile.mkdtemp(prefix="qmem-model-")
    rows = []
    try:
        _run(["--worker", "prepare", "--folder", folder, "--model", args.model])
        for mode in args.modes:
            out = os.path.join(folder, f"{mode}.json")
            _run(["--worker", mode, "--folder", folder, "--worker-out", out, "--batch", str(args.batch),
                  "--max-length", str(args.max_length), "--steps", str(args.steps),
                  "--pruning-ratio", str(args.pruning_ratio)])
            rows.append(common.read_json(out))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    reference = next((r for r in rows if r["mode"] == "fp32"), rows[0])
    for r in rows:
        r["train_peak_anon_vs_fp32"] = r["train_peak_anon_mib"] / reference["train_peak_anon_mib"]
        r["param_mib_vs_fp32"] = r["param_mib"] / reference["param_mib"]
    table = common.print_table(rows, ["mode", "param_mib", "param_mib_vs_fp32", "model_anon_mib",
                                      "train_peak_anon_mib", "train_peak_anon_vs_fp32", "train_peak_rss_mib",
                                      "process_peak_rss_mib", "s_per_step", "pruned_channels"], floatfmt="{:.4g}")
    result = {"benchmark": "quantized_memory", "command": common.command_line(), "machine": common.machine_info(),
              "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "folder", "worker_out")},
              "rows": rows, "table": table}
    common.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
