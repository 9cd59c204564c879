"""One typed configuration for every role, with a written precedence.

Precedence, highest first: command-line flags > the TOML file given with --config >
environment variables FREEZEPS_<FIELD> (e.g. FREEZEPS_NUM_WORKERS=4) > the defaults below.
`Config.validate()` runs after merging and raises ValueError naming the bad field.
"""
from __future__ import annotations

import json
import math
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from typing import Any

from freeze.engines import ENGINES, EngineSpec
from freezeps.netns import LinkShape
from proto.layout import WIRE_DTYPES
from proto.security import Auth, read_auth
from proto.transport import KEEPALIVE_S, MAX_CHUNK_BYTES
from ps.optim import OPTIMIZERS, make_optimizer
from ps.policy import VOTE_WEIGHTS, FreezePolicy
from ps.schedule import SCHEDULES, block_lr_scales
from ps.server import SHARDED_CENTRAL, straggler_refusal
from worker.cached_prefix import cache_refusal
from worker.data import DATASETS
from worker.device import device_refusal
from worker.models import MODELS, TEXT_MODELS, TEXT_POOLINGS, image_size_refusal, text_pooling_refusal
from worker.text import TEXT_DATASETS

PS, WORKER, RUN, STATUS = "ps", "worker", "run", "status"


def _f(default, help: str, roles: tuple[str, ...], choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "roles": roles, "choices": choices})


