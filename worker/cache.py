"""A two-tier cache of the frozen prefix's outputs: (sample, prefix) -> activation tensor.

A *prefix key* names what produced an entry: the model, the input pipeline and the exact
parameters and buffers of the frozen blocks 0..depth-1 (`prefix_key`, a SHA-256). A different
weight, depth or input pipeline is a different key, so a wrong hit is impossible, even when
several runs on one host share the disk tier.

- Memory tier: a byte budget, least-recently-used eviction. Each prefix's entries are the rows
  of one tensor (a *slab*), found through an array indexed by sample id, so a batch is read
  with one index_select: a lookup and a copy per row cost more than a short step (ResNet-18's
  fc alone: 0.5 ms). The budget bounds the slabs' allocated rows, not only the entries in
  them; a slab grows by doubling within it, and a prefix that needs room takes back the
  unused rows of the others (their slabs are compacted) before anything is evicted. An entry
  evicted from memory is written to the disk tier (when there is one), not lost.
- Lending: a training step only needs its batch until the next one, so `read(lend=True)`
  hands out rows the store keeps owning, valid until the next read of that prefix. Where the
  batch's rows are consecutive in the slab, they are a view of it and cost no copy at all;
  `arrange` lays a slab out in the coming epoch's order (known ahead from its seed) so that
  every batch is. Elsewhere they are gathered into the slab's reused batch buffer. Views are
  lent only without a disk tier (there a prefetch thread may write into a slab while a step
  runs). A caller that writes into a view it was lent is caught at the slab's next read (the
  view's version counter moved): those entries are dropped, never served, and that slab lends
  copies from then on.
- Disk tier: a folder and a byte budget, least-recently-used eviction (by last use in this
  process, and by file modification time for entries found on disk at start). One file per
  entry, `<folder>/<prefix key>/<sample>.act`: a header (magic, dtype, shape, BLAKE2b of the
  data) and the raw data. Written to a temporary name, then renamed, so a crash never leaves
  a torn entry under a real name; an entry whose checksum or size does not match is deleted
  and reported as a miss, never used.

Counters (hits and misses per tier, bytes held, evictions, corrupt entries, entries read
ahead) are a plain dict for the run log.

Thread-safe: a prefetch thread may `load` entries from disk into memory while the training
loop reads; file reads happen outside the lock. Rows handed out without `lend` are copies, so
later writes and compactions cannot change them.
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

import numpy as np
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
    views: int = 0  # batches lent as a view of their slab, without a copy
    spoilt: int = 0  # entries dropped because a caller wrote into the view it was lent
    memory_bytes: int = 0  # the entries held in memory
    memory_reserved: int = 0  # the slabs' allocated rows, entries or not: what the budget bounds
    disk_bytes: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


MIN_SLAB_ROWS = 16
_NONE = np.zeros(0, np.int64)
_NONE.flags.writeable = False


class _Slab:
    """One prefix's memory-tier entries: rows of one tensor, a map sample -> row (an array
    indexed by sample id, -1 where absent) and each row's last use, for LRU eviction."""

    def __init__(self, row_shape: tuple[int, ...], dtype: torch.dtype, lends_views: bool):
        self.rows = torch.empty((0, *row_shape), dtype=dtype)
        self.row_bytes = dtype.itemsize * math.prod(row_shape)
        self.slot_of = np.full(0, -1, np.int64)  # sample -> row
        self.sample_at = np.full(0, -1, np.int64)  # row -> sample; -1: free
        self.used_at = np.zeros(0, np.int64)  # row -> the cache's clock at its last use
        self.uses: list[tuple[int, np.ndarray | slice]] = []  # reads not yet in used_at (see touch)
        self.count = 0
        self.batch: torch.Tensor | None = None  # lent rows that are not consecutive are gathered here
        self.lends_views = lends_views  # (no disk tier) until a caller writes into a view it was lent
        self.lent: torch.Tensor | None = None  # the view lent last, its version then and its samples
        self.lent_version = 0
        self.lent_samples: list[int] = []
        self.next_run = 0  # the row after the last view lent: where an arranged epoch's next batch starts
        self.views: dict[tuple[int, int], torch.Tensor] = {}  # (first row, rows) -> view: slicing costs 3 us

    @property
    def capacity(self) -> int:
        return len(self.sample_at)

    @property
    def free(self) -> int:
        return self.capacity - self.count

    def slots(self, samples: np.ndarray) -> np.ndarray:
        """Each sample's row, -1 where it has none."""
        # min() of a list, not numpy's: after a training step numpy's reductions take ~20 us cold.
        if len(samples) and min(samples.tolist()) >= 0:  # numpy counts a negative index from the end
            try:
                return self.slot_of[samples]
            except IndexError:
                pass
        out = np.full(len(samples), -1, np.int64)
        known = (samples >= 0) & (samples < len(self.slot_of))
        out[known] = self.slot_of[samples[known]]
        return out

    def touch(self, slots: np.ndarray | slice, clock: int) -> None:
        """Note a read of `slots` at `clock`: kept in a list and written into used_at in bulk
        (settle), before anything moves or leaves the slab, so the read path does one append."""
        self.uses.append((clock, slots))
        if len(self.uses) > 256:
            self.settle()

    def settle(self) -> None:
        for clock, slots in self.uses:
            self.used_at[slots] = clock
        self.uses.clear()

    def lend_next(self, samples: list[int], clock: int) -> torch.Tensor | None:
        """The view of the rows after the last view lent, when they hold `samples` in that order
        (an arranged epoch, read batch by batch): found with no lookup at all."""
        first, n = self.next_run, len(samples)
        if not self.lends_views or not n or self.sample_at[first:first + n].tolist() != samples or min(samples) < 0:
            return None  # (a free row's sample is -1)
        return self._lend_view(samples, first, clock)

    def lend(self, samples: list[int], slots: np.ndarray, listed: list[int], clock: int) -> torch.Tensor:
        """The rows `slots` (all held; `listed`: the same as a list), owned by the slab until its
        next read: a view where they are consecutive, else gathered into the reused batch buffer."""
        first, n = listed[0], len(listed)
        if self.lends_views and listed == list(range(first, first + n)):
            return self._lend_view(samples, first, clock)
        fits = self.batch is not None and len(self.batch) == n
        self.batch = torch.index_select(self.rows, 0, torch.from_numpy(slots), out=self.batch if fits else None)
        self.touch(slots, clock)
        return self.batch

    def _lend_view(self, samples: list[int], first: int, clock: int) -> torch.Tensor:
        rows = self.views.get((first, len(samples)))
        if rows is None:
            rows = self.views[first, len(samples)] = self.rows[first:first + len(samples)]
        self.lent = rows
        self.lent_version, self.lent_samples, self.next_run = rows._version, samples, first + len(samples)
        self.touch(slice(first, self.next_run), clock)
        return rows

    def take_back(self) -> np.ndarray:
        """End the last lending: the samples whose lent rows the caller wrote into (none, or all
        of the view's; their entries can no longer be trusted)."""
        view, self.lent = self.lent, None
        if view is None or view._version == self.lent_version:
            return _NONE
        self.lends_views = False
        return np.array(self.lent_samples, np.int64)

    def arrange(self, order: np.ndarray) -> None:
        """Lay the entries out in `order` (samples; entries not in it after them), keeping the
        capacity."""
        slots = self.slots(order)
        first = slots[slots >= 0]
        rest = self.sample_at >= 0
        rest[first] = False
        self._relayout(np.concatenate([first, np.flatnonzero(rest)]), self.capacity)
        self.next_run = 0

    def resize(self, capacity: int) -> None:
        """Reallocate to `capacity` rows (at least the entries held), entries first, in place of
        the old rows: grows, or compacts to give unused rows back."""
        self._relayout(np.flatnonzero(self.sample_at >= 0), capacity)

    def _relayout(self, keep: np.ndarray, capacity: int) -> None:
        """New rows: the entries in slots `keep` (every entry), in that order, then free rows.
        The old rows are left as they are (a view lent from them stays valid)."""
        self.settle()
        rows = torch.empty((capacity, *self.rows.shape[1:]), dtype=self.rows.dtype)
        torch.index_select(self.rows, 0, torch.from_numpy(keep), out=rows[:len(keep)])
        sample_at, used_at = np.full(capacity, -1, np.int64), np.zeros(capacity, np.int64)
        sample_at[:len(keep)], used_at[:len(keep)] = self.sample_at[keep], self.used_at[keep]
        self.rows, self.sample_at, self.used_at = rows, sample_at, used_at
        self.views.clear()
        self.slot_of[sample_at[:len(keep)]] = np.arange(len(keep))

    def place(self, samples: np.ndarray, rows: torch.Tensor, clock: int) -> None:
        """Store `rows` for `samples` (distinct, none held) in free rows; room was made."""
        self.settle()
        slots = np.flatnonzero(self.sample_at < 0)[:len(samples)]
        if samples.max(initial=-1) >= len(self.slot_of):
            grown = np.full(max(int(samples.max()) + 1, 2 * len(self.slot_of)), -1, np.int64)
            grown[:len(self.slot_of)] = self.slot_of
            self.slot_of = grown
        self.write(slots, rows)
        self.slot_of[samples], self.sample_at[slots], self.used_at[slots] = slots, samples, clock
        self.count += len(samples)

    def write(self, slots: np.ndarray, rows: torch.Tensor) -> None:
        """Rows into `slots`: every write goes here, after take_back (a view shares its base's
        version counter, so a write with a view out would look like the caller's)."""
        self.rows.index_copy_(0, torch.from_numpy(slots), rows)

    def remove(self, slots: np.ndarray) -> None:
        self.settle()
        self.slot_of[self.sample_at[slots]] = -1
        self.sample_at[slots] = -1
        self.count -= len(slots)


