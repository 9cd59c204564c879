"""Pure decision logic: learning-rate schedules, sharding, config."""
from __future__ import annotations

import numpy as np
import pytest

from freezeps.config import Config, load_config, to_toml
from ps.schedule import block_lr_scales, learning_rate
from worker.data import batch_order, batch_positions, shard_indices


def test_learning_rate_schedules():
    assert learning_rate(10, base_lr=0.1, schedule="constant", total_steps=0) == 0.1
    assert learning_rate(0, base_lr=0.1, schedule="cosine", total_steps=100) == pytest.approx(0.1)
    assert learning_rate(50, base_lr=0.1, schedule="cosine", total_steps=100) == pytest.approx(0.05)
    assert learning_rate(100, base_lr=0.1, schedule="cosine", total_steps=100) == pytest.approx(0.0)
    assert learning_rate(25, base_lr=1.0, schedule="step", total_steps=0, step_size=10, gamma=0.5) == 0.25
    assert learning_rate(1, base_lr=1.0, schedule="constant", total_steps=0, warmup_steps=4) == 0.5
    with pytest.raises(ValueError):
        learning_rate(1, base_lr=1.0, schedule="cosine", total_steps=0)
    with pytest.raises(ValueError, match="linear schedule needs total_steps"):
        learning_rate(1, base_lr=1.0, schedule="linear", total_steps=0)


def test_block_lr_scales_decay_from_the_head_down():
    assert block_lr_scales(4, 1.0) == [1.0] * 4
    assert block_lr_scales(4, 0.5) == [0.125, 0.25, 0.5, 1.0]
    assert block_lr_scales(1, 0.8) == [1.0]


