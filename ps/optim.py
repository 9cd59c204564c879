"""The PS's optimizers: one step over the trained blocks' parameter views, state kept per block.

Both step on the *averaged* gradients, views into the store's accumulators, which the store
divides in place (BlockStore.apply) and the step may overwrite (they are scratch), each block at
its own learning rate (the schedule's, scaled per block: ps/schedule.block_lr_scales). State
lives per block so that a frozen block's state is freed at once and the rest is kept as it is
(a freeze never resets the moments of the blocks that go on training).

- sgd: torch.optim.SGD's update (momentum, dampening 0, L2 weight decay, optional Nesterov),
  by hand over all the blocks' flat views at once, in torch's order of operations, so that it is
  torch's to the bit (InPlaceSGD.step says why not torch's own).
- adamw: torch.optim.AdamW itself (torch_adamw), one instance per block over that block's views,
  so the maths is torch's (and the DDP baseline's, which builds it the same way) to the bit.
"""
from __future__ import annotations

import copy
from typing import Protocol

import torch

OPTIMIZERS = ("sgd", "adamw")

Blocks = dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]]  # block -> (params, averaged grads)


class Optimizer(Protocol):
    name: str

    def step(self, blocks: Blocks, lrs: dict[int, float]) -> None: ...
    def drop(self, block: int) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict, params: dict[int, list[torch.Tensor]]) -> None: ...
    def state_bytes(self) -> int: ...


