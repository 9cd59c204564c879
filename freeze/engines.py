"""Freeze engines: small stateful objects around the rules in freeze.maths.

`decide(stats)` is called once per round with the round's gradients (the PS's averaged
ones for central decisions, a worker's own for votes) and returns a Decision for the
rounds that follow. Engines keep their own accumulators: they copy what they need, never
hold on to the caller's tensors. The frozen set is a prefix that only grows; the caller
enforces that and the guards (freeze.maths.apply_guards).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from freeze import maths

ENGINES = ("none", "static", "linear", "gradnorm", "threshold")


@dataclass(frozen=True)
class RoundStats:
    step: int  # the round just completed (0-based)
    num_blocks: int
    frozen_blocks: int  # during that round
    total_steps: int = 0
    steps_per_epoch: int = 0
    # The round's gradient of each active block's parameters; frozen blocks are absent.
    grads: Mapping[int, Sequence[torch.Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    frozen_blocks: int  # proposed prefix for the next round
    tested: bool = False  # this round ended a test interval
    eta: tuple[float, ...] = ()  # per block at a test (NaN where unknown or frozen)


class FreezeEngine(Protocol):
    name: str

    def initial(self, num_blocks: int) -> int: ...

    def decide(self, stats: RoundStats) -> Decision: ...

    # What the engine has accumulated, for the PS's checkpoints: tensors, numbers and
    # containers of them only (torch.load(weights_only=True) reads it back).
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class _Stateless:
    """Engines whose decision depends on the round alone have nothing to checkpoint."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"engine {self.name!r} keeps no state, got {sorted(state)}")


@dataclass
class EngineSpec:
    """Which engine, with its parameters: what the PS tells workers so they can vote."""
    name: str = "none"
    blocks: int = 0  # static
    from_step: int = 0  # static
    interval: int = 10  # gradnorm, threshold: rounds per test (T); 0: AutoFreeze's, total_steps // 20
    variant: str = "percentile"  # gradnorm: min | percentile
    percentile: float = 50.0  # gradnorm percentile
    norm: int = 2  # gradnorm, threshold: 1 or 2
    tau: float = 0.1  # threshold
    rate: float = 0.5  # threshold: λ
    linear_mode: str = "epoch"  # linear: epoch | composer | pipetransformer
    start: float = 0.0  # linear: epochs (epoch mode) or fraction of training (composer)
    level: float = 1.0  # linear composer: final frozen fraction
    alpha: float = 0.5  # linear pipetransformer

    def validate(self) -> "EngineSpec":
        if self.name not in ENGINES:
            raise ValueError(f"unknown freeze engine {self.name!r}; choose one of {ENGINES}")
        if self.interval < 0:
            raise ValueError("freeze interval must be >= 1, or 0 for AutoFreeze's (total_steps // 20)")
        if self.variant not in ("min", "percentile"):
            raise ValueError(f"gradnorm variant must be min or percentile, got {self.variant!r}")
        if self.norm not in (1, 2):
            raise ValueError(f"norm must be 1 or 2, got {self.norm}")
        if not 0 <= self.percentile <= 100 or not 0 < self.rate <= 1 or not 0 < self.tau < math.inf:
            raise ValueError("need 0 <= percentile <= 100, 0 < rate <= 1, tau > 0 (finite)")
        if self.linear_mode not in ("epoch", "composer", "pipetransformer"):
            raise ValueError(f"unknown linear mode {self.linear_mode!r}")
        # Written so that nan fails each (every comparison with nan is False).
        if not 0 <= self.start < (1 if self.linear_mode == "composer" else math.inf):
            raise ValueError(f"linear start {self.start}: epochs >= 0 (epoch mode), or in composer mode the "
                             "fraction of training before the first freeze, in [0, 1)")
        if not 0 <= self.level <= 1:
            raise ValueError(f"linear level {self.level}: the fraction of the blocks frozen at the end, in [0, 1]")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"linear alpha {self.alpha}: PipeTransformer's rate, in (0, 1]")
        if self.blocks < 0 or self.from_step < 0:
            raise ValueError("static freezing needs blocks >= 0 and from_step >= 0")
        if self.name == "static" and self.blocks == 0:
            raise ValueError("static freezing needs blocks > 0")
        return self


class NoFreeze(_Stateless):
    """Full fine-tuning: nothing is ever frozen."""
    name = "none"

    def initial(self, num_blocks: int) -> int:
        return 0

    def decide(self, stats: RoundStats) -> Decision:
        return Decision(stats.frozen_blocks)


@dataclass
class StaticFreeze(_Stateless):
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

    def decide(self, stats: RoundStats) -> Decision:
        if stats.step + 1 >= self.from_step:
            return Decision(max(stats.frozen_blocks, self.blocks))
        return Decision(stats.frozen_blocks)


