"""The frozen prefix's output for a batch, from the activation cache where it can be.

The training loop asks `CachedPrefix.outputs` for the output of blocks 0..depth-1 on a
batch and runs only the active blocks on it. Each sample's row comes from, in order:
1. the cache, at the current prefix key (a hit);
2. an entry of an earlier, shallower prefix of this run, run through the blocks frozen
   since (the entry is *extended* to the new depth, cached there, and its old one dropped);
3. the whole prefix, run on the sample's input (a miss), and cached.
Misses and extensions run as one batch that passes each block once (see _run_from), so a
step never costs more prefix compute than the same step without the cache.

Cached rows equal recomputed rows bit for bit because the prefix is deterministic in eval
mode and a row of a batched forward does not depend on the other rows, *provided* the batch
is not tiny: CPU kernels take other paths for 1 row (convolutions) or up to 8 (matrix
products) and round differently. So each stretch of that batch runs on at least MIN_ROWS
rows. Where a batch has fewer rows to run, the places left are given to rows the coming
batches will need (read ahead, up to LOOK_AHEAD_BATCHES, from the training loop's schedule):
misses and extensions that join the run no shallower than its shallowest row (so it runs
no block it would not have run, and no stretch on more than MIN_ROWS rows: the same compute),
shallowest first; they are cached now and are hits when their batch comes. Only what is
still short is padded with copies of the first row. Once the cache is warm the rows left
to run are few and scattered (samples an epoch's order skipped, rows to extend after a
freeze), one or two a batch, and each such batch would otherwise pay the prefix on MIN_ROWS.

When caching starts: from a configured depth, or (from_depth 0) when the first batch at a
depth measures that reading its rows back from the cache is faster than computing them through
the whole prefix and that the worker's shard fits the budgets. That batch too is extended from
a shallower prefix's entries where it can be, as any batch is (recomputing them cost seconds per
evaluation on 256-row test batches), so the whole prefix's cost on those rows is estimated.

Old prefixes: an entry is dropped when extended; whatever is left of a prefix two epoch
ends after it stopped being the current one (every sample of the shard has been asked for
since) is dropped with it.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from worker.cache import ActivationCache, prefix_key
from worker.models import BlockModel

log = logging.getLogger("freezeps.worker")

MIN_ROWS = 16
LOOK_AHEAD_BATCHES = 128  # how far ahead rows to run in a short run's places are looked for

# The training loop's schedule: the next n batches' samples (split-wide ids, in the order
# they will be asked for; fewer at the run's end) and a function making the model input of
# rows of them.
Upcoming = Callable[[int], tuple[np.ndarray, Callable[[np.ndarray], torch.Tensor]]]
UNDECIDED = None
AUGMENT_REFUSED = ("the activation cache needs a sample's input to the frozen prefix to be the same every epoch, "
                   "and augment makes it random: turn one of them off")
FROZEN_DROPOUT_REFUSED = ("the activation cache needs the frozen prefix to compute the same output every epoch, "
                          "and frozen_dropout makes it random: turn one of them off")


GPU_REFUSED = ("the activation cache keeps and runs the frozen prefix's outputs on the CPU, and with device cuda "
               "the model is on a GPU: turn the cache off (cache_memory_bytes and cache_disk_bytes 0) or use device "
               "cpu")


def cache_refusal(augment: bool, frozen_dropout: bool, device: str) -> str | None:
    """Why a cache cannot serve a run with these settings (its frozen prefix's output would
    change from epoch to epoch, or the model is not on the CPU), or None."""
    if augment:
        return AUGMENT_REFUSED
    if frozen_dropout:
        return FROZEN_DROPOUT_REFUSED
    return GPU_REFUSED if device != "cpu" else None


@dataclass(frozen=True)
class CacheSettings:
    """A worker's activation cache: budgets per worker process (0: no such tier)."""
    memory_bytes: int
    disk_bytes: int = 0
    folder: Path | None = None  # the disk tier; runs on one host may share it
    from_depth: int = 0  # cache once this many blocks are frozen; 0: once measured to pay
    prefetch_batches: int = 2

    def __post_init__(self):
        if min(self.memory_bytes, self.disk_bytes, self.from_depth, self.prefetch_batches) < 0:
            raise ValueError("cache budgets, from_depth and prefetch_batches must be >= 0")
        if not self.memory_bytes and not self.disk_bytes:
            raise ValueError("an activation cache needs a memory or a disk budget")
        if self.disk_bytes and self.folder is None:
            raise ValueError("cache_disk_bytes needs cache_dir, the folder of the disk tier")


