"""bench/quiet.py: the quiet-machine guard of the timing benchmarks (no model, no timing; fast).

The load average is faked by monkeypatching ``os.getloadavg``; the benchmark scripts are checked to
refuse a busy machine before their expensive work, which is replaced by a function that fails.
"""

from __future__ import annotations

import argparse
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench")
sys.path.insert(0, BENCH)

import quiet  # noqa: E402


def fake_load(monkeypatch, *readings):
    """Make ``os.getloadavg`` return the 1-minute values ``readings`` in turn (5 and 15-minute: 0.1)."""
    values = iter(readings)
    monkeypatch.setattr(os, "getloadavg", lambda: (next(values), 0.1, 0.1))


def make_args(*argv):
    p = argparse.ArgumentParser()
    quiet.add_arguments(p)
    return p.parse_args(list(argv))


def test_flags_and_defaults():
    args = make_args()
    assert args.max_load == quiet.DEFAULT_MAX_LOAD == 1.5 and args.allow_busy is False
    args = make_args("--max-load", "3", "--allow-busy")
    assert args.max_load == 3.0 and args.allow_busy is True


def test_threshold_is_strictly_above_max_load_on_the_1_minute_value():
    assert not quiet.exceeds([1.5, 9.0, 9.0], 1.5)  # equal is quiet; 5 and 15-minute values do not count
    assert quiet.exceeds([1.51, 0.0, 0.0], 1.5)
    assert not quiet.exceeds([2.0, 0, 0], 2.5)
    assert not quiet.exceeds(None, 1.5)  # unknown load: cannot refuse


def test_read_load(monkeypatch):
    fake_load(monkeypatch, 0.25)
    assert quiet.read_load() == [0.25, 0.1, 0.1]

    def no_load():
        raise OSError("no load average")

    monkeypatch.setattr(os, "getloadavg", no_load)
    assert quiet.read_load() is None


def test_quiet_start_and_end(monkeypatch, capsys):
    fake_load(monkeypatch, 0.5, 1.2)
    args = make_args()
    start = quiet.check_start(args)
    rows = [{"model": "dense"}]
    fields = quiet.check_end(args, start, rows)
    assert fields == {"load_average_at_start": [0.5, 0.1, 0.1], "load_average_at_end": [1.2, 0.1, 0.1],
                      "max_load": 1.5, "busy": False}
    assert rows == [{"model": "dense"}]  # quiet rows are not annotated
    out = capsys.readouterr().out
    assert "load average at start (1/5/15 min): 0.50 0.10 0.10" in out
    assert "load average at end (1/5/15 min): 1.20 0.10 0.10" in out


def test_busy_start_refuses_with_the_load_and_the_flag(monkeypatch):
    fake_load(monkeypatch, 2.25)
    with pytest.raises(SystemExit) as e:
        quiet.check_start(make_args())
    assert isinstance(e.value, quiet.MachineBusy)
    message = str(e.value.code)  # a str code: Python prints it to stderr and exits with status 1
    assert "2.25" in message and "at the start" in message
    assert "--allow-busy" in message and "--max-load 1.5" in message


def test_max_load_moves_the_threshold(monkeypatch):
    fake_load(monkeypatch, 2.25, 2.9)
    args = make_args("--max-load", "3")
    fields = quiet.check_end(args, quiet.check_start(args))
    assert fields["busy"] is False and fields["max_load"] == 3.0


@pytest.mark.parametrize("start, end, when", [(0.4, 1.8, "at the end"), (1.7, 0.3, "at the start")])
def test_busy_end_refuses_to_write(monkeypatch, start, end, when):
    fake_load(monkeypatch, end)
    rows = [{"latency_ms": 1.0}]
    with pytest.raises(quiet.MachineBusy) as e:
        quiet.check_end(make_args(), [start, 0.1, 0.1], rows)
    assert when in str(e.value.code) and f"{max(start, end):.2f}" in str(e.value.code)
    assert "busy" not in rows[0]


