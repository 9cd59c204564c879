"""Where a worker (or a DDP rank) computes: the CPU, or a CUDA GPU.

The setting is "cpu", "cuda" or "cuda:N". "cuda" spreads the processes of one host over
its GPUs by their local rank, torchrun's LOCAL_RANK (`freezeps run` sets it to each worker's
index; 0 where unset): several workers may share a GPU, DDP's ranks may not (NCCL refuses).
The PS always computes on the CPU: it sums pushes and applies the optimizer, the bytes are
the work.
"""
from __future__ import annotations

import re

import torch

DEVICE_FORM = re.compile(r"cpu|cuda(:\d+)?")


def device_refusal(spec: str) -> str | None:
    """Why `spec` is not a device setting, or None (its form only: whether the GPU is there
    is known only where the process runs, see resolve_device)."""
    if DEVICE_FORM.fullmatch(spec):
        return None
    return f"device {spec!r}: expected cpu, cuda (GPU LOCAL_RANK mod the GPUs visible) or cuda:N"


def resolve_device(spec: str, local_rank: int, gpus: int) -> torch.device:
    """The device of the process of local rank `local_rank` on a host where `gpus` CUDA GPUs
    are visible (torch.cuda.device_count()), or ValueError saying why there is none."""
    if why := device_refusal(spec):
        raise ValueError(why)
    if spec == "cpu":
        return torch.device("cpu")
    if gpus == 0:
        raise ValueError(f"device {spec!r}: no CUDA GPU is visible to this process (torch built without CUDA, "
                         "no driver, or CUDA_VISIBLE_DEVICES empty); use device cpu")
    if local_rank < 0:
        raise ValueError(f"LOCAL_RANK {local_rank}: must be >= 0")
    index = int(spec.partition(":")[2]) if ":" in spec else local_rank % gpus
    if index >= gpus:
        raise ValueError(f"device {spec!r}: this process sees {gpus} CUDA GPU(s), cuda:0..cuda:{gpus - 1}")
    return torch.device("cuda", index)


def nccl_refusal(devices: list[torch.device]) -> str | None:
    """Why NCCL cannot all-reduce between ranks on `devices` (one host's, in rank order), or None."""
    indices = [d.index for d in devices]
    if len(set(indices)) < len(indices):
        return (f"DDP on NCCL needs a GPU of its own per rank: {len(indices)} ranks on GPUs {sorted(set(indices))}; "
                "use as many workers as GPUs, or device cpu (gloo)")
    return None


def synchronizer(device: torch.device):
    """A call that waits for the device's queued work (timing phases on a GPU, whose kernels
    run asynchronously); on the CPU nothing."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
