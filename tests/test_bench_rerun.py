"""bench/rerun.py: a recorded quality.py command is repeated into another folder (only where it writes
changes), done runs are skipped, bad requests fail before anything runs, and the comparison says whether the
rerun is the same model."""

from __future__ import annotations

import json
import os
import sys

import pytest
from test_bench_quality import data_dir, model_dir  # noqa: F401  (pytest fixtures)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))

import rerun  # noqa: E402

COMMAND = ("python bench/quality.py --model smollm2-gguf --modes iterative --steps 100 --out bench/results/grid "
           "--save-models .bench_models/grid --ratios 0.2 --criteria wanda --tag=-x")


def _record(folder, rid, ppl, command=COMMAND):
    folder.mkdir(parents=True, exist_ok=True)
    record = {"run": rid, "command": command,
              "metrics": {"wikitext2/llm-pruner": {"perplexity": ppl}, "ptb/llm-pruner": {"perplexity": 2 * ppl}}}
    (folder / f"{rid}.json").write_text(json.dumps(record))


def test_rerun_argv_redirects_only_where_the_run_writes():
    argv = rerun.rerun_argv(COMMAND, "out2", "models2")
    assert argv[0] == sys.executable and argv[1].endswith(os.path.join("bench", "quality.py"))
    assert argv[2:] == ["--model", "smollm2-gguf", "--modes", "iterative", "--steps", "100", "--ratios", "0.2",
                        "--criteria", "wanda", "--tag=-x", "--width-multiple", "1",
                        "--out", "out2", "--save-models", "models2"]
    equals_form = rerun.rerun_argv("python bench/quality.py --out=a --save-models=b --steps 4", "c", None,
                                   {"width_multiple": 8})
    assert equals_form[2:] == ["--steps", "4", "--out", "c"]
    with pytest.raises(ValueError, match="not a bench/quality.py command"):
        rerun.rerun_argv("accelerate launch train.py --config x.yaml", "c", None)


def test_options_added_after_a_run_keep_the_behaviour_it_had():
    """A run recorded before --width-multiple existed kept unrounded MLP widths: its rerun must not take today's
    default (8), which makes a smaller model (113.26M -> 112.95M parameters for the 20% wanda grid run)."""
    old = rerun.rerun_argv(COMMAND, "o", None, {"ratios": [0.2]})
    assert old[old.index("--width-multiple") + 1] == "1"
    recorded = rerun.rerun_argv(COMMAND, "o", None, {"width_multiple": 8})
    assert "--width-multiple" not in recorded  # the recorded command's own default applies
    explicit = rerun.rerun_argv(COMMAND + " --width-multiple=16", "o", None, {})
    assert explicit.count("--width-multiple=16") == 1 and "--width-multiple" not in explicit


def test_a_rerun_with_another_parameter_count_is_not_the_same_model():
    first = {"run": "r", "parameters": 113260608, "metrics": {"wikitext2/x": {"perplexity": 94.7}}}
    assert rerun.compare(first, {**first})["same_model"]
    assert not rerun.compare(first, {**first, "parameters": 112949568})["same_model"]
    assert rerun.compare({k: v for k, v in first.items() if k != "parameters"}, first)["same_model"]


def test_reruns_skip_done_runs_and_compare_with_the_first(tmp_path, monkeypatch):
    first, again = tmp_path / "grid", tmp_path / "grid_rerun"
    _record(first, "iterative-wanda-r0.2", 94.7)
    _record(first, "iterative-lora-r0.2", 102.2)
    _record(again, "iterative-lora-r0.2", 102.2 * (1 + 1e-7))  # rerun earlier
    calls = []

    def fake_run(argv, check):
        calls.append(argv)
        out = argv[argv.index("--out") + 1]
        _record(type(tmp_path)(out), "iterative-wanda-r0.2", 94.7 * 1.02)  # moved by 2%: another model

    monkeypatch.setattr(rerun.subprocess, "run", fake_run)
    rows = rerun.main(["--of", str(first), "--out", str(again), "--save-models", str(tmp_path / "m"),
                       "--runs", "iterative-lora-r0.2", "iterative-wanda-r0.2"])
    assert len(calls) == 1 and calls[0][-4:] == ["--out", str(again), "--save-models", str(tmp_path / "m")]
    lora, wanda = rows
    assert lora["same_model"] and lora["wikitext2_change"] == pytest.approx(1e-7)
    assert not wanda["same_model"] and wanda["ptb_change"] == pytest.approx(0.02)


