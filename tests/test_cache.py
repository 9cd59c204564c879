"""The activation cache's store: exact round trips, budgets and eviction, corrupt entries, keys."""
from __future__ import annotations

import copy

import pytest
import torch

from worker.cache import ActivationCache, decode_entry, encode_entry, prefix_key
from worker.models import build_model


def _act(seed: int, shape=(16, 8, 8), dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
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
