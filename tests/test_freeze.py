"""Freeze rules and engines on hand-made numbers and gradient sequences."""
from __future__ import annotations

import math

import pytest
import torch

from freeze import maths
from freeze.engines import (
    Decision,
    EngineSpec,
    GradNormFreeze,
    LinearFreeze,
    NoFreeze,
    RoundStats,
    StaticFreeze,
    ThresholdFreeze,
    make_engine,
    rounds_per_test,
)
from proto import freezeps_pb2 as pb
from ps.policy import FreezeHistory, FreezePolicy, decide, vote_weight

NAN = math.nan


def _stats(step, grads, frozen=0, num_blocks=None, total=100, spe=10):
    return RoundStats(step=step, num_blocks=num_blocks or len(grads) + frozen, frozen_blocks=frozen,
                      total_steps=total, steps_per_epoch=spe,
                      grads={b: [torch.tensor(g, dtype=torch.float32)] for b, g in grads.items()})


def test_eta_definitions():
    assert maths.eta_norm_change(2.0, 1.5) == pytest.approx(0.25)
    assert math.isnan(maths.eta_norm_change(0.0, 1.0))  # previous norm 0: undefined
    assert math.isnan(maths.eta_norm_change(NAN, 1.0))
    prev, cur = [torch.tensor([3.0, 4.0])], [torch.tensor([3.0, 0.0])]
    assert maths.eta_vector_change(prev, cur) == pytest.approx(4.0 / 5.0)  # a difference of vectors
    assert math.isnan(maths.eta_vector_change([torch.zeros(2)], cur))
    assert maths.block_norm([torch.tensor([3.0]), torch.tensor([-4.0])], 1) == pytest.approx(7.0)


def test_min_rule():
    assert maths.min_rule([0.1, 0.5, 0.3], 0) == 1
    assert maths.min_rule([0.1, 0.05, 0.3], 0) == 0  # not the smallest
    assert maths.min_rule([9.9, 0.2, 0.3], 1) == 2  # frozen blocks do not take part
    assert maths.min_rule([NAN, 0.1], 0) == 0
    assert maths.min_rule([0.1, 0.1], 0) == 1  # a tie counts as the smallest
    assert maths.min_rule([0.1], 1) == 1  # nothing left


def test_percentile_rule():
    # threshold = median of (0.1, 0.2, 0.5, 0.9) = 0.35: blocks 0 and 1 are below it.
    assert maths.percentile_rule([0.1, 0.2, 0.5, 0.9], 0, 50) == 2
    assert maths.percentile_rule([0.6, 0.2, 0.5, 0.9], 0, 50) == 0  # the first block is above
    assert maths.percentile_rule([0.01, NAN, 0.05, 0.9], 0, 50) == 1  # NaN stops the prefix
    assert maths.percentile_rule([NAN, NAN], 0, 50) == 0
    assert maths.percentile_rule([0.0, 0.0, 0.0], 0, 50) == 0  # all equal: none is below


def test_threshold_rule_and_rate():
    assert maths.threshold_rule([0.01, 0.02, 0.03, 0.5], 0, tau=0.1, rate=1.0) == 3
    assert maths.threshold_rule([0.01, 0.02, 0.03, 0.5], 0, tau=0.1, rate=0.5) == 2  # λ·4 = 2 per test
    assert maths.threshold_rule([0.01, 0.02, 0.03, 0.5], 0, tau=0.1, rate=0.1) == 1  # at least one
    assert maths.threshold_rule([0.2, 0.01], 0, tau=0.1, rate=1.0) == 0
    assert maths.threshold_rule([NAN, 0.01], 0, tau=0.1, rate=1.0) == 0


def test_linear_schedules():
    assert [maths.linear_schedule(s, 100, 10, 5, mode="epoch") for s in (0, 9, 10, 25)] == [0, 0, 1, 2]
    assert maths.linear_schedule(50, 100, 10, 4, mode="composer", start=0.5, level=1.0) == 0
    assert maths.linear_schedule(100, 100, 10, 4, mode="composer", start=0.5, level=0.5) == 2
    assert maths.linear_schedule(10, 100, 10, 7, mode="pipetransformer", alpha=0.5) == 4  # ceil(3.5)
    with pytest.raises(ValueError):
        maths.linear_schedule(1, 10, 1, 3, mode="cubic")