def make_optimizer(name: str, *, momentum: float = 0.9, weight_decay: float = 0.0, nesterov: bool = False,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> Optimizer:
    """ValueError for an unknown name or settings the optimizer refuses."""
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if name == "sgd":
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if nesterov and momentum == 0:
            raise ValueError("Nesterov needs momentum > 0")
        return InPlaceSGD(momentum, weight_decay, nesterov)
    if name == "adamw":
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"Adam betas must be in [0, 1), got {betas}")
        if eps <= 0:
            raise ValueError(f"Adam eps must be > 0, got {eps}")
        return TorchAdamW(betas, eps, weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def torch_adamw(params, *, lr: float, betas: tuple[float, float], eps: float,
                weight_decay: float) -> torch.optim.AdamW:
    """torch's AdamW as the PS and the DDP and single baselines all build it: the fused kernel.
    On a CPU it steps MiniLM-L6's 22.7M parameters in 14 ms against foreach's 74-89 ms
    (bench/optim_step.py, docs/performance.md), time every worker waits for in a PS round. Its
    results differ from foreach's in the last bit of some elements, but not with the thread
    count, so everything built here agrees to the bit."""
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class InPlaceSGD:
    name = "sgd"

    def __init__(self, momentum: float, weight_decay: float, nesterov: bool):
        self.momentum, self.weight_decay, self.nesterov = momentum, weight_decay, nesterov
        self._momentum: dict[int, list[torch.Tensor]] = {}  # allocated at a block's first step

    def step(self, blocks: Blocks, lrs: dict[int, float]) -> None:
        """torch.optim.SGD's operations in its order, so that the result is torch's to the bit
        on the averaged gradient (with one parameter group per learning rate), over every
        block's views at once.

        This step once folded the 1/W averaging into the momentum update, which saved a pass but
        rounded differently whenever W, the round's samples, was not a power of two (every round
        after a drop), and runs parted from DDP's and from the serial reference. torch.optim.SGD
        itself, one per block, steps ResNet-18 as fast (bench/optim_step.py: 18-20 ms, this with
        the store's averaging 18-23 ms, the folded step 16-18 ms) but made the soak's rounds of 16
        workers slower (median 64-77 ms against 51-56 ms folded and 58 ms this way; the tiny
        model's step 0.6 ms against 0.15-0.2 ms): many more small operations, each perhaps
        waiting for the GIL behind the gRPC threads."""
        params, grads, bufs = [], [], []
        for b, (p, g) in blocks.items():
            if b not in self._momentum:
                self._momentum[b] = [torch.zeros_like(t) for t in p]
            params += p
            grads += g
            bufs += self._momentum[b]
        if not params:
            return
        if self.weight_decay:
            torch._foreach_add_(grads, params, alpha=self.weight_decay)
        torch._foreach_mul_(bufs, self.momentum)  # a zero buffer at the first step: torch's clone of g
        torch._foreach_add_(bufs, grads)
        if self.nesterov:  # p -= lr * (g + momentum * buf)
            torch._foreach_add_(grads, bufs, alpha=self.momentum)
        by_lr: dict[float, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}  # one update per distinct rate
        for b, (p, g) in blocks.items():
            group_params, group_steps = by_lr.setdefault(lrs[b], ([], []))
            group_params += p
            group_steps += g if self.nesterov else self._momentum[b]
        for lr, (group_params, group_steps) in by_lr.items():
            torch._foreach_add_(group_params, group_steps, alpha=-lr)

    def drop(self, block: int) -> None:
        self._momentum.pop(block, None)

    def state_dict(self) -> dict:
        return {b: [m.clone() for m in bufs] for b, bufs in self._momentum.items()}

    def load_state_dict(self, state: dict, params: dict[int, list[torch.Tensor]]) -> None:
        for b, bufs in state.items():
            if b not in params or [m.shape for m in bufs] != [p.shape for p in params[b]]:
                raise ValueError(f"SGD momentum of block {b} does not fit its parameters")
        self._momentum = {b: [m.clone() for m in bufs] for b, bufs in state.items()}

    def state_bytes(self) -> int:
        return sum(_nbytes(bufs) for bufs in self._momentum.values())


class TorchAdamW:
    name = "adamw"

    def __init__(self, betas: tuple[float, float], eps: float, weight_decay: float):
        self.betas, self.eps, self.weight_decay = tuple(betas), eps, weight_decay
        self._per_block: dict[int, torch.optim.AdamW] = {}

    def _make(self, params: list[torch.Tensor]) -> torch.optim.AdamW:
        return torch_adamw(params, lr=0.0, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)

    def step(self, blocks: Blocks, lrs: dict[int, float]) -> None:
        for b, (params, grads) in blocks.items():
            opt = self._per_block.get(b)
            if opt is None:
                opt = self._per_block[b] = self._make(params)
            for p, g in zip(params, grads):
                p.grad = g
            opt.param_groups[0]["lr"] = lrs[b]
            opt.step()
            for p in params:
                p.grad = None

    def drop(self, block: int) -> None:
        self._per_block.pop(block, None)

    def state_dict(self) -> dict:
        # Copies: torch's state_dict holds the live moments, and its load_state_dict keeps the
        # tensors it is given (two optimizers would then step the same moments).
        return {b: copy.deepcopy(opt.state_dict()) for b, opt in self._per_block.items()}

    def load_state_dict(self, state: dict, params: dict[int, list[torch.Tensor]]) -> None:
        restored = {}
        for b, saved in state.items():
            if b not in params:
                raise ValueError(f"AdamW state for block {b}, which this server does not train")
            try:
                moments = saved["state"]
                fits = set(moments) <= set(range(len(params[b]))) and all(
                    s[k].shape == params[b][i].shape for i, s in moments.items() for k in ("exp_avg", "exp_avg_sq"))
            except (KeyError, TypeError, AttributeError):
                fits = False
            if not fits:
                raise ValueError(f"AdamW state of block {b} does not fit its parameters")
            opt = self._make(params[b])
            ours = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
            opt.load_state_dict(copy.deepcopy(saved))  # ValueError when its parameter count differs
            # The settings of this run, not the checkpoint's, as for SGD: torch's load_state_dict
            # takes every group setting from the checkpoint, the kernel too (one saved before
            # the fused kernel would step on foreach again).
            opt.param_groups[0].update(ours)
            restored[b] = opt
        self._per_block = restored

    def state_bytes(self) -> int:
        return sum(_nbytes([s["exp_avg"], s["exp_avg_sq"]]) for opt in self._per_block.values()
                   for s in opt.state.values())
