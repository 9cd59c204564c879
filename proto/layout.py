"""Block layouts: how a manifest's named tensors sit in one flat byte range per block.

Both ends derive the same layout from the same manifest, so a chunk's (block, tensor,
offset) means the same bytes on either side. Pure Python, no torch.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from proto import freezeps_pb2 as pb

# The dtype a manifest's tensors have: the PS holds float32 values. Names are torch's.
DTYPE_SIZES = {"float32": 4}
# The dtypes a push or a pull's changes may travel in (JoinReply.push_dtype, pull_dtype), with
# their element sizes.
WIRE_DTYPES = {"float32": 4, "bfloat16": 2}


class ManifestError(ValueError):
    """A manifest that cannot define a run (empty, duplicate names, unknown dtype...)."""


@dataclass(frozen=True)
class TensorLayout:
    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: int  # pb.PARAMETER or pb.BUFFER
    offset: int  # byte offset inside the block's flat range
    nbytes: int
    row_sparse: bool = False  # a push may carry its gradient as rows, a pull some of its rows (Chunk.rows)

    @property
    def numel(self) -> int:
        return self.nbytes // WIRE_DTYPES[self.dtype]

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (first dimension), for row-sparse tensors."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0


@dataclass(frozen=True)
class BlockLayout:
    index: int
    name: str
    tensors: tuple[TensorLayout, ...]
    nbytes: int

    def block_offset(self, tensor: int, offset: int) -> int:
        """Byte offset inside the block of `offset` bytes into tensor number `tensor`."""
        return self.tensors[tensor].offset + offset

    def locate(self, block_offset: int) -> tuple[int, int]:
        """(tensor index, offset inside it) of a byte offset inside the block."""
        starts = [t.offset for t in self.tensors]
        i = bisect.bisect_right(starts, block_offset) - 1
        # Skip empty tensors that share a start with the next one.
        while i + 1 < len(self.tensors) and self.tensors[i].nbytes == 0:
            i += 1
        return i, block_offset - self.tensors[i].offset


def layout_from_manifest(manifest: pb.Manifest) -> list[BlockLayout]:
    """Validate a manifest and lay out its blocks; raises ManifestError saying what is wrong."""
    if not manifest.blocks:
        raise ManifestError("manifest has no blocks")
    seen_blocks: set[str] = set()
    seen_tensors: set[str] = set()
    blocks = []
    for b, block in enumerate(manifest.blocks):
        if not block.name or block.name in seen_blocks:
            raise ManifestError(f"block {b}: name {block.name!r} is empty or repeated")
        seen_blocks.add(block.name)
        if not block.tensors:
            raise ManifestError(f"block {block.name!r} has no tensors")
        offset = 0
        tensors = []
        for spec in block.tensors:
            if not spec.name or spec.name in seen_tensors:
                raise ManifestError(f"tensor name {spec.name!r} is empty or repeated")
            seen_tensors.add(spec.name)
            if spec.dtype not in DTYPE_SIZES:
                raise ManifestError(
                    f"tensor {spec.name!r}: dtype {spec.dtype!r} not supported (use {sorted(DTYPE_SIZES)})")
            if spec.kind not in (pb.PARAMETER, pb.BUFFER):
                raise ManifestError(f"tensor {spec.name!r}: kind must be PARAMETER or BUFFER")
            if any(d < 0 for d in spec.shape):
                raise ManifestError(f"tensor {spec.name!r}: negative dimension in {list(spec.shape)}")
            if spec.row_sparse and (spec.kind != pb.PARAMETER or len(spec.shape) != 2):
                raise ManifestError(f"tensor {spec.name!r}: only a 2-D PARAMETER can be row_sparse")
            nbytes = math.prod(spec.shape) * DTYPE_SIZES[spec.dtype]
            tensors.append(TensorLayout(spec.name, tuple(spec.shape), spec.dtype, spec.kind, offset, nbytes,
                                        spec.row_sparse))
            offset += nbytes
        blocks.append(BlockLayout(b, block.name, tuple(tensors), offset))
    return blocks


def wire_layout(blocks: list[BlockLayout], dtype: str) -> list[BlockLayout]:
    """The layout the blocks travel in as `dtype` (a push in JoinReply.push_dtype, a pull's
    changes in JoinReply.pull_dtype): the same tensors in the same order, each in `dtype`, so
    offsets and sizes scale with its element size."""
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"wire dtype {dtype!r} not supported (use {sorted(WIRE_DTYPES)})")
    out = []
    for block in blocks:
        offset, tensors = 0, []
        for t in block.tensors:
            nbytes = t.numel * WIRE_DTYPES[dtype]
            tensors.append(TensorLayout(t.name, t.shape, dtype, t.kind, offset, nbytes, t.row_sparse))
            offset += nbytes
        out.append(BlockLayout(block.index, block.name, tuple(tensors), offset))
    return out


def model_bytes(blocks: list[BlockLayout]) -> int:
    return sum(b.nbytes for b in blocks)


def assign_blocks(block_bytes: list[int], num_servers: int) -> list[range]:
    """Split blocks 0..B-1 into `num_servers` contiguous, non-empty ranges whose largest holds
    as few bytes as can be (the linear partition problem, solved exactly).

    ps-lite gives each server a key range; here the keys are blocks in forward order, so a
    growing frozen prefix empties the first servers' ranges first. Every round moves each
    server's bytes over its own link, so the largest range sets the round's time.
    """
    blocks = len(block_bytes)
    if not 1 <= num_servers <= blocks:
        raise ValueError(f"cannot split {blocks} blocks over {num_servers} servers")
    prefix = [0]
    for nbytes in block_bytes:
        prefix.append(prefix[-1] + nbytes)
    # best[k][j]: the smallest possible largest range when blocks [0, j) go to k servers;
    # cut[k][j]: where the k-th range starts in that split.
    best = [[float("inf")] * (blocks + 1) for _ in range(num_servers + 1)]
    cut = [[0] * (blocks + 1) for _ in range(num_servers + 1)]
    best[0][0] = 0
    for k in range(1, num_servers + 1):
        for j in range(k, blocks - (num_servers - k) + 1):
            for i in range(k - 1, j):
                largest = max(best[k - 1][i], prefix[j] - prefix[i])
                if largest < best[k][j]:
                    best[k][j], cut[k][j] = largest, i
    ranges, end = [], blocks
    for k in range(num_servers, 0, -1):
        ranges.append(range(cut[k][end], end))
        end = cut[k][end]
    return ranges[::-1]
