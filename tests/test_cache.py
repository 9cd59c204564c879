"""The activation cache's store: exact round trips, budgets and eviction, corrupt entries, keys."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from worker.cache import ActivationCache, decode_entry, encode_entry, prefix_key
from worker.models import build_model


def _act(seed: int, shape=(16, 8, 8), dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(shape, generator=g).to(dtype)


ENTRY = 16 * 8 * 8 * 4  # bytes of one float32 activation above


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_entries_round_trip_bit_for_bit(tmp_path, dtype):
    t = _act(0, dtype=dtype)
    assert torch.equal(decode_entry(encode_entry(t)), t)
    cache = ActivationCache(memory_bytes=0, disk_bytes=1 << 20, disk_dir=tmp_path)
    cache.put("p", 7, t)
    got = cache.get("p", 7)
    assert got.dtype == dtype and torch.equal(got, t) and cache.stats.disk_hits == 1


def test_memory_budget_evicts_least_recently_used_to_disk(tmp_path):
    cache = ActivationCache(memory_bytes=3 * ENTRY, disk_bytes=1 << 20, disk_dir=tmp_path)
    for i in range(3):
        cache.put("p", i, _act(i))
    assert cache.get("p", 0) is not None  # 0 is now the most recently used; 1 the least
    cache.put("p", 3, _act(3))
    assert cache.stats.memory_bytes == 3 * ENTRY and cache.stats.memory_evictions == 1
    assert (tmp_path / "p" / "1.act").is_file()  # demoted, not lost
    assert torch.equal(cache.get("p", 1), _act(1)) and cache.stats.disk_hits == 1
    assert cache.stats.memory_bytes <= 3 * ENTRY


def test_disk_budget_evicts_and_is_respected(tmp_path):
    entry_file = len(encode_entry(_act(0)))
    cache = ActivationCache(memory_bytes=0, disk_bytes=4 * entry_file, disk_dir=tmp_path)
    for i in range(10):
        cache.put("p", i, _act(i))
        assert cache.stats.disk_bytes <= 4 * entry_file
    assert cache.stats.disk_evictions == 6
    assert sorted(int(p.stem) for p in (tmp_path / "p").glob("*.act")) == [6, 7, 8, 9]
    assert cache.get("p", 0) is None and cache.stats.misses == 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "header"])
def test_a_damaged_disk_entry_is_dropped_never_used(tmp_path, damage):
    cache = ActivationCache(memory_bytes=0, disk_bytes=1 << 20, disk_dir=tmp_path)
    cache.put("p", 1, _act(1))
    path = tmp_path / "p" / "1.act"
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-100] ^= 0x01
    elif damage == "truncate":
        raw = raw[:len(raw) // 2]
    elif damage == "empty":
        raw = bytearray()
    else:
        raw[10:14] = b"\xff\xff\xff\x7f"
    path.write_bytes(bytes(raw))
    assert cache.get("p", 1) is None
    assert cache.stats.corrupt == 1 and cache.stats.misses == 1 and not path.exists()
    assert cache.stats.disk_bytes == 0
    cache.put("p", 1, _act(1))  # recomputed and cached again
    assert torch.equal(cache.get("p", 1), _act(1))


def test_a_second_cache_on_the_folder_shares_entries_and_ignores_temporary_files(tmp_path):
    first = ActivationCache(memory_bytes=0, disk_bytes=1 << 20, disk_dir=tmp_path)
    for i in range(3):
        first.put("p", i, _act(i))
    (tmp_path / "p" / ".5.act.123.tmp").write_bytes(b"torn")  # a writer that died mid-write
    second = ActivationCache(memory_bytes=1 << 20, disk_bytes=1 << 20, disk_dir=tmp_path)
    assert second.stats.disk_bytes == first.stats.disk_bytes
    assert torch.equal(second.get("p", 2), _act(2)) and second.get("p", 5) is None
    # Read once from disk, then from memory.
    assert torch.equal(second.get("p", 2), _act(2)) and second.stats.memory_hits == 1
    # Files that vanish between listing and reading (another worker renamed its temporary
    # file, or evicted an entry): dangling links stand in for them.
    (tmp_path / "p" / ".6.act.124.tmp").symlink_to(tmp_path / "gone")
    (tmp_path / "p" / "7.act").symlink_to(tmp_path / "gone")
    third = ActivationCache(memory_bytes=1 << 20, disk_bytes=1 << 20, disk_dir=tmp_path)
    assert third.stats.disk_bytes == first.stats.disk_bytes and third.get("p", 7) is None


def test_drop_prefix_forgets_a_depth(tmp_path):
    cache = ActivationCache(memory_bytes=2 * ENTRY, disk_bytes=1 << 20, disk_dir=tmp_path)
    for i in range(4):
        cache.put("old", i, _act(i))
    cache.put("new", 0, _act(9))
    cache.drop_prefix("old")
    assert all(cache.get("old", i) is None for i in range(4))
    assert not list((tmp_path / "old").glob("*.act"))
    assert torch.equal(cache.get("new", 0), _act(9))


def test_prefix_key_follows_weights_depth_and_input():
    torch.manual_seed(0)
    model = build_model("resnet18", 10, "random")
    same = copy.deepcopy(model)
    key = prefix_key("resnet18", "32px", list(model.blocks[:3]))
    assert key == prefix_key("resnet18", "32px", list(same.blocks[:3]))
    assert key != prefix_key("resnet18", "32px", list(model.blocks[:2]))  # depth
    assert key != prefix_key("resnet18", "64px", list(model.blocks[:3]))  # input pipeline
    with torch.no_grad():
        next(same.blocks[1].parameters()).view(-1)[0] += 1e-7  # one weight, a tiny change
    assert key != prefix_key("resnet18", "32px", list(same.blocks[:3]))
    same = copy.deepcopy(model)
    bn = next(m for b in same.blocks[:3] for m in b.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_mean[0] += 1.0  # a buffer: eval-mode BatchNorm reads it
    assert key != prefix_key("resnet18", "32px", list(same.blocks[:3]))


def test_budgets_are_validated(tmp_path):
    with pytest.raises(ValueError, match="cache folder"):
        ActivationCache(memory_bytes=1, disk_bytes=1)
    with pytest.raises(ValueError, match=">= 0"):
        ActivationCache(memory_bytes=-1)


def test_a_batch_reads_memory_and_disk_hits_in_batch_order(tmp_path):
    cache = ActivationCache(memory_bytes=4 * ENTRY, disk_bytes=1 << 20, disk_dir=tmp_path)
    cache.put_many("p", np.arange(4), torch.stack([_act(i) for i in range(4)]))
    cache.put_many("p", np.array([4, 5]), torch.stack([_act(4), _act(5)]))  # 0 and 1 demoted to disk
    assert cache.stats.memory_evictions == 2 and (tmp_path / "p" / "0.act").is_file()
    rows, missing = cache.read("p", np.array([5, 9, 0, 3, 1]))
    assert missing.tolist() == [1]
    assert all(torch.equal(r, _act(i)) for r, i in zip(rows, [5, 0, 3, 1]))
    assert (cache.stats.memory_hits, cache.stats.disk_hits, cache.stats.misses) == (2, 2, 1)
    rows, missing = cache.read("p", np.array([0, 1]), lend=True)  # promoted by the last read
    assert not len(missing) and torch.equal(rows[0], _act(0)) and torch.equal(rows[1], _act(1))
    assert not rows._is_view(), "a store with a disk tier lends copies (a prefetch thread may write into a slab)"


def test_the_budget_bounds_allocated_rows_and_unused_rows_are_taken_back_first():
    """Two prefixes of different row sizes under one budget: the slabs' allocation never
    exceeds it, and rows one prefix has given up (extended entries) go to the other before any
    entry is evicted."""
    cache = ActivationCache(memory_bytes=40 * ENTRY)
    small = torch.stack([_act(i, shape=(16, 4, 8)) for i in range(40)])  # half an ENTRY each
    cache.put_many("old", np.arange(40), small)
    assert cache.stats.memory_reserved <= 40 * ENTRY and cache.stats.memory_bytes == 20 * ENTRY
    for start in range(0, 40, 8):  # each batch extended: its old entries discarded, new ones cached
        ids = np.arange(start, start + 8)
        cache.discard("old", ids)
        cache.put_many("new", ids, torch.stack([_act(i) for i in ids]))
        assert cache.stats.memory_reserved <= 40 * ENTRY
    assert cache.stats.memory_evictions == 0 and cache.memory_entries("old") == 0
    assert cache.memory_entries("new") == 40 and cache.stats.memory_bytes == 40 * ENTRY
    rows, missing = cache.read("new", np.arange(40))
    assert not len(missing) and all(torch.equal(r, _act(i)) for i, r in enumerate(rows))


def test_rows_handed_out_are_copies_and_survive_later_writes():
    cache = ActivationCache(memory_bytes=4 * ENTRY)
    cache.put("p", 0, _act(0))
    got = cache.get("p", 0)
    cache.put_many("p", np.arange(1, 5), torch.stack([_act(i) for i in range(1, 5)]))  # grows, then evicts 0
    cache.put("p", 0, _act(7))
    assert torch.equal(got, _act(0)) and torch.equal(cache.get("p", 0), _act(7))


def test_entries_too_big_for_memory_go_to_disk_and_a_prefix_keeps_one_shape(tmp_path):
    cache = ActivationCache(memory_bytes=ENTRY // 2, disk_bytes=1 << 20, disk_dir=tmp_path)
    cache.put("p", 3, _act(3))
    assert cache.stats.memory_bytes == cache.stats.memory_reserved == 0 and (tmp_path / "p" / "3.act").is_file()
    small = ActivationCache(memory_bytes=1 << 20)
    small.put("p", 0, _act(0))
    with pytest.raises(ValueError, match="share a shape"):
        small.put("p", 1, _act(1, shape=(16, 8, 4)))
    with pytest.raises(ValueError, match="sample ids >= 0"):
        small.put("p", -1, _act(1))
    assert small.get("p", -1) is None and small.memory_entries("p") == 1


def test_consecutive_rows_are_lent_as_views_and_scattered_ones_gathered():
    cache = ActivationCache(memory_bytes=1 << 20)
    cache.put_many("p", np.arange(4), torch.stack([_act(i) for i in range(4)]))
    view, _ = cache.read("p", np.arange(4), lend=True)
    assert view._is_view() and all(torch.equal(r, _act(i)) for i, r in enumerate(view))
    gathered, _ = cache.read("p", np.array([3, 2, 1, 0]), lend=True)
    assert not gathered._is_view() and torch.equal(gathered[0], _act(3)) and torch.equal(gathered[3], _act(0))
    again, _ = cache.read("p", np.array([1, 0, 3, 2]), lend=True)
    assert again is gathered and torch.equal(again[0], _act(1))  # the slab's batch buffer, reused
    fewer, _ = cache.read("p", np.array([2, 0]), lend=True)  # the last batch of an epoch is shorter
    assert fewer.shape[0] == 2 and torch.equal(fewer[0], _act(2)) and torch.equal(fewer[1], _act(0))
    copy, _ = cache.read("p", np.arange(4))
    assert not copy._is_view() and copy.data_ptr() != view.data_ptr()  # not lent: a copy of its own


def test_arrange_lays_entries_out_in_the_coming_order_so_each_batch_is_a_view():
    cache = ActivationCache(memory_bytes=1 << 20)
    cache.put_many("p", np.arange(8), torch.stack([_act(i) for i in range(8)]))
    order = np.array([5, 2, 7, 0, 1, 3, 4, 6])
    assert cache.arrange("p", order[:6])  # entries not in the order keep a place after it
    for batch in (order[:3], order[3:6]):
        rows, missing = cache.read("p", batch, lend=True)
        assert not len(missing) and rows._is_view()
        assert all(torch.equal(r, _act(i)) for i, r in zip(batch, rows))
    rows, _ = cache.read("p", np.array([4, 6]), lend=True)
    assert torch.equal(rows[0], _act(4)) and torch.equal(rows[1], _act(6))
    assert cache.memory_entries("p") == 8 and not cache.arrange("q", order)


def test_arrange_needs_room_for_a_second_copy_and_no_disk_tier(tmp_path):
    tight = ActivationCache(memory_bytes=6 * ENTRY)
    tight.put_many("p", np.arange(4), torch.stack([_act(i) for i in range(4)]))
    assert tight.stats.memory_reserved * 2 > tight.memory_bytes
    assert not tight.arrange("p", np.array([3, 2, 1, 0]))  # a second copy of the slab would exceed the budget
    rows, _ = tight.read("p", np.array([3, 2]), lend=True)
    assert not rows._is_view() and torch.equal(rows[0], _act(3))
    disk = ActivationCache(memory_bytes=1 << 20, disk_bytes=1 << 20, disk_dir=tmp_path)
    disk.put_many("p", np.arange(4), torch.stack([_act(i) for i in range(4)]))
    assert not disk.arrange("p", np.array([3, 2, 1, 0]))


def test_a_lent_view_stays_as_lent_through_later_writes_until_the_next_read():
    cache = ActivationCache(memory_bytes=1 << 20)
    cache.put_many("p", np.arange(4), torch.stack([_act(i) for i in range(4)]))
    view, _ = cache.read("p", np.arange(4), lend=True)
    cache.put_many("p", np.arange(4, 40), torch.stack([_act(i) for i in range(4, 40)]))  # the slab grows
    cache.put_many("p", np.arange(4), torch.stack([_act(i + 50) for i in range(4)]))  # fresh values
    assert all(torch.equal(r, _act(i)) for i, r in enumerate(view))
    rows, _ = cache.read("p", np.arange(2), lend=True)
    assert torch.equal(rows[0], _act(50))


def test_rows_a_caller_wrote_into_are_dropped_never_served_and_views_stop():
    """A model that changes its input in place would change the lent rows: the version counter
    catches it at the next read; those entries are misses from then on, the others intact."""
    cache = ActivationCache(memory_bytes=1 << 20)
    cache.put_many("p", np.arange(8), torch.stack([_act(i) for i in range(8)]))
    view, _ = cache.read("p", np.arange(2, 5), lend=True)
    view.mul_(2)
    rows, missing = cache.read("p", np.arange(8), lend=True)
    assert missing.tolist() == [2, 3, 4] and cache.memory_entries("p") == 5
    assert all(torch.equal(r, _act(i)) for i, r in zip([0, 1, 5, 6, 7], rows))
    rows, _ = cache.read("p", np.arange(2), lend=True)
    assert not rows._is_view() and not cache.arrange("p", np.arange(8))
    assert cache.stats.spoilt == 3 and cache.stats.views == 1



def test_a_sample_twice_in_a_batch_read_from_disk_is_promoted_once(tmp_path):
    """Promoted twice, it held two rows of which a discard forgot one; the other was later
    demoted to disk and served after the discard."""
    cache = ActivationCache(memory_bytes=4 * ENTRY, disk_bytes=1 << 20, disk_dir=tmp_path)
    cache.put_many("p", np.arange(8), torch.stack([_act(i) for i in range(8)]))  # 4-7 do not fit: to disk
    rows, missing = cache.read("p", np.array([4, 4]))
    assert not len(missing) and torch.equal(rows[0], _act(4)) and torch.equal(rows[1], _act(4))
    assert cache.stats.memory_evictions == 1, "one row made for sample 4, not two"
    cache.discard("p", np.array([4]))
    cache.put_many("p", np.arange(10, 14), torch.stack([_act(i) for i in range(10, 14)]))  # demotes all held
    assert cache.get("p", 4) is None


def test_an_entry_put_again_replaces_its_disk_copy(tmp_path):
    cache = ActivationCache(memory_bytes=2 * ENTRY, disk_bytes=1 << 20, disk_dir=tmp_path)
    cache.put_many("p", np.arange(3), torch.stack([_act(i) for i in range(3)]))  # 2 does not fit: to disk
    assert torch.equal(cache.get("p", 2), _act(2))  # promoted; its disk copy is still there
    cache.put("p", 2, _act(50))
    cache.put_many("p", np.array([3, 4]), torch.stack([_act(3), _act(4)]))  # 2 demoted again
    assert torch.equal(cache.get("p", 2), _act(50))


@pytest.mark.parametrize("disk", [False, True], ids=["memory", "memory-and-disk"])
def test_random_operations_never_serve_a_wrong_entry_and_keep_the_budgets(tmp_path, disk):
    """Differential test against a dict: puts (fresh values, duplicates), reads (lent or not,
    duplicates, writes into what was lent), arrange, discard, drop_prefix and load, on budgets
    of a few rows. The cache may forget an entry, never serve one that is wrong or gone; its
    byte counters match its slabs after every operation."""
    row = 3 * 4
    for seed in range(12):
        rng = np.random.default_rng(seed)
        memory = int(rng.choice([5, 17, 40])) * row
        disk_bytes = int(rng.choice([2000, 5000])) if disk else 0
        cache = ActivationCache(memory_bytes=memory, disk_bytes=disk_bytes,
                                disk_dir=tmp_path / str(seed) if disk else None)
        truth: dict[tuple[str, int], torch.Tensor] = {}
        for step in range(300):
            op, prefix = rng.random(), str(rng.choice(["a", "b", "c"]))
            samples = rng.integers(0, 30, size=int(rng.integers(1, 9)))
            where = f"seed {seed} step {step}"
            if op < 0.35:
                rows = torch.from_numpy(rng.standard_normal((len(samples), 3)).astype(np.float32))
                cache.put_many(prefix, samples, rows)
                for i, s in reversed(list(enumerate(samples.tolist()))):  # a sample given twice keeps its first
                    truth[prefix, s] = rows[i]
            elif op < 0.75:
                lend = bool(rng.random() < 0.5)
                rows, missing = cache.read(prefix, samples, lend=lend)
                hits = np.setdiff1d(np.arange(len(samples)), missing)
                assert (0 if rows is None else len(rows)) == len(hits), where
                for r, i in zip(rows if rows is not None else [], hits.tolist()):
                    key = (prefix, int(samples[i]))
                    assert key in truth and torch.equal(r, truth[key]), f"{where}: {key} served wrong"
                if lend and rows is not None and rng.random() < 0.1:
                    rows.add_(1.0)  # written into: must not be served again
            elif op < 0.82:
                cache.arrange(prefix, rng.permutation(30))
            elif op < 0.88:
                cache.discard(prefix, samples)
                for s in samples.tolist():
                    truth.pop((prefix, s), None)
            elif op < 0.9:
                cache.drop_prefix(prefix)
                truth = {k: v for k, v in truth.items() if k[0] != prefix}
            elif disk:
                cache.load(prefix, int(samples[0]))
            st, slabs = cache.stats, cache._slabs.values()
            assert st.memory_bytes == sum(s.count * s.row_bytes for s in slabs) <= st.memory_reserved, where
            assert st.memory_reserved == sum(s.capacity * s.row_bytes for s in slabs) <= memory, where
            assert st.disk_bytes <= disk_bytes, where
