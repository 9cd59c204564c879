"""Per-block storage on the PS: values, gradient accumulators, per-worker staging, optimizer.

Every block owned by this server gets flat float32 buffers allocated once: the values and
an accumulator. A push is held as the received chunks themselves (views into gRPC's
buffers, no copy; a bfloat16 push widened to float32 once), checked whole, then added into
the accumulator in place (the row chunks of a row-sparse tensor with index_add); nothing is
stacked or re-flattened per step. Tensors are views into those buffers. The optimizer
(ps/optim.py) steps those views.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from proto import freezeps_pb2 as pb
from proto.layout import WIRE_DTYPES, BlockLayout
from ps.optim import Optimizer


def _flat(nbytes: int) -> torch.Tensor:
    return torch.zeros(nbytes // 4, dtype=torch.float32)


def as_bytes(flat: torch.Tensor) -> np.ndarray:
    """A writable uint8 numpy view of a flat float32 tensor (shares memory)."""
    return flat.numpy().view(np.uint8)


# Received bytes are read-only and only ever read here, which makes torch's warning about
# non-writable buffers moot. A filter set once, for this module only: warnings.catch_warnings
# per call would be slower and is not thread-safe (gRPC handlers run in several threads).
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning,
                        module=__name__)


def _all_finite(values: torch.Tensor) -> bool:
    # A sum is finite when every term is, and costs a fifteenth of isfinite().all(): only a
    # non-finite sum (NaN, Inf, or a harmless overflow) needs the full scan.
    return bool(torch.isfinite(values.sum())) or bool(torch.isfinite(values).all())


@dataclass
class ReceivedPush:
    """One worker's push as received: (block, first element, values) per byte-range chunk,
    and (block, tensor, row indices, rows' values) per row chunk of a row-sparse tensor.

    `dtype`: what the push travels in (JoinReply.push_dtype). float32 values are views of the
    received bytes, without a copy; bfloat16 ones are widened to float32 here, once, so that
    checking and summing are the same for both."""
    dtype: str = "float32"
    pieces: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)
    rows: list[tuple[int, int, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    sparse_tensors: set[tuple[int, int]] = field(default_factory=set)  # sent as rows, even as none

    def _values(self, data: memoryview) -> torch.Tensor:
        if self.dtype == "float32":
            return torch.frombuffer(data, dtype=torch.float32)
        return torch.frombuffer(data, dtype=getattr(torch, self.dtype)).float()

    def write(self, block: int, start: int, data: memoryview) -> None:
        self.pieces.append((block, start // WIRE_DTYPES[self.dtype], self._values(data)))

    def write_rows(self, block: int, tensor: int, rows: np.ndarray, data: memoryview) -> None:
        self.sparse_tensors.add((block, tensor))
        if len(rows):
            self.rows.append((block, tensor, torch.from_numpy(rows.astype(np.int64)), self._values(data)))


class BlockStore:
    """Values, accumulators and the optimizer's state for the blocks this server owns."""

    def __init__(self, blocks: list[BlockLayout], owned: range, optimizer: Optimizer,
                 lr_scales: list[float] | None = None, pull_dtype: str = "float32"):
        """lr_scales: each block's learning rate as a fraction of the schedule's (default 1.0).
        pull_dtype: what a pull's changes travel in (JoinReply.pull_dtype)."""
        self.blocks = blocks
        self.owned = owned
        self.optimizer = optimizer
        self.pull_dtype = pull_dtype
        # With pull changes narrower than float32: per active block, what the workers hold (the
        # values as they were pulled, each round's rounded change added as the workers add it)
        # and the last round's change, rounded. Error feedback: the next change is taken
        # against what the workers hold, so rounding never accumulates.
        self.held: dict[int, torch.Tensor] = {}
        self.changes: dict[int, torch.Tensor] = {}
        self.lr_scales = lr_scales or [1.0] * len(blocks)
        if len(self.lr_scales) != len(blocks):
            raise ValueError(f"{len(self.lr_scales)} learning-rate scales for {len(blocks)} blocks")
        self.values = {b: _flat(blocks[b].nbytes) for b in owned}
        self.acc = {b: _flat(blocks[b].nbytes) for b in owned}
        self._fresh = True  # the accumulators hold nothing of the current round yet
        # Per block: the parameters' value and accumulator views and the buffers' spans.
        self._params: dict[int, list[torch.Tensor]] = {}
        self._grads: dict[int, list[torch.Tensor]] = {}
        self._buffers: dict[int, list[slice]] = {}
        for b in owned:
            params, grads, buffers = [], [], []
            for t in blocks[b].tensors:
                span = slice(t.offset // 4, (t.offset + t.nbytes) // 4)
                if t.kind == pb.BUFFER:
                    buffers.append(span)
                else:
                    params.append(self.values[b][span])
                    grads.append(self.acc[b][span])
            self._params[b], self._grads[b], self._buffers[b] = params, grads, buffers

    def non_finite(self, push: ReceivedPush) -> str | None:
        """The name of the first tensor of a push holding NaN or Inf, or None."""
        for b, start, values in push.pieces:
            if not _all_finite(values):
                first = (start + int((~torch.isfinite(values)).nonzero()[0])) * 4
                tensor, _ = self.blocks[b].locate(first)
                return self.blocks[b].tensors[tensor].name
        for b, t, _, values in push.rows:
            if not _all_finite(values):
                return self.blocks[b].tensors[t].name
        return None

    def values_as_push(self) -> ReceivedPush:
        """The values, shaped as a push, for the same checks."""
        return ReceivedPush(pieces=[(b, 0, self.values[b]) for b in self.owned])

    def accumulate(self, push: ReceivedPush, weight: float) -> None:
        """acc += weight * push. The round's first push overwrites instead, which spares a
        pass to zero the accumulators (a push always covers every active block whole); only
        the tensors it sent as rows are zeroed first."""
        if self._fresh:
            for b, t in push.sparse_tensors:
                self._matrix(b, t).zero_()
        for b, start, values in push.pieces:
            target = self.acc[b][start:start + len(values)]
            if self._fresh:
                torch.mul(values, weight, out=target)
            else:
                target.add_(values, alpha=weight)
        for b, t, rows, values in push.rows:
            matrix = self._matrix(b, t)
            matrix.index_add_(0, rows, values.view(len(rows), -1), alpha=weight)
        self._fresh = False

    def _matrix(self, b: int, t: int) -> torch.Tensor:
        """Tensor t of block b in the accumulator, as a (rows, row elements) view."""
        tensor = self.blocks[b].tensors[t]
        return self.acc[b][tensor.offset // 4:(tensor.offset + tensor.nbytes) // 4].view(tensor.shape[0], -1)

    def average(self, blocks: range, total_weight: float) -> None:
        """Divide the accumulators by the total weight in place (for engines that read them)."""
        for b in blocks:
            self.acc[b].div_(total_weight)

    def param_grads(self, b: int) -> list[torch.Tensor]:
        """Views of block b's parameter gradients in the accumulator (valid until apply())."""
        return self._grads[b]

    def apply(self, blocks: range, total_weight: float, lr: float) -> list[float]:
        """Set buffers to their average and take one optimizer step on the blocks' parameters
        with the averaged gradient acc / total_weight, block b at lr * lr_scales[b]. Returns each
        block's gradient L2 norm (0.0 outside `blocks`)."""
        norms = [0.0] * len(self.blocks)
        trained = {}
        for b in blocks:
            for span in self._buffers[b]:
                torch.div(self.acc[b][span], total_weight, out=self.values[b][span])
            if self._params[b]:
                norms[b] = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(self._grads[b])))) / total_weight
                trained[b] = (self._params[b], self._grads[b])
        if trained:
            if total_weight != 1.0:  # acc / W, rounded as torch's optimizers expect; the accumulators are scratch
                torch._foreach_div_([g for _, grads in trained.values() for g in grads], total_weight)
            self.optimizer.step(trained, {b: lr * self.lr_scales[b] for b in trained})
        self._fresh = True
        return norms

    def hold(self, blocks: range) -> None:
        """The workers will pull these blocks' values whole: what they hold is the values now."""
        if self.pull_dtype != "float32":
            for b in blocks:
                self.held[b] = self.values[b].clone()
                self.changes.pop(b, None)

    def publish(self, blocks: range) -> None:
        """After apply(): each block's change since the last round, taken against what the
        workers hold and rounded to pull_dtype, and added to what they hold, as a worker adds
        it (a float32 addition of the rounded change, so both get the same bits)."""
        if self.pull_dtype == "float32":
            return
        dtype = getattr(torch, self.pull_dtype)
        for b in blocks:
            scratch = self.acc[b]  # free until the round's first push overwrites it (accumulate)
            torch.sub(self.values[b], self.held[b], out=scratch)
            change = self.changes.get(b)
            if change is None:
                change = self.changes[b] = torch.empty(len(scratch), dtype=dtype)
            change.copy_(scratch)  # rounds to nearest even
            self.held[b].add_(change)

    def pull_bytes(self, b: int, kind: str) -> np.ndarray:
        """What a pull carries of block b (ParameterServer._pull_kind): its "values" or what the
        workers "held", in float32, or its last "change" in pull_dtype."""
        if kind == "change":
            return self.changes[b].view(torch.uint8).numpy()
        return as_bytes(self.values[b] if kind == "values" else self.held[b])

    def freeze(self, blocks: range) -> None:
        """Drop the optimizer state and accumulators of newly frozen blocks (and what the
        workers hold of them: their last pull carries their values)."""
        for b in blocks:
            self.optimizer.drop(b)
            self._grads[b] = []
            self.acc[b] = torch.empty(0)
            self.held.pop(b, None)
            self.changes.pop(b, None)

    def state(self) -> dict:
        """Copies of the values, of what the workers hold (pull changes narrower than float32)
        and of the optimizer's state, for a checkpoint."""
        return {"values": {b: v.clone() for b, v in self.values.items()},
                "held": {b: v.clone() for b, v in self.held.items()},
                "optimizer": {"name": self.optimizer.name, "blocks": self.optimizer.state_dict()}}

    def load_state(self, state: dict) -> None:
        """Restore values and optimizer state; ValueError (nothing changed) when they do not fit
        the blocks or were made by another optimizer."""
        values, optimizer = state["values"], state["optimizer"]
        if set(values) != set(self.owned):
            raise ValueError(f"values for blocks {sorted(values)}, expected {list(self.owned)}")
        for b, v in values.items():
            if v.dtype != torch.float32 or v.shape != self.values[b].shape:
                raise ValueError(f"block {self.blocks[b].name!r}: values {v.dtype} {tuple(v.shape)}, "
                                 f"expected float32 {tuple(self.values[b].shape)}")
        if optimizer["name"] != self.optimizer.name:
            raise ValueError(f"the checkpoint's optimizer is {optimizer['name']!r}, this run's {self.optimizer.name!r}")
        held = state.get("held", {}) if self.pull_dtype != "float32" else {}  # older checkpoints: none
        for b, v in held.items():
            if b not in self.values or v.dtype != torch.float32 or v.shape != self.values[b].shape:
                raise ValueError(f"what the workers hold of block {b}: {v.dtype} {tuple(v.shape)} does not fit")
        self.optimizer.load_state_dict(optimizer["blocks"], self._params)  # checks before it changes anything
        for b, v in values.items():
            self.values[b].copy_(v)
        # Workers join a restored PS afresh and pull whole: what they hold is kept only so that a
        # resumed run goes on with the same bits as one not interrupted.
        self.hold(self.owned)
        for b, v in held.items():
            self.held[b] = v.clone()

    def optimizer_state_bytes(self) -> int:
        return self.optimizer.state_bytes()