def test_forced_busy_run_marks_json_and_every_row(monkeypatch, capsys):
    fake_load(monkeypatch, 2.5, 1.9)
    args = make_args("--allow-busy")
    start = quiet.check_start(args)  # no refusal
    rows, results = [{"criterion": "lora"}, {"criterion": "vanilla"}], [{"step_s": 1.0}]
    fields = quiet.check_end(args, start, rows, results)
    assert fields["busy"] is True
    assert fields["load_average_at_start"] == [2.5, 0.1, 0.1] and fields["load_average_at_end"] == [1.9, 0.1, 0.1]
    assert all(r["busy"] is True for r in rows + results)
    assert "busy" in capsys.readouterr().out


def test_forced_run_busy_only_at_start_is_still_busy(monkeypatch):
    fake_load(monkeypatch, 2.0, 0.2)
    args = make_args("--allow-busy")
    rows = [{}]
    assert quiet.check_end(args, quiet.check_start(args), rows)["busy"] is True and rows == [{"busy": True}]


def test_unknown_load_does_not_refuse(monkeypatch, capsys):
    def no_load():
        raise OSError

    monkeypatch.setattr(os, "getloadavg", no_load)
    args = make_args()
    fields = quiet.check_end(args, quiet.check_start(args), [])
    assert fields["busy"] is False and fields["load_average_at_start"] is None
    assert "cannot check" in capsys.readouterr().out


def test_with_start_load_replaces_the_machine_reading():
    machine = {"load_average_at_start": (3.0, 3.0, 3.0), "cpu_count": 2}
    quiet.with_start_load(machine, {"load_average_at_start": [0.2, 0.3, 0.4]})
    assert machine == {"load_average_at_start": [0.2, 0.3, 0.4], "cpu_count": 2}


def _fail(*a, **kw):
    raise AssertionError("expensive work started on a busy machine")


def test_inference_speed_refuses_before_loading_models(monkeypatch, tmp_path):
    import inference_speed

    fake_load(monkeypatch, 2.0)
    monkeypatch.setattr(inference_speed, "build_models", _fail)
    with pytest.raises(quiet.MachineBusy):
        inference_speed.main(["--out", str(tmp_path / "x.json")])
    assert not os.listdir(tmp_path)


def test_criterion_cost_refuses_before_starting_workers(monkeypatch, tmp_path):
    import criterion_cost

    fake_load(monkeypatch, 2.0)
    monkeypatch.setattr(criterion_cost.subprocess, "run", _fail)
    with pytest.raises(quiet.MachineBusy):
        criterion_cost.main(["--out", str(tmp_path / "x.json")])
    assert not os.listdir(tmp_path)


def test_overhead_refuses_before_starting_runs(monkeypatch, tmp_path):
    import overhead

    fake_load(monkeypatch, 2.0)
    monkeypatch.setattr(overhead.subprocess, "run", _fail)
    with pytest.raises(quiet.MachineBusy):
        overhead.main(["--out_dir", str(tmp_path / "out")])
    assert not os.path.exists(tmp_path / "out")


def test_bench_parsers_accept_the_flags():
    import criterion_cost
    import inference_speed
    import overhead

    for module in (inference_speed, criterion_cost, overhead):
        args = module.parse_args(["--max-load", "2.5", "--allow-busy"])
        assert args.max_load == 2.5 and args.allow_busy is True


# End-of-run wiring: the workers (subprocesses that train) are faked, so these run in milliseconds.

def _fake_criterion_worker(cmd, **kw):
    """Stands in for a ``criterion_cost.py --worker`` subprocess: writes its result file."""
    import json

    crit, path = cmd[cmd.index("--worker") + 1], cmd[cmd.index("--worker-out") + 1]
    with open(path, "w") as f:
        json.dump({"criterion": crit, "peak_rss_mib": 100.0, "peak_rss_above_ready_mib": 10.0,
                   "step_s_median": 1.0, "tokens_per_s": 128.0, "score_s_mean": 0.1}, f)


class _Done:
    """What ``subprocess.run`` returns for an ``overhead.py --variant`` run."""

    def __init__(self, cmd):
        import json

        variant = cmd[cmd.index("--variant") + 1]
        result = {"variant": variant, "median_step_s": 1.0, "steps_measured": 2, "peak_rss_mib": 100.0}
        if variant != "sft":
            result |= {"pruning_s_per_step": 0.01, "pruning_fraction_in_run": 0.01}
        self.returncode, self.stdout, self.stderr = 0, "RESULT " + json.dumps(result), ""


