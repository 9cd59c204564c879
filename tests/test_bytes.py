"""Byte accounting: each step's push and pull payload is exactly the unfrozen blocks' bytes."""
from __future__ import annotations

import json

import pytest

from freeze.engines import EngineSpec
from proto.layout import WIRE_DTYPES, layout_from_manifest, wire_layout
from ps.policy import FreezePolicy
from tests.conftest import run_workers, worker_settings
from worker.flat import manifest_for
from worker.models import build_model


@pytest.mark.parametrize("push_dtype,pull_dtype", [("float32", "float32"), ("bfloat16", "float32"),
                                                   ("float32", "bfloat16"), ("bfloat16", "bfloat16")])
def test_payload_is_exactly_the_unfrozen_blocks(ps_factory, tmp_path, push_dtype, pull_dtype):
    """Pulls carry the unfrozen blocks' float32 values, or with pull_dtype bfloat16 their
    changes in half of it after the first pull; a block that has just frozen comes once more
    in float32. Pushes carry the same blocks in push_dtype (bfloat16: half of it, running
    statistics too)."""
    num_workers, steps, freeze_at = 2, 6, 3
    layout = layout_from_manifest(manifest_for(build_model("tiny_cnn", 4)))
    sizes = {str(b.index): b.nbytes for b in layout}
    push_sizes = {str(b.index): b.nbytes for b in wire_layout(layout, push_dtype)}
    assert push_sizes == {k: n // (4 // WIRE_DTYPES[push_dtype]) for k, n in sizes.items()}
    change_sizes = {str(b.index): b.nbytes for b in wire_layout(layout, pull_dtype)}
    log = tmp_path / "ps.jsonl"
    # Chunks of 256 bytes, so blocks span several chunks and chunks span tensors.
    with ps_factory(num_workers, policy=FreezePolicy(EngineSpec("static", blocks=2, from_step=freeze_at)), log_path=log,
                    chunk_bytes=256, push_dtype=push_dtype, pull_dtype=pull_dtype) as ps:
        run_workers([worker_settings(ps.address, model="tiny_cnn", steps=steps) for _ in range(num_workers)])
    records = [json.loads(line) for line in log.read_text().splitlines()]
    rounds = [r for r in records if r["event"] == "round"]
    freezes = [r for r in records if r["event"] == "freeze"]
    assert [(f["step"], f["from"], f["to"]) for f in freezes] == [(freeze_at, 0, 2)]
    assert [r["step"] for r in rounds] == list(range(steps))
    assert all(0 < r["optimizer_s"] < r["round_s"] for r in rounds)  # the PS times its optimizer step
    for r in rounds:
        push = {k: v["payload"] for k, v in r["bytes"]["by_block"]["Push"]["in"].items()}
        pull = {k: v["payload"] for k, v in r["bytes"]["by_block"]["Pull"]["out"].items() if k != "-1"}
        push.pop("-1", None)
        first = 0 if r["step"] < freeze_at else 2
        want_push = {k: n * num_workers for k, n in push_sizes.items() if int(k) >= first}
        # The pull at the freeze boundary carries the newly frozen blocks' final values once; the
        # first pull (no pull before it to change from) whole values.
        pull_sizes = {k: sizes[k] if r["step"] == 0 or (r["step"] == freeze_at and int(k) < 2) else change_sizes[k]
                      for k in sizes}
        want_pull = {k: n * num_workers for k, n in pull_sizes.items()
                     if int(k) >= (first if r["step"] > freeze_at else 0)}
        assert push == want_push, r["step"]
        assert pull == want_pull, r["step"]
        # The freeze record's bytes per round before and after, as measured.
        if r["step"] != freeze_at and (r["step"] or pull_dtype == "float32"):
            key = "bytes_per_step_before" if r["step"] < freeze_at else "bytes_per_step_after"
            assert sum(push.values()) + sum(pull.values()) == freezes[0][key], r["step"]
        # A chunk message costs its payload plus a few bytes of field tags and varints.
        traffic = r["bytes"]["by_block"]["Push"]["in"]
        chunks = [v for k, v in traffic.items() if k != "-1"]
        overhead = sum(v["message"] - v["payload"] for v in chunks)
        assert 0 < overhead <= 24 * sum(v["messages"] for v in chunks)
        by_worker = r["bytes"]["by_worker"]["Push"]["in"]
        assert len(by_worker) == num_workers
        assert all(v["payload"] == sum(want_push.values()) // num_workers for v in by_worker.values())


def test_bn_running_stats_are_averaged(ps_factory):
    """Buffers are set to the batch-size-weighted mean of the workers' values, not optimised."""
    with ps_factory(2, lr=0.5, momentum=0.9, weight_decay=0.1) as ps:
        summaries = run_workers([worker_settings(ps.address, model="tiny_cnn", steps=1) for _ in range(2)])
        values = ps.server.values_by_name()
    assert all(s["steps"] == 1 for s in summaries)
    # After one step from zero-mean/unit-var initial stats, each worker's running mean is
    # 0.1 * its batch mean; the server holds their average, which is not zero.
    mean = values["conv1/bn.running_mean"]
    assert mean.shape == (8,) and abs(mean).sum() > 0
    assert (values["conv1/bn.running_var"] > 0).all()


def test_freezing_from_the_start_is_logged_and_never_sent(ps_factory, tmp_path):
    log = tmp_path / "ps.jsonl"
    with ps_factory(2, policy=FreezePolicy(EngineSpec("static", blocks=2, from_step=0)), log_path=log) as ps:
        run_workers([worker_settings(ps.address, model="tiny_cnn", steps=3) for _ in range(2)])
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["step"], r["to"], r["initial"]) for r in records if r["event"] == "freeze"] == [(0, 2, True)]
    for r in records:
        if r["event"] == "round":
            assert set(r["bytes"]["by_block"]["Push"]["in"]) == {"-1", "2"}
            # The first pull carries every block once (workers need the initial values).
            pulled = set(r["bytes"]["by_block"]["Pull"]["out"])
            assert pulled == ({"-1", "0", "1", "2"} if r["step"] == 0 else {"-1", "2"})
