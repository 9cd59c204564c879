"""Adaptive freezing end to end over gRPC: decided mid-run, applied at a round boundary."""
from __future__ import annotations

import numpy as np
import pytest

from freeze.engines import EngineSpec
from ps.policy import FreezePolicy
from tests.conftest import read_strict_jsonl, run_workers, worker_settings


@pytest.mark.parametrize("votes", [False, True])
def test_adaptive_freeze_mid_run(ps_factory, tmp_path, votes):
    # A τ so generous that every block passes at the second test (round 3): the freeze is
    # certain, and what is checked is how it is carried out.
    policy = FreezePolicy(EngineSpec("threshold", interval=2, tau=100.0, rate=1.0), votes=votes,
                          vote_weights="equal", quorum=1.0)
    snapshots = {}

    def observer(server, record):
        if record["event"] == "freeze":
            snapshots["at_freeze"] = server.values_by_name()
            snapshots["momentum_bytes"] = server.describe()["optimizer_state_bytes"]

    log = tmp_path / "ps.jsonl"
    with ps_factory(2, policy=policy, log_path=log, observer=observer, momentum=0.9) as ps:
        run_workers([worker_settings(ps.address, model="mlp", steps=8) for _ in range(2)])
        final = ps.server.values_by_name()
        momentum_after = ps.server.describe()["optimizer_state_bytes"]
    # Strict JSON: the η of a block not measured yet is null, not Python's NaN token.
    records = read_strict_jsonl(log)
    freezes = [r for r in records if r["event"] == "freeze"]
    assert len(freezes) == 1
    event = freezes[0]
    assert (event["step"], event["from"], event["to"], event["blocks"]) == (4, 0, 2, ["fc1", "fc2"])
    assert event["bytes_per_step_after"] < event["bytes_per_step_before"]
    if votes:
        assert [v["proposal"] for v in event["votes"]] == [3, 3]  # each proposed all; the guard kept the head
    else:
        assert len(event["eta"]) == 3
    first_test = next(r for r in records if r["event"] == "round" and "decision" in r)
    etas = [v["eta"] for v in first_test["decision"]["votes"]] if votes else [first_test["decision"]["eta"]]
    assert all(e is None for eta in etas for e in eta)  # nothing to compare with at the first test
    # After the freeze: no traffic for frozen blocks, their values untouched since.
    for r in records:
        if r["event"] == "round" and r["step"] > 4:
            assert set(r["bytes"]["by_block"]["Push"]["in"]) == {"-1", "2"}
            assert set(r["bytes"]["by_block"]["Pull"]["out"]) == {"-1", "2"}
    for name, value in snapshots["at_freeze"].items():
        if name.startswith(("fc1/", "fc2/")):
            assert np.array_equal(value, final[name]), name
        else:
            assert not np.array_equal(value, final[name]), name  # the head kept training
    # The head's momentum survived the freeze (the same bytes before and after, not reset to none).
    head_bytes = (32 * 4 + 4) * 4
    assert snapshots["momentum_bytes"] == momentum_after == head_bytes
