"""Where workers and DDP ranks compute (worker/device.py), and the GPU path's host staging,
checked on the CPU: no GPU is here, so the CUDA runs themselves are not tested (README)."""
from __future__ import annotations

import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from freeze.engines import EngineSpec
from freezeps.config import load_config
from freezeps.launch import device_refusal_here
from freezeps.roles import local_rank, worker_settings
from proto import freezeps_pb2 as pb
from ps.policy import FreezePolicy
from tests.conftest import run_workers
from tests.conftest import worker_settings as tiny_worker
from worker.cached_prefix import CacheSettings
from worker.device import device_refusal, nccl_refusal, resolve_device
from worker.flat import FlatModel
from worker.models import build_model


def test_device_forms():
    assert resolve_device("cpu", 3, 0) == torch.device("cpu")
    # "cuda" spreads one host's processes over its GPUs by local rank; "cuda:N" is that GPU.
    assert [resolve_device("cuda", r, 2) for r in range(4)] == [torch.device("cuda", i) for i in (0, 1, 0, 1)]
    assert resolve_device("cuda:1", 0, 2) == torch.device("cuda", 1)
    for bad in ("gpu", "cuda:", "cuda:x", "cuda:-1", "CPU", "mps", ""):
        assert device_refusal(bad) is not None
        with pytest.raises(ValueError, match="expected cpu, cuda"):
            resolve_device(bad, 0, 1)


def test_no_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        resolve_device("cuda", 0, 0)
    with pytest.raises(ValueError, match=r"sees 2 CUDA GPU\(s\), cuda:0..cuda:1"):
        resolve_device("cuda:2", 0, 2)


def test_nccl_needs_a_gpu_per_rank():
    assert nccl_refusal([torch.device("cuda", i) for i in range(2)]) is None
    assert "a GPU of its own per rank" in nccl_refusal([torch.device("cuda", 0), torch.device("cuda", 0)])


def test_the_config_refuses_a_bad_device_and_the_cache_on_a_gpu():
    with pytest.raises(ValueError, match="device 'gpu'"):
        load_config({"device": "gpu"}, environ={})
    with pytest.raises(ValueError, match="activation cache .* on the CPU"):
        load_config({"device": "cuda", "cache_memory_bytes": 1 << 20}, environ={})
    with pytest.raises(ValueError, match="activation cache .* on the CPU"):
        tiny_worker("127.0.0.1:1", device="cuda:0", cache=CacheSettings(1 << 20))
    cfg = load_config({"device": "cuda"}, environ={"FREEZEPS_NUM_WORKERS": "2"})
    assert worker_settings(cfg, 1).device == "cuda" and worker_settings(cfg, 1).local_rank == 1


def test_local_rank_from_the_environment():
    assert local_rank({}, "cuda") == 0 and local_rank({"LOCAL_RANK": "3"}, "cuda") == 3
    assert local_rank({}, "cuda", default=2) == 2  # a DDP rank started by hand: its rank
    with pytest.raises(ValueError, match="LOCAL_RANK '-1'"):
        local_rank({"LOCAL_RANK": "-1"}, "cuda")
    # Read only where it picks the GPU: a CPU worker (or one on cuda:N) ignores what it holds.
    assert local_rank({"LOCAL_RANK": "gpu0"}, "cpu") == 0 and local_rank({"LOCAL_RANK": "x"}, "cuda:1") == 0


