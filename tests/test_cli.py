"""The command line as a user runs it: help, a whole tiny job, and an unreachable PS."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from freezeps.launch import free_port
from proto.transport import ByteMeter  # noqa: F401  (the package imports cleanly)
from worker.client import ConnectError, PSClient
from worker.flat import FlatModel
from worker.models import build_model

FREEZEPS = [sys.executable, "-m", "freezeps"]


@pytest.mark.parametrize("command", ["ps", "worker", "run", "report"])
def test_help(command):
    out = subprocess.run(FREEZEPS + [command, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "usage: freezeps " + command in out.stdout
    if command != "report":
        assert "--config" in out.stdout and "FREEZEPS_" in out.stdout


def test_unreachable_ps_backs_off_then_fails():
    client = PSClient(f"127.0.0.1:{free_port()}", connect_retries=3, backoff_s=0.1)
    started = time.monotonic()
    with pytest.raises(ConnectError, match="3 tries"):
        client.join(FlatModel(build_model("mlp", 4)).manifest, "w")
    assert time.monotonic() - started >= 0.1 + 0.2  # slept between the tries, doubling


def test_worker_command_exits_nonzero_with_a_message():
    out = subprocess.run(FREEZEPS + ["worker", "--ps-address", f"127.0.0.1:{free_port()}", "--model", "mlp",
                                     "--dataset", "synthetic", "--weights", "random", "--connect-retries", "2",
                                     "--image-size", "8"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 3
    assert "cannot join the parameter server" in out.stderr


def test_a_worker_whose_data_cannot_be_used_says_why_in_a_line_and_exits_2():
    """A setting only the data can refuse (here a sequence longer than MiniLM's 512 positions)
    is found as the worker loads it: one line saying what, exit status 2, no traceback."""
    out = subprocess.run(FREEZEPS + ["worker", "--ps-address", f"127.0.0.1:{free_port()}", "--model", "minilm",
                                     "--weights", "pretrained", "--dataset", "rotten_tomatoes", "--max-seq-len", "600",
                                     "--connect-retries", "1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "freezeps worker: max_seq_len 600: the model in" in out.stderr and "at most 512 tokens" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_ps_that_cannot_serve_says_why_in_a_line_and_exits_2(tmp_path, capsys):
    """A port another PS holds (gRPC would share it by default: the kernel would deal the
    workers' connections between the two), checkpoints with no folder to go to, a run log or
    checkpoint folder that cannot be made: one line each, exit status 2, before any worker
    could join."""
    from freezeps.config import load_config
    from freezeps.roles import run_ps
    from tests.conftest import running_ps

    with running_ps() as holder:
        cfg = load_config({"listen": holder.address, "num_workers": "1"}, None, {})
        assert run_ps(cfg) == 2
        assert f"freezeps ps: cannot listen on {holder.address}: its port is taken" in capsys.readouterr().err
    assert run_ps(load_config({"checkpoint_every": "5", "num_workers": "1"}, None, {})) == 2
    assert "freezeps ps: checkpoint_every 5 needs checkpoint_dir" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for setting in ({"run_log": str(blocker / "ps.jsonl")},
                    {"checkpoint_dir": str(blocker / "checkpoints"), "checkpoint_every": "1"}):
        cfg = load_config({"listen": f"127.0.0.1:{free_port()}", "num_workers": "1", **setting}, None, {})
        assert run_ps(cfg) == 2
        err = capsys.readouterr().err
        assert err.startswith("freezeps ps: [Errno") and str(blocker) in err and "Traceback" not in err, err


def test_only_a_worker_that_cannot_start_exits_2(monkeypatch):
    """Exit status 2 tells systemd not to restart (deploy/freezeps-worker@.service): it is kept
    for settings the worker cannot start with. An error once it trains (a malformed pull is a
    ValueError) goes up as before, exit 1, and the unit restarts it."""
    from freezeps import roles
    from freezeps.config import load_config
    from proto.transport import WireError
    from worker.train import SetupError

    def worker_that_raises(error: Exception):
        def run_worker(settings):
            raise error
        return run_worker

    cfg = load_config({"model": "mlp", "weights": "random", "dataset": "synthetic", "image_size": "8"}, None, {})
    monkeypatch.setattr(roles, "run_worker", worker_that_raises(SetupError("no samples")))
    assert roles.run_worker_role(cfg) == 2
    monkeypatch.setattr(roles, "run_worker", worker_that_raises(WireError("bad chunk")))
    with pytest.raises(WireError, match="bad chunk"):
        roles.run_worker_role(cfg)


def test_bad_flag_value_is_a_clear_error():
    out = subprocess.run(FREEZEPS + ["ps", "--num-workers", "zero"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--num-workers" in out.stderr


def test_run_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run(FREEZEPS + ["run", "--model", "mlp", "--dataset", "synthetic", "--weights", "random",
                                     "--image-size", "8", "--num-workers", "2", "--batch-size", "32", "--epochs", "2",
                                     "--train-samples", "0", "--test-samples", "0", "--freeze", "static",
                                     "--freeze-blocks", "1", "--freeze-step", "16",
                                     "--cache-memory-bytes", "4096", "--cache-disk-bytes", "1000000",
                                     "--run-dir", str(run_dir)],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "test accuracy" in out.stdout and "saved" in out.stdout and "activation cache: hit rate" in out.stdout
    facts = json.loads(subprocess.run(FREEZEPS + ["report", str(run_dir), "--json"], capture_output=True,
                                      text=True, timeout=60, check=True).stdout)
    assert facts["steps"] == 64 and facts["frozen_blocks"] == 1
    # One evaluation falls inside the training time (step 32; the last one comes after it).
    assert 0 < facts["eval_s"] < facts["train_s"]
    assert facts["accuracy"] > 0.4  # 4 classes: well above chance after 2 epochs
    # Both workers scored their half of the test set at each evaluation; the report added them up.
    for rank in (0, 1):
        records = [json.loads(line) for line in (run_dir / f"worker-{rank}.jsonl").read_text().splitlines()]
        assert [(r["step"], r["share"]) for r in records if r["event"] == "eval"] == [(32, [rank, 2]), (64, [rank, 2])]
    assert facts["test_samples"] == 512 and not facts["partial_evals"]
    assert facts["push_payload"] < facts["push_payload_no_freeze"]
    assert facts["push_by_block"]["fc1"] == 16 * 2 * next(b["bytes"] for b in facts["blocks"] if b["name"] == "fc1")
    # The activation cache: on from the freeze (measured to pay), its disk tier in the run folder.
    cache = facts["cache"]
    assert cache["cached"] > 0 and cache["computed"] > 0 and cache["store"]["memory_evictions"] > 0
    assert cache["cached"] + cache["extended"] + cache["computed"] + cache["uncached"] == 48 * 2 * 32
    assert list((run_dir / "cache").glob("*/*.act"))


@contextlib.contextmanager
def _training_run(tmp_path):
    """A run of a PS and two workers that goes on for long, once it has trained a round:
    (launcher, its children's pids); whatever is left of them is killed afterwards."""
    run = subprocess.Popen(FREEZEPS + ["run", "--model", "mlp", "--dataset", "synthetic", "--weights", "random",
                                       "--image-size", "8", "--num-workers", "2", "--epochs", "1000", "--freeze",
                                       "none", "--run-dir", str(tmp_path / "run")],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    children = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(children) < 3:  # the PS and two workers
            time.sleep(0.5)
            children = [int(p) for p in open(f"/proc/{run.pid}/task/{run.pid}/children").read().split()]
        assert len(children) == 3
        while time.monotonic() < deadline and not _trained(tmp_path / "run"):
            time.sleep(0.5)
        assert _trained(tmp_path / "run"), "the run never trained: the test would prove nothing"
        yield run, children
    finally:
        for pid in [run.pid, *children]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_sigterm_stops_the_whole_run(tmp_path):
    """`kill`, systemd or docker stop the launcher: its PS and workers stop with it."""
    with _training_run(tmp_path) as (run, children):
        run.terminate()
        out, _ = run.communicate(timeout=60)
        assert run.returncode == 143, out
        for pid in children:
            assert not _alive(pid), f"process {pid} outlived the launcher"


def test_a_ps_that_dies_is_reported_at_once_as_the_cause(tmp_path):
    """The PS killed mid-run: the launcher says the PS failed and stops its workers, instead of
    waiting for them to give up joining it and blaming a worker."""
    with _training_run(tmp_path) as (run, children):
        ps = [pid for pid in children if open(f"/proc/{pid}/cmdline").read().split("\0")[3] == "ps"]
        assert len(ps) == 1, children
        started = time.monotonic()
        os.kill(ps[0], signal.SIGKILL)
        out, _ = run.communicate(timeout=60)
        assert run.returncode == 1, out
        assert "the PS failed (exit -9)" in out, out
        assert time.monotonic() - started < 20, "the launcher waited for the workers to give up"
        for pid in children:
            assert not _alive(pid), f"process {pid} outlived the launcher"


def test_a_bench_run_past_its_timeout_is_stopped_with_all_it_started(tmp_path):
    """bench.run_freezeps: a run that outlives its time leaves nothing running beside the bench's next
    run. A stand-in launcher that dies on SIGTERM and leaves its child behind (the real one stops its
    PS and workers on SIGTERM: test_sigterm_stops_the_whole_run); the child must go too."""
    from bench import run_freezeps

    child_pid = tmp_path / "child.pid"
    launcher = ("import subprocess, sys, time; "
                "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
                f"open({str(child_pid)!r}, 'w').write(str(child.pid)); time.sleep(300)")
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="ran past 5 s and was stopped"):
        run_freezeps([sys.executable, "-c", launcher], timeout_s=5)
    assert time.monotonic() - started < 60
    assert child_pid.is_file(), "the stand-in never started its child: the test would prove nothing"
    pid = int(child_pid.read_text())
    try:
        deadline = time.monotonic() + 10  # SIGKILL is delivered, not waited for: the bench cannot reap it
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), "the launcher's child outlived the bench's timeout"
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_the_straggler_bench_stops_and_continues_each_worker_and_leaves_none_stopped(tmp_path):
    """bench.stragglers.Stalls: from the run's first round on, each of the launcher's worker
    processes is stopped (SIGSTOP) now and then and continued; when the run ends, none is left
    stopped (its launcher would wait for it forever). This process stands in for the launcher."""
    from bench.stragglers import Stalls, worker_pids

    def state(pid: int) -> str:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]

    children = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "worker"]) for _ in range(2)]
    try:
        run_log = tmp_path / "ps.jsonl"
        stalls = Stalls(pause_s=0.2, every_s=0.2, seed=0, workers=2, run_log=run_log)
        seen_stopped = set()
        with stalls(os.getpid()):
            time.sleep(0.6)
            assert stalls.log == []  # no round yet: no stall
            run_log.write_text('{"event": "round", "step": 0}\n')
            deadline = time.monotonic() + 5
            while len(seen_stopped) < 2 and time.monotonic() < deadline:
                seen_stopped |= {c.pid for c in children if state(c.pid) == "T"}
                time.sleep(0.01)
        assert seen_stopped == {c.pid for c in children} == set(worker_pids(os.getpid()))
        assert {s["worker"] for s in stalls.log} == {0, 1}
        time.sleep(0.05)
        assert [state(c.pid) for c in children] == ["S", "S"]  # continued: asleep, not stopped
    finally:
        for c in children:
            c.kill()
            c.wait()


