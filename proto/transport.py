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
from proto.layout import BlockLayout

# Room for a chunk's header and gRPC's framing under the 4 MB default limit.
MAX_CHUNK_BYTES = 4 * (1 << 20) - 4096
# Limits both ends set on every channel: the default receive limit, written down
# so nothing depends on raising it.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 4 * (1 << 20)),
    ("grpc.max_receive_message_length", 4 * (1 << 20)),
]


class WireError(ValueError):
    """A chunk stream that does not match the layout (unknown block, bad offset, ...)."""


def iter_chunks(block: BlockLayout, data: np.ndarray, chunk_bytes: int) -> Iterator[Frame]:
    """Cut one block's flat bytes (`data`, a uint8 array of block.nbytes) into encoded chunks."""
    view = memoryview(data)
    pos = 0
    while pos < block.nbytes:
        end = min(pos + chunk_bytes, block.nbytes)
        tensor, offset = block.locate(pos)
        yield encode_chunk(block.index, tensor, offset, view[pos:end])
        pos = end


def copy_into(dest: dict[int, np.ndarray]) -> Callable[[int, int, memoryview], None]:
    """A ChunkReceiver sink that copies each chunk into dest[block] (uint8 arrays) at its offset."""
    def write(block: int, start: int, data: memoryview) -> None:
        dest[block][start:start + len(data)] = np.frombuffer(data, dtype=np.uint8)
    return write


class ChunkReceiver:
    """Checks an in-order chunk stream against the layout and hands each chunk to a sink.

    `expected` lists the blocks that must arrive, in order; `write(block, start, data)`
    receives every accepted chunk with its byte offset in the block. Raises WireError on
    the first bad chunk; the caller decides what to do with what the sink already got.
    """

    def __init__(self, blocks: Sequence[BlockLayout], expected: Sequence[int],
                 write: Callable[[int, int, memoryview], None], chunk_bytes: int):
        self._blocks = blocks
        self._expected = list(expected)
        self._write = write
        self._chunk_bytes = chunk_bytes
        self._i = 0  # index into expected of the block being received
        self._pos = 0  # bytes of it received so far

    def accept(self, chunk: RawChunk) -> None:
        if chunk.block >= len(self._blocks):
            raise WireError(f"chunk names unknown block {chunk.block} (model has {len(self._blocks)})")
        if self._i >= len(self._expected) or chunk.block != self._expected[self._i]:
            want = self._expected[self._i] if self._i < len(self._expected) else "none"
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
        if n % 4 or start % 4:
            raise WireError(f"chunk of {n} bytes at {start} is not aligned to float32 (4 bytes)")
        if start + n > block.nbytes:
            raise WireError(f"chunk runs {start + n - block.nbytes} bytes past the end of block {block.name!r}")
        self._write(chunk.block, start, chunk.data)
        self._pos += n
        if self._pos == block.nbytes:
            self._i += 1
            self._pos = 0

    def finish(self) -> None:
        if self._i < len(self._expected):
            block = self._blocks[self._expected[self._i]]
            raise WireError(f"stream ended early: block {block.name!r} got {self._pos} of {block.nbytes} bytes"
                            f" ({len(self._expected) - self._i} blocks incomplete)")


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
        payload = len(chunk.data) if chunk is not None else 0
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
