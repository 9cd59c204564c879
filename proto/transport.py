"""Moving blocks as chunks, and counting every byte that moves.

This is the one place bytes are counted (ps-lite keeps its counters in its transport):
`ByteMeter.count` is called by `metered()` for every message either side sends or
receives, and nowhere else.
"""
from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from proto.codec import Frame, RawChunk, encode_chunk
from proto.layout import WIRE_DTYPES, BlockLayout, TensorLayout

# Room for a chunk's header and gRPC's framing under the 4 MB default limit.
MAX_CHUNK_BYTES = 4 * (1 << 20) - 4096
# Limits both ends set on every channel: the default receive limit, written down
# so nothing depends on raising it.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 4 * (1 << 20)),
    ("grpc.max_receive_message_length", 4 * (1 << 20)),
]
KEEPALIVE_S = 30.0  # the default of --keepalive-s


def keepalive_options(keepalive_s: float) -> list[tuple[str, int]]:
    """HTTP/2 keepalive for either end (gRPC core's channel arguments, doc/keepalive.md): after
    `keepalive_s` without a frame, ping the peer, and close the connection when it has not
    answered within as long again. TCP alone notices a peer whose host vanished (no RST: power
    loss, a cut link, a stopped process) only after hours: a worker would wait out its RPC
    deadline, and the PS would keep a handler thread on a dead push stream. 0: no pings.

    Pings go out also between calls and however long no data moved (a pull waiting for its
    round sends none); a peer's pings are accepted as often as twice a second (a PS must not
    refuse the workers' pings as too many: keepalive_s is 0 or at least 1, freezeps.config)."""
    accept = [("grpc.http2.min_recv_ping_interval_without_data_ms", 500)]
    if keepalive_s <= 0:
        return accept
    ms = max(1, int(keepalive_s * 1000))
    # grpc.http2.ping_timeout_ms: how long the chttp2 transport of gRPC core (grpcio 1.85) waits for a
    # ping's acknowledgement before it closes the connection; without it, a minute, whatever the
    # keepalive timeout (an internal argument: chttp2 transport's internal.h).
    return [("grpc.keepalive_time_ms", ms), ("grpc.keepalive_timeout_ms", ms), ("grpc.http2.ping_timeout_ms", ms),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0), *accept]


class WireError(ValueError):
    """A chunk stream that does not match the layout (unknown block, bad offset, ...)."""


SparseRows = dict[int, tuple[np.ndarray, np.ndarray]]  # tensor index -> (uint32 row indices, those rows' values)