def test_the_launcher_stops_its_processes_all_at_once_and_kills_the_stubborn(tmp_path):
    """_stop tells every process to stop before it waits for any (a PS shard takes seconds to write
    its summary; one after another, they add up), and kills what ignores SIGTERM."""
    from freezeps.launch import _stop

    journal = tmp_path / "journal"
    slow = ("import signal, sys, time\n"
            "def on_term(*_):\n"
            "    open(sys.argv[1], 'a').write(sys.argv[2] + ' told\\n'); time.sleep(float(sys.argv[3]))\n"
            "    open(sys.argv[1], 'a').write(sys.argv[2] + ' ended\\n'); sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, on_term)\n"
            "open(sys.argv[1], 'a').write(sys.argv[2] + ' ready\\n'); time.sleep(120)\n")
    stubborn = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "open(sys.argv[1], 'a').write('stubborn ready\\n'); time.sleep(120)")
    # Each takes 2 s to end once told: a one-after-another stop tells b only after a has ended.
    procs = [subprocess.Popen([sys.executable, "-c", slow, str(journal), name, "2"]) for name in ("a", "b")]
    procs.append(subprocess.Popen([sys.executable, "-c", stubborn, str(journal)]))
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not journal.exists() or journal.read_text().count("ready") < 3):
            time.sleep(0.1)
        assert journal.read_text().count("ready") == 3
        _stop(procs, grace_s=5.0)
        events = [line for line in journal.read_text().splitlines() if "ready" not in line]
        assert sorted(events[:2]) == ["a told", "b told"], events  # b told before a ended
        assert sorted(events[2:]) == ["a ended", "b ended"], events
        assert [p.returncode for p in procs] == [0, 0, -signal.SIGKILL]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _trained(run_dir) -> bool:
    """Whether the run in `run_dir` got through a round."""
    log = run_dir / "ps.jsonl"
    return log.is_file() and '"event": "round"' in log.read_text()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_ps_and_workers_started_by_hand(tmp_path):
    """What a user does on several hosts: a `freezeps ps` and separate `freezeps worker`s."""
    port = free_port()
    env_file = tmp_path / "job.toml"  # the shared settings, as a deployment would hand them out
    env_file.write_text('model = "mlp"\ndataset = "synthetic"\nweights = "random"\nimage_size = 8\n'
                        'num_workers = 2\nsteps = 5\nbatch_size = 16\nfreeze = "none"\nevaluate = false\n')
    common = ["--config", str(env_file)]
    ps = subprocess.Popen(FREEZEPS + ["ps"] + common + ["--listen", f"127.0.0.1:{port}",
                                                       "--run-log", str(tmp_path / "ps.jsonl")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        workers = [subprocess.Popen(FREEZEPS + ["worker"] + common + ["--ps-address", f"127.0.0.1:{port}",
                                                                      "--log-dir", str(tmp_path)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                   for _ in range(2)]
        for w in workers:
            out, _ = w.communicate(timeout=180)
            assert w.returncode == 0, out
        assert ps.wait(timeout=60) == 0  # the PS ends by itself once its workers have left
    finally:
        for proc in [ps, *[w for w in locals().get("workers", []) if w.poll() is None]]:
            if proc.poll() is None:
                proc.kill()
    facts = json.loads(subprocess.run(FREEZEPS + ["report", str(tmp_path), "--json"], capture_output=True,
                                      text=True, timeout=60, check=True).stdout)
    assert facts["steps"] == 5 and facts["workers"] == 2
    assert facts["push_payload"] == facts["push_payload_no_freeze"] == 5 * 2 * sum(b["bytes"] for b in facts["blocks"])
