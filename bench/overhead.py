"""What LoRAPrune adds to a LoRA fine-tuning step: plain LoRA `SFTTrainer` vs `LoRAPruneTrainer`.

Variants (``--variants``): ``sft`` is a plain LoRA `SFTTrainer`; a criterion name (``lora``,
``taylor_gate``, ``vanilla``, ...) is `LoRAPruneTrainer` with that criterion; a ``+kd`` suffix adds
self-distillation from the base model (``distill_alpha=0.5``: one extra forward pass without
gradient), ``+lstsq`` / ``+bias`` the compensation refit (``compensation=...``; with the default
``compensation_batches`` 8 and ``--prune_freq`` below that, every step accumulates statistics: the
worst case). Same model, data, batch, LoRA config and steps; pruning is active on every measured step
(scores each step, masks every `--prune_freq`). Each variant runs in its own subprocess (so peak
memory is that variant's own), in an order that rotates over `--rounds` so that machine noise hits
all alike. Ratios are against the first variant. Prints a table and writes JSON, but only if the
machine was quiet (see `bench/quiet.py`: `--max-load`, `--allow-busy`); the load averages at start
and end are in the JSON.

    python bench/overhead.py --threads 1                                   # sft vs lora, SmolLM2, CPU
    python bench/overhead.py --threads 1 --variants sft lora taylor_gate lora+kd taylor_gate+kd
    python bench/overhead.py --batch 8 --seq 512 --steps 30 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import quiet  # noqa: E402
from loraprune_trainer.data import portable_path  # noqa: E402

DATA_DIR = os.environ.get("LORAPRUNE_DATA_DIR", os.path.join(HERE, "..", "..", "shared", "data"))


def run_variant(variant: str, opts) -> dict:
    """Train `opts.steps` steps in this process; returns median step time and peak memory."""
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from loraprune_trainer import LoRAPruneConfig, LoRAPruneTrainer
    from loraprune_trainer.data import load_training_dataset
    from loraprune_trainer.loading import load_model_and_tokenizer

    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    model_kwargs = {}
    if opts.quant != "none":  # bitsandbytes base weights (CPU since 0.50, or CUDA)
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if opts.device == "cuda" else torch.float32
        model_kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True) if opts.quant == "int8" else
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute))
        model_kwargs["device_map"] = opts.device
    model, tok = load_model_and_tokenizer(opts.model, dtype=opts.dtype, **model_kwargs)
    dataset = load_training_dataset(opts.dataset, max_samples=opts.batch * (opts.steps + opts.warmup))
    use_cpu = opts.device == "cpu"
    import tempfile

    common = dict(output_dir=tempfile.mkdtemp(prefix=f"overhead-{variant}-"), max_steps=opts.steps + opts.warmup,
                  per_device_train_batch_size=opts.batch, max_length=opts.seq, learning_rate=1e-4,
                  use_cpu=use_cpu, bf16=not use_cpu and opts.dtype != "float32", report_to="none", save_strategy="no", logging_steps=10**6,
                  activation_checkpointing=False, seed=0, disable_tqdm=True, packing=True)
    lora = LoraConfig(r=opts.lora_r, lora_alpha=2 * opts.lora_r, target_modules="all-linear", task_type="CAUSAL_LM")

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._start = [], None

        def on_step_begin(self, args, state, control, **kw):
            if opts.device == "cuda":
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if opts.device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._start)

    timer = StepTimer()
    profiler = None
    if opts.profile:  # where the time goes: per-op CPU self time over the measured steps
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

        class ProfileSteps(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == opts.warmup:
                    profiler.start()

        timer_callbacks = [timer, ProfileSteps()]
    else:
        timer_callbacks = [timer]
    criterion, *extras = variant.split("+")
    unknown = set(extras) - {"kd", "lstsq", "bias"}
    if unknown:
        raise SystemExit(f"unknown variant suffix {sorted(unknown)} in {variant!r}: use +kd, +lstsq or +bias")
    if variant == "sft":
        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=dataset, processing_class=tok,
                             peft_config=lora, callbacks=timer_callbacks)
    else:
        # The ramp covers every step (no warm-up, no cool-down), so scoring runs on all of them.
        args = LoRAPruneConfig(**common, pruning_ratio=0.5, attention_pruning_ratio=0.34, prune_freq=opts.prune_freq,
                               pruning_warmup_ratio=0.0, pruning_cooldown_ratio=0.0, pruning_criterion=criterion,
                               distill_alpha=0.5 if "kd" in extras else 0.0,
                               compensation=next((e for e in extras if e in ("lstsq", "bias")), "none"))
        trainer = LoRAPruneTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                                   peft_config=lora, callbacks=timer_callbacks)
        # Time the pruning work inside the same steps too: a ratio immune to machine noise.
        pruning_times = {}
        callback = trainer.pruning_callback
        for event in ("on_pre_optimizer_step", "on_step_end"):
            original = getattr(callback, event)

            # global_step is incremented between the two events: key both by the step they belong to.
            offset = 1 if event == "on_pre_optimizer_step" else 0

            def timed(*a, _original=original, _offset=offset, **kw):
                if opts.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                out = _original(*a, **kw)
                if opts.device == "cuda":
                    torch.cuda.synchronize()
                step = a[1].global_step + _offset
                pruning_times[step] = pruning_times.get(step, 0.0) + time.perf_counter() - start
                return out

            setattr(callback, event, timed)
    if opts.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    measured = timer.times[opts.warmup:]
    ops = None
    if profiler is not None:
        profiler.stop()
        # Self time per op and measured step (ms): the ops a variant adds show up as differences.
        averages = profiler.key_averages()
        ops = {e.key: e.self_cpu_time_total / 1000 / len(measured) for e in averages}
        calls = {e.key: e.count / len(measured) for e in averages}
        # Including the ops they call: what the criterion's own autograd functions cost in all
        own = {e.key: e.cpu_time_total / 1000 / len(measured) for e in averages if "GateProbe" in e.key}
    result = {"variant": variant, "median_step_s": statistics.median(measured), "steps_measured": len(measured),
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if ops is not None:
        result["profile_ms_per_step"] = ops
        result["profile_calls_per_step"] = calls
        result["profile_own_functions_total_ms_per_step"] = own
    if opts.device == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if variant != "sft":
        per_step = [pruning_times.get(i, 0.0) for i in range(1, len(timer.times) + 1)]
        fractions = [p / (t - p) for p, t in zip(per_step, timer.times)][opts.warmup:]
        result["pruning_s_per_step"] = statistics.median(per_step[opts.warmup:])
        # Mask updates (and a compensation refit) happen every prune_freq steps: the median hides them.
        result["pruning_s_mean"] = statistics.mean(per_step[opts.warmup:])
        result["pruning_fraction_in_run"] = statistics.median(fractions)
        result["score_updates"] = trainer.pruning_state.num_score_updates
        result["params_ratio"] = trainer.pruning_metrics()["prune/params_ratio"]
    return result


def profile_differences(runs: dict, first: str, top: int = 25) -> dict[str, dict[str, float]]:
    """Per variant: op -> (its self ms per step) - (the first variant's), medians over rounds, the
    largest absolute differences first (``top`` of them)."""
    def median_ops(variant):
        tables = [r["profile_ms_per_step"] for r in runs[variant] if "profile_ms_per_step" in r]
        keys = set().union(*tables) if tables else set()
        return {k: statistics.median(t.get(k, 0.0) for t in tables) for k in keys}

    base = median_ops(first)
    out = {}
    for variant in runs:
        if variant == first:
            continue
        ops = median_ops(variant)
        diffs = {k: ops.get(k, 0.0) - base.get(k, 0.0) for k in set(ops) | set(base)}
        ranked = sorted(diffs.items(), key=lambda kv: -abs(kv[1]))[:top]
        out[variant] = {k: round(v, 2) for k, v in ranked}
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-gguf")
    p.add_argument("--variants", nargs="+", default=["sft", "lora"],
                   help="sft | <criterion> | <criterion>+kd; ratios are against the first one.")
    p.add_argument("--dataset", default=os.path.join(DATA_DIR, "c4", "c4_demo.jsonl"))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=8, help="measured steps per run")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps at the start of each run")
    p.add_argument("--prune_freq", type=int, default=2)
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="alternating runs per variant")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16"],
                   help="Load dtype of the base model (default: the model's own; GGUF: float32).")
    p.add_argument("--quant", default="none", choices=["none", "int8", "nf4"],
                   help="bitsandbytes base weights (LLM.int8 or NF4).")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); 1 keeps timings sane on a CPU shared with other jobs")
    p.add_argument("--out_dir", default=os.path.join(HERE, "results"))
    p.add_argument("--out", default=None, help="JSON file to write (default: <out_dir>/overhead_<device>.json).")
    p.add_argument("--profile", action="store_true",
                   help="Also record a torch.profiler op table over the measured steps (its own overhead inflates "
                        "the step times of that run) and print the ops each variant adds to the first one.")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    quiet.add_arguments(p)  # checked by the parent process only, around all the variant runs
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = parse_args(argv)
    if opts.variant:
        print("RESULT " + json.dumps(run_variant(opts.variant, opts)), flush=True)
        return

    load_at_start = quiet.check_start(opts)  # before any run: a busy machine refuses in seconds
    os.makedirs(opts.out_dir, exist_ok=True)
    variants = list(opts.variants)
    runs = {v: [] for v in variants}
    started = time.time()
    for r in range(opts.rounds):
        for variant in variants[r % len(variants):] + variants[:r % len(variants)]:  # rotate the order
            cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant] + argv
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"{variant} run failed:\n{out.stderr[-3000:]}")
            runs[variant].append(json.loads(line[-1][len("RESULT "):]))
            print(f"round {r + 1} {variant}: {runs[variant][-1]['median_step_s']:.3f} s/step", flush=True)

    def med(variant, key):
        return statistics.median(x[key] for x in runs[variant])

    load_fields = quiet.check_end(opts, load_at_start, *runs.values())  # refuses (writes nothing) on a busy machine
    mem_key = "peak_cuda_mib" if opts.device == "cuda" else "peak_rss_mib"
    first = variants[0]
    rows = []
    for v in variants:
        row = {"variant": v, "step_s": med(v, "median_step_s"), mem_key: med(v, mem_key),
               "step_time_ratio": med(v, "median_step_s") / med(first, "median_step_s"),
               "peak_memory_ratio": med(v, mem_key) / med(first, mem_key)}
        if v != "sft":
            row["pruning_s_per_step"] = med(v, "pruning_s_per_step")
            row["pruning_fraction_in_run"] = med(v, "pruning_fraction_in_run")
            if all("pruning_s_mean" in r for r in runs[v]):
                row["pruning_s_mean"] = med(v, "pruning_s_mean")
        rows.append(row)
    summary = {
        "benchmark": "overhead", "rows": rows,
        # Paths as the data folder names them, never the machine's.
        "settings": vars(opts) | {"variant": None, "dataset": portable_path(opts.dataset), "out_dir": None},
        "runs": runs, "wall_s": time.time() - started,
        "machine": {"cpus": os.cpu_count(), "device": opts.device, "load_average_at_start": load_at_start},
        **load_fields,
    }
    if load_fields["busy"]:
        print('\nBUSY machine: these timings are marked "busy": true.')
    print(f"\n{'variant':<18}{'s/step':>9}{mem_key:>14}{'time x':>9}{'mem x':>8}{'pruning s/step':>16}")
    for r in rows:
        pruning = f"{r['pruning_s_per_step']:.3f} (+{100 * r['pruning_fraction_in_run']:.1f}%)" if "pruning_s_per_step" in r else "-"
        print(f"{r['variant']:<18}{r['step_s']:>9.3f}{r[mem_key]:>14.0f}{r['step_time_ratio']:>9.3f}"
              f"{r['peak_memory_ratio']:>8.3f}{pruning:>16}")
    print(f"(ratios against {first}; pruning s/step: the callback's own time inside the same steps)")
    if opts.profile:
        summary["profile_diff"] = profile_differences(runs, first)
        for v, diffs in summary["profile_diff"].items():
            print(f"\nops {v} adds to {first} (ms of self CPU time per step, median over rounds):")
            for op, ms in list(diffs.items())[:12]:
                print(f"  {ms:+9.1f}  {op}")
    path = opts.out or os.path.join(opts.out_dir, f"overhead_{opts.device}.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\nwrote {path} ({summary['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