def test_bad_requests_fail_before_anything_runs(tmp_path, monkeypatch):
    first = tmp_path / "grid"
    _record(first, "iterative-wanda-r0.2", 94.7)
    _record(first, "recipe-run", 80.0, command="accelerate launch train.py --config c.yaml")
    monkeypatch.setattr(rerun.subprocess, "run", lambda *a, **k: pytest.fail("ran before checking every run"))
    with pytest.raises(SystemExit) as e:
        rerun.main(["--of", str(first), "--out", str(tmp_path / "again"),
                    "--runs", "iterative-wanda-r0.2", "missing-run", "recipe-run"])
    assert "run 'missing-run': no " in str(e.value) and "run 'recipe-run': not a bench/quality.py command" in str(e.value)
    with pytest.raises(SystemExit):
        rerun.parse_args(["--of", str(first), "--out", str(first)])


def test_a_command_that_writes_nothing_is_an_error(tmp_path, monkeypatch):
    first = tmp_path / "grid"
    _record(first, "iterative-wanda-r0.2", 94.7)
    monkeypatch.setattr(rerun.subprocess, "run", lambda *a, **k: None)
    with pytest.raises(SystemExit, match="did not write"):
        rerun.main(["--of", str(first), "--out", str(tmp_path / "again"), "--runs", "iterative-wanda-r0.2"])


def test_results_page_takes_missing_tasks_only_from_a_rerun_of_the_same_model(monkeypatch):
    """The grid table fills a task the first run lacks (its model gone) from the rerun's model, but only where
    the rerun reproduced the run's parameter count and perplexities and scored the same number of items."""
    import make_results_md

    def run(rid, ppl, tasks, limit=500):
        scored = {t: {"acc": 0.5, "acc_norm": 0.4, "acc_stderr": 0.02, "acc_norm_stderr": 0.02} for t in tasks}
        return {"run": rid, "mode": "iterative", "criterion": "wanda", "ratio": 0.2, "parameters": 113e6,
                "metrics": {"wikitext2/llm-pruner": {"perplexity": ppl}},
                "zeroshot": {"tasks": scored, "limit": limit}}

    five = ["piqa", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "boolq"]
    first = [run(rid, 90.0, five) for rid in "abcde"]
    reruns = [run("a", 90.0 * (1 + 1e-7), ["hellaswag"]),  # same model: HellaSwag joins the row
              run("b", 90.0 * 1.02, ["hellaswag"]),  # moved 2%: another model
              run("c", 90.0, ["hellaswag"], limit=200),  # other items
              dict(run("e", 90.0, ["hellaswag"]), parameters=112.9e6)]  # same perplexity, other widths
    done = {r["run"]: r for r in make_results_md._with_rerun_tasks(first, reruns)}
    assert done["a"]["tasks_from_rerun"] == {"zeroshot": ["hellaswag"]}
    row = make_results_md._grid_row(done["a"], None)
    assert row["HellaS"] == pytest.approx(40.0) and row["paper mean"] is not None
    assert row["items/task"] == "500 (HellaS: rerun)"
    for rid in "bcde":
        assert "hellaswag" not in done[rid]["zeroshot"]["tasks"] and "tasks_from_rerun" not in done[rid]
    assert "hellaswag" not in first[0]["zeroshot"]["tasks"], "the run itself is left as read"
    # A rerun that is another model shows as a row of its own instead, every number its own.
    own = {r["rerun_of"]: r for r in make_results_md._other_model_reruns(first, reruns)}
    assert sorted(own) == ["b", "e"]
    assert make_results_md._grid_row(own["b"], None)["WikiText-2"] == pytest.approx(90.0 * 1.02)
    assert make_results_md._grid_row(own["b"], None)["HellaS"] == pytest.approx(40.0)

    # The spread table beside it: whether each rerun is the same model, and the paper mean only where it is.
    monkeypatch.setattr(make_results_md, "_runs", lambda folder: {"grid": first, "grid_rerun": reruns}.get(folder, []))
    monkeypatch.setattr(make_results_md, "load", lambda name: None)
    spread = {p["run"]: p for p in make_results_md.run_to_run_spread()["pairs"]}
    assert {rid: p["same model"] for rid, p in spread.items()} == {"a": "yes", "b": "no", "c": "yes", "e": "no"}
    assert spread["a"]["rerun HellaSwag"] == pytest.approx(40.0) and spread["a"]["paper mean"] == row["paper mean"]
    assert spread["b"]["paper mean"] is None and spread["e"]["paper mean"] is None


