"""Bind a BlockModel's tensors to one flat buffer per block, in the wire's block layout.

After binding, every parameter and float buffer of block b is a view into values[b], and
every parameter's .grad a view into grads[b]. A pull writes chunks straight into
values[b] (or, with narrower pull changes, adds them to held[b] and copies that into
values[b]; of an embedding matrix, only the rows the next batch reads, where the pull asked
for those); a push sends grads[b] (with the running statistics copied into their slots)
as it is, or rounded to the PS's push dtype in one copy: no per-step flattening or
unflattening.

On a GPU the model's flat buffers live there and the wire's in host memory (pinned), one
copy each way a round: a pull lands in the host's buffer and each block is copied up as soon
as all of it has come, a push's gradients are copied down a block at a time before they are
sent. On the CPU the two are one.
"""
from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from proto import freezeps_pb2 as pb
from proto.layout import WIRE_DTYPES, BlockLayout, layout_from_manifest, wire_layout
from proto.transport import SparseRows, WireError, copy_into, row_requests, sparse_rows
from worker.models import BlockModel

# A pull's changes are read straight from gRPC's read-only buffers and only read: torch's
# warning about non-writable buffers is moot (as in ps/store.py). Set once, for this module.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning,
                        module=__name__)


def _tensors(block: torch.nn.Module):
    """(name, module, attribute, tensor, kind) for every parameter and float buffer, in order."""
    for mod_name, module in block.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            yield (f"{mod_name}.{attr}" if mod_name else attr), module, attr, p, pb.PARAMETER
        for attr, buf in module.named_buffers(recurse=False):
            if buf is not None and buf.is_floating_point():
                yield (f"{mod_name}.{attr}" if mod_name else attr), module, attr, buf, pb.BUFFER


def manifest_for(model: BlockModel, row_sparse: bool = False) -> pb.Manifest:
    """The model's manifest; with row_sparse, embedding matrices are marked row_sparse (a push
    may carry their gradients as the nonzero rows, a pull only some of their rows)."""
    manifest = pb.Manifest(model=model.model_name)
    for name, block in zip(model.block_names, model.blocks):
        spec = manifest.blocks.add(name=name)
        for tname, module, attr, t, kind in _tensors(block):
            sparse = row_sparse and isinstance(module, torch.nn.Embedding) and attr == "weight"
            spec.tensors.add(name=f"{name}/{tname}", shape=list(t.shape), dtype=str(t.dtype).removeprefix("torch."),
                             kind=kind, row_sparse=sparse)
    return manifest


def _known(dtype: str, what_the_ps: str) -> str:
    """A wire dtype the PS named at Join ("" is float32), or ValueError saying what it asked."""
    dtype = dtype or "float32"
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"the PS {what_the_ps} {dtype!r}, which this worker does not know (it knows "
                         f"{sorted(WIRE_DTYPES)})")
    return dtype


