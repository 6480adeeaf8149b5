"""How the MLP width a pruned model keeps changes its speed: one LLaMA MLP (gate, up, down projections and
SwiGLU) on a ``[tokens, hidden]`` input at many intermediate widths, timed side by side.

The budget solver keeps the fewest channels that reach a budget, which can be an odd width such as 1,126
(SmolLM2 at 20%); matrix kernels run full tiles only on aligned widths. This measures what an unlucky
width costs and which multiple (``width_multiple``) avoids it: every width's median time, and the time per
kept channel relative to the full width (1.0 = as fast per channel as the unpruned MLP).

    python bench/width_speed.py --threads 1                       # SmolLM2 shapes (hidden 576, MLP 1536)
    python bench/width_speed.py --hidden 4096 --full 14336 --widths 11468 11469 11472 11520  # Llama-3-8B

Repeats interleave the widths (load from other processes hits all of them alike). Quiet-machine guard as
in the other timing benches (``--max-load``, ``--allow-busy``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import quiet  # noqa: E402

DEFAULT_WIDTHS = [1088, 1120, 1121, 1122, 1123, 1124, 1125, 1126, 1127, 1128, 1136, 1152, 1216, 1228, 1229, 1232,
                  1280, 1536]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--full", type=int, default=1536, help="The unpruned intermediate size (reference row).")
    p.add_argument("--widths", type=int, nargs="+", default=DEFAULT_WIDTHS)
    p.add_argument("--tokens", type=int, default=2048, help="Rows of the input (batch x sequence).")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "width_speed.json"))
    quiet.add_arguments(p)
    return p.parse_args(argv)


def mlp_time(x, gate, up, down) -> float:
    import torch

    with torch.no_grad():
        t = time.perf_counter()
        h = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)  # [tokens, width]
        h @ down.T  # [tokens, hidden]
    return time.perf_counter() - t


def alignment(width: int) -> int:
    """The largest power of two (up to 128) that divides ``width``."""
    k = 1
    while k < 128 and width % (2 * k) == 0:
        k *= 2
    return k


def main(argv=None):
    args = parse_args(argv)
    load_at_start = quiet.check_start(args)
    import torch

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    widths = sorted(set(args.widths) | {args.full})
    x = torch.randn(args.tokens, args.hidden, generator=g)
    weights = {w: (torch.randn(w, args.hidden, generator=g) * 0.02, torch.randn(w, args.hidden, generator=g) * 0.02,
                   torch.randn(args.hidden, w, generator=g) * 0.02) for w in widths}
    samples = {w: [] for w in widths}
    for w in widths:  # warm-up
        mlp_time(x, *weights[w])
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        for w in widths:
            samples[w].append(mlp_time(x, *weights[w]))
    full_ms = 1000 * statistics.median(samples[args.full])
    rows = []
    for w in widths:
        ms = 1000 * statistics.median(samples[w])
        rows.append({"width": w, "multiple_of": alignment(w), "ms": ms, "ms_min": 1000 * min(samples[w]),
                     "ms_max": 1000 * max(samples[w]), "time_vs_full": ms / full_ms,
                     "ideal_vs_full": w / args.full, "per_channel_vs_full": (ms / full_ms) / (w / args.full)})
    load_fields = quiet.check_end(args, load_at_start, rows)
    table = common.print_table(rows, ["width", "multiple_of", "ms", "ms_min", "ms_max", "time_vs_full",
                                      "ideal_vs_full", "per_channel_vs_full"], floatfmt="{:.3f}")
    common.write_json(args.out, {"benchmark": "MLP time by kept width", "rows": rows, "table": table,
                                 "settings": {**vars(args), "out": os.path.relpath(args.out, common.REPO_ROOT)},
                                 "command": common.command_line(),
                                 "wall_s": time.perf_counter() - t0,
                                 "machine": quiet.with_start_load(common.machine_info(), load_fields),
                                 **load_fields})


if __name__ == "__main__":
    main()
