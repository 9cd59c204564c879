"""Benchmarks: each module runs freezeps as a user would and writes what it measured."""
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager

# How a bench starts freezeps; what follows it in a command is freezeps's own command line.
FREEZEPS = [sys.executable, "-m", "freezeps"]

STOP_GRACE_S = 60  # what a stopped launcher has to stop its PS and workers (it gives them 10 s, all at once)


def run_freezeps(cmd: list[str], timeout_s: float,
                 alongside: Callable[[int], AbstractContextManager] | None = None) -> None:
    """Run `cmd` (a FREEZEPS command line) to its end, its output discarded; CalledProcessError
    if it fails. Past `timeout_s`, or when the bench itself is interrupted, the launcher is stopped
    as `kill` would stop it (SIGTERM: it stops its PS and workers), and whatever of its process
    group still runs after STOP_GRACE_S is killed; then TimeoutError names the command and its limit.
    `alongside(pid)`: a context entered with the launcher's pid while it runs (a bench's faults).

    Not subprocess.run(timeout=...): that SIGKILLs the launcher alone, and its PS and workers
    train on, unseen, beside the bench's next run (a 6-epoch run on R8 once outlived its hour so)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with alongside(proc.pid) if alongside else contextlib.nullcontext():
            code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        raise TimeoutError(f"`freezeps {' '.join(cmd[len(FREEZEPS):])}` ran past {timeout_s:.0f} s and was "
                           "stopped, with its PS and workers") from None
    except BaseException:  # Ctrl-C reaches the bench only: the launcher runs in its own session
        _stop_group(proc)
        raise
    if code != 0:
        raise subprocess.CalledProcessError(code, cmd)


def _stop_group(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    try:  # the launcher led its own process group: what is left of it (its pid is not reused while it has members)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