def test_the_launcher_checks_every_process_device_before_starting():
    four = partial(load_config, environ={})
    assert device_refusal_here(four({"device": "cpu"}), 0) is None
    assert "no CUDA GPU" in device_refusal_here(four({"device": "cuda"}), 0)
    assert device_refusal_here(four({"device": "cuda"}), 1) is None  # four PS workers may share a GPU
    assert "a GPU of its own per rank" in device_refusal_here(four({"device": "cuda", "mode": "ddp"}), 2)
    assert device_refusal_here(four({"device": "cuda", "mode": "ddp"}), 4) is None
    assert device_refusal_here(four({"device": "cuda", "mode": "single"}), 1) is None
    assert "sees 1 CUDA GPU" in device_refusal_here(four({"device": "cuda:1"}), 1)


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="this host has a GPU")
def test_run_on_cuda_without_a_gpu_exits_2_before_starting_anything(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "freezeps", "run", "--device", "cuda", "--model", "mlp",
                          "--dataset", "synthetic", "--weights", "random", "--image-size", "8", "--run-dir", str(run_dir)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no CUDA GPU is visible" in out.stderr, out.stderr
    assert not run_dir.exists()


def _pull_header(step, blocks, delta, frozen=0) -> pb.PullHeader:
    return pb.PullHeader(step=step, blocks=blocks, delta=delta, freeze=pb.FreezeState(frozen_blocks=frozen))


def test_host_staging_moves_the_same_bytes_as_the_model_itself():
    """A FlatModel whose wire buffers are apart from the model's (as on a GPU) pulls, trains,
    pushes and uploads exactly what one whose buffers are the model's does, in float32 and
    bfloat16 both ways, BatchNorm statistics (updated in place by a forward) included."""
    torch.manual_seed(0)
    source = build_model("tiny_cnn", 4)
    flats = []
    for staging in (False, True):
        model = build_model("tiny_cnn", 4)
        model.load_state_dict(source.state_dict())
        flats.append(FlatModel(model, host_staging=staging))
    plain, staged = flats
    assert staged._host_values[0] is not staged.values[0] and plain._host_values[0] is plain.values[0]
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    rng = np.random.default_rng(0)
    for dtype in ("float32", "bfloat16"):
        for flat in flats:
            flat.set_push_dtype(dtype)
            flat.set_pull_dtype(dtype)
        for step in range(3):
            blocks = list(range(len(plain.layout)))
            # The first pull after a Join is whole values; the later ones are changes in bfloat16.
            delta = [dtype != "float32" and step > 0] * len(blocks)
            header = _pull_header(step, blocks, delta)
            payloads = {b: rng.standard_normal(plain.layout[b].nbytes // 4).astype(np.float32) * 0.01
                        for b in blocks}
            for flat in flats:
                sink = flat.pull_sink(header)
                for b in blocks:
                    data = payloads[b] if not delta[b] else \
                        torch.from_numpy(payloads[b]).to(torch.bfloat16).view(torch.int16).numpy()
                    sink.write(b, 0, memoryview(data.tobytes()))
                for b in blocks:
                    sink.land(b)
                flat.zero_grads(0)
                F.cross_entropy(flat.model(x), y).backward()
            for b in blocks:
                np.testing.assert_array_equal(staged.values[b].numpy(), plain.values[b].numpy())
                np.testing.assert_array_equal(staged.push_bytes(b), plain.push_bytes(b))
                np.testing.assert_array_equal(staged.value_bytes(b), plain.value_bytes(b))
    # The check can fail: the pulls and the forwards moved the values.
    assert not torch.equal(plain.values[0], FlatModel(source).values[0])


def test_a_run_with_host_staging_trains_to_the_same_bits(ps_factory, tmp_path, monkeypatch):
    """Over gRPC, with a freeze mid-run and bfloat16 pushes and pulls: workers staging their
    wire buffers apart from the model (the GPU path's copies) train to the PS values of workers
    that do not, bit for bit."""
    weights = tmp_path / "init.pt"  # worker threads share torch's RNG: give them one initial model
    torch.save(build_model("tiny_cnn", 4).state_dict(), weights)
    finals = []
    for staging in (False, True):
        monkeypatch.setattr("worker.train.FlatModel", partial(FlatModel, host_staging=staging))
        policy = FreezePolicy(EngineSpec("static", blocks=1, from_step=3))
        with ps_factory(2, policy=policy, lr=0.05, push_dtype="bfloat16", pull_dtype="bfloat16") as ps:
            run_workers([tiny_worker(ps.address, model="tiny_cnn", steps=6, weights=str(weights)) for _ in range(2)])
            finals.append(ps.server.values_by_name())
    assert finals[0].keys() == finals[1].keys()
    for name in finals[0]:
        np.testing.assert_array_equal(finals[1][name], finals[0][name], err_msg=name)
    init = build_model("tiny_cnn", 4, str(weights))
    assert not np.array_equal(finals[0]["head/fc.weight"], init.blocks[-1].fc.weight.detach().numpy())