@dataclass(frozen=True)
class Config:
    # -- parameter server ------------------------------------------------------------------
    listen: str = _f("127.0.0.1:50051", "address the PS binds, host:port; one that is not loopback needs "
                     "token_file or tls_client_auth, or insecure", (PS,))
    num_workers: int = _f(4, "workers in the run; round 0 starts when this many have joined", (PS, RUN))
    chunk_bytes: int = _f(1 << 20, "largest tensor payload of one message, bytes", (PS, RUN))
    push_dtype: str = _f("float32", "what pushes carry gradients (and running statistics) in: bfloat16 halves "
                         "their bytes, and the PS sums them in float32; with --mode ddp, DDP's bf16 compression "
                         "hook (gradients only)", (PS, RUN), tuple(WIRE_DTYPES))
    pull_dtype: str = _f("float32", "what pulls carry the parameters' changes in: bfloat16 halves their bytes "
                         "(each round's change, rounded, with error feedback: the PS keeps what the workers "
                         "hold, so rounding does not accumulate); float32 pulls whole values", (PS, RUN),
                         tuple(WIRE_DTYPES))
    optimizer: str = _f("sgd", "the PS's optimizer", (PS, RUN), OPTIMIZERS)
    lr: float = _f(0.1, "learning rate (the schedule's peak)", (PS, RUN))
    momentum: float = _f(0.9, "sgd: momentum", (PS, RUN))
    weight_decay: float = _f(1e-4, "sgd: L2 penalty added to the gradient; adamw: decoupled weight decay", (PS, RUN))
    nesterov: bool = _f(False, "sgd: use Nesterov momentum", (PS, RUN))
    adam_beta1: float = _f(0.9, "adamw: decay of the first moment", (PS, RUN))
    adam_beta2: float = _f(0.999, "adamw: decay of the second moment", (PS, RUN))
    adam_eps: float = _f(1e-8, "adamw: added to the second moment's root", (PS, RUN))
    lr_schedule: str = _f("constant", "learning-rate schedule", (PS, RUN), SCHEDULES)
    warmup_steps: int = _f(0, "linear learning-rate warm-up, rounds", (PS, RUN))
    lr_step_size: int = _f(0, "rounds between decays of the step schedule", (PS, RUN))
    lr_gamma: float = _f(0.1, "decay factor of the step schedule", (PS, RUN))
    lr_block_decay: float = _f(1.0, "layer-wise learning-rate decay: block b of n trains at the schedule's rate "
                               "times this^(n-1-b), the head at the full rate (1 = off; ELECTRA used 0.8)", (PS, RUN))
    # The defaults make `freezeps run` the main job: EfficientNet-Lite0 (ImageNet weights) on
    # a 24,576-sample slice of Fashion-MNIST, 4 workers, 2 epochs of 96 rounds, with the
    # stem and MBConv blocks 0-13 (half the bytes) frozen from epoch 2: about 2 minutes here (1 min 48 s, 2026-12-04).
    freeze: str = _f("static", "freeze engine", (PS, RUN), ENGINES)
    freeze_blocks: int = _f(15, "static: leading blocks to freeze", (PS, RUN))
    freeze_step: int = _f(96, "static: first step at which they are frozen (0 = from the start)", (PS, RUN))
    freeze_interval: int = _f(10, "gradnorm, threshold: rounds per test (gradients are summed over them); "
                                  "0 = AutoFreeze's, 20 tests per run", (PS, RUN))
    freeze_variant: str = _f("percentile", "gradnorm: the seed's min rule or AutoFreeze's percentile rule",
                             (PS, RUN), ("min", "percentile"))
    freeze_percentile: float = _f(50.0, "gradnorm percentile rule: the percentile of the active blocks' eta",
                                  (PS, RUN))
    freeze_norm: int = _f(2, "gradnorm, threshold: 1 (L1) or 2 (L2) norm", (PS, RUN))
    freeze_tau: float = _f(0.1, "threshold: a leading block freezes when its eta is below this", (PS, RUN))
    freeze_rate: float = _f(0.5, "threshold: at most this fraction of the active blocks freezes per test", (PS, RUN))
    linear_mode: str = _f("epoch", "linear: one block per epoch, Composer's fractions, or PipeTransformer's",
                          (PS, RUN), ("epoch", "composer", "pipetransformer"))
    linear_start: float = _f(0.0, "linear: epochs before the first freeze (epoch) or fraction of training (composer)",
                             (PS, RUN))
    linear_level: float = _f(1.0, "linear composer: fraction of the blocks frozen at the end", (PS, RUN))
    linear_alpha: float = _f(0.5, "linear pipetransformer: alpha of ceil(L(1-(1-alpha)^epoch))", (PS, RUN))
    freeze_warmup: int = _f(0, "guard: no freeze before this step", (PS, RUN))
    freeze_min_gap: int = _f(0, "guard: at least this many steps between two freezes", (PS, RUN))
    freeze_patience: int = _f(1, "guard (gradnorm, threshold): a block freezes once this many tests in a row "
                                 "proposed it", (PS, RUN))
    freeze_head: bool = _f(False, "guard: allow the last block (the head) to freeze", (PS, RUN))
    freeze_max_fraction: float = _f(1.0, "guard: at most this fraction of the blocks frozen", (PS, RUN))
    freeze_deadline: int = _f(0, "guard (gradnorm, threshold): from this step on the most the other guards allow "
                                 "is frozen, whatever the tests say; 0: no deadline", (PS, RUN))
    freeze_decision: str = _f("central", "gradnorm, threshold: the PS decides from averaged gradients, or "
                              "workers vote from their own", (PS, RUN), ("central", "votes"))
    vote_weights: str = _f("shard", "weight of a worker's vote", (PS, RUN), VOTE_WEIGHTS)
    vote_quorum: float = _f(0.5, "fraction of the total vote weight a prefix needs", (PS, RUN))
    round_timeout_s: float = _f(300.0, "longest a pull waits for its round, seconds (more than worker_timeout_s); "
                                "a Heartbeat from any worker restarts it",
                                (PS, RUN))
    worker_timeout_s: float = _f(120.0, "a worker that has not pushed this long after its push was due (or after "
                                 "its last Heartbeat, sent while it evaluates) is dropped and the round completes "
                                 "without it", (PS, RUN))
    backup_workers: int = _f(0, "a round completes once all live workers but this many have pushed: the slowest "
                             "are waited out and their late pushes not applied (they skip to the run's step); "
                             "rounds then depend on timing, not only on the pushes", (PS, RUN))
    max_staleness: int = _f(0, "with backup_workers: a late push whose parameters are at most this many rounds "
                            "old (and no block froze since) goes into the current round, in its worker's place, "
                            "instead of being thrown away (bounded staleness); 0: thrown away", (PS, RUN))
    start_timeout_s: float = _f(120.0, "a run (or a resumed run) still waiting for workers this long after its "
                                "initial values arrived starts with those present", (PS, RUN))
    ps_shards: int = _f(1, "PS shards: separate PS processes, each owning a contiguous range of blocks of roughly "
                        "equal bytes (ps-lite style); run: one per shard (with netns, each on its own link)", (PS, RUN))
    ps_shard: int = _f(0, "which of the ps_shards this PS is, 0-based", (PS,))
    max_model_bytes: int = _f(4 << 30, "largest model (tensor bytes) the PS accepts from the first Join; it "
                              "allocates about 3x this", (PS, RUN))
    checkpoint_dir: str = _f("", "folder for the PS's checkpoints; empty: none (run: RUN_DIR/checkpoints when "
                             "checkpoint_every > 0)", (PS,))
    checkpoint_every: int = _f(0, "checkpoint every this many rounds (also at SIGTERM and at the end); 0: only "
                               "at SIGTERM and the end", (PS, RUN))
    checkpoint_keep: int = _f(2, "checkpoints kept; a corrupted newest one falls back to the one before", (PS,))
    resume: str = _f("", "restore the newest good checkpoint in this folder before serving (and checkpoint "
                     "there unless checkpoint_dir is set)", (PS,))
    auto_resume: bool = _f(False, "restore the newest good checkpoint in checkpoint_dir when it holds one, else "
                           "start fresh: for a PS that systemd or Docker restarts", (PS,))
    run_log: str = _f("", "PS run log (JSONL) path; empty: none (run: RUN_DIR/ps.jsonl)", (PS,))
    params_out: str = _f("", "save the final parameters here ({tensor name: tensor}, torch.save); empty: "
                         "not saved (run: RUN_DIR/params.pt)", (PS,))
    # -- worker ----------------------------------------------------------------------------
    ps_address: str = _f("127.0.0.1:50051", "PS address a worker connects to, host:port; with several PS shards, "
                         "theirs in shard order, comma-separated", (WORKER,))
    model: str = _f("efficientnet_lite0", "model", (WORKER, RUN), tuple(sorted(MODELS)))
    weights: str = _f("imagenet", "initial weights: pretrained (imagenet for the vision models), random, a "
                      "state_dict file, or for bert a Hugging Face folder", (WORKER, RUN))
    dataset: str = _f("fashion_mnist", "dataset", (WORKER, RUN), DATASETS)
    data_dir: str = _f("data", "dataset folder (torchvision layout)", (WORKER, RUN))
    download: bool = _f(False, "download the dataset through torchvision if missing (needs internet)", (WORKER, RUN))
    train_samples: int = _f(24576, "use a fixed random subset of the training set; 0 = all", (WORKER, RUN))
    test_samples: int = _f(2000, "use a fixed random subset of the test set; 0 = all", (WORKER, RUN))
    image_size: int = _f(32, "input side in pixels (smaller images are padded)", (WORKER, RUN))
    text_pooling: str = _f("cls", "text models: what the head classifies: cls, BERT's pooler on the [CLS] token; "
                           "mean, the mean of the tokens' last hidden states, the pooling sentence-transformers "
                           "checkpoints (all-MiniLM-L6-v2) were trained with", (WORKER, RUN), TEXT_POOLINGS)
    max_seq_len: int = _f(64, "text: tokens per sample, [CLS] and [SEP] included (padded or truncated)",
                          (WORKER, RUN))
    data_file: str = _f("", "dataset csv: the CSV (or .tsv/.tab) file; a tenth of its rows is held out for testing",
                        (WORKER, RUN))
    text_column: str = _f("text", "dataset csv: the column of the texts", (WORKER, RUN))
    label_column: str = _f("label", "dataset csv: the column of the labels", (WORKER, RUN))
    augment: bool = _f(False, "random crop and horizontal flip", (WORKER, RUN))
    sharding: str = _f("iid", "how the training set is split over workers", (WORKER, RUN), ("iid", "dirichlet"))
    dirichlet_alpha: float = _f(0.5, "label skew of dirichlet sharding; smaller is more skewed", (WORKER, RUN))
    batch_size: int = _f(64, "samples per worker per step", (WORKER, RUN))
    epochs: int = _f(2, "passes over the training set", (WORKER, RUN))
    steps: int = _f(0, "rounds to run; 0 = epochs x steps per epoch", (WORKER, RUN))
    seed: int = _f(0, "seed of sharding, batch order, augmentation and init", (WORKER, RUN))
    device: str = _f("cpu", "where workers (and ddp's and single's processes) compute: cpu; cuda, a GPU per process "
                     "(LOCAL_RANK mod the GPUs visible; run sets LOCAL_RANK to each worker's index), where ddp "
                     "all-reduces with NCCL and needs a GPU per rank; or cuda:N. The PS computes on the CPU",
                     (WORKER, RUN))
    threads: int = _f(0, "torch threads per worker; 0 = this host's cores / num_workers (right when every "
                       "worker runs here; a worker on a host of its own wants the host's cores)", (WORKER, RUN))
    sparse_push: bool = _f(True, "push an embedding matrix's gradient as its nonzero rows (with their indices) "
                           "when that is smaller than the matrix", (WORKER, RUN))
    sparse_pull: bool = _f(True, "pull of an embedding matrix only the rows the next batch reads (of the word "
                           "embeddings its token ids, of the position embeddings its positions), in float32; the "
                           "other rows, which that batch does not read, stay as they were: "
                           "training is the same to the bit", (WORKER, RUN))
    overlap_push: bool = _f(True, "push each block's gradients as soon as backward has finished it (last block "
                            "first), while backward computes the blocks before it (in votes mode the vote after them); "
                            "off, the push starts when backward has ended. The same bytes, the same training",
                            (WORKER, RUN))
    overlap_pull: bool = _f(True, "run the forward pass through each pulled block as soon as it has landed, while "
                            "the pull brings the blocks after it; off, or when a freeze was decided, before an "
                            "evaluation, or when the run went on without this worker, forward starts when all of "
                            "the pull has come. The same bytes, the same training", (WORKER, RUN))
    frozen_dropout: bool = _f(False, "frozen blocks keep dropout on while training, as before their freeze (BatchNorm "
                              "stays frozen); without the activation cache, which needs a prefix that computes the "
                              "same output every time", (WORKER, RUN))
    evaluate: bool = _f(True, "measure test accuracy at each epoch end", (WORKER, RUN))
    eval_every: int = _f(0, "also measure test accuracy every this many steps; 0 = epoch ends only",
                         (WORKER, RUN))
    eval_split: bool = _f(True, "every worker scores its 1/N of the test set, all at once (the report adds the "
                          "shares up); off: rank 0 scores all of it while the others wait", (WORKER, RUN))
    log_dir: str = _f("", "folder for the worker's log worker-RANK.jsonl; empty: none", (WORKER,))
    connect_retries: int = _f(8, "join attempts (exponential backoff) before giving up", (WORKER, RUN))
    rpc_timeout_s: float = _f(600.0, "deadline of one pull or push, seconds", (WORKER, RUN))
    keepalive_s: float = _f(KEEPALIVE_S, "seconds of silence on a connection after which its end pings the "
                            "other (HTTP/2 keepalive); one that does not answer within as long again is taken as "
                            "gone (a vanished PS host: the worker's call fails and it joins again; a vanished "
                            "worker: the PS ends its calls). 0: no pings; else at least 1", (PS, WORKER, RUN))
    max_rejoins: int = _f(20, "times a worker joins again after the PS dropped it or restarted, before it gives up",
                          (WORKER, RUN))
    # -- activation cache (see worker/cached_prefix.py) --------------------------------------
    cache_memory_bytes: int = _f(0, "activation cache: memory budget per worker, bytes; with cache_disk_bytes 0 "
                                 "too, no cache (caching needs augment off)", (WORKER, RUN))
    cache_disk_bytes: int = _f(0, "activation cache: disk budget per worker, bytes, in cache_dir", (WORKER, RUN))
    cache_dir: str = _f("", "activation cache: folder of the disk tier; runs on one host with the same base model "
                        "and data may share it (run: RUN_DIR/cache)", (WORKER, RUN))
    cache_from_depth: int = _f(0, "activation cache: cache once this many blocks are frozen; 0: once the first "
                               "batch at a depth measures that reading is faster than computing", (WORKER, RUN))
    cache_prefetch: int = _f(2, "activation cache: batches read ahead from the disk tier", (WORKER, RUN))
    # -- security (see proto/security.py); secrets live in files, never in flags or logs ----
    tls: bool = _f(False, "TLS on every call: the PS serves with tls_cert and tls_key, a worker checks the PS's "
                   "certificate against tls_ca (run: makes a CA and certificates in RUN_DIR/secrets)",
                   (PS, WORKER, RUN, STATUS))
    tls_cert: str = _f("", "PEM certificate file: the PS's own, or a worker's client certificate for mutual TLS",
                       (PS, WORKER, STATUS))
    tls_key: str = _f("", "PEM private key file of tls_cert", (PS, WORKER, STATUS))
    tls_ca: str = _f("", "PEM CA certificate file: a worker checks the PS's certificate against it (empty: the "
                     "system's roots); with tls_client_auth the PS checks the workers' against it",
                     (PS, WORKER, STATUS))
    tls_client_auth: bool = _f(False, "mutual TLS: the PS refuses callers without a certificate signed by tls_ca",
                               (PS, RUN))
    token_file: str = _f("", "file holding the shared-secret token that every call carries and the PS checks; "
                         "empty: none (run: a fresh one in RUN_DIR/secrets)", (PS, WORKER, RUN, STATUS))
    insecure: bool = _f(False, "let the PS listen on a non-loopback address without a token or mutual TLS", (PS,))
    # -- launcher --------------------------------------------------------------------------
    run_dir: str = _f("", "run folder for logs; empty: runs/<date-time>", (RUN,))
    mode: str = _f("ps", "ps: a freezeps run; ddp: the same training on torch.distributed DDP (gloo; NCCL with "
                   "device cuda); single: one process on the union of the workers' batches, no communication", (RUN,),
                   ("ps", "ddp", "single"))
    network: str = _f("loopback", "loopback, or netns: the PS and each worker in its own network namespace "
                      "on a bridge, wire bytes read from the links (needs root)", (RUN,), ("loopback", "netns"))
    link_rate: str = _f("", "netns: bandwidth of each host's link, e.g. 1gbit or 10gbit; empty: unlimited", (RUN,))
    link_delay_ms: float = _f(0.0, "netns: one-way delay of each host's link, ms (needs the kernel's netem)", (RUN,))
    link_mtu: int = _f(1500, "netns: MTU of the links", (RUN,))
    link_offload: bool = _f(False, "netns: segmentation offload on the links (less CPU per byte; the counters "
                            "then count headers once per 64 KiB, not per frame)", (RUN,))
    count_wire_bytes: bool = _f(False, "record the bytes this host's interfaces (all but lo) sent and received "
                                "in each round record; exact in a netns, where only the PS's traffic is", (PS,))
    log_level: str = _f("info", "logging level", (PS, WORKER, RUN), ("debug", "info", "warning", "error"))

    def validate(self) -> "Config":
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ValueError(f"{f.name}: {value!r} is not one of {list(choices)}")
            # nan passes every comparison below (nan < 0 is False) and inf bounds nothing: a
            # run would start and fail later (an lr of nan at the first round's update)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
        positive = ("num_workers", "chunk_bytes", "ps_shards", "batch_size", "epochs", "image_size", "max_seq_len", "connect_retries",
                "checkpoint_keep", "max_model_bytes")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        nonneg = ("eval_every", "lr", "momentum", "weight_decay", "warmup_steps", "lr_step_size", "freeze_blocks",
                  "freeze_step", "train_samples", "test_samples", "steps", "threads", "checkpoint_every", "max_rejoins",
                  "cache_memory_bytes", "cache_disk_bytes", "cache_from_depth", "cache_prefetch")
        for name in nonneg:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.chunk_bytes % 4 or self.chunk_bytes > MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be a multiple of 4 and at most {MAX_CHUNK_BYTES}, got {self.chunk_bytes}")
        if min(self.round_timeout_s, self.rpc_timeout_s, self.worker_timeout_s, self.start_timeout_s) <= 0:
            raise ValueError("timeouts must be > 0")
        if not 0 <= self.seed < 2 ** 32:  # the workers' generators are seeded with seed * 1000 + rank
            raise ValueError(f"seed must be in 0..{2 ** 32 - 1}, got {self.seed}")
        if self.dirichlet_alpha <= 0:
            raise ValueError(f"dirichlet_alpha must be > 0, got {self.dirichlet_alpha}")
        if self.lr_gamma <= 0:
            raise ValueError(f"lr_gamma must be > 0, got {self.lr_gamma}")
        if self.keepalive_s < 0 or 0 < self.keepalive_s < 1:
            raise ValueError(f"keepalive_s {self.keepalive_s:g}: 0 (off) or at least 1 (a PS takes a worker's pings "
                             "at most once a second)")
        if self.round_timeout_s <= self.worker_timeout_s:
            raise ValueError(f"round_timeout_s ({self.round_timeout_s}) must exceed worker_timeout_s "
                             f"({self.worker_timeout_s}): a pull must outwait the dropping of a late worker")
        if not 0 <= self.ps_shard < self.ps_shards:
            raise ValueError(f"ps_shard {self.ps_shard} must be in 0..ps_shards-1 ({self.ps_shards} shards)")
        if self.push_dtype != "float32" and self.mode == "single":
            raise ValueError(f"push_dtype {self.push_dtype!r}: mode 'single' sends nothing")
        if self.pull_dtype != "float32" and self.mode != "ps":
            raise ValueError(f"pull_dtype {self.pull_dtype!r} is a PS's: mode {self.mode!r} pulls nothing (with "
                             f"ddp, push_dtype bfloat16 narrows the all-reduce both ways)")
        if why := straggler_refusal(self.num_workers, self.backup_workers, self.max_staleness, self.ps_shards):
            raise ValueError(why)
        if self.backup_workers and self.mode != "ps":
            raise ValueError(f"backup_workers {self.backup_workers} is a PS's: mode {self.mode!r} has no PS")
        if self.ps_shards > 1 and self.mode != "ps":
            raise ValueError(f"ps_shards {self.ps_shards}: shards are a PS's; mode {self.mode!r} has no PS")
        ps_addresses(self)
        if why := address_refusal("listen", self.listen, lowest_port=0):
            raise ValueError(why)
        if why := device_refusal(self.device):
            raise ValueError(why)
        if (self.cache_memory_bytes or self.cache_disk_bytes) and (why := cache_refusal(self.augment,
                                                                                       self.frozen_dropout,
                                                                                       self.device)):
            raise ValueError(f"cache_memory_bytes, cache_disk_bytes: {why}")
        if (self.cache_memory_bytes or self.cache_disk_bytes) and self.mode != "ps":
            raise ValueError(f"cache_memory_bytes, cache_disk_bytes: the activation cache is a PS worker's; mode "
                             f"{self.mode!r} has none")
        if self.dataset != "csv" and (self.data_file or self.text_column != Config.text_column
                                      or self.label_column != Config.label_column):
            raise ValueError(f"data_file, text_column and label_column are dataset csv's; dataset {self.dataset!r} "
                             "reads its own file")
        if (self.model in TEXT_MODELS) != (self.dataset in TEXT_DATASETS):
            raise ValueError(f"model {self.model} and dataset {self.dataset}: a text model needs a text dataset "
                             f"({', '.join(TEXT_DATASETS)}) and a vision model an image one")
        if why := text_pooling_refusal(self.model, self.text_pooling) or image_size_refusal(self.model,
                                                                                          self.image_size):
            raise ValueError(why)
        block_lr_scales(1, self.lr_block_decay)
        if self.auto_resume and (self.resume or not self.checkpoint_dir):
            raise ValueError("auto_resume needs checkpoint_dir, and not resume (which insists on a checkpoint)")
        if self.lr_schedule == "step" and self.lr_step_size == 0:
            raise ValueError("lr_schedule 'step' needs lr_step_size > 0")
        if not self.tls and (self.tls_cert or self.tls_key or self.tls_ca or self.tls_client_auth):
            raise ValueError("tls_cert, tls_key, tls_ca and tls_client_auth only apply with tls on")
        make_optimizer(self.optimizer, momentum=self.momentum, weight_decay=self.weight_decay, nesterov=self.nesterov,
                       betas=(self.adam_beta1, self.adam_beta2), eps=self.adam_eps)
        policy = freeze_policy(self)  # validates the engine and the guards
        if self.ps_shards > 1 and policy.needs_gradients:
            raise ValueError(f"ps_shards {self.ps_shards} with freeze {self.freeze!r}: {SHARDED_CENTRAL}")
        link_shape(self)
        if self.network != "netns" and (self.link_rate or self.link_delay_ms or self.link_offload
                                        or self.link_mtu != Config.link_mtu):
            raise ValueError("link_rate, link_delay_ms, link_mtu and link_offload shape the links between network "
                             f"namespaces: they need network netns (network is {self.network!r})")
        return self