def test_a_real_rerun_reproduces_a_tiny_quality_run(tmp_path, monkeypatch, data_dir, model_dir):  # noqa: F811
    """End to end: a quality.py run is recorded, rerun.py repeats its recorded command in a new process into
    another folder, and the rerun is the same model (perplexity within SAME_MODEL_RTOL), its model kept."""
    import quality

    first, again, models = tmp_path / "first", tmp_path / "again", tmp_path / "models"
    argv = ["--model", model_dir, "--out", str(first), "--ratios", "0.5", "--criteria", "taylor_gate", "--modes",
            "iterative", "--steps", "2", "--batch", "2", "--max-length", "32", "--windows", "2", "--protocols",
            "llm-pruner", "--eval-sets", "wikitext2", "--prune-freq", "1"]
    # The run records the command it was started with (sys.argv), as from a shell.
    monkeypatch.setattr(sys, "argv", [os.path.join(rerun.common.REPO_ROOT, "bench", "quality.py"), *argv])
    quality.main(argv)
    recorded = json.loads((first / "iterative-taylor_gate-r0.5.json").read_text())["command"]
    assert recorded.startswith("python bench/quality.py --model ")

    rows = rerun.main(["--of", str(first), "--out", str(again), "--save-models", str(models),
                       "--runs", "iterative-taylor_gate-r0.5"])
    assert len(rows) == 1 and rows[0]["same_model"], rows
    assert (models / "iterative-taylor_gate-r0.5" / "config.json").is_file()
    repeated = json.loads((again / "iterative-taylor_gate-r0.5.json").read_text())
    assert f"--out {again}" in repeated["command"] and f"--out {first}" not in repeated["command"]


def test_grid_reading_says_when_hellaswag_does_not_set_criteria_apart_from_random():
    """The grid's reading compares the paper's six-task mean and HellaSwag of the criteria with random masks,
    and says HellaSwag alone cannot tell them apart only when the gap is under two standard errors."""
    import make_results_md

    def run(criterion, hellaswag, other=0.5):
        tasks = {t: {"acc": other, "acc_norm": other, "acc_stderr": 0.02, "acc_norm_stderr": 0.02}
                 for t in ["piqa", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "boolq"]}
        tasks["hellaswag"] = {"acc": hellaswag, "acc_norm": hellaswag, "acc_stderr": 0.022, "acc_norm_stderr": 0.022}
        return {"run": criterion, "mode": "iterative", "criterion": criterion, "ratio": 0.2, "parameters": 113e6,
                "metrics": {"wikitext2/llm-pruner": {"perplexity": 90.0}},
                "zeroshot": {"tasks": tasks, "limit": 500}}

    close = make_results_md.grid_reading([run("wanda", 0.40), run("lora", 0.37), run("random", 0.36, other=0.45)])
    assert "HellaSwag alone spans 37.0-40.0 against random's 36.0" in close
    assert "does not set the worst criterion apart from random masks" in close
    far = make_results_md.grid_reading([run("wanda", 0.40), run("lora", 0.37), run("random", 0.30, other=0.45)])
    assert "HellaSwag alone spans 37.0-40.0 against random's 30.0" in far
    assert "does not set the worst criterion apart" not in far


