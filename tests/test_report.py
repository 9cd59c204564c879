"""`freezeps report` on a small committed run log (tests/fixtures/run-small: a 2-worker MLP
run of 16 steps in network namespaces, the first block frozen from step 8)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import ANY

import numpy as np
import pytest

from freeze.maths import apply_guards
from freezeps.cli import main
from freezeps.report import (
    _mode,
    _paired,
    comparison_markdown,
    format_report,
    full_model_pace,
    merge_evals,
    paired_difference,
    seeds_markdown,
    summarize_run,
    time_to_accuracy,
)
from proto.runlog import JsonlLog, read_jsonl
from worker.data import load_dataset
from worker.models import build_model
from worker.train import eval_due, eval_share, evaluate

FIXTURE = Path(__file__).parent / "fixtures" / "run-small"


def test_facts_of_a_run():
    facts = summarize_run(FIXTURE)
    assert facts["steps"] == 16 and facts["workers"] == 2 and facts["frozen_blocks"] == 1
    assert len(facts["payload_per_step"]) == 16
    sizes = {b["name"]: b["bytes"] for b in facts["blocks"]}
    # Before the freeze every block moves up and down for both workers; from step 9 on the
    # first block moves no more (step 8 still pulls its last update).
    assert facts["payload_per_step"][0] == {n: 4 * s for n, s in sizes.items()}
    assert "fc1" not in facts["payload_per_step"][9]
    # The rounds' windows hold everything but rank 0's last pull (of the active blocks) for
    # its final evaluation, which comes after the last round.
    in_rounds = sum(sum(s.values()) for s in facts["payload_per_step"])
    assert facts["push_payload"] + facts["pull_payload"] - in_rounds == sizes["fc2"] + sizes["head"]
    assert [c["step"] for c in facts["curve"]] == [4, 8, 12, 16]
    assert facts["curve"] == sorted(facts["curve"], key=lambda c: c["wall_s"])
    assert facts["wire"]["wire_bytes"] >= facts["wire"]["payload_bytes"] > 0
    assert len(facts["wire_per_step"]) == 16


def test_ps_optimizer_time_and_accuracy_by_evaluation(tmp_path):
    from freezeps.report import evaluations_markdown
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    assert "ps_optimizer_s" not in summarize_run(run)["phase_ms_per_step"]  # logged before the PS timed it
    records = [json.loads(line) for line in (run / "ps.jsonl").read_text().splitlines()]
    rounds = [r for r in records if r["event"] == "round"]
    for i, r in enumerate(rounds):
        r["optimizer_s"] = 0.001 * (i + 1)
    (run / "ps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    facts = summarize_run(run)
    assert facts["phase_ms_per_step"]["ps_optimizer_s"] == pytest.approx(1000 * 0.001 * (len(rounds) + 1) / 2)
    other = {**facts, "name": "other", "accuracy_by_epoch": [(0.5, 0.25), (1.0, 0.5)]}
    table = evaluations_markdown([facts, other]).splitlines()
    epochs = sorted({e for e, _ in facts["accuracy_by_epoch"]} | {0.5, 1.0})
    assert table[2] == "| run | " + " | ".join(f"{e:g}" for e in epochs) + " |"
    row = table[5].split("|")[1:-1]
    assert row[0].strip() == "other"
    assert [c.strip() for c in row[1:]] == [{0.5: "0.2500", 1.0: "0.5000"}.get(e, "-") for e in epochs]


def test_workers_the_ps_dropped_and_late_pushes_show_in_the_facts_and_reports(tmp_path, capsys):
    from freezeps.report import format_drops
    run = tmp_path / "dropped"
    shutil.copytree(FIXTURE, run)
    assert summarize_run(run)["drops"] == []
    with (run / "ps.jsonl").open("a") as f:  # as the PS logs a drop
        f.write(json.dumps({"event": "drop", "step": 5, "worker": "w0-0-x", "rank": 0,
                            "reason": "no push 120.3 s after the round began"}) + "\n")
        f.write(json.dumps({"event": "drop", "step": 9, "worker": "w2-0-x", "rank": 0,
                            "reason": "no push 120.1 s after the round began"}) + "\n")
        for step in (2, 6):  # as a PS with backup workers logs a push that came after its round
            f.write(json.dumps({"event": "late_push", "step": step, "worker": "w1-1-x", "rank": 1,
                                "run_step": step + 1, "received": True}) + "\n")
    assert summarize_run(run)["drops"] == [{"step": 5, "rank": 0}, {"step": 9, "rank": 0}]
    assert summarize_run(run)["late_pushes"] == 2 and summarize_run(FIXTURE)["late_pushes"] == 0
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "workers dropped: rank 0 at steps 5, 9" in out
    assert "late pushes (rounds completed without them, not applied): 2" in out
    assert main(["report", str(FIXTURE), str(run), "--out", str(tmp_path / "cmp")]) == 0
    text = (tmp_path / "cmp" / "report.md").read_text()
    assert "Workers dropped (the rounds went on without them until they joined again):\n\n- dropped: rank 0 at steps 5, 9\n" in text
    assert format_drops([{"step": 3, "rank": 2}, {"step": 1, "rank": 0}]) == "rank 0 at step 1; rank 2 at step 3"


def test_text_report(capsys):
    assert main(["report", str(FIXTURE)]) == 0
    out = capsys.readouterr().out
    assert "16 steps" in out and "wire/payload" in out and "fc1" in out


def test_comparison_writes_tables_and_plots(tmp_path, capsys):
    for name in ("full", "frozen"):
        shutil.copytree(FIXTURE, tmp_path / name)
    out = tmp_path / "cmp"
    assert main(["report", str(tmp_path / "full"), str(tmp_path / "frozen"), "--out", str(out),
                 "--title", "two runs"]) == 0
    text = (out / "report.md").read_text()
    assert text.startswith("# two runs")
    assert "| full | ps | static |" in text and "| frozen | ps | static |" in text
    for png in ("bytes_per_step.png", "accuracy_vs_time.png", "accuracy_vs_bytes.png", "freeze_timeline.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"]({png})" in text
    # and the facts bench.pool reads, without the per-step series
    facts = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in facts] == ["full", "frozen"] and "payload_per_step" not in facts[0]
    assert facts[0]["train_s"] == summarize_run(FIXTURE)["train_s"]


def test_time_to_accuracy_and_baseline():
    facts = summarize_run(FIXTURE)
    best = facts["best_accuracy"]
    first = next(c for c in facts["curve"] if c["accuracy"] >= best)
    assert time_to_accuracy(facts, best) == first["wall_s"]
    assert time_to_accuracy(facts, 1.01) is None
    other = {**facts, "name": "other", "push_payload": facts["push_payload"] // 2, "pull_payload": 0, "eval_s": 1.25}
    table = comparison_markdown([facts, other], baseline="run-small")
    row = next(line for line in table.splitlines() if line.startswith("| other"))
    saved = 1 - (facts["push_payload"] // 2) / (facts["push_payload"] + facts["pull_payload"])
    assert f"{saved:.1%}" in row
    header = [c.strip() for c in table.splitlines()[2].strip("|").split("|")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == len(header) and cells[header.index("of which eval s")] == "1.2"
    base_row = next(line for line in table.splitlines() if line.startswith(f"| {facts['name']}"))
    assert [c.strip() for c in base_row.strip("|").split("|")][header.index("of which eval s")] == "-"  # not timed then
    # the time to the target, and the baseline's over it: twice as fast is 2.00x
    faster = {**facts, "name": "faster", "curve": [{**c, "wall_s": c["wall_s"] / 2} for c in facts["curve"]]}
    never = {**facts, "name": "never", "curve": [{**c, "accuracy": 0.0} for c in facts["curve"]]}
    table = comparison_markdown([facts, faster, never])
    tta = time_to_accuracy(facts, facts["best_accuracy"] - 0.005)
    assert tta > 0

    def cell(name):
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} "))
        return [c.strip() for c in row.strip("|").split("|")][header.index("time to target s")]
    assert cell(facts["name"]) == f"{tta:.0f} (1.00x)"
    assert cell("faster") == f"{tta / 2:.0f} (2.00x)" and cell("never") == "not reached"
    with pytest.raises(ValueError, match="no run named 'run-smal' to compare with"):
        comparison_markdown([facts, other], baseline="run-smal")  # not silently the first run


def test_the_pace_before_any_freeze_says_whether_two_runs_times_compare():
    facts = summarize_run(FIXTURE)
    steady = [(1.0 + 2.0 * i, 0) for i in range(20)]  # (end of round i, blocks frozen): 2 s a round, never frozen
    slower = [(1.0 + 3.0 * i, 0 if i < 12 else 2) for i in range(20)]  # 3 s a round, 2 blocks frozen from round 12
    runs = [{**facts, "name": "none", "frozen_over_time": steady, "train_s": 38.0},
            {**facts, "name": "frozen", "frozen_over_time": slower, "train_s": 45.0}]
    assert full_model_pace(runs) == (11, {"none": 2.0, "frozen": 3.0})
    table = comparison_markdown(runs)
    assert "Seconds per round over rounds 1-11, before any of these runs froze a block" in table
    assert "none 2.00, frozen 3.00." in table
    # each run's time in units of its own full rounds (38/2, 45/3), for a speedup at one machine
    # speed: 1.27x where the measured times say 0.84x, the frozen run's machine being 1.5x slower
    assert "in each run's own rounds 1-11" in table and "none 19 (1.00x), frozen 15 (1.27x)." in table
    assert "none 19 (0.79x), frozen 15 (1.00x)." in comparison_markdown(runs, "frozen")
    # a PS run beside a DDP run, or one on another link, paces differently by design, not by the
    # machine's speed: no time in units of their rounds, and the table says why
    for other in ({"mode": "ddp"}, {"config": {**facts["config"], "network": "netns", "link_rate": "1gbit"}}):
        mixed = comparison_markdown([runs[0], {**runs[1], **other}])
        assert "none 2.00, frozen 3.00." in mixed and "own rounds" not in mixed
        assert "move a round's bytes differently" in mixed and "their measured times are the comparison" in mixed
    assert "netns at 1gbit" in mixed and "move a round's bytes differently" not in table
    stopped = [{**runs[0], "frozen_over_time": [(1.0, 0)] * 20}, runs[1]]  # a clock that stood still
    assert "none 0.00, frozen 3.00." in comparison_markdown(stopped) and "own rounds" not in comparison_markdown(stopped)
    # facts read back from results.json have no per-round series; a freeze within MIN_PACE_ROUNDS leaves too few
    assert full_model_pace([{k: v for k, v in runs[0].items() if k != "frozen_over_time"}, runs[1]]) is None
    early = {**facts, "name": "early", "frozen_over_time": [(1.0 + i, 0 if i < 5 else 1) for i in range(20)]}
    assert full_model_pace([runs[0], early]) is None
    assert "Seconds per round" not in comparison_markdown([runs[0], early])


def test_the_mode_and_the_savings_name_shards_and_narrow_pushes():
    def facts(mode, shards=1, **config):
        return {"mode": mode, "ps_shards": shards, "config": config}
    assert _mode(facts("ps")) == "ps" and _mode(facts("ddp", push_dtype="float32")) == "ddp"
    assert _mode(facts("ps", 3, push_dtype="bfloat16")) == "ps, 3 shards, bfloat16 pushes"
    assert _mode(facts("ddp", push_dtype="bfloat16")) == "ddp, bfloat16 all-reduce"
    assert _mode(facts("ps", push_dtype="bfloat16", pull_dtype="bfloat16")) == \
        "ps, bfloat16 pushes, bfloat16 pull changes"
    # A GPU run says so (its rounds are other work than a CPU run's); the CPU, the default, is not named.
    assert _mode(facts("ddp", device="cuda", push_dtype="bfloat16")) == "ddp on cuda, bfloat16 all-reduce"
    assert _mode(facts("ps", device="cpu")) == "ps"
    # A run's report says its savings count the narrower dtypes too.
    run = summarize_run(FIXTURE)
    assert "counts float32" not in format_report(run)
    run["config"]["push_dtype"] = "bfloat16"
    assert "(bfloat16 pushes: 'dense, no freeze' counts float32" in format_report(run)
    assert format_report(run).startswith("ps, bfloat16 pushes:")
    run["config"]["pull_dtype"] = "bfloat16"
    assert "(bfloat16 pushes, bfloat16 pull changes: 'dense, no freeze' counts float32" in format_report(run)


def test_missing_run_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert f"{tmp_path / 'nothing'}: no such run folder" in capsys.readouterr().err
    (tmp_path / "unfinished").mkdir()
    assert main(["report", str(tmp_path / "unfinished")]) == 2
    assert "has no summary record: did the run finish?" in capsys.readouterr().err


def test_a_log_line_cut_short_is_left_out_with_a_warning_and_the_next_writer_starts_a_new_line(tmp_path, caplog):
    """A process that dies while writing leaves its log's last line cut short; the records
    before it still count. A restarted process (a resumed PS, a worker back in its rank)
    appends its records on lines of their own after it, so none of them is lost with it."""

    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    worker = run / "worker-0.jsonl"
    whole = read_jsonl(worker)
    worker.write_text(worker.read_text() + '{"event": "step", "step": 9')
    assert read_jsonl(worker) == whole
    assert f"{worker} line {len(whole) + 1} is not a JSON record" in caplog.text
    assert {**summarize_run(run), "name": ""} == {**summarize_run(FIXTURE), "name": ""}  # but the folder's name
    again = JsonlLog(worker)
    again.write({"event": "rejoin", "step": 9})
    again.close()
    assert read_jsonl(worker)[:-1] == whole and read_jsonl(worker)[-1]["event"] == "rejoin"


@pytest.mark.parametrize("bad", ["fast", "0gbit", "-1mbit"])
def test_bad_link_rate_refused(bad):
    from freezeps.config import load_config
    with pytest.raises(ValueError, match="link rate"):
        load_config({"link_rate": bad}, environ={})


def test_seeds_table_pairs_runs_by_seed():
    facts = summarize_run(FIXTURE)

    def run(name, seed, accuracy, train_s, payload):
        return {**facts, "name": f"{name}-s{seed}", "config": {**facts["config"], "seed": seed},
                "accuracy": accuracy, "train_s": train_s, "push_payload": payload, "pull_payload": 0}

    groups = {"none": [run("none", 0, 0.80, 100.0, 1000), run("none", 1, 0.70, 200.0, 1000)],
              "frozen": [run("frozen", 1, 0.69, 100.0, 400), run("frozen", 0, 0.80, 50.0, 600)]}
    table = seeds_markdown(groups, "none")
    row = next(line for line in table.splitlines() if line.startswith("| frozen"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # Paired by seed, not by position: differences 0 and -1 point, time saved 50% both, bytes 60% and 40%.
    assert cells[1] == "1, 0"
    assert cells[3] == "-0.50 ± 0.71" and cells[5] == "-1.00"
    assert cells[4] == "-"  # the fixture's log predates the kept test errors
    assert cells[7] == "50.0% ± 0.0%" and cells[8] == "2.00x, 2.00x" and cells[10] == "50.0% ± 14.1%"
    base_row = next(line for line in table.splitlines() if line.startswith("| none"))
    assert "+0.00 ± 0.00" in base_row
    with pytest.raises(ValueError, match="no `none` run"):
        seeds_markdown({"none": groups["none"][:1], "frozen": groups["frozen"]}, "none")


def test_paired_difference_is_the_mean_and_standard_error_of_per_sample_differences():
    samples = 10
    wrong, base_wrong = [1, 2, 3], [3, 4]  # accuracy 0.7 against 0.8
    diff, se = paired_difference(wrong, base_wrong, samples)
    per_sample = np.array([(i in base_wrong) - (i in wrong) for i in range(samples)], dtype=float)
    assert diff == pytest.approx(-10.0) == pytest.approx(100 * per_sample.mean())
    assert se == pytest.approx(100 * per_sample.std() / np.sqrt(samples))
    assert paired_difference(wrong, wrong, samples) == (0.0, 0.0)
    with pytest.raises(ValueError, match="samples must be positive"):
        paired_difference([], [], 0)


def test_seeds_table_pools_the_test_set_error_over_seeds():
    facts = summarize_run(FIXTURE)

    def run(name, seed, wrong):
        return {**facts, "name": f"{name}-s{seed}", "config": {**facts["config"], "seed": seed},
                "accuracy": 1 - len(wrong) / 10, "test_wrong": wrong, "test_samples": 10,
                "test_set": f"ten-{seed}"}

    groups = {"none": [run("none", 0, [3, 4]), run("none", 1, [5])],
              "frozen": [run("frozen", 0, [1, 2, 3]), run("frozen", 1, [5, 6])]}
    row = next(line for line in seeds_markdown(groups, "none").splitlines() if line.startswith("| frozen"))
    se = [paired_difference([1, 2, 3], [3, 4], 10)[1], paired_difference([5, 6], [5], 10)[1]]
    assert row.split("|")[5].strip() == f"{np.sqrt(se[0] ** 2 + se[1] ** 2) / 2:.2f}"
    # Runs scored on different test samples are not paired.
    groups["frozen"][1]["test_set"] = "another"
    row = next(line for line in seeds_markdown(groups, "none").splitlines() if line.startswith("| frozen"))
    assert row.split("|")[5].strip() == "-"


def test_seeded_comparison_has_one_table_per_seed_against_that_seeds_baseline(tmp_path):
    from freezeps.report import write_comparison
    facts = summarize_run(FIXTURE)
    groups = {name: [{**facts, "name": f"{name}-s{seed}", "config": {**facts["config"], "seed": seed}}
                     for seed in (0, 1)] for name in ("none", "frozen")}
    runs = [r for seed in (0, 1) for r in (groups["none"][seed], groups["frozen"][seed])]
    text = write_comparison(runs, tmp_path, "seeded", baseline="none", groups=groups).read_text()
    assert text.index("Over seeds") < text.index("## Seed 0") < text.index("## Seed 1")
    seed1 = text[text.index("## Seed 1"):]
    assert "against `none-s1`" in seed1 and "| frozen-s1 |" in seed1 and "| frozen-s0 |" not in seed1


def test_a_rebuilt_comparison_names_the_date_and_machine_of_its_runs(tmp_path, monkeypatch):
    from bench import compare

    made = compare._where_and_when(tmp_path / "runs", rebuilding=False)
    monkeypatch.setattr(compare.machine, "describe", lambda: "another machine")
    assert compare._where_and_when(tmp_path / "runs", rebuilding=True) == made
    assert made["machine"] != "another machine"
    older = tmp_path / "older"  # runs made before the bench noted anything
    older.mkdir()
    assert "not recorded" in compare._where_and_when(older, rebuilding=True)["machine"]


def test_a_bench_goes_on_in_its_runs_dir_and_runs_only_what_did_not_finish(tmp_path, monkeypatch):
    from bench import compare
    from freezeps.cli import build_parser, config_from_args
    from freezeps.config import to_toml

    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "bench.json").write_text(json.dumps({"date": "2026-01-01", "machine": compare.machine.describe()}))
    ran = []

    def fake_run(cmd, timeout_s):  # a `freezeps run` that makes the fixture's run where it is told
        ran.append(cmd)
        run_dir = Path(cmd[cmd.index("--run-dir") + 1])
        shutil.copytree(FIXTURE, run_dir)
        (run_dir / "config.toml").write_text(to_toml(config_from_args(build_parser().parse_args(cmd[len(compare.FREEZEPS):]))))

    def bench(*flags, runs_dir=runs):
        monkeypatch.setattr(sys, "argv", ["compare", "--out", str(tmp_path / "out"), "--runs-dir", str(runs_dir), *flags])
        compare.main()

    monkeypatch.setattr(compare, "run_freezeps", fake_run)
    bench("--only", "ps-none")
    probes = json.loads((runs / "bench.json").read_text())["probe_ms"]
    assert list(probes) == ["ps-none"] and all(ms > 0 for ms in probes["ps-none"])  # before and after the run
    assert f"ps-none {probes['ps-none'][0]:.1f} / {probes['ps-none'][1]:.1f}." in (tmp_path / "out" / "README.md").read_text()
    assert summarize_run(runs / "ps-none")["speed_probe"]["what"] == compare.machine.PROBE
    assert summarize_run(FIXTURE)["speed_probe"] is None  # made by no bench
    (runs / "ps-gradnorm").mkdir()  # stopped midway: a round, no summary
    (runs / "ps-gradnorm" / "ps.jsonl").write_text(json.dumps({"event": "round", "step": 0}) + "\n")
    (runs / "ps-gradnorm" / "worker-7.jsonl").write_text("")
    bench("--only", "ps-none,ps-gradnorm")
    assert [cmd[cmd.index("--run-dir") + 1] for cmd in ran] == [str(runs / "ps-none"), str(runs / "ps-gradnorm")]
    assert not (runs / "ps-gradnorm" / "worker-7.jsonl").exists()  # the stopped run's logs did not mix in
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "| ps-none |" in readme and "| ps-gradnorm |" in readme
    assert json.loads((runs / "bench.json").read_text())["date"].startswith("2026-01-01 to ")
    assert json.loads((runs / "bench.json").read_text())["probe_ms"] == {**probes, "ps-gradnorm": ANY}  # kept
    bench("--only", "ps-none,ps-gradnorm")  # everything finished: nothing runs again
    assert len(ran) == 2
    shutil.copytree(runs, tmp_path / "copied")  # nor in a copy of the folder, whose runs name their old place
    bench("--only", "ps-none,ps-gradnorm", runs_dir=tmp_path / "copied")
    assert len(ran) == 2 and "| ps-gradnorm |" in (tmp_path / "out" / "README.md").read_text()
    # The baseline is named, not implied by the order of the runs.
    bench("--only", "ps-gradnorm,ps-none", "--baseline", "ps-none")
    assert "are against `ps-none`" in (tmp_path / "out" / "README.md").read_text() and len(ran) == 2
    with pytest.raises(SystemExit):
        bench("--only", "ps-gradnorm,ps-none", "--baseline", "ddp-none")
    # A finished run is not passed off as one made with other flags.
    with pytest.raises(ValueError, match=r"ps-none finished with other settings .*epochs: \d+ -> 7"):
        bench("--only", "ps-none,ps-gradnorm", "--epochs", "7")
    # Except the freeze settings between two runs that freeze nothing: none serves another warm-up.
    bench("--only", "ps-none", "--freeze-warmup", "86")
    assert len(ran) == 2
    with pytest.raises(ValueError, match=r"ps-gradnorm finished with other settings .*freeze_warmup: 8 -> 86"):
        bench("--only", "ps-none,ps-gradnorm", "--freeze-warmup", "86")
    (runs / "ps-none" / "config.toml").write_text("no_such_setting = 1\n")  # made by another version
    with pytest.raises(ValueError, match="config.toml does not load here"):
        bench("--only", "ps-none")
    assert len(ran) == 2
    monkeypatch.setattr(compare.machine, "describe", lambda: "another machine")
    with pytest.raises(ValueError, match="runs from another machine"):
        bench("--only", "ps-none")


def test_pool_groups_seeds_from_several_folders_and_refuses_what_does_not_pair(tmp_path):
    from bench import pool
    facts = summarize_run(FIXTURE)

    def folder(name, runs):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(runs))
        return tmp_path / name

    def run(name, seed, accuracy, **config):
        return {**facts, "name": name, "accuracy": accuracy,
                "config": {**facts["config"], "seed": seed, "run_dir": f"runs/{name}", **config}}

    first = folder("first", [run("none", 0, 0.80), run("frozen", 0, 0.79)])
    second = folder("second", [run("none-s1", 1, 0.70), run("frozen-s1", 1, 0.67)])
    groups = pool.pool([(second, None), (first, None)])
    assert [r["config"]["seed"] for r in groups["frozen"]] == [0, 1]
    pool.main([str(first), str(second), "--baseline", "none", "--out", str(tmp_path / "pooled")])
    row = next(line for line in (tmp_path / "pooled" / "README.md").read_text().splitlines()
               if line.startswith("| frozen"))
    assert row.split("|")[2].strip() == "0, 1" and row.split("|")[4].strip() == "-2.00 ± 1.41"
    assert "](../first/README.md)" in (tmp_path / "pooled" / "README.md").read_text()
    with pytest.raises(ValueError, match="seed 0 comes twice"):
        pool.pool([(first, None), (first, None)])
    other = folder("other", [run("frozen-s2", 2, 0.7, lr=0.5)])
    with pytest.raises(ValueError, match="differs from other runs of frozen in lr"):
        pool.pool([(first, None), (other, None)])
    # A run that freezes nothing never reads the freeze settings: made beside another freeze setting,
    # it still pools; a run that freezes does not.
    later = folder("later", [run("frozen-s2", 2, 0.69, freeze_warmup=86),
                             run("none-s2", 2, 0.71, freeze="none", freeze_warmup=86)])
    first_none = folder("first-none", [run("none", 0, 0.80, freeze="none")])
    assert [r["accuracy"] for r in pool.pool([(first_none, None), (later, None)])["none"]] == [0.80, 0.71]
    with pytest.raises(ValueError, match="differs from other runs of frozen in freeze_warmup"):
        pool.pool([(first, None), (later, None)])
    # FOLDER:CONFIG takes just that configuration: seed 1's freezing run with another folder's none
    # (0.72 where second's own none-s1 has 0.70, which would otherwise come twice).
    second_none = folder("second-none", [run("none-s1", 1, 0.72)])
    pool.main([str(first), f"{second}:frozen", str(second_none), "--baseline", "none",
               "--out", str(tmp_path / "picked")])
    row = next(line for line in (tmp_path / "picked" / "README.md").read_text().splitlines()
               if line.startswith("| frozen"))
    assert row.split("|")[2].strip() == "0, 1" and row.split("|")[4].strip() == "-3.00 ± 2.83"
    assert pool.source(f"{later}:frozen, none") == (later, frozenset({"frozen", "none"}))
    assert pool.source(str(later)) == (later, None)
    with pytest.raises(ValueError, match=r"no run of nothing \(it has frozen, none\)"):
        pool.pool([(later, frozenset({"nothing"}))])
    with pytest.raises(ValueError, match="no configuration named after ':'"):
        pool.pool([pool.source(f"{later}:")])
    with pytest.raises(SystemExit):  # a parser error, with the message above, not a traceback
        pool.main([f"{later}:nothing", "--baseline", "none", "--out", str(tmp_path / "bad")])


def test_flags_the_compare_bench_passes_on_win_over_the_configuration(tmp_path):
    from bench import compare
    from freezeps.cli import build_parser, config_from_args

    common = [*compare.WORKLOADS["minilm-r8"], "--steps", "0"]
    cmd = compare.run_command(common, "ps-autofreeze-half", ["--freeze-warmup", "86", "--epochs", "4"],
                              tmp_path / "run", seed=1)
    assert cmd[1:4] == ["-m", "freezeps", "run"]
    cfg = config_from_args(build_parser().parse_args(cmd[len(compare.FREEZEPS):]))
    assert (cfg.freeze_warmup, cfg.epochs, cfg.seed, cfg.freeze_max_fraction) == (86, 4, 1, 0.5)
    plain = config_from_args(build_parser().parse_args(compare.run_command(common, "ps-autofreeze-half", [],
                                                                           tmp_path / "run", seed=None)[len(compare.FREEZEPS):]))
    assert (plain.freeze_warmup, plain.epochs, plain.seed) == (0, 2, 0)


@pytest.mark.parametrize("workload", ["resnet18", "minilm-r8"])
def test_every_compare_configuration_is_a_valid_run(tmp_path, workload):
    from bench import compare
    from freezeps.cli import build_parser, config_from_args

    def config(name):
        cmd = compare.run_command(compare.WORKLOADS[workload], name, [], tmp_path / name, seed=0)
        return config_from_args(build_parser().parse_args(cmd[len(compare.FREEZEPS):]))

    for name in compare.CONFIGS:
        assert config(name).mode == compare.CONFIGS[name][1], name
    quarter = config("ps-autofreeze-quarter-cache")
    assert (quarter.freeze_max_fraction, quarter.cache_memory_bytes > 0) == (0.75, True)
    votes = config("ps-autofreeze-votes-half-cache")
    assert (votes.freeze_decision, votes.freeze_norm, votes.freeze_max_fraction) == ("votes", 1, 0.5)
    votes_quarter = config("ps-autofreeze-votes-quarter-cache")
    assert (votes_quarter.freeze_decision, votes_quarter.freeze_max_fraction) == ("votes", 0.75)
    five = config("ps-autofreeze-5of8-cache")
    # MiniLM's 8 blocks: the embeddings and layer0-3 may freeze, never layer4.
    assert apply_guards(8, 0, 100, -1, 8, max_fraction=five.freeze_max_fraction) == 5
    late = config("ps-autofreeze-5of8-deadline-cache")
    assert (late.freeze_deadline, late.freeze_max_fraction, late.cache_memory_bytes > 0) == (104, 0.625, True)
    assert apply_guards(0, 0, 103, -1, 8, max_fraction=late.freeze_max_fraction, deadline=late.freeze_deadline) == 5
    noisy = config("ps-autofreeze-5of8-dropout")
    assert (noisy.frozen_dropout, noisy.freeze_max_fraction, noisy.cache_memory_bytes) == (True, 0.625, 0)


def _share(step, rank, world, wrong, scored, loss=1.0, time=100.0, eval_s=2.0, test_samples=10):
    return {"event": "eval", "step": step, "epoch": 1.0, "share": [rank, world], "scored": scored, "wrong": wrong,
            "accuracy": 1 - len(wrong) / scored, "loss": loss, "time": time, "eval_s": eval_s,
            "test_samples": test_samples, "test_set": "abc"}


def test_evaluation_shares_merge_into_one_evaluation_per_step():
    merged = merge_evals([_share(4, 1, 2, [3, 7], 5, loss=2.0, time=101.0, eval_s=3.0),
                          _share(4, 0, 2, [0], 5, loss=1.0, time=100.0, eval_s=2.0),
                          _share(8, 0, 2, [0, 2], 5), _share(8, 1, 2, [9], 5)])
    assert [e["step"] for e in merged] == [4, 8]
    first = merged[0]
    assert first["wrong"] == [0, 3, 7] and first["scored"] == 10 and first["accuracy"] == pytest.approx(0.7)
    assert first["loss"] == pytest.approx(1.5) and first["shares"] == 2 and "share" not in first
    # The shares ran at once: the evaluation ended with the last and took as long as the longest.
    assert first["time"] == 101.0 and first["eval_s"] == 3.0 and first["test_set"] == "abc"
    assert merged[1]["accuracy"] == pytest.approx(0.7)


def test_an_evaluation_short_of_a_share_says_so_and_is_not_paired():
    # Rank 1 scored step 4 twice (it rejoined): the later counts once. Rank 2 never scored step 4.
    merged = merge_evals([_share(4, 0, 3, [0], 4, test_samples=10), _share(4, 1, 3, [1, 4], 3, test_samples=10),
                          _share(4, 1, 3, [4], 3, test_samples=10)])
    assert len(merged) == 1
    assert merged[0]["scored"] == 7 and merged[0]["wrong"] == [0, 4] and merged[0]["test_set"] is None
    assert merged[0]["accuracy"] == pytest.approx(5 / 7)
    facts = {"test_wrong": [0, 4], "test_set": None, "test_samples": 7}
    assert _paired(facts, facts) is None
    text = format_report({**summarize_run(FIXTURE), "partial_evals": [{"step": 4, "scored": 7, "test_samples": 10}]})
    assert "evaluations short of shares: step 4 scored 7 of 10 test samples" in text
    # Shares of two world sizes at one step overlap: the world that scored more is kept.
    mixed = merge_evals([_share(2, 0, 2, [0], 5), _share(2, 1, 2, [1], 5), _share(2, 0, 3, [0, 3], 4)])
    assert mixed[0]["scored"] == 10 and mixed[0]["wrong"] == [0, 1]


def test_a_run_log_is_strict_json_with_null_for_what_is_not_finite(tmp_path):
    from tests.conftest import read_strict_jsonl

    log = JsonlLog(tmp_path / "ps.jsonl")
    log.write({"event": "round", "step": 3, "loss": float("inf"),
               "decision": {"eta": [float("nan"), 0.25], "votes": [{"eta": (float("-inf"), 1.0)}]}})
    log.write({"event": "eval", "step": 3, "loss": 0.5})
    log.close()

    first, second = read_strict_jsonl(tmp_path / "ps.jsonl")
    assert first["loss"] is None and first["decision"] == {"eta": [None, 0.25], "votes": [{"eta": [None, 1.0]}]}
    assert second["loss"] == 0.5
    # An evaluation with a share whose loss was not finite has no mean loss, and still its accuracy.
    merged = merge_evals([_share(4, 0, 2, [0], 5, loss=None), _share(4, 1, 2, [], 5, loss=1.0)])
    assert merged[0]["loss"] is None and merged[0]["accuracy"] == pytest.approx(0.9)


def test_a_record_from_before_the_split_is_a_whole_evaluation():
    old = {"event": "eval", "step": 4, "epoch": 1.0, "accuracy": 0.9, "loss": 0.3, "time": 5.0, "test_samples": 10}
    assert merge_evals([old]) == [{**old, "scored": 10}]


def test_the_shares_of_a_models_evaluation_score_what_one_worker_scoring_all_does():
    """worker.train.evaluate on shares (rank, 3) for every rank, merged, is evaluate on everything."""
    ds = load_dataset("synthetic", Path("data"), False, False, 70, 0)
    model = build_model("mlp", ds.num_classes)
    settings = SimpleNamespace(image_size=8)
    whole = evaluate(model, ds, settings, 3, step=5, steps_per_epoch=5)
    shares = [{**evaluate(model, ds, settings, 3, step=5, steps_per_epoch=5, share=(r, 3)), "time": 0.0}
              for r in range(3)]
    assert sorted(s["scored"] for s in shares) == [23, 23, 24]
    merged = merge_evals(shares)[0]
    assert merged["scored"] == whole["test_samples"] == 70 and merged["test_set"] == whole["test_set"]
    assert merged["wrong"] == sorted(whole["wrong"]) and merged["accuracy"] == pytest.approx(whole["accuracy"])
    assert merged["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    with pytest.raises(ValueError, match="rank must be in"):
        evaluate(model, ds, settings, 3, step=5, steps_per_epoch=5, share=(3, 3))


def test_who_scores_what_and_when():
    """Split: every rank scores its own share; not split: rank 0 scores all; none without evaluate.
    Due at each epoch's end and every eval_every steps, never before the first step."""
    assert [eval_share(True, True, r, 3) for r in range(3)] == [(0, 3), (1, 3), (2, 3)]
    assert [eval_share(True, False, r, 3) for r in range(3)] == [(0, 1), None, None]
    assert eval_share(False, True, 0, 3) is None
    assert [s for s in range(13) if eval_due(s, steps_per_epoch=5, eval_every=0)] == [5, 10]
    assert [s for s in range(13) if eval_due(s, steps_per_epoch=5, eval_every=4)] == [4, 5, 8, 10, 12]
