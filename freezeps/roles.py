"""Turn one Config into the settings each role takes, and run that role."""
from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import grpc

from freezeps.config import PS, WORKER, Config, auth_for, freeze_policy, ps_addresses
from proto.security import AuthError
from proto.transport import InterfaceCounter
from ps.checkpoint import CheckpointError, list_checkpoints
from ps.main import CannotServe, CheckpointPlan, serve_ps
from ps.server import ServerSettings
from worker.cached_prefix import CacheSettings
from worker.client import ConnectError
from worker.models import text_model_folder
from worker.text import TEXT_DATASETS, TextSettings
from worker.train import SetupError, WorkerSettings, run_worker


def server_settings(cfg: Config) -> ServerSettings:
    return ServerSettings(num_workers=cfg.num_workers, chunk_bytes=cfg.chunk_bytes, lr=cfg.lr,
                          optimizer=cfg.optimizer, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          nesterov=cfg.nesterov, adam_betas=(cfg.adam_beta1, cfg.adam_beta2), adam_eps=cfg.adam_eps,
                          lr_schedule=cfg.lr_schedule, warmup_steps=cfg.warmup_steps,
                          lr_step_size=cfg.lr_step_size, lr_gamma=cfg.lr_gamma, lr_block_decay=cfg.lr_block_decay,
                          round_timeout_s=cfg.round_timeout_s, worker_timeout_s=cfg.worker_timeout_s,
                          start_timeout_s=cfg.start_timeout_s,
                          max_model_bytes=cfg.max_model_bytes, shard=cfg.ps_shard, num_shards=cfg.ps_shards,
                          push_dtype=cfg.push_dtype, pull_dtype=cfg.pull_dtype, backup_workers=cfg.backup_workers,
                          max_staleness=cfg.max_staleness)


def worker_settings(cfg: Config, local_rank: int = 0) -> WorkerSettings:
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.num_workers)
    return WorkerSettings(ps_addresses=tuple(ps_addresses(cfg)), model=cfg.model, weights=cfg.weights, dataset=cfg.dataset,
                          data_dir=Path(cfg.data_dir), download=cfg.download, train_samples=cfg.train_samples,
                          test_samples=cfg.test_samples, image_size=cfg.image_size, augment=cfg.augment,
                          sharding=cfg.sharding, dirichlet_alpha=cfg.dirichlet_alpha, batch_size=cfg.batch_size,
                          epochs=cfg.epochs, steps=cfg.steps, seed=cfg.seed, threads=threads,
                          evaluate=cfg.evaluate, eval_every=cfg.eval_every, log_dir=Path(cfg.log_dir) if cfg.log_dir else None,
                          connect_retries=cfg.connect_retries, rpc_timeout_s=cfg.rpc_timeout_s,
                          keepalive_s=cfg.keepalive_s,
                          max_rejoins=cfg.max_rejoins, cache=cache_settings(cfg), text=text_settings(cfg),
                          sparse_push=cfg.sparse_push, sparse_pull=cfg.sparse_pull, overlap_push=cfg.overlap_push,
                          overlap_pull=cfg.overlap_pull, eval_split=cfg.eval_split,
                          frozen_dropout=cfg.frozen_dropout, text_pooling=cfg.text_pooling, device=cfg.device,
                          local_rank=local_rank)


def local_rank(environ, device: str, default: int = 0) -> int:
    """This process's place among its host's (torchrun's LOCAL_RANK, which `freezeps run` and
    the systemd units set), which picks its GPU with device "cuda" (worker.device); read only
    then, so that a CPU worker does not care what it holds. `default` where it is unset or unused."""
    if device != "cuda" or "LOCAL_RANK" not in environ:
        return default
    raw = environ["LOCAL_RANK"]
    if not raw.isdigit():
        raise ValueError(f"LOCAL_RANK {raw!r}: expected a whole number >= 0 (with device cuda it picks the GPU)")
    return int(raw)


