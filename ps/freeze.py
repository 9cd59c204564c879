"""Freeze engines: decide, once per round, how many leading blocks are frozen.

An engine is a small object with one method, `decide(step, stats) -> frozen_blocks`,
called after round `step` has been applied; the answer holds from step `step + 1`.
The frozen set is a prefix and only grows: the server enforces that, whatever an
engine answers. Adaptive engines come later and plug in here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class RoundStats:
    """What the server knows after a round, per block (index = block number)."""
    step: int
    num_blocks: int
    frozen_blocks: int
    grad_norms: tuple[float, ...]  # L2 norm of each block's averaged gradient; 0.0 for frozen blocks


class FreezeEngine(Protocol):
    name: str

    def initial(self, num_blocks: int) -> int:
        """Frozen blocks before the first round."""

    def decide(self, stats: RoundStats) -> int:
        """Frozen blocks from round stats.step + 1 on."""


class NoFreeze:
    """Full fine-tuning: nothing is ever frozen."""
    name = "none"

    def initial(self, num_blocks: int) -> int:
        return 0

    def decide(self, stats: RoundStats) -> int:
        return stats.frozen_blocks


@dataclass
class StaticFreeze:
    """Freeze the first `blocks` blocks from step `from_step` on (0: from the start)."""
    blocks: int
    from_step: int = 0
    name = "static"

    def __post_init__(self):
        if self.blocks < 0 or self.from_step < 0:
            raise ValueError("static freezing needs blocks >= 0 and from_step >= 0")

    def initial(self, num_blocks: int) -> int:
        if self.blocks >= num_blocks:
            raise ValueError(f"cannot freeze {self.blocks} of {num_blocks} blocks: the last must train")
        return self.blocks if self.from_step == 0 else 0

    def decide(self, stats: RoundStats) -> int:
        if stats.step + 1 >= self.from_step:
            return max(stats.frozen_blocks, self.blocks)
        return stats.frozen_blocks


def make_engine(name: str, *, blocks: int = 0, from_step: int = 0) -> FreezeEngine:
    if name == "none":
        return NoFreeze()
    if name == "static":
        return StaticFreeze(blocks=blocks, from_step=from_step)
    raise ValueError(f"unknown freeze engine {name!r}; choose one of ('none', 'static')")