def test_combine_votes_with_weights_quorum_and_ties():
    assert maths.combine_votes([3, 1, 2], [1, 1, 1], 0.5, 0) == 2  # 2 of 3 support prefix 2
    assert maths.combine_votes([3, 1, 2], [1, 1, 1], 1.0, 0) == 1  # unanimity
    assert maths.combine_votes([3, 0], [1, 1], 0.5, 0) == 3  # a tie at exactly the quorum passes
    assert maths.combine_votes([3, 0], [1, 3], 0.5, 0) == 0  # the heavier worker says no
    assert maths.combine_votes([], [], 0.5, 2) == 2  # a worker missing a test: no change
    assert maths.combine_votes([1], [0.0], 0.5, 0) == 0  # zero total weight decides nothing


def test_guards():
    g = maths.apply_guards
    assert g(3, 0, step=10, last_freeze_step=-1, num_blocks=4) == 3  # the head (block 3) trains
    assert g(4, 0, step=10, last_freeze_step=-1, num_blocks=4) == 3
    assert g(4, 0, step=10, last_freeze_step=-1, num_blocks=4, freeze_head=True) == 4
    assert g(3, 0, step=4, last_freeze_step=-1, num_blocks=4, warmup_steps=10) == 0
    assert g(3, 1, step=10, last_freeze_step=8, num_blocks=4, min_gap=5) == 1
    assert g(3, 1, step=20, last_freeze_step=8, num_blocks=4, min_gap=5) == 3
    assert g(3, 0, step=10, last_freeze_step=-1, num_blocks=4, max_fraction=0.5) == 2
    assert g(0, 2, step=10, last_freeze_step=-1, num_blocks=4) == 2  # never shrinks
    # A deadline: from step 12 on the most the guards allow is frozen, whatever was proposed.
    assert g(0, 0, step=10, last_freeze_step=-1, num_blocks=8, max_fraction=0.625, deadline=12) == 0
    assert g(0, 0, step=11, last_freeze_step=-1, num_blocks=8, max_fraction=0.625, deadline=12) == 5
    assert g(0, 1, step=11, last_freeze_step=10, num_blocks=8, min_gap=5, deadline=12) == 7  # the head trains
    assert g(8, 0, step=11, last_freeze_step=-1, num_blocks=8, freeze_head=True, deadline=12) == 8


def test_sustained_takes_what_the_last_tests_all_proposed():
    assert maths.sustained([3], 0, 1) == 3
    assert maths.sustained([3], 0, 2) == 0  # one test is not enough
    assert maths.sustained([3, 1], 0, 2) == 1  # both proposed at least 1
    assert maths.sustained([0, 3, 2], 1, 2) == 2  # only the last two count
    assert maths.sustained([0, 0], 1, 2) == 1  # never shrinks
    with pytest.raises(ValueError):
        maths.sustained([1], 0, 0)


def test_patience_freezes_only_what_consecutive_tests_proposed():
    """A central engine whose tests propose 2, 0, 2, 2, 3, 3: with patience 2 nothing freezes on
    the lone 2, then 2 at the second 2 in a row, 3 at the second 3."""
    class Scripted:  # an engine that proposes a fixed sequence at each test (every round here)
        def __init__(self, proposals):
            self.proposals = iter(proposals)

        def decide(self, stats):
            return Decision(max(stats.frozen_blocks, next(self.proposals)), tested=True)

    policy = FreezePolicy(EngineSpec("gradnorm", interval=1), patience=2)
    engine, history, frozen, seen = Scripted([2, 0, 2, 2, 3, 3]), FreezeHistory(), 0, []
    for step in range(6):
        frozen, info, history = decide(policy, engine, _stats(step, {}, num_blocks=6, frozen=frozen), [], history)
        seen.append(frozen)
    assert seen == [0, 0, 0, 2, 2, 3] and history.last_freeze_step == 6 and history.proposals == (3, 3)
    assert info == {"eta": [], "proposed": 3, "sustained": 3}
    # Without patience the same sequence freezes at the first test.
    first = decide(FreezePolicy(EngineSpec("gradnorm", interval=1)), Scripted([2]), _stats(0, {}, num_blocks=6),
                   [], FreezeHistory())
    assert first[0] == 2 and "sustained" not in first[1]
    with pytest.raises(ValueError, match="patience counts tests"):
        FreezePolicy(EngineSpec("static", blocks=2), patience=2).validate()
    with pytest.raises(ValueError, match="patience must be >= 1"):
        FreezePolicy(EngineSpec("gradnorm"), patience=0).validate()