@dataclass
class ActivationCache:
    """See the module docstring. `memory_bytes` and `disk_bytes` are budgets (0: no such tier).
    Samples are ids >= 0 (a split's row numbers); all entries of a prefix share a shape and dtype."""
    memory_bytes: int
    disk_bytes: int = 0
    disk_dir: Path | None = None
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self):
        if self.memory_bytes < 0 or self.disk_bytes < 0:
            raise ValueError("cache budgets must be >= 0")
        if self.disk_bytes and self.disk_dir is None:
            raise ValueError("a disk budget needs a cache folder")
        self._slabs: dict[str, _Slab] = {}
        self._clock = 0  # ticks at every read and write: the order of last uses
        self._disk: OrderedDict[tuple[str, int], int] = OrderedDict()  # key -> file size, oldest first
        self._lock = threading.Lock()
        if self.disk_bytes:
            self._scan_disk()

    # -- reading ----------------------------------------------------------------------------
    def get(self, prefix: str, sample: int) -> torch.Tensor | None:
        rows, _ = self.read(prefix, np.array([sample]))
        return None if rows is None else rows[0]

    def read(self, prefix: str, samples: np.ndarray, lend: bool = False) -> tuple[torch.Tensor | None, np.ndarray]:
        """The entries of those of `samples` that are cached, in batch order (None when none
        is), and the positions in `samples` of those that are not. Memory hits are gathered
        with one index_select. `lend`: when every sample is in memory, the rows are lent (see
        the module docstring): valid until the prefix's next read, and not to be written into."""
        samples = np.asarray(samples, dtype=np.int64)
        with self._lock:
            # The warm paths, taken every training step: as few calls as can be (each numpy or torch
            # call right after a backward pass costs 3-20 us of cold CPU caches).
            self._clock += 1
            slab = self._take_back(prefix)
            batch = samples.tolist()
            if lend and slab is not None and (rows := slab.lend_next(batch, self._clock)) is not None:
                self.stats.memory_hits += len(batch)
                self.stats.views += 1
                return rows, _NONE
            slots = slab.slots(samples) if slab else np.full(len(samples), -1, np.int64)
            listed = slots.tolist()
            if slab is not None and listed and min(listed) >= 0:
                self.stats.memory_hits += len(listed)
                if lend:
                    rows = slab.lend(batch, slots, listed, self._clock)
                    self.stats.views += slab.lent is rows
                    return rows, _NONE
                slab.touch(slots, self._clock)
                return torch.index_select(slab.rows, 0, torch.from_numpy(slots)), _NONE
            in_memory = slots >= 0
            from_disk, read_back = {}, {}  # position in the batch -> entry; sample -> entry (read once)
            if self._disk:
                for i in np.flatnonzero(~in_memory).tolist():
                    sample = batch[i]
                    if sample not in read_back and (prefix, sample) in self._disk:
                        read_back[sample] = self._read_disk((prefix, sample))
                    if (tensor := read_back.get(sample)) is not None:
                        from_disk[i] = tensor
            found = in_memory.copy()
            found[list(from_disk)] = True
            n_mem, n = int(np.count_nonzero(in_memory)), int(np.count_nonzero(found))
            self.stats.memory_hits += n_mem
            self.stats.disk_hits += len(from_disk)
            self.stats.misses += len(samples) - n
            if not n:
                return None, np.arange(len(samples))
            like = slab.rows if n_mem else next(iter(from_disk.values()))[None]
            out = torch.empty((n, *like.shape[1:]), dtype=like.dtype)
            if from_disk:  # rows in batch order: where each memory and disk hit goes among the hits
                at = np.cumsum(found) - 1
                if n_mem:
                    out[torch.from_numpy(at[in_memory])] = slab.rows[torch.from_numpy(slots[in_memory])]
                for i, tensor in from_disk.items():
                    out[at[i]] = tensor
            else:
                torch.index_select(slab.rows, 0, torch.from_numpy(slots[in_memory]), out=out)
            if n_mem:
                slab.touch(slots[in_memory], self._clock)
            if from_disk and self.memory_bytes:  # promoted after the memory hits were read out
                promoted = {s: t for s, t in read_back.items() if t is not None}  # once, if twice in the batch
                self._insert(prefix, np.array(list(promoted), np.int64), torch.stack(list(promoted.values())))
            return out, np.flatnonzero(~found)

    def arrange(self, prefix: str, order: np.ndarray) -> bool:
        """Lay the prefix's memory entries out in `order` (samples: the coming epoch's, in the
        order they will be read), so that each batch of it is lent as a view. The rebuild holds
        the old and the new rows at once, so it is done only where the budget has room for
        both; and only where views are lent (no disk tier). Whether it was done."""
        order = np.asarray(order, dtype=np.int64)
        with self._lock:
            slab = self._take_back(prefix)
            if slab is None or not slab.lends_views:
                return False
            if slab.capacity * slab.row_bytes > self.memory_bytes - self.stats.memory_reserved:
                return False
            slab.arrange(order)
            return True

    def load(self, prefix: str, sample: int) -> None:
        """Bring a disk entry into the memory tier ahead of its use (the prefetch thread's call):
        the file is read and checked outside the lock, so the training loop is not held up."""
        key = (prefix, sample)
        with self._lock:
            if self._in_memory(prefix, sample) or key not in self._disk or not self.memory_bytes:
                return
        try:
            tensor = decode_entry(self._path(key).read_bytes())
        except OSError:
            return  # gone (evicted meanwhile): the training loop will find out and count it
        except CorruptEntry:
            tensor = None
        with self._lock:
            if self._in_memory(prefix, sample) or key not in self._disk:
                return
            if tensor is None:
                self.stats.corrupt += 1
                self._forget_disk(key)
                return
            self._disk.move_to_end(key)
            self.stats.prefetched += 1
            self._clock += 1
            self._insert(prefix, np.array([sample]), tensor[None])

    def holds(self, prefix: str, samples: np.ndarray) -> np.ndarray:
        """Whether each of `samples` has an entry of `prefix` in either tier: reads nothing and
        counts nothing (an entry spoilt since its last lending still shows until that read)."""
        samples = np.asarray(samples, dtype=np.int64)
        with self._lock:
            slab = self._slabs.get(prefix)
            held = slab.slots(samples) >= 0 if slab is not None else np.zeros(len(samples), bool)
            if self._disk:
                held |= np.fromiter(((prefix, s) in self._disk for s in samples.tolist()), bool, len(samples))
            return held

    def memory_entries(self, prefix: str) -> int:
        with self._lock:
            slab = self._slabs.get(prefix)
            return slab.count if slab else 0

    def _in_memory(self, prefix: str, sample: int) -> bool:
        slab = self._slabs.get(prefix)
        return bool(slab is not None and slab.slots(np.array([sample]))[0] >= 0)

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
        self.put_many(prefix, np.array([sample]), tensor[None])

    def put_many(self, prefix: str, samples: np.ndarray, rows: torch.Tensor) -> None:
        """Keep copies of `rows` (row i is sample i's entry; a sample given twice keeps its first)."""
        samples = np.asarray(samples, dtype=np.int64)
        if len(samples) != len(rows) or (len(samples) and samples.min() < 0):
            raise ValueError("put_many needs one row per sample, and sample ids >= 0")
        if str(rows.dtype) not in _DTYPES:
            raise ValueError(f"activations of dtype {rows.dtype} are not cached")
        samples, first = np.unique(samples, return_index=True)
        rows = rows.detach().cpu()[torch.from_numpy(first)]
        with self._lock:
            self.stats.puts += len(samples)
            self._clock += 1
            if self._disk:  # a disk copy of an entry put again is stale: never to be read or kept
                for s in samples.tolist():
                    if (prefix, s) in self._disk:
                        self._forget_disk((prefix, s))
            if self.memory_bytes:
                self._insert(prefix, samples, rows)
            elif self.disk_bytes:
                for s, row in zip(samples, rows):
                    self._write_disk((prefix, int(s)), row)

    def discard(self, prefix: str, samples: np.ndarray) -> None:
        """Forget these entries (extended to a deeper prefix, they will not be read again); a
        slab left empty is freed."""
        samples = np.asarray(samples, dtype=np.int64)
        with self._lock:
            slab = self._slabs.get(prefix)
            if slab is not None:
                slots = slab.slots(samples)
                self._remove(prefix, slab, np.unique(slots[slots >= 0]))
            for s in samples:
                if (prefix, int(s)) in self._disk:
                    self._forget_disk((prefix, int(s)))

    def drop_prefix(self, prefix: str) -> None:
        """Forget every entry made by `prefix` (a depth that can no longer be used)."""
        with self._lock:
            slab = self._slabs.get(prefix)
            if slab is not None:
                self._remove(prefix, slab, np.flatnonzero(slab.sample_at >= 0))
            for key in [k for k in self._disk if k[0] == prefix]:
                self._forget_disk(key)

    # -- the memory tier --------------------------------------------------------------------
    def _insert(self, prefix: str, samples: np.ndarray, rows: torch.Tensor) -> None:
        """Entries (distinct samples) into the prefix's slab, making room by the budget; what
        does not fit goes to the disk tier."""
        slab = self._take_back(prefix)
        if slab is None:
            slab = self._slabs[prefix] = _Slab(tuple(rows.shape[1:]), rows.dtype, lends_views=not self.disk_bytes)
        elif slab.rows.shape[1:] != rows.shape[1:] or slab.rows.dtype != rows.dtype:
            raise ValueError(f"entries of one prefix share a shape and dtype: {tuple(slab.rows.shape[1:])} "
                             f"{slab.rows.dtype}, not {tuple(rows.shape[1:])} {rows.dtype}")
        slots = slab.slots(samples)
        held = slots >= 0
        if held.any():  # a fresh value for an entry already held
            slab.write(slots[held], rows[torch.from_numpy(np.flatnonzero(held))])
            slab.touch(slots[held], self._clock)
        new = np.flatnonzero(~held)
        fits = min(len(new), self._make_room(slab, len(new)))
        if fits:
            slab.place(samples[new[:fits]], rows[torch.from_numpy(new[:fits])], self._clock)
            self.stats.memory_bytes += fits * slab.row_bytes
        for i in new[fits:]:
            if self.disk_bytes and (prefix, int(samples[i])) not in self._disk:
                self._write_disk((prefix, int(samples[i])), rows[i])
        if not slab.count:
            self._free(prefix, slab)

    def _make_room(self, slab: _Slab, n: int) -> int:
        """Free rows in `slab` for up to n entries: grow it within the budget, else take back the
        other slabs' unused rows, else evict the least recently used entries. How many there are."""
        if slab.row_bytes > self.memory_bytes:
            return 0
        while slab.free < n:
            room = (self.memory_bytes - self.stats.memory_reserved) // slab.row_bytes
            if room > 0:
                self._resize(slab, slab.capacity + min(room, max(n - slab.free, slab.capacity, MIN_SLAB_ROWS)))
            elif slack := [(p, s) for p, s in self._slabs.items() if s is not slab and s.free]:
                for prefix, other in slack:
                    self._resize(other, other.count) if other.count else self._free(prefix, other)
            elif not self._evict_oldest(n - slab.free):
                break
        return slab.free

    def _evict_oldest(self, n: int) -> int:
        """Evict the n least recently used entries of all slabs (to disk, where there is one)."""
        for slab in self._slabs.values():
            slab.settle()
        held = [(p, s, np.flatnonzero(s.sample_at >= 0)) for p, s in self._slabs.items()]
        used = np.concatenate([s.used_at[slots] for _, s, slots in held]) if held else np.zeros(0)
        if not len(used):
            return 0
        n = min(n, len(used))
        oldest = np.zeros(len(used), bool)
        oldest[np.argsort(used, kind="stable")[:n]] = True
        at = 0
        for prefix, slab, slots in held:
            victims = slots[oldest[at:at + len(slots)]]
            at += len(slots)
            if not len(victims):
                continue
            if self.disk_bytes:
                for slot in victims:
                    key = (prefix, int(slab.sample_at[slot]))
                    if key not in self._disk:
                        self._write_disk(key, slab.rows[slot])  # demoted, not lost
            # Not _remove: a slab left empty here may be the one room is being made in; the others
            # are freed by _make_room's next pass, with their unused rows.
            slab.remove(victims)
            self.stats.memory_bytes -= len(victims) * slab.row_bytes
            self.stats.memory_evictions += len(victims)
        return n

    def _take_back(self, prefix: str) -> _Slab | None:
        """The prefix's slab, its last lending ended: entries whose lent rows the caller wrote
        into are dropped from both tiers (eviction may have copied them to disk meanwhile)."""
        slab = self._slabs.get(prefix)
        if slab is None or slab.lent is None:
            return slab
        spoilt = slab.take_back()
        self.stats.spoilt += len(spoilt)
        if len(spoilt):
            slots = slab.slots(spoilt)
            self._remove(prefix, slab, slots[slots >= 0])
            for s in spoilt.tolist():
                if (prefix, s) in self._disk:
                    self._forget_disk((prefix, s))
        return self._slabs.get(prefix)

    def _remove(self, prefix: str, slab: _Slab, slots: np.ndarray) -> None:
        slab.remove(slots)
        self.stats.memory_bytes -= len(slots) * slab.row_bytes
        if not slab.count:
            self._free(prefix, slab)

    def _resize(self, slab: _Slab, capacity: int) -> None:
        self.stats.memory_reserved += (capacity - slab.capacity) * slab.row_bytes
        slab.resize(capacity)

    def _free(self, prefix: str, slab: _Slab) -> None:
        self.stats.memory_reserved -= slab.capacity * slab.row_bytes
        del self._slabs[prefix]

    # -- the disk tier ----------------------------------------------------------------------
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
            try:  # another process sharing the folder may rename or evict a file meanwhile
                st = path.stat()
            except FileNotFoundError:
                continue
            if path.name.endswith(".tmp"):
                if time.time() - st.st_mtime > 3600:
                    path.unlink(missing_ok=True)
            elif path.suffix == ".act" and path.stem.isdigit():
                found.append((st.st_mtime_ns, (path.parent.name, int(path.stem)), st.st_size))
        for _, key, size in sorted(found):
            self._disk[key] = size
            self.stats.disk_bytes += size
        while self.stats.disk_bytes > self.disk_bytes:
            self._forget_disk(next(iter(self._disk)))
            self.stats.disk_evictions += 1
