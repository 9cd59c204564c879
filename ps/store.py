"""Per-block storage on the PS: values, gradient accumulators, per-worker staging, optimizer.

Every block owned by this server gets flat float32 buffers allocated once: the values and
an accumulator. A push is held as the received chunks themselves (views into gRPC's
buffers, no copy), checked whole, then added into the accumulator in place; nothing is
stacked or re-flattened per step. Tensors are views into those buffers.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from proto import freezeps_pb2 as pb
from proto.layout import BlockLayout


def _flat(nbytes: int) -> torch.Tensor:
    return torch.zeros(nbytes // 4, dtype=torch.float32)


def as_bytes(flat: torch.Tensor) -> np.ndarray:
    """A writable uint8 numpy view of a flat float32 tensor (shares memory)."""
    return flat.numpy().view(np.uint8)


def _float_view(data: memoryview) -> torch.Tensor:
    """float32 view of received bytes, without a copy. The bytes are read-only and are
    only ever read, which makes torch's warning about writable buffers moot here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=torch.float32)


@dataclass
class ReceivedPush:
    """One worker's push as received: (block, first element, values) per chunk."""
    pieces: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)

    def write(self, block: int, start: int, data: memoryview) -> None:
        self.pieces.append((block, start // 4, _float_view(data)))


class BlockStore:
    def __init__(self, blocks: list[BlockLayout], owned: range, *,
                 momentum: float, weight_decay: float, nesterov: bool = False):
        self.blocks = blocks
        self.owned = owned
        self.values = {b: _flat(blocks[b].nbytes) for b in owned}
        self.acc = {b: _flat(blocks[b].nbytes) for b in owned}
        self._params: dict[int, list[torch.Tensor]] = {}
        self._buffers: dict[int, list[slice]] = {}
        groups = []
        for b in owned:
            params, buffers = [], []
            for t in blocks[b].tensors:
                span = slice(t.offset // 4, (t.offset + t.nbytes) // 4)
                if t.kind == pb.BUFFER:
                    buffers.append(span)
                    continue
                value = self.values[b][span].view(t.shape)
                value.grad = self.acc[b][span].view(t.shape)  # the averaged gradient, in place
                params.append(value)
            self._params[b], self._buffers[b] = params, buffers
            if params:
                groups.append({"params": params, "block": b})
        # torch's own SGD (foreach kernels) on views of the flat buffers: one param group
        # per block, so a frozen block's group and momentum can be dropped.
        self.optimizer = torch.optim.SGD(groups or [{"params": [torch.zeros(1)], "block": -1}],
                                         lr=0.0, momentum=momentum, weight_decay=weight_decay,
                                         nesterov=nesterov, foreach=True)

    def non_finite(self, pieces: list[tuple[int, int, torch.Tensor]]) -> str | None:
        """The name of the first tensor holding NaN or Inf, or None."""
        for b, start, values in pieces:
            # A sum is finite when every term is, and costs a fifteenth of isfinite().all():
            # only a non-finite sum (NaN, Inf, or a harmless overflow) needs the full scan.
            if bool(torch.isfinite(values.sum())) or bool(torch.isfinite(values).all()):
                continue
            first = (start + int((~torch.isfinite(values)).nonzero()[0])) * 4
            tensor, _ = self.blocks[b].locate(first)
            return self.blocks[b].tensors[tensor].name
        return None

    def values_pieces(self) -> list[tuple[int, int, torch.Tensor]]:
        return [(b, 0, self.values[b]) for b in self.owned]

    def accumulate(self, push: ReceivedPush, weight: float) -> None:
        for b, start, values in push.pieces:
            self.acc[b][start:start + len(values)].add_(values, alpha=weight)

    def apply(self, blocks: range, total_weight: float, lr: float) -> list[float]:
        """Average the accumulators, set buffers, take one optimizer step on `blocks`.

        Returns the L2 norm of each block's averaged gradient (0.0 outside `blocks`).
        """
        norms = [0.0] * len(self.blocks)
        for b in blocks:
            self.acc[b].div_(total_weight)
            for span in self._buffers[b]:
                self.values[b][span].copy_(self.acc[b][span])
            grads = [p.grad for p in self._params[b]]
            if grads:
                norms[b] = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
        # Frozen blocks' groups were removed by freeze(): every group left is active.
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        for b in blocks:
            self.acc[b].zero_()
        return norms

    def freeze(self, blocks: range) -> None:
        """Drop the optimizer state (momentum) and accumulators of newly frozen blocks."""
        frozen = set(blocks)
        keep = []
        for group in self.optimizer.param_groups:
            if group["block"] in frozen:
                for p in group["params"]:
                    self.optimizer.state.pop(p, None)
                    p.grad = None
            else:
                keep.append(group)
        self.optimizer.param_groups[:] = keep
        for b in frozen:
            self.acc[b] = torch.empty(0)

    def optimizer_state_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for s in self.optimizer.state.values()
                   for v in s.values() if isinstance(v, torch.Tensor))