def test_a_deadline_freezes_what_the_tests_did_not_by_its_step_and_says_so():
    """Tests that never propose a freeze: with deadline 6, the decision after step 5 freezes the
    cap (5 of 8 here), logged as the deadline's; a run whose tests froze the cap earlier is
    untouched by it. Patience does not hold it back (nor the minimum gap: test_guards)."""
    class Never:
        def decide(self, stats):
            return Decision(stats.frozen_blocks, tested=True)

    policy = FreezePolicy(EngineSpec("gradnorm", interval=1), max_fraction=0.625, deadline=6, patience=3,
                          warmup_steps=2)
    frozen, history, seen = 0, FreezeHistory(), []
    for step in range(8):
        frozen, info, history = decide(policy, Never(), _stats(step, {}, num_blocks=8, frozen=frozen), [], history)
        seen.append(frozen)
        if step == 5:
            assert info["deadline"] == 6 and "proposed" not in info
    assert seen == [0, 0, 0, 0, 0, 5, 5, 5] and history.last_freeze_step == 6
    assert "deadline" not in info  # nothing more to freeze: the rounds after log no deadline
    done = decide(policy, Never(), _stats(5, {}, num_blocks=8, frozen=5), [], FreezeHistory())
    assert done[0] == 5 and "deadline" not in done[1]
    with pytest.raises(ValueError, match="engine 'none' makes none"):
        FreezePolicy(EngineSpec("none"), deadline=6).validate()
    with pytest.raises(ValueError, match="before the warm-up ends"):
        FreezePolicy(EngineSpec("gradnorm"), deadline=6, warmup_steps=8).validate()
    with pytest.raises(ValueError, match="deadline must be >= 0"):
        FreezePolicy(EngineSpec("gradnorm"), deadline=-1).validate()


def test_patience_counts_a_round_of_votes_as_one_test():
    policy = FreezePolicy(EngineSpec("gradnorm"), votes=True, vote_weights="equal", patience=2)
    votes = [{"worker": w, "rank": r, "loss": 1.0, "vote": pb.Vote(frozen_blocks=2)} for r, w in enumerate("ab")]
    no_vote = [{"worker": w, "rank": r, "loss": 1.0, "vote": None} for r, w in enumerate("ab")]
    frozen, _, history = decide(policy, None, _stats(3, {}, num_blocks=4), votes, FreezeHistory())
    assert frozen == 0 and history.proposals == (2,)
    frozen, _, history = decide(policy, None, _stats(4, {}, num_blocks=4), no_vote, history)  # not a test
    assert frozen == 0 and history.proposals == (2,)
    frozen, _, history = decide(policy, None, _stats(7, {}, num_blocks=4), votes, history)
    assert frozen == 2 and history.last_freeze_step == 8


def test_gradnorm_engine_on_a_gradient_sequence():
    # Block 0's gradient stops changing after the first interval; block 1's keeps halving.
    engine = GradNormFreeze(interval=2, variant="min")
    seq = [{0: [1.0, 0.0], 1: [8.0, 0.0], 2: [1.0]}] * 2 + [{0: [1.0, 0.0], 1: [4.0, 0.0], 2: [3.0]}] * 2
    decisions = [engine.decide(_stats(s, g, num_blocks=3)) for s, g in enumerate(seq)]
    assert [d.tested for d in decisions] == [False, True, False, True]
    assert decisions[1].frozen_blocks == 0 and all(math.isnan(e) for e in decisions[1].eta)  # nothing to compare
    assert decisions[3].eta == pytest.approx((0.0, 0.5, 2.0))
    assert decisions[3].frozen_blocks == 1