def engine_spec(cfg: Config) -> EngineSpec:
    return EngineSpec(name=cfg.freeze, blocks=cfg.freeze_blocks, from_step=cfg.freeze_step,
                      interval=cfg.freeze_interval, variant=cfg.freeze_variant, percentile=cfg.freeze_percentile,
                      norm=cfg.freeze_norm, tau=cfg.freeze_tau, rate=cfg.freeze_rate, linear_mode=cfg.linear_mode,
                      start=cfg.linear_start, level=cfg.linear_level, alpha=cfg.linear_alpha)


def freeze_policy(cfg: Config) -> FreezePolicy:
    return FreezePolicy(spec=engine_spec(cfg), votes=cfg.freeze_decision == "votes", vote_weights=cfg.vote_weights,
                        quorum=cfg.vote_quorum, warmup_steps=cfg.freeze_warmup, min_gap=cfg.freeze_min_gap,
                        patience=cfg.freeze_patience,
                        freeze_head=cfg.freeze_head, max_fraction=cfg.freeze_max_fraction,
                        deadline=cfg.freeze_deadline).validate()


def ps_addresses(cfg: Config) -> list[str]:
    """The PS shards' addresses, in shard order (ValueError when one is not host:port)."""
    addresses = [a.strip() for a in cfg.ps_address.split(",")]
    for a in addresses:
        if why := address_refusal("ps_address", a, lowest_port=1):
            raise ValueError(why)
    return addresses


