"""A two-tier cache of the frozen prefix's outputs: (sample, prefix) -> activation tensor.

A *prefix key* names what produced an entry: the model, the input pipeline and the exact
parameters and buffers of the frozen blocks 0..depth-1 (`prefix_key`, a SHA-256). A different
weight, depth or input pipeline is a different key, so a wrong hit is impossible, even when
several runs on one host share the disk tier.

- Memory tier: a byte budget, least-recently-used eviction. An entry evicted from memory is
  written to the disk tier (when there is one), not lost.
- Disk tier: a folder and a byte budget, least-recently-used eviction (by last use in this
  process, and by file modification time for entries found on disk at start). One file per
  entry, `<folder>/<prefix key>/<sample>.act`: a header (magic, dtype, shape, BLAKE2b of the
  data) and the raw data. Written to a temporary name, then renamed, so a crash never leaves
  a torn entry under a real name; an entry whose checksum or size does not match is deleted
  and reported as a miss, never used.

Counters (hits and misses per tier, bytes held, evictions, corrupt entries, entries read
ahead) are a plain dict for the run log.

Thread-safe: a prefetch thread may `load` entries from disk into memory while the training
loop reads; file reads happen outside the lock.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

MAGIC = b"FZACT1\n"
_LEN = struct.Struct("<I")


def prefix_key(model_name: str, input_spec: str, blocks: list[torch.nn.Module]) -> str:
    """SHA-256 over the model's name, a description of the input pipeline and every parameter
    and floating-point buffer (names, dtypes, shapes, bytes) of `blocks`: the frozen prefix.
    Integer buffers (BatchNorm's batch counter) differ between workers and do not change an
    eval-mode output, so they are left out."""
    h = hashlib.sha256()
    h.update(json.dumps([model_name, input_spec, len(blocks)]).encode())
    for i, block in enumerate(blocks):
        for name, tensor in [*block.named_parameters(), *block.named_buffers()]:
            if not tensor.is_floating_point():
                continue
            t = tensor.detach().contiguous().cpu()
            h.update(f"{i}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(_raw(t))
    return h.hexdigest()


def _raw(t: torch.Tensor) -> bytes:
    """A contiguous CPU tensor's bytes, for any dtype (bfloat16 included)."""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def encode_entry(tensor: torch.Tensor) -> bytes:
    t = tensor.detach().contiguous().cpu()
    if str(t.dtype) not in _DTYPES:
        raise ValueError(f"activations of dtype {t.dtype} are not cached")
    data = _raw(t)
    header = json.dumps({"dtype": str(t.dtype), "shape": list(t.shape)}).encode()
    return MAGIC + _LEN.pack(len(header)) + header + _digest(data) + data


class CorruptEntry(ValueError):
    """A disk entry that is torn, truncated or altered."""


def decode_entry(raw: bytes) -> torch.Tensor:
    if not raw.startswith(MAGIC):
        raise CorruptEntry("bad magic")
    pos = len(MAGIC)
    try:
        (n,) = _LEN.unpack_from(raw, pos)
        meta = json.loads(raw[pos + 4:pos + 4 + n])
        dtype, shape = _DTYPES[meta["dtype"]], tuple(int(s) for s in meta["shape"])
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise CorruptEntry(f"bad header: {e}") from None
    pos += 4 + n
    digest, data = raw[pos:pos + 16], raw[pos + 16:]
    if len(data) != dtype.itemsize * math.prod(shape):
        raise CorruptEntry(f"{len(data)} data bytes for shape {shape} of {dtype}")
    if _digest(data) != digest:
        raise CorruptEntry("checksum mismatch")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


@dataclass
class CacheStats:
    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    prefetched: int = 0  # disk entries read into memory ahead of use, off the training loop
    puts: int = 0
    memory_evictions: int = 0
    disk_evictions: int = 0
    corrupt: int = 0
    write_errors: int = 0
    memory_bytes: int = 0
    disk_bytes: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ActivationCache:
    """See the module docstring. `memory_bytes` and `disk_bytes` are budgets (0: no such tier)."""
    memory_bytes: int
    disk_bytes: int = 0
    disk_dir: Path | None = None
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self):
        if self.memory_bytes < 0 or self.disk_bytes < 0:
            raise ValueError("cache budgets must be >= 0")
        if self.disk_bytes and self.disk_dir is None:
            raise ValueError("a disk budget needs a cache folder")
        self._memory: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self._disk: OrderedDict[tuple[str, int], int] = OrderedDict()  # key -> file size, oldest first
        self._lock = threading.Lock()
        if self.disk_bytes:
            self._scan_disk()

    # -- reading ----------------------------------------------------------------------------
    def get(self, prefix: str, sample: int) -> torch.Tensor | None:
        return self.get_many(prefix, [sample])[0]

    def get_many(self, prefix: str, samples: list[int]) -> list[torch.Tensor | None]:
        """The entries of `samples` (None for a miss), under one hold of the lock: a batch costs
        a dictionary lookup per row, not a call."""
        with self._lock:
            return [self._get(prefix, s) for s in samples]

    def _get(self, prefix: str, sample: int) -> torch.Tensor | None:
        key = (prefix, sample)
        hit = self._memory.get(key)
        if hit is not None:
            self._memory.move_to_end(key)
            self.stats.memory_hits += 1
            return hit
        if key in self._disk:
            tensor = self._read_disk(key)
            if tensor is not None:
                self.stats.disk_hits += 1
                self._keep_in_memory(key, tensor)
                return tensor
        self.stats.misses += 1
        return None

    def load(self, prefix: str, sample: int) -> None:
        """Bring a disk entry into the memory tier ahead of its use (the prefetch thread's call):
        the file is read and checked outside the lock, so the training loop is not held up."""
        key = (prefix, sample)
        with self._lock:
            if key in self._memory or key not in self._disk or not self.memory_bytes:
                return
        try:
            tensor = decode_entry(self._path(key).read_bytes())
        except OSError:
            return  # gone (evicted meanwhile): the training loop will find out and count it
        except CorruptEntry:
            tensor = None
        with self._lock:
            if key in self._memory or key not in self._disk:
                return
            if tensor is None:
                self.stats.corrupt += 1
                self._forget_disk(key)
                return
            self._disk.move_to_end(key)
            self.stats.prefetched += 1
            self._keep_in_memory(key, tensor)

    def _read_disk(self, key) -> torch.Tensor | None:
        try:
            tensor = decode_entry(self._path(key).read_bytes())
        except FileNotFoundError:  # another process sharing the folder evicted it
            self._forget_disk(key)
            return None
        except (OSError, CorruptEntry):
            self.stats.corrupt += 1
            self._forget_disk(key)
            return None
        self._disk.move_to_end(key)
        return tensor

    # -- writing ----------------------------------------------------------------------------
    def put(self, prefix: str, sample: int, tensor: torch.Tensor) -> None:
        """Keep a copy of `tensor` (so a row of a batch does not keep the whole batch alive)."""
        key = (prefix, sample)
        tensor = tensor.detach().cpu().clone(memory_format=torch.contiguous_format)
        with self._lock:
            self.stats.puts += 1
            if key in self._memory:
                self._drop_memory(key)
            if self.memory_bytes:
                self._keep_in_memory(key, tensor)
            elif self.disk_bytes:
                self._write_disk(key, tensor)

    def discard(self, prefix: str, sample: int) -> None:
        """Forget one entry (it was extended to a deeper prefix and will not be read again)."""
        key = (prefix, sample)
        with self._lock:
            if key in self._memory:
                self._drop_memory(key)
            if key in self._disk:
                self._forget_disk(key)

    def drop_prefix(self, prefix: str) -> None:
        """Forget every entry made by `prefix` (a depth that can no longer be used)."""
        with self._lock:
            for key in [k for k in self._memory if k[0] == prefix]:
                self._drop_memory(key)
            for key in [k for k in self._disk if k[0] == prefix]:
                self._forget_disk(key)

    # -- tiers ------------------------------------------------------------------------------
    def _keep_in_memory(self, key, tensor: torch.Tensor) -> None:
        size = _nbytes(tensor)
        if size > self.memory_bytes:
            if self.disk_bytes and key not in self._disk:
                self._write_disk(key, tensor)
            return
        self._memory[key] = tensor
        self.stats.memory_bytes += size
        while self.stats.memory_bytes > self.memory_bytes:
            old_key, old = self._memory.popitem(last=False)
            self.stats.memory_bytes -= _nbytes(old)
            self.stats.memory_evictions += 1
            if self.disk_bytes and old_key not in self._disk:
                self._write_disk(old_key, old)  # demoted, not lost

    def _drop_memory(self, key) -> None:
        old = self._memory.pop(key)
        self.stats.memory_bytes -= _nbytes(old)

    def _path(self, key) -> Path:
        return self.disk_dir / key[0] / f"{key[1]}.act"

    def _write_disk(self, key, tensor: torch.Tensor) -> None:
        raw = encode_entry(tensor)
        if len(raw) > self.disk_bytes:
            return
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(raw)
            os.replace(tmp, path)  # atomic: readers see the old entry or the whole new one
        except OSError:  # a full or read-only disk costs the entry, not the run
            self.stats.write_errors += 1
            tmp.unlink(missing_ok=True)
            return
        if key in self._disk:
            self.stats.disk_bytes -= self._disk.pop(key)
        self._disk[key] = len(raw)
        self.stats.disk_bytes += len(raw)
        while self.stats.disk_bytes > self.disk_bytes:
            old_key = next(iter(self._disk))
            self._forget_disk(old_key)
            self.stats.disk_evictions += 1

    def _forget_disk(self, key) -> None:
        self.stats.disk_bytes -= self._disk.pop(key)
        self._path(key).unlink(missing_ok=True)

    def _scan_disk(self) -> None:
        """Index the entries already in the folder (another run's, or this one's before a
        restart), oldest first. Temporary files are another writer's (or a crashed one's) and
        never read; those an hour old are removed."""
        self.disk_dir.mkdir(parents=True, exist_ok=True)
        found = []
        for path in self.disk_dir.glob("*/*"):
            if path.name.endswith(".tmp"):
                if time.time() - path.stat().st_mtime > 3600:
                    path.unlink(missing_ok=True)
            elif path.suffix == ".act" and path.stem.isdigit():
                st = path.stat()
                found.append((st.st_mtime_ns, (path.parent.name, int(path.stem)), st.st_size))
        for _, key, size in sorted(found):
            self._disk[key] = size
            self.stats.disk_bytes += size
        while self.stats.disk_bytes > self.disk_bytes:
            self._forget_disk(next(iter(self._disk)))
            self.stats.disk_evictions += 1