def test_interval_zero_tests_twenty_times_per_run_as_autofreeze():
    """interval 0: a test every total_steps // 20 rounds (AutoFreeze's cadence), at least every round."""
    assert [rounds_per_test(0, total) for total in (360, 64, 10, 0)] == [18, 3, 1, 1]
    assert rounds_per_test(7, 360) == 7
    engine = make_engine(EngineSpec("gradnorm", interval=0))
    tested = [s for s in range(120) if engine.decide(_stats(s, {0: [1.0], 1: [1.0]}, total=120)).tested]
    assert tested == list(range(5, 120, 6))


def test_gradnorm_zero_gradients_and_one_block():
    engine = GradNormFreeze(interval=1, variant="percentile")
    for s in range(3):
        d = engine.decide(_stats(s, {0: [0.0, 0.0], 1: [1.0]}))
    assert math.isnan(d.eta[0]) and d.frozen_blocks == 0  # zero previous norm: never freezes
    single = GradNormFreeze(interval=1)
    assert [single.decide(_stats(s, {0: [1.0]})).frozen_blocks for s in range(3)] == [0, 0, 0]


def test_threshold_engine_and_frozen_blocks_are_forgotten():
    engine = ThresholdFreeze(interval=1, tau=0.1, rate=1.0)
    engine.decide(_stats(0, {0: [1.0], 1: [1.0], 2: [5.0]}))
    d = engine.decide(_stats(1, {0: [1.01], 1: [1.0], 2: [1.0]}))
    assert d.frozen_blocks == 2 and d.eta[2] == pytest.approx(0.8)
    d = engine.decide(_stats(2, {2: [1.0]}, frozen=2))
    assert math.isnan(d.eta[0]) and d.frozen_blocks == 3  # NaN for frozen blocks; proposes the head...
    assert maths.apply_guards(d.frozen_blocks, 2, 2, -1, 3) == 2  # ...which the guard keeps training


def test_simple_engines_and_spec_validation():
    assert NoFreeze().decide(_stats(9, {0: [1.0]}, frozen=2)).frozen_blocks == 2
    static = StaticFreeze(blocks=3, from_step=5)
    assert [static.decide(_stats(s, {}, num_blocks=7)).frozen_blocks for s in (3, 4)] == [0, 3]
    with pytest.raises(ValueError, match="last must train"):
        StaticFreeze(blocks=7).initial(7)
    assert LinearFreeze().decide(_stats(9, {}, num_blocks=5, spe=10)).frozen_blocks == 1
    for bad in (EngineSpec("sometimes"), EngineSpec("gradnorm", interval=-1), EngineSpec("static")):
        with pytest.raises(ValueError):
            make_engine(bad)
    # the spec checks its own numbers too, nan and inf included (it also comes as JSON in votes mode)
    for bad, words in ((EngineSpec("threshold", tau=math.inf), "tau > 0"),
                       (EngineSpec("linear", start=math.nan), "linear start nan"),
                       (EngineSpec("linear", linear_mode="composer", level=math.nan), "linear level nan"),
                       (EngineSpec("linear", linear_mode="pipetransformer", alpha=math.inf), "linear alpha inf")):
        with pytest.raises(ValueError, match=words):
            bad.validate()


def test_votes_decide_with_weights_and_are_logged():
    policy = FreezePolicy(EngineSpec("gradnorm"), votes=True, vote_weights="shard", quorum=0.6)
    pushes = [{"worker": "a", "rank": 0, "loss": 1.0, "vote": pb.Vote(frozen_blocks=2, shard_size=300)},
              {"worker": "b", "rank": 1, "loss": 1.0, "vote": pb.Vote(frozen_blocks=0, shard_size=100)},
              {"worker": "c", "rank": 2, "loss": 1.0, "vote": None}]  # c missed this test
    frozen, info, _ = decide(policy, None, _stats(9, {}, num_blocks=4), pushes, FreezeHistory())
    assert frozen == 2 and [v["proposal"] for v in info["votes"]] == [2, 0]
    equal = FreezePolicy(EngineSpec("gradnorm"), votes=True, vote_weights="equal", quorum=0.6)
    assert decide(equal, None, _stats(9, {}, num_blocks=4), pushes, FreezeHistory())[0] == 0
    assert vote_weight("loss", pb.Vote(), 2.5) == 2.5 and vote_weight("balance", pb.Vote(label_balance=0.3), 1) == 0.3
