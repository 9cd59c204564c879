"""The baselines share our code: PS, DDP (gloo) and a single process give the same
parameters after the same steps on a deterministic tiny workload, freezing included."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from freezeps.report import summarize_run
from worker.flat import FlatModel
from worker.models import build_model

COMMON = ["--model", "mlp", "--image-size", "8", "--dataset", "synthetic",
          "--num-workers", "2", "--steps", "8", "--batch-size", "16", "--lr", "0.05", "--momentum", "0.9",
          "--weight-decay", "0.001", "--freeze", "static", "--freeze-blocks", "1", "--freeze-step", "4",
          "--eval-every", "4", "--seed", "3"]


def _run(mode: str, run_dir, weights, *extra: str) -> dict[str, torch.Tensor]:
    proc = subprocess.run([sys.executable, "-m", "freezeps", "run", "--mode", mode, *COMMON, "--weights", str(weights),
                           *extra,
                           "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-1500:]
    return torch.load(run_dir / "params.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("baselines")
    torch.manual_seed(11)
    model = build_model("mlp", 4, "random")
    torch.save(model.state_dict(), base / "init.pt")
    runs = {mode: (_run(mode, base / mode, base / "init.pt"), base / mode) for mode in ("ps", "ddp", "single")}
    runs["init"] = (FlatModel(model).values_by_name(), None)
    return runs


@pytest.mark.parametrize("mode", ["ddp", "single"])
def test_same_parameters_as_the_ps(runs, mode):
    ps, _ = runs["ps"]
    other, _ = runs[mode]
    assert ps.keys() == other.keys()
    for name in ps:
        torch.testing.assert_close(other[name], ps[name], rtol=1e-5, atol=1e-6, msg=name)
    # Not vacuous: every block, the frozen one too (before step 4), moved from the start.
    init, _ = runs["init"]
    for name in ("fc1/fc.weight", "head/fc.weight"):
        assert not torch.allclose(init[name], ps[name], atol=1e-4), name


GPUS = torch.cuda.device_count()


@pytest.mark.skipif(GPUS == 0, reason="no CUDA GPU here (the GPU path runs where there is one)")
@pytest.mark.parametrize("mode", ["ps", "single", "ddp"])
def test_the_same_parameters_on_a_gpu(runs, tmp_path, mode):
    """--device cuda: the PS's workers (two sharing a GPU), the single process and DDP on NCCL
    (a GPU per rank) train to the CPU run's parameters, within float32's rounding."""
    if mode == "ddp" and GPUS < 2:
        pytest.skip("DDP on NCCL needs a GPU per rank: two here")
    want, ps_dir = runs["ps"]
    got = _run(mode, tmp_path / mode, ps_dir.parent / "init.pt", "--device", "cuda")
    assert summarize_run(tmp_path / mode)["config"]["device"] == "cuda"
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


def test_ddp_moves_no_bytes_for_frozen_blocks(runs):
    _, run_dir = runs["ddp"]
    facts = summarize_run(run_dir)
    assert facts["mode"] == "ddp" and facts["frozen_blocks"] == 1
    per_step = facts["payload_per_step"]
    assert "fc1" in per_step[3] and all("fc1" not in s for s in per_step[4:])
    records = [json.loads(line) for line in (run_dir / "ddp.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "freeze"] == [4]
    ps_facts = summarize_run(runs["ps"][1])
    assert facts["accuracy"] == ps_facts["accuracy"]
    # The eval record keeps which test samples were wrong: as many as the accuracy says, the same in both modes.
    assert len(facts["test_wrong"]) == round((1 - facts["accuracy"]) * facts["test_samples"])
    assert facts["test_wrong"] == ps_facts["test_wrong"]


def test_ddp_averages_running_statistics_as_the_ps_does(tmp_path):
    """With BatchNorm: DDP averages the running statistics over the ranks as the PS does, so
    both give the same parameters and statistics (a single process, normalising over the
    union batch, would not)."""
    extra = ("--model", "tiny_cnn", "--freeze-blocks", "1")
    ps = _run("ps", tmp_path / "ps", "random", *extra)
    ddp = _run("ddp", tmp_path / "ddp", "random", *extra)
    assert any("running_var" in name for name in ps)
    for name in ps:
        torch.testing.assert_close(ddp[name], ps[name], rtol=1e-4, atol=1e-5, msg=name)
    assert summarize_run(tmp_path / "ddp")["push_payload"] == summarize_run(tmp_path / "ps")["push_payload"]


def test_adamw_with_linear_decay_is_the_same_in_ps_and_ddp(tmp_path):
    """AdamW on the PS (torch's, one per block) against torch's AdamW under DDP, through a
    freeze (the frozen block's moments are freed, the others' kept), a warm-up + linear decay,
    and a layer-wise decay of the rate (fc1 at a quarter of the head's, fc2 at half)."""
    extra = ("--optimizer", "adamw", "--lr", "0.01", "--lr-schedule", "linear", "--warmup-steps", "2",
             "--lr-block-decay", "0.5")
    ps = _run("ps", tmp_path / "ps", "random", *extra)
    ddp = _run("ddp", tmp_path / "ddp", "random", *extra)
    for name in ps:
        torch.testing.assert_close(ddp[name], ps[name], rtol=1e-5, atol=1e-6, msg=name)
    records = [json.loads(line) for line in (tmp_path / "ps" / "ps.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r.get("event") == "round"]
    assert lrs == pytest.approx([0.005, 0.01] + [0.01 * (6 - k) / 6 for k in range(6)])
    state_bytes = next(r for r in records if r.get("event") == "summary")["optimizer_state_bytes"]
    head_and_fc2 = sum(t.nbytes for b in FlatModel(build_model("mlp", 4)).layout[1:] for t in b.tensors)
    assert state_bytes == 2 * head_and_fc2  # two moments per trained parameter, none for the frozen block


def test_a_deadline_freezes_at_its_step_over_grpc_and_in_ddp_alike(tmp_path):
    """Tests that cannot fire in 8 rounds (one every 100): the deadline alone freezes all but the
    head after step 4, in the PS and in DDP, and both logs say it was the deadline's."""
    extra = ("--freeze", "gradnorm", "--freeze-interval", "100", "--freeze-deadline", "4")
    ps = _run("ps", tmp_path / "ps", "random", *extra)
    ddp = _run("ddp", tmp_path / "ddp", "random", *extra)
    for mode, log in (("ps", "ps.jsonl"), ("ddp", "ddp.jsonl")):
        records = [json.loads(line) for line in (tmp_path / mode / log).read_text().splitlines()]
        freezes = [r for r in records if r["event"] == "freeze"]
        blocks = summarize_run(tmp_path / mode)["blocks"]
        assert [(f["step"], f["to"], f["deadline"]) for f in freezes] == [(4, len(blocks) - 1, 4)], mode
    for name in ps:
        torch.testing.assert_close(ddp[name], ps[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bfloat16_halves_the_ps_push_and_ddps_all_reduce(runs, tmp_path):
    """--push-dtype bfloat16: the PS's pushes and DDP's all-reduce (torch's bf16 compression
    hook) carry half the float32 runs' bytes; the PS's pulls stay float32. The two modes no
    longer agree to the bit (DDP sums in bf16, the PS in float32) but train alike."""
    weights = runs["ps"][1].parent / "init.pt"  # the float32 runs' initial values
    ps = _run("ps", tmp_path / "ps", weights, "--push-dtype", "bfloat16")
    ddp = _run("ddp", tmp_path / "ddp", weights, "--push-dtype", "bfloat16")
    wide = {mode: summarize_run(runs[mode][1]) for mode in ("ps", "ddp")}
    narrow = {mode: summarize_run(tmp_path / mode) for mode in ("ps", "ddp")}
    for mode in ("ps", "ddp"):
        assert 2 * narrow[mode]["push_payload"] == wide[mode]["push_payload"], mode
    assert narrow["ps"]["pull_payload"] == wide["ps"]["pull_payload"]
    assert 2 * narrow["ddp"]["pull_payload"] == wide["ddp"]["pull_payload"]
    for name in ps:  # 8 steps apart by bf16's rounding (here at most 1.3e-4)
        torch.testing.assert_close(ddp[name], ps[name], rtol=0, atol=3e-4, msg=name)
        torch.testing.assert_close(ps[name], runs["ps"][0][name], rtol=0, atol=3e-4, msg=name)
    # Both rounded: neither is its float32 run.
    assert any(not torch.equal(ps[name], runs["ps"][0][name]) for name in ps)
    assert any(not torch.equal(ddp[name], runs["ddp"][0][name]) for name in ddp)