def address_refusal(setting: str, address: str, lowest_port: int) -> str | None:
    """Why `address` is not host:port with a TCP port from `lowest_port` (0 where any free port
    will do) to 65535, or None. (gRPC takes a larger port modulo 65536: 99999 would serve on 34463.)"""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not lowest_port <= int(port) <= 65535:
        return f"{setting}: {address!r} is not host:port with a port from {lowest_port} to 65535"
    return None


def auth_for(cfg: Config, role: str) -> Auth:
    """What a role presents and trusts, read from the files the settings name (AuthError if unusable).
    Only the PS demands client certificates: tls_client_auth is its setting."""
    return read_auth(tls=cfg.tls, cert=cfg.tls_cert, key=cfg.tls_key, ca=cfg.tls_ca,
                     client_auth=cfg.tls_client_auth and role == PS, token_file=cfg.token_file)


def link_shape(cfg: Config) -> LinkShape:
    return LinkShape(rate=cfg.link_rate, delay_ms=cfg.link_delay_ms, mtu=cfg.link_mtu,
                     offload=cfg.link_offload).validate()


def _coerce(name: str, kind: Any, raw: Any) -> Any:
    """Turn a string (environment) or TOML value into the field's type, or raise ValueError."""
    kind = {"int": int, "float": float, "bool": bool, "str": str}.get(kind, kind)
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: {raw!r} is not a boolean")
    try:
        # TOML's own types: true is no number (Python's bool is an int), 1.5 no int, 5 no name
        if isinstance(raw, bool) or (kind is int and isinstance(raw, float)) or (kind is str and not isinstance(raw, str)):
            raise ValueError
        return kind(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {raw!r} is not a valid {kind.__name__}") from None


def load_config(cli: dict[str, Any] | None = None, config_file: str | None = None,
                environ: dict[str, str] | None = None) -> Config:
    """Merge defaults < environment < file < command line, then validate."""
    environ = os.environ if environ is None else environ
    known = {f.name: f for f in fields(Config)}
    values: dict[str, Any] = {}
    for name, f in known.items():
        key = f"FREEZEPS_{name.upper()}"
        if key in environ:
            values[name] = _coerce(key, f.type, environ[key])
    if config_file:
        with open(config_file, "rb") as fh:
            table = tomllib.load(fh)
        for key, raw in table.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(f"{config_file}: unknown setting {key!r}")
            values[name] = _coerce(f"{config_file}: {key}", known[name].type, raw)
    for name, raw in (cli or {}).items():
        if raw is not None:
            values[name] = _coerce(f"--{name.replace('_', '-')}", known[name].type, raw)
    return replace(Config(), **values).validate()


def to_toml(cfg: Config) -> str:
    """The file that load_config(config_file=...) reads back as cfg (a run's config.toml).
    Strings are written as JSON strings, whose escapes are TOML's basic-string escapes."""
    lines = []
    for f in fields(Config):
        value = getattr(cfg, f.name)
        if isinstance(value, bool):
            lines.append(f"{f.name} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{f.name} = {value!r}")
        else:
            lines.append(f"{f.name} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def fields_for(role: str):
    """The settings a role reads, for its --help and its flags."""
    return [f for f in fields(Config) if role in f.metadata["roles"]]