@dataclass
class LinearFreeze(_Stateless):
    """A schedule that ignores the gradients: the weak baseline adaptive engines must beat."""
    mode: str = "epoch"
    start: float = 0.0
    level: float = 1.0
    alpha: float = 0.5
    name = "linear"

    def initial(self, num_blocks: int) -> int:
        return 0

    def decide(self, stats: RoundStats) -> Decision:
        wanted = maths.linear_schedule(stats.step + 1, stats.total_steps, stats.steps_per_epoch, stats.num_blocks,
                                       mode=self.mode, start=self.start, level=self.level, alpha=self.alpha)
        return Decision(max(stats.frozen_blocks, wanted))


def rounds_per_test(interval: int, total_steps: int) -> int:
    """Rounds per test: `interval`, or with 0 AutoFreeze's cadence of 20 tests per run (its code
    tests every epochs * steps_per_epoch / 20 steps), so a test spans the same share of any run."""
    return interval or max(1, total_steps // 20)


class _IntervalEngine:
    """Accumulates each active block's signed gradient over `interval` rounds (Δ_T)."""

    def __init__(self, interval: int, norm: int):
        self.interval, self.norm = interval, norm
        self._acc: dict[int, list[torch.Tensor]] = {}
        self._rounds = 0

    def initial(self, num_blocks: int) -> int:
        return 0

    def _accumulate(self, stats: RoundStats) -> bool:
        """Add this round's gradients; True when an interval just ended."""
        for b in list(self._acc):
            if b not in stats.grads:  # frozen since: forget it
                del self._acc[b]
        for b, grads in stats.grads.items():
            if b in self._acc:
                torch._foreach_add_(self._acc[b], list(grads))
            else:
                self._acc[b] = [g.detach().clone() for g in grads]
        self._rounds += 1
        return self._rounds % rounds_per_test(self.interval, stats.total_steps) == 0

    def _take(self) -> dict[int, list[torch.Tensor]]:
        acc, self._acc = self._acc, {}
        return acc

    def state_dict(self) -> dict:
        return {"rounds": self._rounds, "acc": {b: [t.clone() for t in ts] for b, ts in self._acc.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._rounds = int(state["rounds"])
        self._acc = {int(b): [t.clone() for t in ts] for b, ts in state["acc"].items()}


class GradNormFreeze(_IntervalEngine):
    """The seed's test (variant "min") and AutoFreeze's (variant "percentile") on
    η = |‖Δ_{T−1}‖ − ‖Δ_T‖| / ‖Δ_{T−1}‖ per block."""
    name = "gradnorm"

    def __init__(self, interval: int = 10, variant: str = "percentile", percentile: float = 50.0, norm: int = 2):
        super().__init__(interval, norm)
        self.variant, self.percentile = variant, percentile
        self._prev_norm: dict[int, float] = {}

    def decide(self, stats: RoundStats) -> Decision:
        if not self._accumulate(stats):
            return Decision(stats.frozen_blocks)
        eta = [math.nan] * stats.num_blocks
        for b, delta in self._take().items():
            cur = maths.block_norm(delta, self.norm)
            eta[b] = maths.eta_norm_change(self._prev_norm.get(b, math.nan), cur)
            self._prev_norm[b] = cur
        if self.variant == "min":
            k = maths.min_rule(eta, stats.frozen_blocks)
        else:
            k = maths.percentile_rule(eta, stats.frozen_blocks, self.percentile)
        return Decision(k, tested=True, eta=tuple(eta))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "prev_norm": dict(self._prev_norm)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._prev_norm = {int(b): float(v) for b, v in state["prev_norm"].items()}


class ThresholdFreeze(_IntervalEngine):
    """SmartPipe: η = ‖Δ_{T−1} − Δ_T‖ / ‖Δ_{T−1}‖; leading blocks with η < τ freeze, at a rate λ."""
    name = "threshold"

    def __init__(self, interval: int = 10, tau: float = 0.1, rate: float = 0.5, norm: int = 2):
        super().__init__(interval, norm)
        self.tau, self.rate = tau, rate
        self._prev: dict[int, list[torch.Tensor]] = {}

    def decide(self, stats: RoundStats) -> Decision:
        if not self._accumulate(stats):
            return Decision(stats.frozen_blocks)
        eta = [math.nan] * stats.num_blocks
        current = self._take()
        for b, delta in current.items():
            if b in self._prev:
                eta[b] = maths.eta_vector_change(self._prev[b], delta, self.norm)
        self._prev = current
        return Decision(maths.threshold_rule(eta, stats.frozen_blocks, self.tau, self.rate), tested=True,
                        eta=tuple(eta))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "prev": {b: [t.clone() for t in ts] for b, ts in self._prev.items()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._prev = {int(b): [t.clone() for t in ts] for b, ts in state["prev"].items()}


def make_engine(spec: EngineSpec) -> FreezeEngine:
    spec.validate()
    if spec.name == "none":
        return NoFreeze()
    if spec.name == "static":
        return StaticFreeze(blocks=spec.blocks, from_step=spec.from_step)
    if spec.name == "linear":
        return LinearFreeze(mode=spec.linear_mode, start=spec.start, level=spec.level, alpha=spec.alpha)
    if spec.name == "gradnorm":
        return GradNormFreeze(spec.interval, spec.variant, spec.percentile, spec.norm)
    return ThresholdFreeze(spec.interval, spec.tau, spec.rate, spec.norm)