def test_compensated_runs_are_compared_with_plain_runs_only(monkeypatch):
    """The compensation section compares a refitted run with the best plain (`none`) run at its budget, the
    plain run's rerun included, never with a rerun of a refitted run; each refitted run's own rerun is shown
    beside it."""
    import make_results_md

    def run(rid, compensation, ppl):
        settings = {"compensation": compensation} if compensation != "none" else {}
        return {"run": rid, "mode": "iterative", "criterion": "taylor_gate", "ratio": 0.2, "parameters": 113e6,
                "tokens_trained": 1000, "settings": settings, "metrics": {"wikitext2/llm-pruner": {"perplexity": ppl}}}

    grid = [run("plain", "none", 90.0), run("refit", "lstsq", 88.0)]
    reruns = [run("plain", "none", 91.0), run("refit", "lstsq", 80.0)]
    monkeypatch.setattr(make_results_md, "_runs", lambda folder: {"grid": grid, "grid_rerun": reruns}.get(folder, []))
    monkeypatch.setattr(make_results_md, "load", lambda name: None)
    assert make_results_md._comp(grid[1]) == "lstsq" and make_results_md._comp(grid[0]) == "none"
    parts = []
    make_results_md.section_compensation(parts)
    page = "\n".join(parts)
    assert "WikiText-2 -2.2% (rerun -11.1%) vs the best `none` run (90.0)" in page
    assert "taylor_gate + lstsq refit (rerun) | 80.0" in page


def test_grid_reading_gives_the_paper_mean_at_50_percent_and_a_rerun_row_for_a_run_without_zero_shot():
    """The 50% sentence uses the paper's six-task mean where a run has HellaSwag, and for a run with no
    zero-shot of its own (its rerun another model) the rerun's numbers, named as such."""
    import make_results_md

    def run(rid, ppl, hellaswag=True, zeroshot=True, rerun_of=None):
        tasks = {t: {"acc": 0.5, "acc_norm": 0.5, "acc_stderr": 0.02, "acc_norm_stderr": 0.02}
                 for t in ["piqa", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "boolq"]}
        if hellaswag:
            tasks["hellaswag"] = {"acc": 0.2, "acc_norm": 0.2, "acc_stderr": 0.02, "acc_norm_stderr": 0.02}
        r = {"run": rid, "mode": "iterative", "criterion": "taylor_gate", "ratio": 0.5, "parameters": 81e6,
             "metrics": {"wikitext2/llm-pruner": {"perplexity": ppl}}}
        if zeroshot:
            r["zeroshot"] = {"tasks": tasks, "limit": 500}
        return dict(r, rerun_of=rerun_of) if rerun_of else r

    plain, refit = run("plain", 300.0), dict(run("refit", 225.0, zeroshot=False), settings={"compensation": "lstsq"})
    text = make_results_md.grid_reading([plain, refit], [run("refit", 230.0, rerun_of="refit")])
    assert "taylor_gate: 300.0, zero-shot paper mean 45.0 (mean of 5 50.0)" in text
    assert "taylor_gate + lstsq refit: 225.0 (its rerun, another model: 230.0, zero-shot paper mean 45.0" in text
    assert "where a rerun tipped to another model, that model has a row of its own" in text
    # A run with neither HellaSwag nor a rerun that has it keeps the older caveat and the five-task mean.
    text = make_results_md.grid_reading([run("plain", 300.0, hellaswag=False), refit])
    assert "taylor_gate: 300.0, zero-shot mean of 5 50.0" in text
    assert "HellaSwag only for the runs whose models were still at hand" in text
    # A rerun row that scored HellaSwag alone gives its perplexities and no mean (no recursion into itself).
    only_hellaswag = run("refit", 230.0, rerun_of="refit")
    only_hellaswag["zeroshot"]["tasks"] = {"hellaswag": only_hellaswag["zeroshot"]["tasks"]["hellaswag"]}
    text = make_results_md.grid_reading([plain, refit], [only_hellaswag])
    assert "taylor_gate + lstsq refit: 225.0 (its rerun, another model: 230.0)" in text


