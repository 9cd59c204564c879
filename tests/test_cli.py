"""The command line as a user runs it: help, a whole tiny job, and an unreachable PS."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

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


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_ps_backs_off_then_fails():
    client = PSClient(f"127.0.0.1:{_closed_port()}", connect_retries=3, backoff_s=0.1)
    started = time.monotonic()
    with pytest.raises(ConnectError, match="3 tries"):
        client.join(FlatModel(build_model("mlp", 4)).manifest, "w")
    assert time.monotonic() - started >= 0.1 + 0.2  # slept between the tries, doubling


def test_worker_command_exits_nonzero_with_a_message():
    out = subprocess.run(FREEZEPS + ["worker", "--ps-address", f"127.0.0.1:{_closed_port()}", "--model", "mlp",
                                     "--dataset", "synthetic", "--weights", "random", "--connect-retries", "2",
                                     "--image-size", "8"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 3
    assert "cannot reach the parameter server" in out.stderr


def test_bad_flag_value_is_a_clear_error():
    out = subprocess.run(FREEZEPS + ["ps", "--num-workers", "zero"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--num-workers" in out.stderr


def test_run_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run(FREEZEPS + ["run", "--model", "mlp", "--dataset", "synthetic", "--weights", "random",
                                     "--image-size", "8", "--num-workers", "2", "--batch-size", "32", "--epochs", "2",
                                     "--train-samples", "0", "--test-samples", "0", "--freeze", "static",
                                     "--freeze-blocks", "1", "--freeze-step", "48",
                                     "--run-dir", str(run_dir)],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "test accuracy" in out.stdout and "saved" in out.stdout
    facts = json.loads(subprocess.run(FREEZEPS + ["report", str(run_dir), "--json"], capture_output=True,
                                      text=True, timeout=60, check=True).stdout)
    assert facts["steps"] == 64 and facts["frozen_blocks"] == 1
    assert facts["accuracy"] > 0.4  # 4 classes: well above chance after 2 epochs
    assert facts["push_payload"] < facts["push_payload_no_freeze"]
    assert facts["push_by_block"]["fc1"] == 48 * 2 * next(b["bytes"] for b in facts["blocks"] if b["name"] == "fc1")
