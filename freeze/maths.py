"""The freeze rules as pure functions of numbers: easy to test with hand-made sequences.

Conventions: blocks are numbered 0..L-1 in forward order; `frozen` is the length of the
frozen prefix; every function returns a new prefix length >= frozen. An η that is NaN
(its previous norm was 0, or nothing to compare yet) never allows a freeze.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def block_norm(tensors: Sequence[torch.Tensor], ord: int = 2) -> float:
    """The L1 or L2 norm of a block's tensors taken together."""
    if not tensors:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(tensors), ord)), ord))


def eta_norm_change(prev: float, cur: float) -> float:
    """The seed's and AutoFreeze's η: |‖Δ_{T-1}‖ − ‖Δ_T‖| / ‖Δ_{T-1}‖ (NaN when prev is 0)."""
    if not prev > 0 or not math.isfinite(prev) or not math.isfinite(cur):
        return math.nan
    return abs(prev - cur) / prev


def eta_vector_change(prev: Sequence[torch.Tensor], cur: Sequence[torch.Tensor], ord: int = 2) -> float:
    """SmartPipe's η: ‖g_{t-1} − g_t‖ / ‖g_{t-1}‖, a difference of vectors (NaN when prev is 0)."""
    prev_norm = block_norm(prev, ord)
    if not prev_norm > 0:
        return math.nan
    return block_norm(torch._foreach_sub(list(prev), list(cur)), ord) / prev_norm


def min_rule(etas: Sequence[float], frozen: int) -> int:
    """The seed's Algorithm 1: freeze the first active block when it has the smallest η."""
    active = [(e, i) for i, e in enumerate(etas) if i >= frozen and not math.isnan(e)]
    if frozen >= len(etas) or math.isnan(etas[frozen]) or not active:
        return frozen
    smallest = min(e for e, _ in active)
    return frozen + 1 if etas[frozen] <= smallest else frozen


def percentile_rule(etas: Sequence[float], frozen: int, percentile: float) -> int:
    """AutoFreeze: freeze every active block before the first whose η is at or above the
    `percentile`-th percentile of the active blocks' η."""
    active = [e for e in etas[frozen:] if not math.isnan(e)]
    if not active:
        return frozen
    threshold = float(torch.quantile(torch.tensor(active, dtype=torch.float64), percentile / 100.0))
    k = frozen
    while k < len(etas) and not math.isnan(etas[k]) and etas[k] < threshold:
        k += 1
    return k


def threshold_rule(etas: Sequence[float], frozen: int, tau: float, rate: float) -> int:
    """SmartPipe: leading active blocks with η < τ freeze, at most max(1, ⌊λ·active⌋) per test."""
    cap = max(1, math.floor(rate * (len(etas) - frozen)))
    k = frozen
    while k < len(etas) and k - frozen < cap and not math.isnan(etas[k]) and etas[k] < tau:
        k += 1
    return k


def linear_schedule(step: int, total_steps: int, steps_per_epoch: int, num_blocks: int, *, mode: str,
                    start: float = 0.0, level: float = 1.0, alpha: float = 0.5) -> int:
    """Gradient-blind schedules, as a prefix length for round `step` (0-based):

    epoch: one more block per epoch, starting after `start` epochs;
    composer: from fraction `start` of training, grow linearly to fraction `level` of the
      blocks at the end (Composer's LayerFreezing freeze_start / freeze_level);
    pipetransformer: ceil(L·(1−(1−α)^E)) after E completed epochs.
    """
    epoch = step // max(steps_per_epoch, 1)
    if mode == "epoch":
        return max(0, epoch - int(start))
    if mode == "composer":
        progress = step / max(total_steps, 1)
        if progress < start:
            return 0
        return math.floor(level * num_blocks * (progress - start) / max(1.0 - start, 1e-9))
    if mode == "pipetransformer":
        return math.ceil(num_blocks * (1.0 - (1.0 - alpha) ** epoch)) if epoch > 0 else 0
    raise ValueError(f"unknown linear mode {mode!r}; choose epoch, composer or pipetransformer")


def combine_votes(proposals: Sequence[int], weights: Sequence[float], quorum: float, frozen: int) -> int:
    """The longest prefix whose weighted support reaches `quorum` (a fraction of the total
    weight). A worker supports every prefix up to the one it proposed."""
    total = sum(weights)
    if total <= 0 or not proposals:
        return frozen
    best = frozen
    for k in range(frozen + 1, max(proposals) + 1):
        support = sum(w for p, w in zip(proposals, weights) if p >= k)
        if support >= quorum * total - 1e-12:
            best = k
    return best


def sustained(proposals: Sequence[int], frozen: int, patience: int) -> int:
    """The prefix the last `patience` tests all proposed (their minimum), so that one noisy
    test does not freeze a block: `proposals` are the tests' prefixes, oldest first."""
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    if len(proposals) < patience:
        return frozen
    return max(frozen, min(proposals[-patience:]))


def apply_guards(proposed: int, frozen: int, step: int, last_freeze_step: int, num_blocks: int, *,
                 warmup_steps: int = 0, min_gap: int = 0, freeze_head: bool = False,
                 max_fraction: float = 1.0, deadline: int = 0) -> int:
    """Bound a proposal: only grows; nothing before warm-up or within min_gap steps of the
    last freeze; the head (last block) only if asked; at most max_fraction of the blocks.
    From step `deadline` on (when > 0) that most is frozen whatever was proposed: the tests
    may freeze earlier, never later, so a run's savings have a floor."""
    limit = num_blocks if freeze_head else num_blocks - 1
    limit = min(limit, math.floor(max_fraction * num_blocks + 1e-9))
    if deadline > 0 and step + 1 >= deadline:
        return max(frozen, limit)
    if proposed <= frozen or step + 1 < warmup_steps:
        return frozen
    if last_freeze_step >= 0 and step + 1 - last_freeze_step < min_gap:
        return frozen
    return max(frozen, min(proposed, limit))