def test_reruns_on_another_cpu_join_the_spread_and_a_missing_full_hellaswag_is_explained(monkeypatch):
    """A rerun on another kind of CPU is one more spread measurement (its own row, its change counted in the
    largest change) and the page names that CPU; a full-sets row without HellaSwag gets a sentence saying why
    and how to fill it."""
    import common
    import make_results_md

    def run(rid, ppl, train_s=300.0, cpu=None, full=None):
        return {"run": rid, "mode": "iterative", "criterion": "taylor_gate", "ratio": 0.2, "parameters": 113e6,
                "train_s": train_s, "machine": {"cpu": cpu, "cpu_capability": "AVX2" if cpu else None},
                "metrics": {"wikitext2/llm-pruner": {"perplexity": ppl}}, **({"zeroshot_full": full} if full else {})}

    scored = {"acc": 0.5, "acc_norm": 0.4, "acc_stderr": 0.01, "acc_norm_stderr": 0.01}
    full_pass = {"tasks": {"hellaswag": scored}, "limit": None, "eval_s": 7200.0,
                 "protocol": {"cache": {"requests_cached_before": 168, "requests_cached_after": 40168}}}
    grid = [run("tg", 90.0, full={"tasks": {"piqa": scored}, "limit": None}), run("w", 95.0)]
    same_kind = [run("tg", 90.0), run("w", 95.0, full=full_pass)]
    other_cpu = [run("tg", 90.0 * 1.03, train_s=1200.0, cpu="Old CPU (family 23)")]
    folders = {"grid": grid, "grid_rerun": same_kind, make_results_md.OTHER_CPU_RERUNS: other_cpu}
    monkeypatch.setattr(make_results_md, "_runs", lambda folder: folders.get(folder, []))
    monkeypatch.setattr(make_results_md, "load", lambda name: None)

    spread = make_results_md.run_to_run_spread()
    rows = {p["run"]: p for p in spread["pairs"]}
    assert rows["tg (other CPU)"]["same model"] == "no" and rows["tg"]["same model"] == "yes"
    assert spread["max_rel"] == pytest.approx(3.0)
    parts = []
    make_results_md.section_spread(parts)
    page = "\n".join(parts)
    assert "`tg` on Old CPU (family 23), torch kernels AVX2." in page

    note = make_results_md._full_hellaswag_gaps(grid)
    assert note.startswith("No full HellaSwag yet for `taylor_gate` 20%")
    assert "--runs <run> --tasks hellaswag --limit 0" in note
    grid[0]["zeroshot_full"]["tasks"]["hellaswag"] = scored
    assert make_results_md._full_hellaswag_gaps(grid) == ""

    described = common.machine_info()
    assert "cpu" in described and described["cpu_capability"], described


def test_run_ids_do_not_depend_on_file_times(tmp_path):
    """Results pages list runs in ``run_ids`` order; a clone rewrites file times, so the order is the names'."""
    for name, stamp in (("b", 1_000), ("a", 3_000), ("c", 2_000)):
        path = tmp_path / f"{name}.json"
        path.write_text("{}")
        os.utime(path, (stamp, stamp))
    assert rerun.common.run_ids(str(tmp_path)) == ["a", "b", "c"]