def _no_extras(monkeypatch, module):
    """Skip the parts that import torch or matplotlib (machine description, figure)."""
    if hasattr(module, "plot"):
        monkeypatch.setattr(module, "plot", lambda *a, **kw: None)
    if hasattr(module, "common"):
        monkeypatch.setattr(module.common, "machine_info", lambda: {"load_average_at_start": (9.0, 9.0, 9.0)})


@pytest.mark.parametrize("busy", [False, True])
def test_criterion_cost_writes_loads_and_busy_rows(monkeypatch, tmp_path, busy):
    import json

    import criterion_cost

    _no_extras(monkeypatch, criterion_cost)
    fake_load(monkeypatch, 0.3, 1.9 if busy else 0.4)
    monkeypatch.setattr(criterion_cost.subprocess, "run", _fake_criterion_worker)
    out = tmp_path / "cost.json"
    criterion_cost.main(["--out", str(out)] + (["--allow-busy"] if busy else []))
    d = json.loads(out.read_text())
    assert d["busy"] is busy and d["max_load"] == 1.5
    assert d["load_average_at_start"][0] == 0.3 and d["load_average_at_end"][0] == (1.9 if busy else 0.4)
    assert d["machine"]["load_average_at_start"][0] == 0.3  # the start reading, not the one at writing time
    assert [r.get("busy") for r in d["rows"] + d["results"]] == [True if busy else None] * 6


def test_criterion_cost_busy_end_writes_nothing(monkeypatch, tmp_path):
    import criterion_cost

    _no_extras(monkeypatch, criterion_cost)
    fake_load(monkeypatch, 0.3, 1.9)
    monkeypatch.setattr(criterion_cost.subprocess, "run", _fake_criterion_worker)
    with pytest.raises(quiet.MachineBusy):
        criterion_cost.main(["--out", str(tmp_path / "cost.json")])
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("busy", [False, True])
def test_overhead_writes_loads_and_busy_runs(monkeypatch, tmp_path, busy):
    import json

    import overhead

    fake_load(monkeypatch, 0.3, 1.9 if busy else 0.4)
    monkeypatch.setattr(overhead.subprocess, "run", lambda cmd, **kw: _Done(cmd))
    overhead.main(["--out_dir", str(tmp_path), "--rounds", "1"] + (["--allow-busy"] if busy else []))
    d = json.loads((tmp_path / "overhead_cpu.json").read_text())
    assert d["busy"] is busy and d["max_load"] == 1.5
    assert d["load_average_at_start"][0] == 0.3 and d["load_average_at_end"][0] == (1.9 if busy else 0.4)
    assert [r.get("busy") for v in d["runs"].values() for r in v] == [True if busy else None] * 2


def test_overhead_busy_end_writes_nothing(monkeypatch, tmp_path):
    import overhead

    fake_load(monkeypatch, 0.3, 1.9)
    monkeypatch.setattr(overhead.subprocess, "run", lambda cmd, **kw: _Done(cmd))
    with pytest.raises(quiet.MachineBusy):
        overhead.main(["--out_dir", str(tmp_path), "--rounds", "1"])
    assert not os.listdir(tmp_path)


def test_overhead_profile_differences_rank_the_ops_a_variant_adds():
    import overhead

    runs = {"sft": [{"profile_ms_per_step": {"aten::mm": 100.0, "aten::add": 5.0}},
                    {"profile_ms_per_step": {"aten::mm": 110.0, "aten::add": 5.0}}],
            "taylor_gate": [{"profile_ms_per_step": {"aten::mm": 105.0, "aten::mul": 9.0, "aten::add": 5.0}},
                            {"profile_ms_per_step": {"aten::mm": 105.0, "aten::mul": 11.0, "aten::add": 5.0}}]}
    diffs = overhead.profile_differences(runs, "sft")
    assert list(diffs) == ["taylor_gate"]
    assert next(iter(diffs["taylor_gate"].items())) == ("aten::mul", 10.0)  # the largest difference first
    assert diffs["taylor_gate"]["aten::add"] == 0.0 and diffs["taylor_gate"]["aten::mm"] == 0.0
