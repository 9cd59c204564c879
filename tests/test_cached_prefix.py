"""The activation cache in the worker: cached rows equal recomputed ones, the cache follows the
freeze boundary, decides when it pays, reads ahead, is shared, refuses augmentation, and an
adaptive run with it ends where the same run without it ends."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from freeze.engines import EngineSpec
from freezeps.config import load_config
from freezeps.report import merge_evals
from freezeps.roles import worker_settings as settings_from_config
from ps.policy import FreezePolicy
from tests.conftest import run_workers, worker_settings
from worker.cache import ActivationCache
from worker.cached_prefix import CachedPrefix, CacheSettings
from worker.models import build_model

IMAGES = torch.randn(96, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _model(name: str):
    torch.manual_seed(0)
    model = build_model(name, 10)
    model.train()
    return model


def _batches(epoch: int, batch: int = 24) -> list[np.ndarray]:
    """Every sample once per epoch, in another order each epoch (so rows meet other rows)."""
    order = np.random.default_rng(epoch).permutation(len(IMAGES))
    return [order[i:i + batch] for i in range(0, len(order), batch)]


def _freeze(model, cached: CachedPrefix, depth: int) -> None:
    model.set_frozen(depth)
    cached.follow(depth, len(IMAGES))


def _coming(batches: list[np.ndarray], n: int):
    """The batches after batch n as the training loop hands them to the cache (worker.cached_prefix.Upcoming)."""
    def upcoming(k: int):
        ids = np.concatenate(batches[n + 1:n + 1 + k] or [np.zeros(0, np.int64)])
        return ids, lambda rows: IMAGES[ids[rows]]
    return upcoming


def _check_epoch(model, cached: CachedPrefix, epoch: int, upcoming: bool = False) -> None:
    batches = _batches(epoch)
    for n, ids in enumerate(batches):
        got = cached.outputs(ids, lambda rows, ids=ids: IMAGES[ids[rows]],
                             _coming(batches, n) if upcoming else None)
        want = model.prefix(IMAGES[ids])
        assert torch.equal(got, want), (epoch, n, cached.last_batch)


@pytest.mark.parametrize("name,depths", [("tiny_cnn", [1, 2]), ("resnet18", [2, 4, 5]),
                                         ("efficientnet_lite0", [3, 8, 15])])
def test_cached_rows_equal_recomputed_ones_as_the_boundary_moves(tmp_path, name, depths):
    model = _model(name)
    cached = CachedPrefix(model, ActivationCache(64 << 20), "images", from_depth=1)
    for epoch, depth in enumerate(depths):
        _freeze(model, cached, depth)
        before = dict(cached.counters.__dict__)
        _check_epoch(model, cached, 2 * epoch)  # misses, or entries of the last depth extended
        if epoch:
            assert cached.counters.extended - before["extended"] == len(IMAGES)
        else:
            assert cached.counters.computed == len(IMAGES)
        _check_epoch(model, cached, 2 * epoch + 1)  # all hits
        assert cached.last_batch == {"cached": 24, "extended": 0, "computed": 0, "ahead": 0, "ran": 0}
    # Entries at depths that can no longer be used are gone: extended ones at once.
    assert cached.store.stats.memory_bytes == len(IMAGES) * model.prefix(IMAGES[:1]).numel() * 4


def test_an_epoch_laid_out_ahead_reads_every_batch_as_a_view_and_exactly():
    model = _model("resnet18")
    cached = CachedPrefix(model, ActivationCache(64 << 20), "images", from_depth=1)
    _freeze(model, cached, 4)
    _check_epoch(model, cached, 0)  # every row computed and cached
    cached.arrange(np.concatenate(_batches(1)))
    _check_epoch(model, cached, 1)
    assert cached.store.stats.views == len(_batches(1)) and cached.counters.cached == len(IMAGES)
    _check_epoch(model, cached, 2)  # not laid out: gathered
    assert cached.store.stats.views == len(_batches(1))


def test_partly_cached_batches_and_duplicates_are_exact(tmp_path):
    """Misses among hits run on a padded batch, so a lone miss equals its row of a full batch
    (what the run without a cache computes; a batch of one row rounds otherwise); a batch may
    hold a sample twice."""
    model = _model("efficientnet_lite0")
    cached = CachedPrefix(model, ActivationCache(64 << 20), "images", from_depth=1)
    _freeze(model, cached, 6)
    full = model.prefix(IMAGES)
    assert not torch.equal(model.prefix(IMAGES[[3]]), full[[3]])  # why the padding is there
    for ids in ([3], [3, 4, 5], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [9, 9, 30]):
        ids = np.array(ids)
        assert torch.equal(cached.outputs(ids, lambda rows, ids=ids: IMAGES[ids[rows]]), full[ids])
    assert cached.counters.cached == 1 + 3 + 2 and cached.counters.computed == 1 + 2 + 17 + 1


def test_a_batch_of_hits_extensions_from_two_depths_and_misses_runs_each_block_once():
    """Misses run up to the depth of the shallowest entries found, join them there, and so on
    to the current depth: one batch per block, never one batch per source, and each row equals
    its row of a full uncached batch."""
    model = _model("resnet18")
    cached = CachedPrefix(model, ActivationCache(64 << 20), "images", from_depth=1)
    _freeze(model, cached, 2)
    cached.outputs(np.arange(0, 20), lambda rows: IMAGES[rows])  # 0-19 cached at depth 2
    _freeze(model, cached, 4)
    cached.outputs(np.arange(20, 40), lambda rows: IMAGES[20 + rows])  # 20-39 cached at depth 4
    _freeze(model, cached, 6)
    cached.outputs(np.arange(40, 50), lambda rows: IMAGES[40 + rows])  # 40-49 cached at depth 6
    calls = [0] * len(model.blocks)
    hooks = [b.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, b in enumerate(model.blocks)]
    ids = np.array([45, 3, 25, 60, 4, 46, 26, 61])  # hits, depth-2 and depth-4 entries, misses
    got = cached.outputs(ids, lambda rows: IMAGES[ids[rows]])
    for h in hooks:
        h.remove()
    assert torch.equal(got, model.prefix(IMAGES[ids]))
    assert cached.last_batch == {"cached": 2, "extended": 4, "computed": 2, "ahead": 0, "ran": 6}
    assert calls[:6] == [1] * 6 and calls[6:] == [0] * (len(model.blocks) - 6)
    assert all(cached.store.get(cached.key, int(s)) is not None for s in ids)


def _block_runs(model) -> tuple[list[int], list]:
    """How many times each block ran since, and the hooks that count it (to remove)."""
    calls = [0] * len(model.blocks)
    return calls, [b.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
                   for i, b in enumerate(model.blocks)]


def test_a_short_run_gives_its_places_to_the_coming_batches_rows():
    """A batch with fewer rows to run than MIN_ROWS runs rows of the coming batches in the
    places left, none that would start shallower than its own (so no stretch runs longer),
    the shallowest first; they equal a full batch's rows bit for bit, are hits when their
    batch comes, and are counted as what they were then."""
    model = _model("resnet18")
    cached = CachedPrefix(model, ActivationCache(64 << 20), "images", from_depth=1)
    _freeze(model, cached, 2)
    for first in range(0, 60, 20):
        cached.outputs(np.arange(first, first + 20), lambda rows, first=first: IMAGES[first + rows])
    _freeze(model, cached, 4)  # 0-59 have depth-2 entries, 60-95 none
    coming = [np.array([60, 61, 4, 5, 62]), np.arange(6, 30), np.arange(63, 70)]
    batch = np.arange(4)
    calls, hooks = _block_runs(model)
    got = cached.outputs(batch, lambda rows: IMAGES[batch[rows]], _coming([batch, *coming], 0))
    assert torch.equal(got, model.prefix(IMAGES[batch]))
    assert calls[:4] == [1, 1, 2, 2]  # blocks 0-1 only for the check above: no miss joined the run
    assert cached.last_batch == {"cached": 0, "extended": 4, "computed": 0, "ahead": 12, "ran": 16}
    assert sorted(cached._ahead) == list(range(4, 16)) and set(cached._ahead.values()) == {"extended"}
    assert cached.store.holds(cached.key, np.arange(4, 16)).all()
    assert not cached.store.holds(cached.key, np.array([60, 61, 62, 16])).any()

    batch = coming[0]  # two misses and two rows run ahead: the misses take the places first
    calls[:] = [0] * len(calls)
    got = cached.outputs(batch, lambda rows: IMAGES[batch[rows]], _coming([batch, *coming[1:]], 0))
    for h in hooks:
        h.remove()
    assert torch.equal(got, model.prefix(IMAGES[batch]))
    assert calls[:4] == [1, 1, 1, 1]
    assert cached.last_batch == {"cached": 0, "extended": 2, "computed": 3, "ahead": 13, "ran": 16}
    assert cached.store.holds(cached.key, np.arange(63, 70)).all()  # every miss coming, then extensions
    assert cached.store.holds(cached.key, np.arange(16, 22)).all() and not cached.store.holds(cached.key, [22]).any()
    for ids in coming[1:]:
        assert torch.equal(cached.outputs(ids, lambda rows, ids=ids: IMAGES[ids[rows]]), model.prefix(IMAGES[ids]))


def test_reading_ahead_runs_the_prefix_less_and_counts_the_same():
    """An epoch where a few rows were never cached, with and without the coming batches: the
    same outputs bit for bit and the same counts of rows served cached, extended and computed,
    but one run of the prefix where there were as many as batches with a row to run."""
    model = _model("resnet18")
    skipped = np.array([5, 17, 40, 41, 77, 90])
    counters, runs = [], []
    for reading_ahead in (False, True):
        cached = CachedPrefix(model, ActivationCache(64 << 20), "images", from_depth=1)
        _freeze(model, cached, 3)
        kept = np.setdiff1d(np.arange(len(IMAGES)), skipped)
        cached.outputs(kept, lambda rows: IMAGES[kept[rows]])
        calls, hooks = _block_runs(model)
        _check_epoch(model, cached, 1, upcoming=reading_ahead)
        for h in hooks:
            h.remove()
        counters.append({k: getattr(cached.counters, k) for k in ("cached", "extended", "computed", "ahead")})
        runs.append(calls[0] - len(_batches(1)))  # _check_epoch runs the whole prefix once a batch
    short = sum(bool(np.isin(b, skipped).any()) for b in _batches(1))
    assert short > 1 and runs == [short, 1]
    first = next(b for b in _batches(1) if np.isin(b, skipped).any())
    ahead = len(skipped) - np.isin(first, skipped).sum()
    # 90 rows computed when they were cached, then served as hits; the 6 skipped computed in the epoch.
    assert counters[0] == {"cached": 90, "extended": 0, "computed": 96, "ahead": 0}
    assert counters[1] == {**counters[0], "ahead": ahead}


def test_random_runs_on_tight_budgets_serve_every_row_exactly(tmp_path):
    """Differential test against running the prefix: boundaries moving by random steps, epochs
    that skip samples, duplicates, laid-out epochs, read-ahead, memory budgets from none to a
    few batches (evictions, demotions to disk and back), caching measured or from depth 1.
    Every batch's rows equal the uncached prefix's bit for bit."""
    model = _model("resnet18")
    entry = model.prefix(IMAGES[:1], 0, 1).numel() * 4  # depth 1's rows are the largest
    for seed in range(6):
        rng = np.random.default_rng(seed)
        memory, disk = int(rng.integers(0, 80)) * entry, int(rng.choice([0, 64 << 20]))
        store = ActivationCache(memory or (0 if disk else 20 * entry), disk, tmp_path / str(seed) if disk else None)
        cached = CachedPrefix(model, store, "images", from_depth=int(rng.choice([0, 1])), min_rows=8,
                              prefetch_batches=int(rng.choice([0, 2])))
        depth = 0
        model.set_frozen(0)
        for epoch in range(5):
            if rng.random() < 0.7 and depth < len(model.blocks) - 1:
                depth = int(rng.integers(depth + 1, len(model.blocks)))
                _freeze(model, cached, depth)
            order = rng.permutation(len(IMAGES))[:int(rng.integers(40, len(IMAGES) + 1))]
            size = int(rng.choice([8, 12, 16]))
            batches = [order[i:i + size] for i in range(0, len(order) - size + 1, size)]
            if rng.random() < 0.5:
                cached.arrange(np.concatenate(batches))
            for n, ids in enumerate(batches):
                if rng.random() < 0.1:
                    ids = np.concatenate([ids, ids[:2]])
                got = cached.outputs(ids, lambda rows, ids=ids: IMAGES[ids[rows]],
                                     _coming(batches, n) if rng.random() < 0.7 else None)
                want = model.prefix(IMAGES[ids]) if depth else IMAGES[ids]
                assert torch.equal(got, want), (seed, epoch, n, depth, cached.last_batch)
            cached.end_epoch()
        cached.close()


def test_old_prefixes_are_dropped_two_epoch_ends_later():
    model = _model("tiny_cnn")
    store = ActivationCache(64 << 20)
    cached = CachedPrefix(model, store, "images", from_depth=1)
    _freeze(model, cached, 1)
    half = np.arange(48)
    cached.outputs(np.arange(96), lambda rows: IMAGES[rows])  # everything cached at depth 1
    old_key = cached.key
    _freeze(model, cached, 2)
    cached.outputs(half, lambda rows: IMAGES[rows])  # half extended, their old entries dropped
    assert store.memory_entries(old_key) == 48
    cached.end_epoch()
    assert store.memory_entries(old_key) == 48  # the rest may still be extended
    cached.end_epoch()
    assert store.memory_entries(old_key) == 0
    entry = model.prefix(IMAGES[:1]).numel() * 4
    assert store.stats.memory_bytes == store.memory_entries(cached.key) * entry == 48 * entry


def test_measured_decision_and_a_shard_that_does_not_fit():
    model = _model("resnet18")
    cached = CachedPrefix(model, ActivationCache(64 << 20), "images", from_depth=0)
    _freeze(model, cached, 5)  # layer1-3: costly to compute, 4 KiB per row to read
    ids = np.arange(24)
    cached.outputs(ids, lambda rows: IMAGES[ids[rows]])
    assert cached.active is True and cached.decisions[-1]["caching"] is True
    assert cached.outputs(ids, lambda rows: IMAGES[ids[rows]]).shape[0] == 24
    assert cached.last_batch["cached"] == 24

    small = CachedPrefix(model, ActivationCache(10_000), "images", from_depth=0)
    small.follow(5, shard_size=1000)  # 1000 x 4 KiB does not fit 10 kB
    small.outputs(ids, lambda rows: IMAGES[ids[rows]])
    assert small.active is False and "budgets hold 10000" in small.decisions[-1]["why"]
    assert small.store.stats.memory_bytes == 0  # what the measurement cached is dropped
    out = small.outputs(ids, lambda rows: IMAGES[ids[rows]])
    assert torch.equal(out, model.prefix(IMAGES[ids])) and small.counters.uncached == 24


def test_the_measured_first_batch_at_a_deeper_boundary_is_extended_not_recomputed():
    """When the boundary moves past a cached depth, the batch that decides caching at the new
    depth runs only the blocks frozen since, like any later batch, and its rows are exact."""
    model = _model("resnet18")
    cached = CachedPrefix(model, ActivationCache(64 << 20), "images", from_depth=0)
    ids = np.arange(24)
    _freeze(model, cached, 4)
    cached.outputs(ids, lambda rows: IMAGES[ids[rows]])
    assert cached.decisions[-1] == {**cached.decisions[-1], "depth": 4, "caching": True}
    _freeze(model, cached, 5)
    calls = [0] * len(model.blocks)
    hooks = [b.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, b in enumerate(model.blocks)]
    got = cached.outputs(ids, lambda rows: IMAGES[ids[rows]])
    for h in hooks:
        h.remove()
    assert calls[:5] == [0, 0, 0, 0, 1]
    assert cached.last_batch == {"cached": 0, "extended": 24, "computed": 0, "ahead": 0, "ran": 24}
    assert torch.equal(got, model.prefix(IMAGES[ids]))
    assert cached.decisions[-1] == {**cached.decisions[-1], "depth": 5, "caching": True}
    # What reading spares is the whole prefix's cost: the depth-4 rows' own plus the extension's.
    assert cached._row_cost[5] > cached._row_cost[4]
    cached.outputs(ids, lambda rows: IMAGES[ids[rows]])
    assert cached.last_batch["cached"] == 24


def test_read_ahead_from_disk_keeps_the_loop_off_the_disk(tmp_path):
    model = _model("tiny_cnn")
    first = CachedPrefix(model, ActivationCache(0, 64 << 20, tmp_path), "images", from_depth=1)
    _freeze(model, first, 2)
    _check_epoch(model, first, 0)  # written to disk
    first.close()
    # Another worker (or job) on this host, same model and data: it reads the shared folder.
    second = CachedPrefix(model, ActivationCache(64 << 20, 64 << 20, tmp_path), "images", from_depth=1)
    _freeze(model, second, 2)
    batches = _batches(1)
    for n, ids in enumerate(batches):
        got = second.outputs(ids, lambda rows, ids=ids: IMAGES[ids[rows]], _coming(batches, n))
        assert torch.equal(got, model.prefix(IMAGES[ids]))
        second._pool.submit(lambda: None).result()  # let the read-ahead finish (one thread: in order)
    stats = second.store.stats
    assert stats.disk_hits == len(batches[0])  # only the first batch was not read ahead
    assert stats.prefetched == len(IMAGES) - len(batches[0])
    assert second.counters.cached == len(IMAGES) and second.counters.computed == 0
    second.close()


def test_a_job_with_other_weights_never_hits_the_shared_folder(tmp_path):
    model = _model("tiny_cnn")
    first = CachedPrefix(model, ActivationCache(0, 64 << 20, tmp_path), "images", from_depth=1)
    _freeze(model, first, 2)
    _check_epoch(model, first, 0)
    other = _model("tiny_cnn")
    with torch.no_grad():
        other.blocks[1][0].weight[0, 0, 0, 0] += 1e-3
    second = CachedPrefix(other, ActivationCache(64 << 20, 64 << 20, tmp_path), "images", from_depth=1)
    _freeze(other, second, 2)
    _check_epoch(other, second, 1)
    assert second.counters.cached == 0 and second.counters.computed == len(IMAGES)
    # The input pipeline is part of the key too.
    third = CachedPrefix(model, ActivationCache(64 << 20, 64 << 20, tmp_path), "other images", from_depth=1)
    _freeze(model, third, 2)
    _check_epoch(model, third, 1)
    assert third.counters.cached == 0


def test_the_batch_counter_of_batchnorm_is_not_part_of_the_key():
    """Workers pull float tensors only: their BatchNorm batch counters differ, their prefixes do not."""
    a, b = _model("tiny_cnn"), _model("tiny_cnn")
    b.blocks[0][1].num_batches_tracked += 7
    keys = []
    for model in (a, b):
        cached = CachedPrefix(model, ActivationCache(1 << 20), "images", from_depth=1)
        _freeze(model, cached, 2)
        keys.append(cached.key)
    assert keys[0] == keys[1]


def test_augmentation_refuses_caching(tmp_path):
    with pytest.raises(ValueError, match="augment makes it random"):
        worker_settings("127.0.0.1:1", augment=True, cache=CacheSettings(1 << 20))
    with pytest.raises(ValueError, match="augment makes it random"):
        load_config({"augment": True, "cache_memory_bytes": 1 << 20}, environ={})
    with pytest.raises(ValueError, match="needs cache_dir"):
        CacheSettings(0, 1 << 20)
    with pytest.raises(ValueError, match="memory or a disk budget"):
        CacheSettings(0, 0)


def test_frozen_dropout_refuses_caching_and_reaches_the_worker():
    with pytest.raises(ValueError, match="frozen_dropout makes it random"):
        worker_settings("127.0.0.1:1", frozen_dropout=True, cache=CacheSettings(1 << 20))
    with pytest.raises(ValueError, match="frozen_dropout makes it random"):
        load_config({"frozen_dropout": True, "cache_disk_bytes": 1 << 20}, environ={})
    assert settings_from_config(load_config({"frozen_dropout": True}, environ={})).frozen_dropout


def _adaptive_run(ps_factory, tmp_path, weights, cache, train_samples=512):
    # Blocks freeze one at a time (the rate guard and min_gap): conv1 at step 8, conv2 at 16.
    policy = FreezePolicy(EngineSpec("threshold", interval=4, tau=100.0, rate=0.5), min_gap=8)
    with ps_factory(2, policy=policy, log_path=tmp_path / "ps.jsonl", momentum=0.9) as ps:
        summaries = run_workers([worker_settings(ps.address, model="tiny_cnn", weights=str(weights), train_samples=train_samples,
                                                 steps=0, epochs=5, cache=cache, log_dir=tmp_path, evaluate=True,
                                                 test_samples=300) for _ in range(2)])
        return ps.server.values_by_name(), summaries


def test_an_adaptive_run_with_the_cache_ends_where_the_same_run_without_it_does(ps_factory, tmp_path):
    weights = tmp_path / "init.pt"  # worker threads share torch's RNG: give them one initial model
    torch.save(build_model("tiny_cnn", 4).state_dict(), weights)
    (tmp_path / "plain").mkdir()
    (tmp_path / "cached").mkdir()
    plain, plain_summaries = _adaptive_run(ps_factory, tmp_path / "plain", weights, None)
    cache = CacheSettings(1 << 16, 16 << 20, tmp_path / "cache", from_depth=1)  # memory for a third of the shard
    with_cache, summaries = _adaptive_run(ps_factory, tmp_path / "cached", weights, cache)
    freezes = [json.loads(line) for line in (tmp_path / "cached" / "ps.jsonl").read_text().splitlines()]
    assert [(r["step"], r["to"]) for r in freezes if r["event"] == "freeze"] == [(8, 1), (16, 2)]
    assert plain.keys() == with_cache.keys()
    for name in plain:
        assert np.array_equal(plain[name], with_cache[name]), name
    for summary in summaries:
        cache_report = summary["cache"]
        assert cache_report["cached"] > 0 and cache_report["extended"] > 0
        assert cache_report["store"]["memory_evictions"] > 0 and cache_report["store"]["prefetched"] > 0
        assert cache_report["store"]["memory_bytes"] <= 1 << 16
        assert [d["depth"] for d in cache_report["decisions"]] == [1, 2]
    # The evaluators read their test samples' prefix outputs from the cache too, and score the same.
    evals, plain_evals = (merge_evals([json.loads(line) for w in (0, 1)
                                       for line in (tmp_path / run / f"worker-{w}.jsonl").read_text().splitlines()
                                       if json.loads(line)["event"] == "eval"]) for run in ("cached", "plain"))
    assert [(e["step"], e["wrong"]) for e in evals] == [(e["step"], e["wrong"]) for e in plain_evals]
    assert len(evals) == 5 and all(e["scored"] == 300 and e["shares"] == 2 for e in evals)
    assert sum(s["eval_cache"]["cached"] for s in summaries) >= 3 * 300
    steps = [json.loads(line) for line in (tmp_path / "cached" / "worker-0.jsonl").read_text().splitlines()]
    assert any(r.get("cache", {}).get("cached") == 16 for r in steps if r["event"] == "step")
    # Memory only: each epoch's entries are laid out in its order ahead, and each batch of the
    # three epochs at depth 2 (steps 32-79) is lent as a view.
    (tmp_path / "memory").mkdir()
    in_memory, summaries = _adaptive_run(ps_factory, tmp_path / "memory", weights, CacheSettings(1 << 20, from_depth=1))
    for name in plain:
        assert np.array_equal(plain[name], in_memory[name]), name
    for summary in summaries:
        store = summary["cache"]["store"]
        assert store["views"] == 3 * 16 and store["spoilt"] == 0 and store["memory_evictions"] == 0


def test_rows_an_epoch_skipped_are_run_ahead_and_the_run_ends_where_it_does_without_the_cache(ps_factory, tmp_path):
    """520 samples over 2 workers in batches of 16: each epoch's order leaves 4 of a worker's 260
    out, and they come back one or two a batch in later epochs, short runs whose places the
    training loop's coming batches fill. The parameters still end bit for bit as without the cache."""
    weights = tmp_path / "init.pt"
    torch.save(build_model("tiny_cnn", 4).state_dict(), weights)
    (tmp_path / "plain").mkdir()
    (tmp_path / "cached").mkdir()
    plain, _ = _adaptive_run(ps_factory, tmp_path / "plain", weights, None, train_samples=520)
    with_cache, summaries = _adaptive_run(ps_factory, tmp_path / "cached", weights,
                                          CacheSettings(1 << 20, from_depth=1), train_samples=520)
    for name in plain:
        assert np.array_equal(plain[name], with_cache[name]), name
    assert all(s["cache"]["ahead"] > 0 for s in summaries)
    steps = [json.loads(line) for line in (tmp_path / "cached" / "worker-0.jsonl").read_text().splitlines()]
    ran = [r["cache"]["ran"] for r in steps if r["event"] == "step" and "cache" in r]
    assert any(0 < n <= 16 for n in ran) and max(ran) <= 16