def text_settings(cfg: Config) -> TextSettings | None:
    """The tokenizer (the text model's own) and file of a text dataset; None for images."""
    if cfg.dataset not in TEXT_DATASETS:
        return None
    return TextSettings(text_model_folder(cfg.model, cfg.weights), cfg.max_seq_len, cfg.data_file, cfg.text_column,
                        cfg.label_column)


def cache_settings(cfg: Config) -> CacheSettings | None:
    if not (cfg.cache_memory_bytes or cfg.cache_disk_bytes):
        return None
    return CacheSettings(cfg.cache_memory_bytes, cfg.cache_disk_bytes, Path(cfg.cache_dir) if cfg.cache_dir else None,
                         cfg.cache_from_depth, cfg.cache_prefetch)


def checkpoint_plan(cfg: Config) -> CheckpointPlan | None:
    folder = cfg.checkpoint_dir or cfg.resume
    return CheckpointPlan(Path(folder), cfg.checkpoint_every, cfg.checkpoint_keep) if folder else None


def resume_from(cfg: Config) -> Path | None:
    """The folder to restore from: --resume, or with --auto-resume the checkpoint folder when
    it holds a checkpoint (all of them corrupted is still an error, not a fresh start)."""
    if cfg.resume:
        return Path(cfg.resume)
    if cfg.auto_resume and list_checkpoints(Path(cfg.checkpoint_dir)):
        return Path(cfg.checkpoint_dir)
    return None


def run_ps(cfg: Config) -> int:
    """Serve one run; exit status 0, 2 when the security settings cannot be used (or would
    serve strangers) or a file or address cannot be (the run log's or checkpoints' folder,
    a port another process holds), or 5 when --resume finds no checkpoint that fits (or a run
    that does not resume finds checkpoints in its folder)."""
    if cfg.checkpoint_every and not (cfg.checkpoint_dir or cfg.resume):  # `freezeps run` gives the run folder's
        print(f"freezeps ps: checkpoint_every {cfg.checkpoint_every} needs checkpoint_dir, where the checkpoints go",
              file=sys.stderr)
        return 2
    try:
        serve_ps(server_settings(cfg), freeze_policy(cfg), cfg.listen, Path(cfg.run_log) if cfg.run_log else None,
                 auth=auth_for(cfg, PS), insecure=cfg.insecure, wire=InterfaceCounter() if cfg.count_wire_bytes else None,
                 params_out=Path(cfg.params_out) if cfg.params_out else None,
                 checkpoints=checkpoint_plan(cfg), resume=resume_from(cfg), keepalive_s=cfg.keepalive_s)
    except AuthError as e:
        print(f"freezeps ps: {e}", file=sys.stderr)
        return 2
    except CannotServe as e:
        print(f"freezeps ps: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"freezeps ps: {e}", file=sys.stderr)
        return 5
    return 0


def run_worker_role(cfg: Config) -> int:
    """Run one worker; exit status 0 when done, 2 when its settings cannot be used (security,
    cache, device, or the data: a missing dataset, a sequence longer than the model takes,
    fewer samples than workers), 3 when the PS cannot be reached, 4 on an RPC error (a refused
    token among them)."""
    try:
        settings = replace(worker_settings(cfg, local_rank(os.environ, cfg.device)), auth=auth_for(cfg, WORKER))
    except (AuthError, ValueError) as e:
        print(f"freezeps worker: {e}", file=sys.stderr)
        return 2
    try:
        run_worker(settings)
    except SetupError as e:
        print(f"freezeps worker: {e}", file=sys.stderr)
        return 2
    except ConnectError as e:
        print(f"freezeps worker: {e}", file=sys.stderr)
        return 3
    except grpc.RpcError as e:
        print(f"freezeps worker: the PS answered {e.code().name}: {e.details()}", file=sys.stderr)
        return 4
    return 0