@dataclass
class PrefixCounters:
    cached: int = 0  # rows read from the cache at the current depth
    extended: int = 0  # rows read at a shallower depth and run through the blocks frozen since
    computed: int = 0  # rows run through the whole prefix while caching
    ahead: int = 0  # rows run for a coming batch in a short run's places (counted served when it comes)
    uncached: int = 0  # rows run through the whole prefix with caching off at that depth
    read_s: float = 0.0
    compute_s: float = 0.0  # running misses and extensions (one batch) and caching them
    saved_s: float = 0.0  # estimate: rows served x the measured per-row cost of the prefix, less the reads

    def hit_rate(self) -> float:
        """Rows not computed from the input, of the rows served while caching."""
        served = self.cached + self.extended + self.computed
        return (self.cached + self.extended) / served if served else 0.0


@dataclass
class _Source:
    depth: int
    key: str
    epoch_ends: int = 0  # epoch ends since it stopped being current


class CachedPrefix:
    def __init__(self, model: BlockModel, store: ActivationCache, input_spec: str, from_depth: int = 0,
                 min_rows: int = MIN_ROWS, prefetch_batches: int = 2):
        """`min_rows`: at most the batch size, so that a miss runs on as many rows as an uncached batch."""
        if from_depth < 0 or min_rows < 1 or prefetch_batches < 0:
            raise ValueError("from_depth and prefetch_batches must be >= 0, min_rows >= 1")
        self.model, self.store, self.input_spec = model, store, input_spec
        self.from_depth, self.min_rows, self.prefetch_batches = from_depth, min_rows, prefetch_batches
        self.counters = PrefixCounters()
        self.depth, self.key = 0, None
        self.active: bool | None = False  # UNDECIDED until measured when from_depth is 0
        self.decisions: list[dict] = []
        self._sources: list[_Source] = []  # deepest first
        self._row_cost: dict[int, float] = {}  # depth -> seconds per row of the whole prefix
        self._pool = ThreadPoolExecutor(1, "cache-prefetch") if prefetch_batches else None
        self._submitted: set[int] = set()
        self._shard_size = 0
        self.last_batch: dict[str, int] = {}  # where the last batch's rows came from
        self._batch: torch.Tensor | None = None
        self._ahead: dict[int, str] = {}  # sample -> "computed" or "extended": run ahead at this depth
        self._ran = 0  # rows the frozen blocks ran on in the current call

    @classmethod
    def open(cls, settings: CacheSettings, model: BlockModel, input_spec: str, batch_size: int,
             store: ActivationCache | None = None) -> "CachedPrefix":
        """`store`: one to share (the evaluator's test samples and its training shard share the
        worker's budgets), else a new one."""
        store = store or ActivationCache(settings.memory_bytes, settings.disk_bytes, settings.folder)
        return cls(model, store, input_spec, settings.from_depth, min(MIN_ROWS, batch_size), settings.prefetch_batches)

    # -- the boundary -----------------------------------------------------------------------
    def follow(self, depth: int, shard_size: int) -> None:
        """The model's frozen prefix is now `depth` blocks (after model.set_frozen(depth))."""
        self._shard_size = shard_size
        if depth == self.depth:
            return
        if self.key is not None and self.active:
            self._sources.insert(0, _Source(self.depth, self.key))
        self.depth = depth
        self._ahead.clear()  # rows run ahead at the old depth are extended like any entry of it
        self.key = prefix_key(self.model.model_name, self.input_spec, list(self.model.blocks[:depth])) if depth else None
        self._sources = sorted((s for s in self._sources if s.key != self.key), key=lambda s: -s.depth)
        self._submitted.clear()
        if depth == 0:
            self.active = False
        elif self.from_depth:
            self.active = depth >= self.from_depth
            self._decided(f"from_depth {self.from_depth}")
        else:
            self.active = UNDECIDED

    def arrange(self, order: np.ndarray) -> None:
        """The coming epoch will ask for the samples `order` in that order: lay the current
        prefix's entries out so, and each batch is read without a copy (ActivationCache.arrange).
        The time it takes counts as reading."""
        if self.active and self.key is not None:
            t0 = time.perf_counter()
            self.store.arrange(self.key, order)
            spent = time.perf_counter() - t0
            self.counters.read_s += spent
            self.counters.saved_s -= spent

    def end_epoch(self) -> None:
        """Drop what is left of prefixes that stopped being current two epoch ends ago."""
        self._submitted.clear()
        for source in self._sources:
            source.epoch_ends += 1
        for source in [s for s in self._sources if s.epoch_ends >= 2]:
            self.store.drop_prefix(source.key)
        self._sources = [s for s in self._sources if s.epoch_ends < 2]

    # -- a batch ----------------------------------------------------------------------------
    def outputs(self, samples: np.ndarray, inputs: Callable[[np.ndarray], torch.Tensor],
                upcoming: Upcoming | None = None) -> torch.Tensor:
        """The prefix's output for `samples` (split-wide ids); `inputs(rows)` makes the model
        input of the batch's rows `rows`; `upcoming`: the coming batches (read ahead from the
        disk tier, and run in a short run's places). The tensor returned may be overwritten by
        the next call."""
        c = self.counters
        before = (c.cached, c.extended, c.computed, c.ahead)
        self._ran = 0
        out = self._outputs(samples, inputs, upcoming)
        # Where the batch's rows came from, how many rows of coming batches ran in its places, and
        # how many rows the frozen blocks ran on in all (padding aside; 0 where nothing ran, even
        # if rows run ahead earlier count as computed or extended here).
        self.last_batch = {"cached": c.cached - before[0], "extended": c.extended - before[1],
                           "computed": c.computed - before[2], "ahead": c.ahead - before[3], "ran": self._ran}
        return out

    def _outputs(self, samples, inputs, upcoming) -> torch.Tensor:
        if self.depth == 0:
            return inputs(np.arange(len(samples)))
        if self.active is UNDECIDED:
            return self._measure(samples, inputs)
        if not self.active:
            self.counters.uncached += len(samples)
            return self.model.prefix(inputs(np.arange(len(samples))))
        t0 = time.perf_counter()
        # Once warm, every row is a hit, lent by the store: a view of its slab (see arrange) or one
        # gather into a buffer of its own, valid until the next call, which is all a step needs.
        got, left = self.store.read(self.key, samples, lend=True)
        cached = len(samples) - len(left)
        if self._ahead and cached:
            cached -= self._served_ahead(np.delete(samples, left) if len(left) else samples)
        n = len(samples)
        if len(left):
            run, run_inputs = self._with_rows_ahead(samples, left, inputs, upcoming)
            rows = np.concatenate([left, np.arange(n, len(run))])
            found = self._found_at_shallower_depths(run, rows)
        t1 = time.perf_counter()
        self.counters.cached += cached
        self.counters.read_s += t1 - t0
        out = got
        if len(left):
            todo, misses, computed, run_s = self._fill(run, rows, found, run_inputs)
            self._count(run[todo], misses, todo < n)
            self._ran = len(todo)
            mine = np.flatnonzero(todo < n)
            out = self._buffer(n, computed)
            if len(left) < n:
                out[torch.from_numpy(np.setdiff1d(np.arange(n), left))] = got
            out[torch.from_numpy(todo[mine])] = computed[torch.from_numpy(mine)]
            spent = time.perf_counter() - t1
            self.counters.compute_s += spent
            if not found:  # misses only: what a row of the whole prefix costs, the blocks' time as in _measure
                self._row_cost[self.depth] = run_s / max(len(todo), self.min_rows)
        if self.depth in self._row_cost:
            self.counters.saved_s += cached * self._row_cost[self.depth] - (t1 - t0)
        self._prefetch(upcoming)
        return out

    def _served_ahead(self, hits: np.ndarray) -> int:
        """Of the batch's hits, how many were run ahead (in an earlier batch's places), now
        counted as what they were, computed or extended."""
        kinds = [self._ahead.pop(s, None) for s in hits.tolist()]
        computed, extended = kinds.count("computed"), kinds.count("extended")
        self.counters.computed += computed
        self.counters.extended += extended
        return computed + extended

    def _count(self, samples: np.ndarray, misses: int, mine: np.ndarray) -> None:
        """Count a run's rows `samples` (its first `misses` from the input, the rest extended):
        the batch's (`mine`) as served now, the others as run ahead, served when they come."""
        self.counters.computed += int(np.count_nonzero(mine[:misses]))
        self.counters.extended += int(np.count_nonzero(mine[misses:]))
        for i in np.flatnonzero(~mine).tolist():
            self._ahead[int(samples[i])] = "computed" if i < misses else "extended"
        self.counters.ahead += int(np.count_nonzero(~mine))
        for s in samples[mine].tolist():
            self._ahead.pop(s, None)  # run ahead but not kept (the budget was full): run again now

    def _with_rows_ahead(self, samples: np.ndarray, left: np.ndarray, inputs, upcoming):
        """The run for the batch's rows `left`, with the coming batches' rows in its places
        (see the module docstring): the run's samples (the batch's, then those added) and a
        function making the model input of rows of them."""
        short = self.min_rows - len(left)
        if upcoming is None or short <= 0:
            return samples, inputs
        coming, coming_inputs = upcoming(LOOK_AHEAD_BATCHES)
        _, first = np.unique(coming, return_index=True)
        pos = np.sort(first)  # each coming sample once, in the order they come
        pos = pos[~np.isin(coming[pos], samples)]
        pos = pos[~self.store.holds(self.key, coming[pos])]
        start_at = self._start_depths(coming[pos])
        # Shallowest first (they fill the most stretches), no shallower than the run's start.
        by_start = np.argsort(start_at, kind="stable")
        chosen = pos[by_start][start_at[by_start] >= self._start_depths(samples[left]).min()][:short]
        if not len(chosen):
            return samples, inputs
        n = len(samples)
        run = np.concatenate([samples, coming[chosen]])

        def run_inputs(rows: np.ndarray) -> torch.Tensor:  # rows ascending: the batch's first
            mine, theirs = rows[rows < n], rows[rows >= n] - n
            parts = ([inputs(mine)] if len(mine) else []) + ([coming_inputs(chosen[theirs])] if len(theirs) else [])
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        return run, run_inputs

    def _start_depths(self, samples: np.ndarray) -> np.ndarray:
        """For samples not cached at this depth, the depth a run of each would start at: its
        deepest shallower entry's, 0 where it has none (a miss). Membership only, nothing read."""
        depths = np.zeros(len(samples), np.int64)
        for source in (s for s in self._sources if s.depth < self.depth):  # deepest first
            depths[(depths == 0) & self.store.holds(source.key, samples)] = source.depth
        return depths

    def _buffer(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """A batch of n rows shaped like `like`'s, reused from step to step: when little is left
        to compute, allocating (and page-faulting) a fresh batch each step costs more than
        reading the rows. Valid until the next call, which is all a training step needs."""
        shape = (n, *like.shape[1:])
        if self._batch is None or self._batch.shape != shape or self._batch.dtype != like.dtype:
            self._batch = torch.empty(shape, dtype=like.dtype)
        return self._batch

    def _fill(self, samples: np.ndarray, rows: np.ndarray, found: list[tuple[_Source, np.ndarray, torch.Tensor]],
              inputs) -> tuple[np.ndarray, int, torch.Tensor, float]:
        """The rows `rows` of `samples`, not cached at this depth, with `found` their shallower
        entries (_found_at_shallower_depths): those extended, the rest run from the input, in one
        batch (_run_from); all cached at this depth and their shallower entries dropped. Returns
        the rows in the order they come out (those run from the input first), how many of them
        were, their outputs, and the seconds the blocks took."""
        extended = np.concatenate([r for _, r, _ in found]) if found else np.zeros(0, np.int64)
        missing = np.setdiff1d(rows, extended)
        t0 = time.perf_counter()
        computed = self._run_from(inputs(missing) if len(missing) else None, found)
        run_s = time.perf_counter() - t0
        todo = np.concatenate([missing, extended])
        self.store.put_many(self.key, samples[todo], computed)
        for source, r, _ in found:
            self.store.discard(source.key, samples[r])
        return todo, len(missing), computed, run_s

    def _found_at_shallower_depths(self, samples: np.ndarray, left: np.ndarray
                                   ) -> list[tuple[_Source, np.ndarray, torch.Tensor]]:
        """For the batch's rows `left` (not cached at this depth), entries of shallower
        prefixes: for each row the deepest there is (the fewest blocks left to run), as
        (source, the batch's rows found there, their entries), shallowest source first."""
        found = []
        for source in (s for s in self._sources if s.depth < self.depth):  # deepest first
            if not len(left):
                break
            entries, not_there = self.store.read(source.key, samples[left])
            if entries is not None:
                found.insert(0, (source, np.delete(left, not_there), entries))
                left = left[not_there]
        return found

    def _run_from(self, misses: torch.Tensor | None, found: list[tuple[_Source, np.ndarray, torch.Tensor]]
                  ) -> torch.Tensor:
        """One batch through the prefix, each block run once: the misses from the input, joined
        at each shallower depth by the entries found there, on to the current depth. The rows
        come out in that order: misses, then the entries, shallowest source first."""
        x, at = misses, 0
        for depth, entries in [(s.depth, entries) for s, _, entries in found] + [(self.depth, None)]:
            if x is not None:
                x = self._run(x, at, depth)
            if entries is not None:
                x = entries if x is None else torch.cat([x, entries])
            at = depth
        return x

    def _run(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Blocks start..end-1 on x, on at least min_rows rows (see the module docstring)."""
        n = len(x)
        if n < self.min_rows:
            x = torch.cat([x, x[:1].expand(self.min_rows - n, *x.shape[1:])])
        return self.model.prefix(x, start, end)[:n]

    def _measure(self, samples: np.ndarray, inputs) -> torch.Tensor:
        """The first batch at this depth: run it as any batch (rows with a shallower prefix's
        entry are extended from it), cache it, read it back, and decide. Reading is set against
        what it spares, running the whole prefix: measured on the rows run from the input; for
        the extended rows, the time taken plus their entries' cost per row at their depth, as
        measured there (a shallower source was cached, so measured, or from_depth decides)."""
        rows = np.arange(len(samples))
        found = self._found_at_shallower_depths(samples, rows)
        t0 = time.perf_counter()
        todo, misses, computed, run_s = self._fill(samples, rows, found, inputs)
        self._count(samples[todo], misses, np.ones(len(todo), bool))
        self._ran = len(todo)
        out = computed[torch.from_numpy(np.argsort(todo))]
        spent = time.perf_counter() - t0
        # The blocks' time only: writing the rows into the cache is not what reading them back spares.
        compute_s = run_s + sum(len(r) * self._row_cost[source.depth] for source, r, _ in found)
        t1 = time.perf_counter()
        _, not_back = self.store.read(self.key, samples)
        read_s = time.perf_counter() - t1
        self.counters.compute_s += spent
        self._row_cost[self.depth] = compute_s / len(samples)
        entry_bytes = out[0].numel() * out.element_size()
        needed, budget = entry_bytes * self._shard_size, self.store.memory_bytes + self.store.disk_bytes
        if len(not_back) or needed > budget:
            self.active = False
            reason = f"the shard's entries need {needed} bytes; the budgets hold {budget}"
        else:
            self.active = read_s < compute_s
            reason = f"reading a batch back took {read_s * 1e3:.2f} ms, computing it {compute_s * 1e3:.2f} ms"
        if not self.active:
            self.store.drop_prefix(self.key)
        self._decided(reason)
        return out

    def _decided(self, reason: str) -> None:
        record = {"depth": self.depth, "caching": bool(self.active), "why": reason}
        self.decisions.append(record)
        log.info("[Worker] activation cache at depth %d: %s (%s)", self.depth, "on" if self.active else "off", reason)

    # -- reading ahead ----------------------------------------------------------------------
    def _prefetch(self, upcoming: Upcoming | None) -> None:
        if self._pool is None or not self.store.disk_bytes or upcoming is None:
            return
        todo = [s for s in upcoming(self.prefetch_batches)[0].tolist() if s not in self._submitted]
        if todo:
            self._submitted.update(todo)
            self._pool.submit(self._load, self.key, todo)

    def _load(self, key: str, samples: list[int]) -> None:
        for s in samples:
            if key != self.key:
                return  # the boundary moved: these entries are no longer the ones wanted
            self.store.load(key, s)

    def report(self) -> dict:
        """Counters for the run log: this worker's rows, times and decisions, and the store's."""
        return {**self.counters.__dict__, "hit_rate": self.counters.hit_rate(), "decisions": self.decisions,
                "store": self.store.stats.as_dict()}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
