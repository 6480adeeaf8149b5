"""Quiet-machine guard for the timing benchmarks (``inference_speed``, ``criterion_cost``, ``overhead``).

Timings taken while other jobs share the CPU measure the other jobs as much as the code, so a timing
benchmark publishes only what it measured on a quiet machine:

* at the start, before any expensive work, it reads the 1-minute load average and refuses at once if
  it is above ``--max-load`` (a refused 10-minute run costs nothing; a wasted one costs 10 minutes);
* at the end it reads the load again and refuses to write its timing rows if either reading was above
  the threshold;
* ``--allow-busy`` overrides both refusals; the JSON then says ``"busy": true`` at the top and in every
  timing row, so tables built from it can flag those numbers.

Both readings are recorded in the JSON (``load_average_at_start``, ``load_average_at_end``: the 1, 5
and 15-minute values) either way. Typical use::

    quiet.add_arguments(parser)
    args = parser.parse_args()
    load_at_start = quiet.check_start(args)          # before loading models
    ...                                              # measure
    fields = quiet.check_end(args, load_at_start, rows)  # before writing; annotates rows
    write_json(path, {..., **fields})

Note that the benchmark's own threads count in the load average too: a run using all cores of the
machine raises the 1-minute value towards the core count by itself.
"""

from __future__ import annotations

import os

# 1.5 runnable threads on the 2-core machine the CPU results come from: one core's worth of work plus
# some slack for background daemons. Scale it with ``--max-load`` on larger machines.
DEFAULT_MAX_LOAD = 1.5
ALLOW_BUSY_FLAG = "--allow-busy"
MAX_LOAD_FLAG = "--max-load"


class MachineBusy(SystemExit):
    """The machine was too loaded to publish timings.

    A ``SystemExit`` so that, uncaught, it ends the benchmark with exit status 1 and prints the message
    (which names the measured load and the override flag) on stderr, without a traceback.
    """


def add_arguments(parser) -> None:
    """Add ``--max-load`` and ``--allow-busy`` to an ``argparse`` parser."""
    parser.add_argument(MAX_LOAD_FLAG, type=float, default=DEFAULT_MAX_LOAD,
                        help="Refuse to time (at the start) or to write timings (at the end) if the 1-minute load "
                             f"average exceeds this (default {DEFAULT_MAX_LOAD}, for 2 cores).")
    parser.add_argument(ALLOW_BUSY_FLAG, action="store_true",
                        help="Time and write anyway on a busy machine; the JSON and every timing row are then "
                             'marked "busy": true.')


def read_load() -> list[float] | None:
    """The 1, 5 and 15-minute load averages, or None where the OS has none (e.g. Windows)."""
    try:
        return [float(v) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def exceeds(load: list[float] | None, max_load: float) -> bool:
    """Whether the 1-minute value of ``load`` is above ``max_load`` (an unknown load is not)."""
    return load is not None and load[0] > max_load


def format_load(load: list[float] | None) -> str:
    """``"0.42 0.50 0.61"``, or ``"unknown"``."""
    return "unknown" if load is None else " ".join(f"{v:.2f}" for v in load)


def refusal_message(when: str, load: list[float], max_load: float) -> str:
    """Why the benchmark stops, and the three ways to go on."""
    cores = os.cpu_count()
    return (f"Machine busy: the 1-minute load average {when} was {load[0]:.2f} (1/5/15 min: {format_load(load)}), "
            f"above {MAX_LOAD_FLAG} {max_load:g} on this {cores}-core machine, so timings would measure other jobs "
            f"too and no timing rows are written. Wait until the machine is quiet (see `uptime`) and rerun, raise "
            f"{MAX_LOAD_FLAG}, or rerun with {ALLOW_BUSY_FLAG} to write the timings marked \"busy\": true.")


def check_start(args) -> list[float] | None:
    """Read, print and check the load before any expensive work; returns it (for :func:`check_end`).

    ``args`` needs ``max_load`` and ``allow_busy`` (see :func:`add_arguments`). Raises
    :class:`MachineBusy` if the machine is already busy and ``--allow-busy`` was not given.
    """
    load = read_load()
    print(f"load average at start (1/5/15 min): {format_load(load)}", flush=True)
    if load is None:
        print("warning: this OS reports no load average; cannot check that the machine is quiet.", flush=True)
    if exceeds(load, args.max_load):
        if not args.allow_busy:
            raise MachineBusy(refusal_message("at the start", load, args.max_load))
        print(f"warning: load {load[0]:.2f} > {args.max_load:g}, timing anyway ({ALLOW_BUSY_FLAG}); "
              'results will be marked "busy": true.', flush=True)
    return load


def annotate_rows(rows: list[dict], busy: bool) -> list[dict]:
    """Mark every row ``"busy": True`` when ``busy`` (rows are changed in place and returned).

    Quiet rows get no key, so tables built from them show an empty cell rather than ``False``.
    """
    if busy:
        for row in rows:
            row["busy"] = True
    return rows


def check_end(args, load_at_start: list[float] | None, *row_groups: list[dict]) -> dict:
    """Read, print and check the load after measuring; returns the fields for the result JSON.

    Raises :class:`MachineBusy` (nothing is written) if either reading exceeds ``args.max_load`` and
    ``--allow-busy`` was not given. Otherwise marks every row of every ``row_groups`` list busy when a
    reading exceeded the threshold, and returns ``load_average_at_start``, ``load_average_at_end``,
    ``max_load`` and ``busy``.
    """
    load_at_end = read_load()
    print(f"load average at end (1/5/15 min): {format_load(load_at_end)}", flush=True)
    busy = False
    for when, load in (("at the start", load_at_start), ("at the end", load_at_end)):
        if exceeds(load, args.max_load):
            if not args.allow_busy:
                raise MachineBusy(refusal_message(when, load, args.max_load))
            busy = True
    if busy:
        print(f'warning: machine was busy; writing timings marked "busy": true ({ALLOW_BUSY_FLAG}).', flush=True)
    for rows in row_groups:
        annotate_rows(rows, busy)
    return {"load_average_at_start": load_at_start, "load_average_at_end": load_at_end,
            "max_load": args.max_load, "busy": busy}


def with_start_load(machine: dict, load_fields: dict) -> dict:
    """Put the start reading into a ``machine`` description (changed in place and returned).

    ``common.machine_info()`` reads the load when it is called, which is at the end when the results are
    written; the results page shows ``machine["load_average_at_start"]``, so it must be the real start.
    """
    machine["load_average_at_start"] = load_fields["load_average_at_start"]
    return machine
