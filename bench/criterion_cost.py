"""Cost of the importance criterion (the paper's Table 4): peak memory and step throughput of
``LoRAPruneTrainer`` with the ``lora`` criterion vs the ``vanilla`` (true base-weight gradient)
criterion, at the same batch, side by side in one run. ``none`` (plain LoRA ``SFTTrainer``, no
pruning) is the floor.

Each criterion runs in its own subprocess, so peak memory is that process's alone: on CPU the
peak resident set size (``resource.getrusage(...).ru_maxrss``, which includes the model's
weights: we also report the peak *above* the resident size after loading and building the
trainer), on GPU ``torch.cuda.max_memory_allocated``. Every step scores (no warm-up/cool-down),
so the criterion's cost is in every timed step; the first ``--skip`` steps are not timed, and
the median step time is reported (robust to other processes' load).

Timings are written only if the machine was quiet (see ``bench/quiet.py``: ``--max-load``,
``--allow-busy``); the load averages at start and end are in the JSON.

CPU default: SmolLM2-135M, batch 2 x 64 tokens, 6 steps. GPU: ``--batch 8 --max-length 512 --steps 30``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import quiet  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-gguf")
    p.add_argument("--criteria", nargs="+", default=["none", "lora", "vanilla"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--skip", type=int, default=1, help="Untimed first steps.")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "criterion_cost.json"))
    quiet.add_arguments(p)  # checked by the parent process only, around all the workers
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def worker(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from loraprune_trainer import LoRAPruneConfig, LoRAPruneTrainer
    from loraprune_trainer.loading import load_model_and_tokenizer

    cuda = torch.cuda.is_available()
    model, tok = load_model_and_tokenizer(args.model)
    if cuda:
        model = model.cuda()
    # Long C4 documents, truncated to max_length: every sample is exactly max_length tokens.
    ds = Dataset.from_list([{"text": t} for t in common.c4_texts(0, 200) if len(t) > 8 * args.max_length][:64])
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    tmp = tempfile.mkdtemp()
    common_kw = dict(output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=args.batch,
                     learning_rate=1e-4, save_strategy="no", report_to="none", use_cpu=not cuda, bf16=False,
                     max_length=args.max_length, packing=False, gradient_checkpointing=args.gradient_checkpointing,
                     logging_steps=1000, disable_tqdm=True, dataset_text_field="text", seed=0)
    times, score_times = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    if args.worker == "none":
        trainer = SFTTrainer(model, SFTConfig(**common_kw), train_dataset=ds, processing_class=tok, peft_config=lora,
                             callbacks=[Timer()])
    else:
        cfg = LoRAPruneConfig(**common_kw, pruning_criterion=args.worker, pruning_ratio=0.5,
                              pruning_warmup_ratio=0.0, pruning_cooldown_ratio=0.0, prune_freq=1)
        trainer = LoRAPruneTrainer(model, cfg, train_dataset=ds, processing_class=tok, peft_config=lora,
                                   callbacks=[Timer()])
        score = trainer.criterion.score

        def timed_score(structure):
            t = time.perf_counter()
            out = score(structure)
            score_times.append(time.perf_counter() - t)
            return out

        trainer.criterion.score = timed_score
    rss_ready = _rss_mib()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        gpu_ready = torch.cuda.memory_allocated() / 2**20
    trainer.train()
    timed = times[args.skip:]
    tokens_per_step = args.batch * args.max_length
    out = {
        "criterion": args.worker,
        "peak_rss_mib": _rss_mib(),
        "rss_ready_mib": rss_ready,
        "peak_rss_above_ready_mib": _rss_mib() - rss_ready,
        # Median: other processes on a shared machine make single steps slow, not the criterion.
        "step_s_median": statistics.median(timed),
        "step_s_all": times,
        "tokens_per_s": tokens_per_step / statistics.median(timed),
        "score_s_mean": (sum(score_times[args.skip:]) / max(1, len(score_times[args.skip:]))) if score_times else 0.0,
        "trainable_in_optimizer": sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"]),
    }
    if cuda:
        out["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu_ready_mib"] = gpu_ready
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        result = worker(args)
        with open(args.worker_out, "w") as f:
            json.dump(result, f)
        return
    load_at_start = quiet.check_start(args)  # before starting any worker: a busy machine refuses in seconds
    results = []
    t_all = time.perf_counter()
    for crit in args.criteria:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", crit, "--worker-out", path, "--model", args.model,
               "--batch", str(args.batch), "--max-length", str(args.max_length), "--steps", str(args.steps),
               "--skip", str(args.skip)] + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=common.REPO_ROOT)
        with open(path) as f:
            r = json.load(f)
        os.unlink(path)
        r["process_wall_s"] = time.perf_counter() - t0
        results.append(r)
        print(f"{crit}: peak RSS {r['peak_rss_mib']:.0f} MiB, step {r['step_s_median']:.2f}s", flush=True)
    by = {r["criterion"]: r for r in results}
    mem_key = "gpu_peak_mib" if "gpu_peak_mib" in results[0] else "peak_rss_mib"
    rows = []
    for r in results:
        row = {"criterion": r["criterion"], "peak_MiB": r[mem_key], "above_ready_MiB": r["peak_rss_above_ready_mib"],
               "step_s": r["step_s_median"], "tokens/s": r["tokens_per_s"], "score_s": r["score_s_mean"]}
        if "vanilla" in by and r["criterion"] != "vanilla":
            row["mem_vs_vanilla_%"] = 100.0 * (r[mem_key] / by["vanilla"][mem_key] - 1)
            row["throughput_vs_vanilla_%"] = 100.0 * (r["tokens_per_s"] / by["vanilla"]["tokens_per_s"] - 1)
        rows.append(row)
    load_fields = quiet.check_end(args, load_at_start, rows, results)  # refuses (writes nothing) on a busy machine
    table = common.print_table(rows, ["criterion", "peak_MiB", "above_ready_MiB", "step_s", "tokens/s", "score_s",
                                      "mem_vs_vanilla_%", "throughput_vs_vanilla_%"]
                               + (["busy"] if load_fields["busy"] else []), floatfmt="{:.2f}")
    common.write_json(args.out, {
        "benchmark": "criterion cost (Table 4)", "memory_metric": mem_key, "rows": rows, "table": table,
        "results": results, "settings": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
        "machine": quiet.with_start_load(common.machine_info(), load_fields), "command": common.command_line(),
        "wall_s": time.perf_counter() - t_all, **load_fields,
    })
    plot(rows, mem_key, os.path.splitext(args.out)[0] + ".png")


def plot(rows, mem_key, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [r["criterion"] for r in rows]
    a.bar(names, [r["peak_MiB"] for r in rows], color="tab:blue")
    a.set_ylabel(f"peak memory (MiB, {mem_key})")
    b.bar(names, [r["tokens/s"] for r in rows], color="tab:orange")
    b.set_ylabel("training tokens / s")
    fig.suptitle("Criterion cost: LoRA-guided vs full-gradient (vanilla)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
