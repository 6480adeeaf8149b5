"""Helpers shared by the benchmark scripts: data paths, machine description, JSON output, timing."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "bench", "results")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def data_dir() -> str:
    """``$LORAPRUNE_DATA_DIR``, default ``../shared/data`` relative to the repository root."""
    path = os.environ.get("LORAPRUNE_DATA_DIR", os.path.join(REPO_ROOT, "..", "shared", "data"))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Data folder {path!r} not found: set LORAPRUNE_DATA_DIR to the folder holding "
                                "wikitext-2-raw/, ptb/, c4/.")
    return os.path.abspath(path)


def data_file(relative: str) -> str:
    """``relative`` inside the data folder (:func:`data_dir`); files the repository ships (``data/``) are found
    there too when no data folder is set."""
    root = os.environ.get("LORAPRUNE_DATA_DIR", os.path.join(REPO_ROOT, "..", "shared", "data"))
    shipped = os.path.join(REPO_ROOT, "data", relative)
    if not os.path.isdir(root) and os.path.isfile(shipped):
        return shipped
    return os.path.join(data_dir(), relative)


def c4_texts(start: int = 0, count: int | None = None) -> list[str]:
    """Documents ``start .. start+count`` of the C4 sample (``c4/c4_demo.jsonl``)."""
    with open(data_file("c4/c4_demo.jsonl")) as f:
        docs = [json.loads(line)["text"] for line in f if line.strip()]
    end = None if count is None else start + count
    if count is not None and end > len(docs):
        raise ValueError(f"The C4 sample has {len(docs)} documents; asked for {start}..{end}.")
    return docs[start:end]


def jsonl_texts(relative: str) -> list[str]:
    """The ``"text"`` field of every line of a JSONL file under the data folder."""
    with open(data_file(relative)) as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages (None where the OS has none)."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def cpu_description() -> str | None:
    """The CPU's vendor, family, model and name as Linux reports them (``/proc/cpuinfo``), else None."""
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
    except OSError:
        return None
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    if "model name" not in fields:
        return platform.processor() or None
    return (f"{fields['model name']} ({fields.get('vendor_id', '?')} family {fields.get('cpu family', '?')} "
            f"model {fields.get('model', '?')}, {fields.get('cpu MHz', '?')} MHz)")


def machine_info() -> dict:
    """What ran the benchmark (recorded with every result)."""
    import torch

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # Two CPUs with the same core count can differ in speed and round floats differently; these say which.
        "cpu": cpu_description(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    try:
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                                            capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001  (git missing is not an error for a benchmark)
        info["git_commit"] = None
    return info


def run_ids(folder: str) -> list[str]:
    """The run ids of a results folder (one ``<run>.json`` each), in name order: file times would order them by
    when they were written, but a clone rewrites those times, and pages built from the runs must not change."""
    import glob

    paths = sorted(glob.glob(os.path.join(folder, "*.json")))
    return [os.path.splitext(os.path.basename(p))[0] for p in paths]


def write_json(path: str, obj) -> None:
    """Write ``obj`` atomically (a reader never sees half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def command_line() -> str:
    return " ".join(["python"] + [os.path.relpath(sys.argv[0], REPO_ROOT)] + sys.argv[1:])


@contextmanager
def stopwatch():
    """``with stopwatch() as t: ...`` then ``t()`` is the elapsed seconds."""
    start = time.perf_counter()
    end = [None]
    yield lambda: (end[0] if end[0] is not None else time.perf_counter()) - start
    end[0] = time.perf_counter()


def print_table(rows: list[dict], columns: list[str], floatfmt: str = "{:.3g}") -> str:
    """A plain-text table of ``rows`` (dicts) over ``columns``; returned and printed."""
    def fmt(v):
        if isinstance(v, float):
            return floatfmt.format(v)
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text