def iter_chunks(block: BlockLayout, data: np.ndarray, chunk_bytes: int,
                sparse: SparseRows | None = None) -> Iterator[Frame]:
    """Cut one block's flat bytes (`data`, a uint8 array of block.nbytes) into encoded chunks.

    Tensors in `sparse` (row-sparse ones, in a push) go as row chunks of their nonzero rows
    instead of their bytes; byte-range chunks stop short of them."""
    view = memoryview(data)
    pos = 0
    for t in sorted(sparse or ()):
        tensor = block.tensors[t]
        yield from _byte_chunks(block, view, pos, tensor.offset, chunk_bytes)
        rows, values = sparse[t]
        per_chunk = max(chunk_bytes // tensor.row_bytes, 1)
        for first in range(0, max(len(rows), 1), per_chunk):
            part = rows[first:first + per_chunk]
            yield encode_chunk(block.index, t, 0, memoryview(values[first:first + per_chunk].reshape(-1).view(np.uint8)),
                               memoryview(part.astype("<u4", copy=False).view(np.uint8)))
        pos = tensor.offset + tensor.nbytes
    yield from _byte_chunks(block, view, pos, block.nbytes, chunk_bytes)


def _byte_chunks(block: BlockLayout, view: memoryview, pos: int, end: int, chunk_bytes: int) -> Iterator[Frame]:
    while pos < end:
        stop = min(pos + chunk_bytes, end)
        tensor, offset = block.locate(pos)
        yield encode_chunk(block.index, tensor, offset, view[pos:stop])
        pos = stop


def sparse_rows(block: BlockLayout, grads: np.ndarray, element_bytes: int = 4) -> SparseRows:
    """The block's row-sparse tensors that are cheaper as their nonzero rows, from its flat
    float32 gradient (`block`: its float32 layout), when each value travels in `element_bytes`:
    {tensor index: (rows, float32 values)}; the others stay out (sent dense)."""
    sparse = {}
    for i, t in enumerate(block.tensors):
        if t.row_sparse:
            rows = nonzero_rows(grads[t.offset // 4:(t.offset + t.nbytes) // 4], t.shape[1], element_bytes)
            if rows is not None:
                sparse[i] = rows
    return sparse


def nonzero_rows(grad: np.ndarray, row_elems: int, element_bytes: int = 4) -> tuple[np.ndarray, np.ndarray] | None:
    """(row indices, rows) of a row-major gradient's nonzero rows, when sending them with their
    indices takes fewer bytes than the dense tensor, each value in `element_bytes`; else None."""
    matrix = grad.reshape(-1, row_elems)
    rows = np.flatnonzero(matrix.any(axis=1)).astype(np.uint32)
    if len(rows) * (row_elems * element_bytes + 4) >= matrix.size * element_bytes:
        return None
    return rows, np.ascontiguousarray(matrix[rows])


def rows_error(rows: np.ndarray, tensor: TensorLayout, first_allowed: int = 0) -> str | None:
    """Why `rows` (uint32 row indices) cannot name rows of `tensor`, from `first_allowed` on
    (strictly increasing, within the tensor); None when they can."""
    if len(rows) and (int(rows[0]) < first_allowed or int(rows[-1]) >= tensor.shape[0]
                      or (len(rows) > 1 and bool((np.diff(rows.astype(np.int64)) <= 0).any()))):
        return (f"row indices of tensor {tensor.name!r} must be strictly increasing and below "
                f"{tensor.shape[0]}")
    return None


RowRequests = dict[int, dict[int, np.ndarray]]  # block -> tensor index -> uint32 rows asked for


def row_requests(entries, blocks: Sequence[BlockLayout]) -> RowRequests:
    """A PullRequest's `rows` (TensorRows messages) checked against the layout: each names a
    row-sparse tensor once, with well-formed row indices. WireError says what is wrong."""
    asked: RowRequests = {}
    for entry in entries:
        if entry.block >= len(blocks) or entry.tensor >= len(blocks[entry.block].tensors):
            raise WireError(f"rows asked of tensor {entry.tensor} of block {entry.block}, which the model lacks")
        tensor = blocks[entry.block].tensors[entry.tensor]
        if not tensor.row_sparse:
            raise WireError(f"rows asked of tensor {tensor.name!r}, which the manifest does not mark row_sparse")
        if entry.tensor in asked.get(entry.block, {}):
            raise WireError(f"rows of tensor {tensor.name!r} asked for twice")
        if len(entry.rows) % 4:
            raise WireError(f"row indices of {len(entry.rows)} bytes: not a whole number of uint32")
        rows = np.frombuffer(entry.rows, dtype="<u4")
        if why := rows_error(rows, tensor):
            raise WireError(why)
        asked.setdefault(entry.block, {})[entry.tensor] = rows
    return asked


def copy_into(dest: dict[int, np.ndarray]) -> Callable[[int, int, memoryview], None]:
    """A ChunkReceiver sink that copies each chunk into dest[block] (uint8 arrays) at its offset."""
    def write(block: int, start: int, data: memoryview) -> None:
        dest[block][start:start + len(data)] = np.frombuffer(data, dtype=np.uint8)
    return write


class ChunkReceiver:
    """Checks an in-order chunk stream against the layout and hands each chunk to a sink.

    `expected` lists the blocks that must arrive, in order; `write(block, start, data)`
    receives every accepted chunk with its byte offset in the block. Row chunks are accepted
    only with a `write_rows(block, tensor, rows, data)` sink (a push, or a pull that asked for
    rows). `landed(block)`, where given, is called once for each expected block, in order, as
    soon as all of it has come: its last byte, or, where it ends with row chunks, when a chunk
    of another tensor follows them or the stream ends (a pull's blocks then serve the forward
    pass while the later ones arrive). Raises WireError on the first bad chunk; the caller
    decides what to do with what the sink already got.
    """

    def __init__(self, blocks: Sequence[BlockLayout], expected: Sequence[int],
                 write: Callable[[int, int, memoryview], None], chunk_bytes: int,
                 write_rows: Callable[[int, int, np.ndarray, memoryview], None] | None = None,
                 landed: Callable[[int], None] | None = None):
        self._blocks = blocks
        self._expected = list(expected)
        self._write = write
        self._write_rows = write_rows
        self._landed = landed
        self._chunk_bytes = chunk_bytes
        self._i = 0  # index into expected of the block being received
        self._pos = 0  # bytes of it received so far
        self._landed_upto = 0  # expected[:this] were handed to landed
        # (block, tensor, next allowed row) while row chunks of one tensor may go on arriving
        self._rows_open: tuple[int, int, int] | None = None

    def accept(self, chunk: RawChunk) -> None:
        if chunk.block >= len(self._blocks):
            raise WireError(f"chunk names unknown block {chunk.block} (model has {len(self._blocks)})")
        continuing = self._continues_rows(chunk)
        if not continuing:  # the blocks before this chunk have all come
            self._land(self._i)
        if chunk.rows is not None:
            self._accept_rows(chunk, continuing)
        else:
            self._accept_bytes(chunk)
        if self._rows_open is None:  # (after a row chunk, more rows of its tensor may follow)
            self._land(self._i)

    def _continues_rows(self, chunk: RawChunk) -> bool:
        """Whether `chunk` carries more rows of the tensor the last chunk carried rows of."""
        return chunk.rows is not None and self._rows_open is not None and \
            self._rows_open[:2] == (chunk.block, chunk.tensor)

    def _land(self, upto: int) -> None:
        while self._landed is not None and self._landed_upto < upto:
            self._landed(self._expected[self._landed_upto])
            self._landed_upto += 1

    def _accept_bytes(self, chunk: RawChunk) -> None:
        self._rows_open = None
        if chunk.block != self._expected_block():
            want = self._expected_block()
            raise WireError(f"chunk for block {chunk.block} out of order or not expected here (expected block {want})")
        block = self._blocks[chunk.block]
        if chunk.tensor >= len(block.tensors):
            raise WireError(f"chunk names unknown tensor {chunk.tensor} of block {block.name!r} "
                            f"({len(block.tensors)} tensors)")
        tensor = block.tensors[chunk.tensor]
        if chunk.offset >= max(tensor.nbytes, 1):
            raise WireError(f"offset {chunk.offset} is past the end of tensor {tensor.name!r} ({tensor.nbytes} bytes)")
        start = block.block_offset(chunk.tensor, chunk.offset)
        if start != self._pos:
            raise WireError(f"block {block.name!r}: chunk starts at byte {start}, expected {self._pos} "
                            "(chunks must be in order, without gaps or overlaps)")
        n = len(chunk.data)
        if n == 0 or n > self._chunk_bytes:
            raise WireError(f"chunk of {n} bytes; must be 1..{self._chunk_bytes}")
        size = WIRE_DTYPES[tensor.dtype]  # a block's tensors share one dtype
        if n % size or start % size:
            raise WireError(f"chunk of {n} bytes at {start} is not aligned to {tensor.dtype} ({size} bytes)")
        if start + n > block.nbytes:
            raise WireError(f"chunk runs {start + n - block.nbytes} bytes past the end of block {block.name!r}")
        self._write(chunk.block, start, chunk.data)
        self._advance(block, n)

    def _expected_block(self) -> int | str:
        """The block the next chunk must belong to; "none" once every expected block arrived."""
        return self._expected[self._i] if self._i < len(self._expected) else "none"

    def _advance(self, block: BlockLayout, n: int) -> None:
        self._pos += n
        if self._pos == block.nbytes:
            self._i += 1
            self._pos = 0

    def _accept_rows(self, chunk: RawChunk, continuing: bool) -> None:
        """A row chunk; `continuing`: it carries more rows of the tensor the last chunk did."""
        if self._write_rows is None:
            raise WireError("row chunks are allowed only in a push or a pull that asked for rows")
        block = self._blocks[chunk.block]
        if chunk.tensor >= len(block.tensors) or not block.tensors[chunk.tensor].row_sparse:
            raise WireError(f"row chunk for tensor {chunk.tensor} of block {block.name!r}, which the manifest "
                            "does not mark row_sparse")
        tensor = block.tensors[chunk.tensor]
        if not continuing:  # the first row chunk stands where the tensor's bytes would
            want = self._expected_block()
            if chunk.block != want or self._pos != tensor.offset:
                raise WireError(f"row chunk for tensor {tensor.name!r} out of order (expected block {want} "
                                f"at byte {self._pos})")
        if chunk.offset:
            raise WireError(f"row chunk with offset {chunk.offset}; row chunks carry offset 0")
        if continuing and not chunk.rows:  # else a stream of them would never end
            raise WireError(f"row chunk of tensor {tensor.name!r} continues without rows")
        if len(chunk.rows) % 4:
            raise WireError(f"row indices of {len(chunk.rows)} bytes: not a whole number of uint32")
        rows = np.frombuffer(chunk.rows, dtype="<u4")
        n = len(chunk.data)
        if n != len(rows) * tensor.row_bytes:
            raise WireError(f"row chunk of tensor {tensor.name!r}: {n} bytes of data for {len(rows)} rows "
                            f"of {tensor.row_bytes} bytes")
        if n > self._chunk_bytes:
            raise WireError(f"chunk of {n} bytes; must be 1..{self._chunk_bytes}")
        first_allowed = self._rows_open[2] if continuing else 0
        if why := rows_error(rows, tensor, first_allowed):
            raise WireError(f"row chunk: {why}, across the tensor's chunks")
        self._write_rows(chunk.block, chunk.tensor, rows, chunk.data)
        self._rows_open = (chunk.block, chunk.tensor, int(rows[-1]) + 1 if len(rows) else first_allowed)
        if not continuing:
            self._advance(block, tensor.nbytes)

    def finish(self) -> None:
        if self._i < len(self._expected):
            block = self._blocks[self._expected[self._i]]
            raise WireError(f"stream ended early: block {block.name!r} got {self._pos} of {block.nbytes} bytes"
                            f" ({len(self._expected) - self._i} blocks incomplete)")
        self._land(len(self._expected))


@dataclass
class Traffic:
    payload: int = 0
    message: int = 0
    messages: int = 0

    def add(self, payload: int, message: int) -> None:
        self.payload += payload
        self.message += message
        self.messages += 1

    def as_dict(self) -> dict:
        return {"payload": self.payload, "message": self.message, "messages": self.messages}


@dataclass
class ByteMeter:
    """Counts tensor payload bytes and serialized message bytes.

    Totals are kept per (method, direction, block) and per (method, direction, worker);
    `take_window()` returns and resets the counts since the last call, which the PS
    writes to the run log once per round.
    """
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _total: dict = field(default_factory=lambda: defaultdict(Traffic))
    _window: dict = field(default_factory=lambda: defaultdict(Traffic))
    _window_by_worker: dict = field(default_factory=lambda: defaultdict(Traffic))

    def count(self, method: str, direction: str, worker: str, msg) -> None:
        """Count one message: a stream Frame or a unary protobuf message.

        direction is "in" or "out", seen from the process that owns this meter.
        """
        if isinstance(msg, Frame):
            chunk, size = msg.chunk, msg.size
        else:
            chunk, size = None, msg.ByteSize()
        payload = chunk.payload if chunk is not None else 0
        block = chunk.block if chunk is not None else -1  # -1: headers and control messages
        with self._lock:
            self._total[(method, direction, block)].add(payload, size)
            self._window[(method, direction, block)].add(payload, size)
            self._window_by_worker[(method, direction, worker)].add(payload, size)

    def take_window(self) -> dict:
        """{"by_block": {method: {direction: {block: traffic}}}, "by_worker": ...}, then reset."""
        with self._lock:
            window, by_worker = self._window, self._window_by_worker
            self._window = defaultdict(Traffic)
            self._window_by_worker = defaultdict(Traffic)
        return {"by_block": _nest(window), "by_worker": _nest(by_worker)}

    def totals(self) -> dict:
        with self._lock:
            return _nest(self._total)

    def restore(self, totals: dict) -> None:
        """Start from the totals() of an earlier process (a resumed PS); the window stays empty."""
        with self._lock:
            self._total = defaultdict(Traffic)
            for method, dirs in totals.items():
                for direction, keys in dirs.items():
                    for key, t in keys.items():
                        key = int(key) if key.lstrip("-").isdigit() else key
                        self._total[(method, direction, key)] = Traffic(t["payload"], t["message"], t["messages"])

    def payload_total(self, direction: str) -> int:
        with self._lock:
            return sum(t.payload for (_, d, _), t in self._total.items() if d == direction)


class InterfaceCounter:
    """The third level of bytes: what this host's network interfaces (all but lo) sent and
    received, from the kernel's counters in /proc/net/dev, which are per network namespace.

    In a namespace of its own (freezeps run --network netns) only the PS's traffic crosses
    them, so a window is exactly that traffic, with every header and acknowledgement.
    """

    def __init__(self, path: str = "/proc/net/dev"):
        self._path = path
        self._last = self._read()

    def _read(self) -> dict[str, int]:
        totals = {"rx_bytes": 0, "rx_packets": 0, "tx_bytes": 0, "tx_packets": 0}
        with open(self._path, encoding="ascii") as f:
            for line in f.readlines()[2:]:  # two header lines
                name, _, fields = line.partition(":")
                if name.strip() == "lo":
                    continue
                v = [int(x) for x in fields.split()]
                # rx: bytes packets errs drop fifo frame compressed multicast; then tx: bytes packets ...
                totals["rx_bytes"] += v[0]
                totals["rx_packets"] += v[1]
                totals["tx_bytes"] += v[8]
                totals["tx_packets"] += v[9]
        return totals

    def take_window(self) -> dict[str, int]:
        """Counts since the last call (or since this counter was made)."""
        now = self._read()
        window = {k: now[k] - self._last[k] for k in now}
        self._last = now
        return window


def _nest(flat: dict) -> dict:
    out: dict = {}
    for (method, direction, key), traffic in sorted(flat.items(), key=lambda kv: str(kv[0])):
        out.setdefault(method, {}).setdefault(direction, {})[str(key)] = traffic.as_dict()
    return out


def metered(messages: Iterable, meter: ByteMeter, method: str, direction: str, worker: str) -> Iterator:
    """Pass a message stream through, counting each message as it goes by."""
    for msg in messages:
        meter.count(method, direction, worker, msg)
        yield msg