class FlatModel:
    def __init__(self, model: BlockModel, sparse_push: bool = False, device: torch.device = torch.device("cpu"),
                 host_staging: bool | None = None, sparse_pull: bool = False):
        """Moves `model` to `device` and binds it. `sparse_push`: embedding gradients travel as
        their nonzero rows where that is smaller; `sparse_pull`: a pull may ask for only the
        embedding rows the next batch reads (rows_asked). `host_staging`: the wire's buffers
        apart from the model's; None: where the device is not the CPU (tests force it on the
        CPU, to check the copies without a GPU)."""
        self.model = model.to(device)
        staged = device.type != "cpu" if host_staging is None else host_staging
        pinned = staged and device.type == "cuda"
        self.sparse_push, self.sparse_pull = sparse_push, sparse_pull
        self.manifest = manifest_for(model, sparse_push or sparse_pull)
        self.layout: list[BlockLayout] = layout_from_manifest(self.manifest)
        self._tensor_index = {t.name: (b, i) for b, layout in enumerate(self.layout)
                              for i, t in enumerate(layout.tensors)}
        self.push_dtype = "float32"
        self.push_layout: list[BlockLayout] = self.layout  # how a push carries the blocks
        self._narrow: list[torch.Tensor] = []  # per block, the push in push_dtype (not float32)
        self.pull_dtype = "float32"
        self.change_layout: list[BlockLayout] = self.layout  # how a pull carries a block's change
        # With changes narrower than float32: per block, the values as pulled, the changes
        # added, as the PS adds them to its copy (the model's own values drift from it: a
        # training forward updates BatchNorm's running statistics in place).
        self.held: list[torch.Tensor] = []
        # The step of the last pull, once all of it landed (the client sets it); None: none since the Join.
        self.pulled_step: int | None = None
        # Blocks whose held copy is not what the PS holds for this worker: their last pull
        # carried only some rows. A change cannot be added to them until they come whole.
        self._held_stale: set[int] = set()
        self.values: list[torch.Tensor] = []  # the model's, on its device
        self.grads: list[torch.Tensor] = []
        # The wire's copies in host memory: the same tensors as values and grads without staging.
        self._host_values: list[torch.Tensor] = []
        self._host_grads: list[torch.Tensor] = []
        self._buffer_slots: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        self._param_grads: list[list[torch.Tensor]] = []
        for block, layout in zip(model.blocks, self.layout):
            values = torch.empty(layout.nbytes // 4, device=device)
            grads = torch.zeros(layout.nbytes // 4, device=device)
            slots, param_grads = [], []
            for (_, module, attr, t, kind), spec in zip(_tensors(block), layout.tensors):
                span = slice(spec.offset // 4, (spec.offset + spec.nbytes) // 4)
                view = values[span].view(t.shape)
                view.copy_(t.detach())
                if kind == pb.PARAMETER:
                    t.data = view
                    t.grad = grads[span].view(t.shape)
                    param_grads.append(grads[span])
                else:
                    module._buffers[attr] = view
                    slots.append((view, grads[span]))
            self.values.append(values)
            self.grads.append(grads)
            self._host_values.append(torch.empty(len(values), pin_memory=pinned).copy_(values) if staged else values)
            self._host_grads.append(torch.empty(len(grads), pin_memory=pinned) if staged else grads)
            self._buffer_slots.append(slots)
            self._param_grads.append(param_grads)

    def value_bytes(self, b: int) -> np.ndarray:
        """Block b's values as they are now (what an Init uploads)."""
        return self._on_host(self.values, self._host_values, b).numpy().view(np.uint8)

    @staticmethod
    def _on_host(tensors: list[torch.Tensor], host: list[torch.Tensor], b: int) -> torch.Tensor:
        """Block b of `tensors` in its host copy `host[b]` (copied there if it is not the same)."""
        if host[b] is not tensors[b]:
            host[b].copy_(tensors[b])
        return host[b]

    def set_push_dtype(self, dtype: str) -> None:
        """Push in `dtype` from now on (what the PS's JoinReply.push_dtype says; "" is float32)."""
        dtype = _known(dtype, "asks for pushes in")
        self.push_dtype = dtype
        self.push_layout = wire_layout(self.layout, dtype)
        self._narrow = [] if dtype == "float32" else [torch.empty(len(g), dtype=getattr(torch, dtype))
                                                       for g in self.grads]

    def set_pull_dtype(self, dtype: str) -> None:
        """Take pulls' changes in `dtype` (JoinReply.pull_dtype; "" is float32), from a Join on:
        the first pull after it carries whole values."""
        dtype = _known(dtype, "sends pull changes in")
        self.pull_dtype = dtype
        self.change_layout = wire_layout(self.layout, dtype)
        self.held = [] if dtype == "float32" else [torch.empty_like(v) for v in self._host_values]
        self.pulled_step = None
        self._held_stale = set()

    def rows_asked(self, reads: dict[str, torch.Tensor], first_block: int) -> list[pb.TensorRows]:
        """What a pull asks of the row-sparse tensors of blocks from `first_block` on, given the
        rows the next step reads of them (`reads`, by manifest name: BlockModel.rows_read);
        nothing without sparse_pull."""
        asked = []
        for name, rows in reads.items() if self.sparse_pull else ():
            b, t = self._tensor_index[name]
            if b >= first_block:
                asked.append(pb.TensorRows(block=b, tensor=t, rows=rows.numpy().astype("<u4").tobytes()))
        return asked

    def pull_base(self, asked: Sequence[pb.TensorRows] = ()) -> int | None:
        """The base_step a pull asking `asked` may name: the last pull's step, unless a block
        whose held copy is stale would come as a change (it comes whole without a base)."""
        return None if self._held_stale - {a.block for a in asked} else self.pulled_step

    def pull_sink(self, header: pb.PullHeader, asked: Sequence[pb.TensorRows] = ()) -> PullSink:
        """Where a pull's chunks go: values are copied into the model, changes added to what this
        worker holds, the rows asked for written into their matrices; PullSink.land(b) once all
        of block b has come."""
        return PullSink(self, header, asked)

    def _land(self, b: int, changed: bool, partial: bool, frozen_blocks: int) -> None:
        """All of block b's pull has come (`changed`: as a change; `partial`: of a row-sparse
        tensor only the rows asked for): the model's values of it are what this worker holds."""
        if changed:
            self.values[b].copy_(self.held[b])
            return
        if self._host_values[b] is not self.values[b]:
            self.values[b].copy_(self._host_values[b])
        if partial:  # its other rows are older than what the PS holds for the workers
            if self.held:
                self._held_stale.add(b)
            return
        self._held_stale.discard(b)
        if self.held and b >= frozen_blocks:  # a frozen block is not pulled again
            self.held[b].copy_(self._host_values[b])

    def push_bytes(self, b: int) -> np.ndarray:
        """Block b's push payload in push_layout: parameter gradients, and running statistics in
        their slots."""
        for value, slot in self._buffer_slots[b]:
            slot.copy_(value.reshape(-1))
        grads = self._on_host(self.grads, self._host_grads, b)
        if not self._narrow:
            return grads.numpy().view(np.uint8)
        self._narrow[b].copy_(grads)  # rounds to nearest even
        return self._narrow[b].view(torch.uint8).numpy()

    def push_rows(self, b: int) -> SparseRows:
        """Block b's row-sparse gradients that are cheaper as their nonzero rows: {tensor: (rows,
        values in push_dtype)}; none without sparse_push. Call after push_bytes(b)."""
        if not self.sparse_push:
            return {}
        sparse = sparse_rows(self.layout[b], self._host_grads[b].numpy(), WIRE_DTYPES[self.push_dtype])
        if not self._narrow:
            return sparse
        dtype = getattr(torch, self.push_dtype)
        # numpy has no bfloat16: the rounded values travel as their raw 16-bit patterns.
        return {t: (rows, torch.from_numpy(values).to(dtype).view(torch.int16).numpy())
                for t, (rows, values) in sparse.items()}

    def values_by_name(self) -> dict[str, torch.Tensor]:
        """A copy of every tensor's value by manifest name (the names the PS saves under), on the CPU."""
        return {t.name: self.values[b][t.offset // 4:(t.offset + t.nbytes) // 4].view(t.shape).to("cpu", copy=True)
                for b, layout in enumerate(self.layout) for t in layout.tensors}

    def param_grads(self, b: int) -> list[torch.Tensor]:
        """Views of block b's parameter gradients (what a vote is computed from)."""
        return self._param_grads[b]

    def zero_grads(self, first_block: int) -> None:
        for g in self.grads[first_block:]:
            g.zero_()


class GradsReady:
    """Which blocks' gradients this step's backward pass has finished, so that a push can send a
    block while backward still computes the blocks before it (it finishes the last block first).

    A block is done once every parameter of it that takes a gradient has had this step's
    accumulated (a post-accumulate-grad hook, which runs where autograd runs: another thread
    than the push's); `finish()`, called when backward has returned, marks every block done,
    which also covers a parameter that got no gradient this step. In votes mode `cast(vote)`
    then hands the push the vote worked out from the whole gradient, which it sends last.
    `abandon()` (backward or the vote failed) makes every wait raise, so a push under way is
    cancelled rather than sent half-computed."""

    def __init__(self, flat: FlatModel):
        self._lock = threading.Lock()
        self._done = [threading.Event() for _ in flat.layout]
        self._params = [[t for _, _, _, t, kind in _tensors(block) if kind == pb.PARAMETER]
                        for block in flat.model.blocks]
        self._left = [0] * len(self._params)  # per block, parameters still to come this step
        self._voted = threading.Event()
        self._vote = pb.Vote()
        self._failed = False
        for b, params in enumerate(self._params):
            for p in params:
                p.register_post_accumulate_grad_hook(lambda _, b=b: self._accumulated(b))

    def arm(self, first_block: int) -> None:
        """Before a step's backward through blocks first_block onwards."""
        with self._lock:
            self._failed = False
            self._voted.clear()
            for b, params in enumerate(self._params):
                self._left[b] = sum(p.requires_grad for p in params) if b >= first_block else 0
                self._done[b].clear()
                if self._left[b] == 0:  # no gradient to wait for: frozen, or running statistics only
                    self._done[b].set()

    def _accumulated(self, b: int) -> None:
        with self._lock:
            self._left[b] -= 1
            if self._left[b] == 0:
                self._done[b].set()

    def finish(self) -> None:
        for done in self._done:
            done.set()

    def cast(self, vote: pb.Vote) -> None:
        """After finish(), in votes mode: this step's vote (an abstention where it tests nothing)."""
        self._vote = vote
        self._voted.set()

    def abandon(self) -> None:
        with self._lock:
            self._failed = True
        self.finish()
        self._voted.set()

    def wait(self, b: int) -> None:
        """Block until backward has finished block b; RuntimeError if it failed."""
        self._done[b].wait()
        if self._failed:
            raise RuntimeError("backward failed: the push is abandoned")

    def vote(self) -> pb.Vote:
        """Block until the step's vote is cast; RuntimeError if backward or the vote failed."""
        self._voted.wait()
        if self._failed:
            raise RuntimeError("backward or the vote failed: the push is abandoned")
        return self._vote


class ValuesReady:
    """Which blocks of the pull under way have landed in the model, so that the forward pass can
    run a block while the pull still brings the ones after it (it brings them in block order).

    A forward pre-hook on each block waits for the block's values: at once where no pull is
    under way or the block is not in it (frozen). `arm(blocks)` when a pull's header has come,
    before its chunks are taken; `landed(b)` as each block lands (PullSink.land, in the pull's
    thread); `fail(error)` when the pull broke off: a forward waiting for a block that did not
    land raises `error` (the step is abandoned, the worker joins again). `waited_s`: how long
    forwards waited since the last arm, the part of the pull they did not hide."""

    def __init__(self, flat: FlatModel):
        self._landed = [threading.Event() for _ in flat.layout]
        self._error: BaseException | None = None
        self._lost: frozenset[int] = frozenset()  # the blocks the last pull broke off before
        self.waited_s = 0.0
        for event in self._landed:
            event.set()
        for b, block in enumerate(flat.model.blocks):
            block.register_forward_pre_hook(lambda module, args, b=b: self.wait(b))

    def arm(self, blocks: Sequence[int]) -> None:
        self._error, self._lost, self.waited_s = None, frozenset(), 0.0
        for b in blocks:
            self._landed[b].clear()

    def landed(self, b: int) -> None:
        self._landed[b].set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._lost = frozenset(b for b, event in enumerate(self._landed) if not event.is_set())
        for event in self._landed:
            event.set()

    def wait(self, b: int) -> None:
        """Block until block b has landed; the pull's error if it broke off before."""
        if not self._landed[b].is_set():
            started = time.perf_counter()
            self._landed[b].wait()
            self.waited_s += time.perf_counter() - started
        if b in self._lost:
            raise self._error


class PullSink:
    """One pull's sinks (a ChunkReceiver's write, write_rows and landed) into a FlatModel, and
    what came of the rows it asked for: each row-sparse tensor asked for comes whole (a block
    that has just frozen) or as exactly the rows asked, which `partial` lists by block."""

    def __init__(self, flat: FlatModel, header: pb.PullHeader, asked: Sequence[pb.TensorRows]):
        self._flat = flat
        self._frozen_blocks = header.freeze.frozen_blocks
        self._changed = {b for b, delta in zip(header.blocks, header.delta) if delta}
        self.layouts = [flat.change_layout[b] if b in self._changed else layout for b, layout in enumerate(flat.layout)]
        self._copy = copy_into({b: flat._host_values[b].numpy().view(np.uint8) for b in header.blocks
                                if b not in self._changed})
        self._asked = row_requests(asked, flat.layout)
        self._change_dtype, self._change_size = getattr(torch, flat.pull_dtype), WIRE_DTYPES[flat.pull_dtype]
        self._rows_got: dict[tuple[int, int], int] = {}  # (block, tensor) -> rows written so far
        self.partial: set[int] = set()

    def write(self, block: int, start: int, data: memoryview) -> None:
        if block in self._changed:  # the same float32 addition of the rounded change as the PS's (BlockStore.publish)
            size = self._change_size
            self._flat.held[block][start // size:(start + len(data)) // size].add_(
                torch.frombuffer(data, dtype=self._change_dtype))
        else:
            self._copy(block, start, data)

    def write_rows(self, block: int, tensor: int, rows: np.ndarray, data: memoryview) -> None:
        """Rows of a tensor this pull asked rows of, in float32: they must be the next of those asked."""
        wanted = self._asked.get(block, {}).get(tensor)
        if wanted is None or block in self._changed:
            raise WireError(f"pull: row chunk for tensor {tensor} of block {block}, whose rows were not asked for")
        got = self._rows_got.get((block, tensor), 0)
        if not np.array_equal(rows, wanted[got:got + len(rows)]):
            raise WireError(f"pull: row chunk for tensor {tensor} of block {block} with rows other than those asked")
        self._rows_got[block, tensor] = got + len(rows)
        self.partial.add(block)
        spec = self._flat.layout[block].tensors[tensor]
        matrix = self._flat._host_values[block][spec.offset // 4:(spec.offset + spec.nbytes) // 4].view(spec.shape[0], -1)
        matrix[torch.from_numpy(rows.astype(np.int64))] = torch.frombuffer(data, dtype=torch.float32).view(len(rows), -1)

    def land(self, block: int) -> None:
        """All of `block` has come: every tensor of it that came as rows got all the rows asked
        of it, and the model's values of it are now what this worker holds."""
        for (b, tensor), got in self._rows_got.items():
            if b == block and got != len(self._asked[b][tensor]):
                raise WireError(f"pull: tensor {tensor} of block {b} got {got} of the "
                                f"{len(self._asked[b][tensor])} rows asked")
        self._flat._land(block, block in self._changed, block in self.partial, self._frozen_blocks)