def test_linear_schedule_is_berts():
    """Past the warm-up, the linear schedule is transformers' get_linear_schedule_with_warmup
    (whose warm-up starts at 0 where ours starts at base_lr / warmup_steps: round 0 trains)."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    total, warmup, base = 50, 5, 2e-5
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=total)
    theirs = []
    for _ in range(total):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = [learning_rate(s, base_lr=base, schedule="linear", total_steps=total, warmup_steps=warmup)
            for s in range(total)]
    assert ours[:warmup] == pytest.approx([base * (s + 1) / warmup for s in range(warmup)])
    assert ours[warmup:] == pytest.approx(theirs[warmup:], rel=1e-12)
    assert ours[warmup] == pytest.approx(base) and ours[-1] == pytest.approx(base / (total - warmup))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_shards_are_disjoint_complete_and_deterministic(scheme):
    labels = np.random.default_rng(0).integers(0, 10, 5000)
    shards = [shard_indices(labels, r, 4, scheme, alpha=0.3, seed=1) for r in range(4)]
    joined = np.concatenate(shards)
    assert len(joined) == len(labels) and len(np.unique(joined)) == len(labels)
    assert all(np.array_equal(s, shard_indices(labels, r, 4, scheme, alpha=0.3, seed=1)) for r, s in enumerate(shards))
    sizes = [len(s) for s in shards]
    if scheme == "iid":
        assert max(sizes) - min(sizes) <= 1
    else:  # label skew: some worker's label histogram is far from uniform
        hist = np.bincount(labels[shards[0]], minlength=10) / len(shards[0])
        assert hist.max() > 0.2
    assert not np.array_equal(batch_order(shards[0], 0, 0, 1), batch_order(shards[0], 1, 0, 1))


def test_every_worker_gets_samples_or_the_sharding_says_why():
    labels = np.random.default_rng(1).integers(0, 10, 64)
    # Seed 4's first Dirichlet(0.01) partition gives rank 2 nothing (18, 21, 0, 25): drawn again.
    shards = [shard_indices(labels, r, 4, "dirichlet", alpha=0.01, seed=4) for r in range(4)]
    assert min(len(s) for s in shards) > 0 and sorted(np.concatenate(shards).tolist()) == list(range(64))
    # Two classes over eight workers at alpha 0.01: each class goes (nearly) whole to one worker.
    with pytest.raises(ValueError, match="each of 100 draws left one of 8 workers without samples"):
        shard_indices(np.random.default_rng(2).integers(0, 2, 64), 0, 8, "dirichlet", alpha=0.01)
    with pytest.raises(ValueError, match="3 training samples for 4 workers: each needs at least one"):
        shard_indices(np.zeros(3), 0, 4)


@pytest.mark.parametrize("shard_size", [256, 260, 250])  # an epoch's rows exactly; 4 left out; 6 too few
def test_batch_positions_read_ahead_are_the_batches_of_those_steps(shard_size):
    """What the activation cache is handed as the coming batches (a stretch of steps, across
    epoch ends) is each of those steps' batch, in order; each epoch visits its order from the
    start, wrapping round where the shard holds fewer rows than the epoch's 16 batches of 16."""
    shard = np.arange(1000, 1000 + shard_size)
    one = [batch_positions(shard, 1, 3, 16, 16, step, step + 1) for step in range(48)]
    for step in range(48):
        order = batch_order(shard, step // 16, 1, 3)
        assert np.array_equal(one[step], np.take(order, np.arange(16) + step % 16 * 16, mode="wrap"))
    for first, n in [(0, 48), (5, 30), (15, 2), (31, 1), (40, 0)]:
        assert np.array_equal(batch_positions(shard, 1, 3, 16, 16, first, first + n),
                              np.concatenate([np.zeros(0, np.int64), *one[first:first + n]]))
    epoch = np.concatenate(one[16:32])
    assert set(epoch) == set(shard) if shard_size <= 256 else len(set(epoch)) == 256


def test_config_precedence_cli_over_file_over_env(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text('lr = 0.05\nbatch_size = 32\nmodel = "resnet18"\n')
    env = {"FREEZEPS_LR": "0.2", "FREEZEPS_BATCH_SIZE": "16", "FREEZEPS_SEED": "3"}
    cfg = load_config({"batch_size": "8"}, str(file), env)
    assert (cfg.batch_size, cfg.lr, cfg.seed, cfg.model) == (8, 0.05, 3, "resnet18")
    assert cfg.momentum == Config().momentum


def test_a_written_config_reads_back_as_the_same_config(tmp_path):
    # A run's config.toml: every field, and strings that need escaping (a quote, a backslash,
    # a non-ASCII letter), come back unchanged.
    cfg = load_config({"run_dir": 'runs/a "quoted" \\ näive', "lr": "0.03", "evaluate": "false",
                       "freeze": "gradnorm", "freeze_max_fraction": "0.75"}, None, {})
    file = tmp_path / "config.toml"
    file.write_text(to_toml(cfg))
    assert load_config({}, str(file), {}) == cfg


@pytest.mark.parametrize("cli,words", [
    ({"batch_size": "0"}, "batch_size must be > 0"),
    ({"model": "vgg"}, "model"),
    ({"chunk_bytes": str(8 << 20)}, "chunk_bytes"),
    ({"lr": "fast"}, "--lr"),
    ({"freeze": "static", "freeze_blocks": "0"}, "blocks > 0"),
    ({"freeze": "gradnorm", "freeze_norm": "3"}, "norm"),
    ({"vote_quorum": "0"}, "quorum"),
    ({"lr_block_decay": "0"}, r"lr_block_decay must be in \(0, 1\]"),
    ({"lr_block_decay": "1.5"}, "lr_block_decay"),
    ({"push_dtype": "float16"}, r"push_dtype: 'float16' is not one of \['float32', 'bfloat16'\]"),
    ({"push_dtype": "bfloat16", "mode": "single"}, "mode 'single' sends nothing"),
    ({"pull_dtype": "int8"}, r"pull_dtype: 'int8' is not one of \['float32', 'bfloat16'\]"),
    ({"pull_dtype": "bfloat16", "mode": "ddp"}, "mode 'ddp' pulls nothing"),
    ({"backup_workers": "4", "num_workers": "4"}, r"need 0 <= backup_workers < num_workers \(4\)"),
    ({"backup_workers": "-1"}, "need 0 <= backup_workers"),
    ({"backup_workers": "1", "mode": "ddp"}, "backup_workers 1 is a PS's: mode 'ddp' has no PS"),
    ({"backup_workers": "1", "ps_shards": "2", "freeze": "none"}, "each shard would complete its rounds"),
    ({"keepalive_s": "0.5"}, r"keepalive_s 0.5: 0 \(off\) or at least 1"),
    ({"max_staleness": "2"}, "max_staleness 2: at least 0, and more only with backup_workers"),
    # nan passes a `< 0` check and inf bounds nothing: both refused before anything runs
    ({"model": "mlp", "weights": "random", "dataset": "synthetic"}, r"image_size 32: model mlp .* takes 8x8"),
    ({"listen": "127.0.0.1:99999"}, r"listen: '127.0.0.1:99999' is not host:port with a port from 0 to 65535"),
    ({"listen": "nonsense"}, "listen: 'nonsense' is not host:port"),
    ({"ps_address": "10.0.0.1:0"}, "ps_address: '10.0.0.1:0' is not host:port with a port from 1 to 65535"),
    ({"link_rate": "1gbit"}, "link_rate, link_delay_ms, link_mtu and link_offload .* need network netns"),
    ({"link_mtu": "9000"}, "need network netns"),
    ({"mode": "ddp", "cache_memory_bytes": "1000000"}, "the activation cache is a PS worker's; mode 'ddp' has none"),
    ({"data_file": "reviews.csv"}, "data_file, text_column and label_column are dataset csv's"),
    ({"lr": "nan"}, "lr must be a finite number, got nan"),
    ({"weight_decay": "inf"}, "weight_decay must be a finite number, got inf"),
    ({"worker_timeout_s": "nan"}, "worker_timeout_s must be a finite number"),
    ({"link_delay_ms": "inf"}, "link_delay_ms must be a finite number"),
    ({"sharding": "dirichlet", "dirichlet_alpha": "0"}, "dirichlet_alpha must be > 0"),
    ({"lr_schedule": "step", "lr_step_size": "5", "lr_gamma": "-0.5"}, "lr_gamma must be > 0"),
    ({"keepalive_s": "-1"}, r"keepalive_s -1: 0 \(off\) or at least 1"),
    ({"freeze": "threshold", "freeze_tau": "0"}, "tau > 0"),
    ({"freeze": "linear", "linear_mode": "composer", "linear_start": "1"}, r"linear start 1.0: .* in \[0, 1\)"),
    ({"freeze": "linear", "linear_start": "-2"}, "linear start -2.0: epochs >= 0"),
    ({"freeze": "linear", "linear_mode": "composer", "linear_level": "1.5"}, r"linear level 1.5: .* in \[0, 1\]"),
    ({"freeze": "linear", "linear_mode": "pipetransformer", "linear_alpha": "0"}, r"linear alpha 0.0: .* in \(0, 1\]"),
])
def test_config_rejects_bad_values(cli, words):
    with pytest.raises(ValueError, match=words):
        load_config(cli, None, {})


def test_config_rejects_unknown_file_keys_and_bad_env(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text("learning_rate = 0.1\n")
    with pytest.raises(ValueError, match="unknown setting"):
        load_config({}, str(file), {})
    with pytest.raises(ValueError, match="FREEZEPS_EVALUATE"):
        load_config({}, None, {"FREEZEPS_EVALUATE": "maybe"})
    # TOML's true is no number (Python's bool is an int), 5 no model name
    for line, words in (("num_workers = true", "num_workers: True is not a valid int"),
                        ("lr = false", "lr: False is not a valid float"),
                        ("model = 5", "model: 5 is not a valid str"),
                        ("seed = 99999999999999999999999", r"seed must be in 0\.\.4294967295")):
        file.write_text(line + "\n")
        with pytest.raises(ValueError, match=words):
            load_config({}, str(file), {})
    # TOML has nan and inf literals, the environment float("nan"): refused from every source
    file.write_text("lr = nan\n")
    with pytest.raises(ValueError, match="lr must be a finite number, got nan"):
        load_config({}, str(file), {})
    with pytest.raises(ValueError, match="momentum must be a finite number, got inf"):
        load_config({}, None, {"FREEZEPS_MOMENTUM": "inf"})
