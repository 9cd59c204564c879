"""Where and how the PS decides a freeze: the engine, central or by votes, and the guards."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from freeze import maths
from freeze.engines import Decision, EngineSpec, RoundStats, make_engine
from proto import freezeps_pb2 as pb

VOTE_WEIGHTS = ("equal", "shard", "loss", "balance")
GRADIENT_ENGINES = ("gradnorm", "threshold")


@dataclass(frozen=True)
class FreezePolicy:
    spec: EngineSpec = field(default_factory=EngineSpec)
    votes: bool = False  # gradient engines only: workers vote from their own gradients
    vote_weights: str = "shard"
    quorum: float = 0.5  # fraction of the total vote weight a prefix needs
    warmup_steps: int = 0
    min_gap: int = 0
    patience: int = 1  # gradient engines: a prefix freezes once this many tests in a row proposed it
    freeze_head: bool = False
    max_fraction: float = 1.0
    deadline: int = 0  # gradient engines: from this step on the most the guards allow is frozen; 0: never

    def validate(self) -> "FreezePolicy":
        self.spec.validate()
        if self.vote_weights not in VOTE_WEIGHTS:
            raise ValueError(f"vote weights must be one of {VOTE_WEIGHTS}, got {self.vote_weights!r}")
        if not 0 < self.quorum <= 1 or not 0 <= self.max_fraction <= 1:
            raise ValueError("need 0 < quorum <= 1 and 0 <= max_fraction <= 1")
        if self.warmup_steps < 0 or self.min_gap < 0:
            raise ValueError("warm-up and minimum gap must be >= 0")
        if self.patience < 1:
            raise ValueError(f"freeze patience must be >= 1, got {self.patience}")
        if self.patience > 1:
            self._require_tests("freeze patience counts tests")
        if self.deadline < 0:
            raise ValueError(f"freeze deadline must be >= 0 (0: none), got {self.deadline}")
        if self.deadline:
            self._require_tests("a freeze deadline bounds when the tests freeze")
        if self.deadline and self.deadline < self.warmup_steps:
            raise ValueError(f"freeze deadline {self.deadline} comes before the warm-up ends at step "
                             f"{self.warmup_steps}: it would freeze during the warm-up")
        return self

    def _require_tests(self, what: str) -> None:
        """Patience and the deadline act on freeze tests, which only gradient engines make."""
        if self.spec.name not in GRADIENT_ENGINES:
            raise ValueError(f"{what}; engine {self.spec.name!r} makes none "
                             f"(use it with {' or '.join(GRADIENT_ENGINES)})")

    @property
    def uses_votes(self) -> bool:
        return self.votes and self.spec.name in GRADIENT_ENGINES

    @property
    def needs_gradients(self) -> bool:
        """The PS's engine reads the averaged gradients (central decisions of gradient engines)."""
        return self.spec.name in GRADIENT_ENGINES and not self.uses_votes

    def engine_config(self) -> pb.EngineConfig:
        return pb.EngineConfig(name=self.spec.name, spec_json=json.dumps(dataclasses.asdict(self.spec)),
                               votes=self.uses_votes)

    def make_engine(self):
        return make_engine(self.spec)


def vote_weight(scheme: str, vote: pb.Vote, loss: float) -> float:
    """equal: 1. shard: the shard's size. loss: the worker's loss this round (a worker still
    far from fitting its data weighs more against freezing). balance: label entropy, so
    workers whose data look like the whole distribution weigh more."""
    if scheme == "equal":
        return 1.0
    if scheme == "shard":
        return float(vote.shard_size)
    if scheme == "loss":
        return loss if math.isfinite(loss) and loss > 0 else 0.0
    return max(vote.label_balance, 0.0)


@dataclass(frozen=True)
class FreezeHistory:
    """What the guards remember between rounds (and the PS checkpoints)."""
    last_freeze_step: int = -1  # the first step with the latest freeze, -1 before any
    proposals: tuple[int, ...] = ()  # the last `patience` tests' proposed prefixes, oldest first


def decide(policy: FreezePolicy, engine, stats: RoundStats, pushes: list[dict],
           history: FreezeHistory) -> tuple[int, dict, FreezeHistory]:
    """The prefix for the next round, what to log about how it was reached, and the history
    the next round's decision starts from."""
    info: dict = {}
    tested = False
    if policy.uses_votes:
        votes = [p for p in pushes if p.get("vote") is not None]
        if votes:
            tested = True
            weights = [vote_weight(policy.vote_weights, p["vote"], p["loss"]) for p in votes]
            proposals = [p["vote"].frozen_blocks for p in votes]
            proposed = maths.combine_votes(proposals, weights, policy.quorum, stats.frozen_blocks)
            info["votes"] = [{"worker": p["worker"], "rank": p["rank"], "proposal": k, "weight": w,
                              "eta": list(p["vote"].eta)} for p, k, w in zip(votes, proposals, weights)]
        else:
            proposed = stats.frozen_blocks
    else:
        decision: Decision = engine.decide(stats)
        proposed, tested = decision.frozen_blocks, decision.tested
        if tested:
            info["eta"] = list(decision.eta)
    if proposed != stats.frozen_blocks:
        info["proposed"] = proposed
    if tested:
        history = dataclasses.replace(history, proposals=(*history.proposals, proposed)[-policy.patience:])
        if policy.patience > 1:
            proposed = maths.sustained(history.proposals, stats.frozen_blocks, policy.patience)
            info["sustained"] = proposed
    frozen = maths.apply_guards(proposed, stats.frozen_blocks, stats.step, history.last_freeze_step,
                                stats.num_blocks, warmup_steps=policy.warmup_steps, min_gap=policy.min_gap,
                                freeze_head=policy.freeze_head, max_fraction=policy.max_fraction,
                                deadline=policy.deadline)
    if frozen > max(proposed, stats.frozen_blocks):
        info["deadline"] = policy.deadline  # this freeze is the deadline's, not a test's
    if frozen > stats.frozen_blocks:
        history = dataclasses.replace(history, last_freeze_step=stats.step + 1)
    return frozen, info, history
