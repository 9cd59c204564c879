"""The baselines a user would otherwise run, on the same code: DDP (torch.distributed with
gloo on the CPU, NCCL with device cuda), and a single process with no communication at all.

Same model, data, sharding, batch order, optimizer maths, LR schedule and freeze engines as
a freezeps run. The freeze decision is made on rank 0 from the all-reduced gradients (the
same average the PS's central decision reads) and broadcast; a freeze takes effect at the
next step, as on the PS. DDP is rebuilt over the parameters that still train when the
frozen prefix grows, so frozen blocks are neither all-reduced nor back-propagated.

BatchNorm running statistics are averaged over the ranks after each step (an all-reduce of
the active blocks' buffers), as the PS averages the pushed ones, instead of DDP's default
broadcast of rank 0's; their bytes are counted with the gradients'.

The single process trains on the union of the workers' batches (batch_size x num_workers)
in one step: the same optimisation trajectory, without distribution.

Rank 0 writes RUN_DIR/params.pt as the PS does, and RUN_DIR/ddp.jsonl in the shape of a PS run log ("round" records with the
tensor bytes each rank handed to the all-reduce per block, "freeze" records, a "summary"),
so `freezeps report` reads both. Bytes: a rank hands its gradients to the all-reduce and gets
the average back (with the running statistics); that is counted as its push and pull
payload, which then equals a PS worker's (with push_dtype bfloat16, torch's bf16 compression
hook halves the gradients' both ways, where a PS halves only the push). The wire bytes (ring
all-reduce moves 2(N-1)/N of them each way) come from the links in --network netns.

With device cuda each rank trains on its GPU (LOCAL_RANK's, as a worker's; else its rank's)
and all-reduces over NCCL, which needs a GPU of its own per rank.

    python -m freezeps.ddp --config RUN_DIR/config.toml --rank R --world N --master HOST:PORT
"""
from __future__ import annotations

import argparse
import datetime
import faulthandler
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from freeze.engines import RoundStats, make_engine
from freezeps.config import Config, freeze_policy, load_config
from freezeps.roles import local_rank, text_settings
from proto.layout import WIRE_DTYPES
from proto.runlog import JsonlLog
from ps.main import save_params
from ps.optim import torch_adamw
from ps.policy import FreezeHistory, decide
from ps.schedule import block_lr_scales, learning_rate
from worker.data import batch_order, load_dataset, make_batch, shard_indices
from worker.device import resolve_device, synchronizer
from worker.flat import FlatModel
from worker.models import build_model
from worker.train import eval_due, eval_share, evaluate, input_channels


def _block_bytes(model, grad_element_bytes: int = 4) -> list[int]:
    """Per block: what a step all-reduces for it, its gradients (`grad_element_bytes` an element:
    2 with the bf16 hook) and float32 buffers."""
    return [sum(p.numel() * grad_element_bytes for p in block.parameters())
            + sum(b.numel() * b.element_size() for b in block.buffers() if b.is_floating_point())
            for block in model.blocks]


def train(cfg: Config, rank: int, world: int, run_dir: Path | None, single: bool = False,
          device: torch.device = torch.device("cpu")) -> torch.nn.Module:
    """Train as one rank of `world` on `device` (dist already initialised when world > 1, with
    a backend that all-reduces `device`'s tensors); returns the model."""
    if cfg.freeze_decision == "votes":
        raise ValueError("the ddp and single modes decide centrally: freeze_decision must be 'central'")
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // (1 if single else world)))
    torch.manual_seed(cfg.seed)
    text = text_settings(cfg)
    train_set = load_dataset(cfg.dataset, Path(cfg.data_dir), True, cfg.download, cfg.train_samples, cfg.seed, text)
    # This rank's share of the test set at each evaluation (None: it does not evaluate), as in the PS mode.
    share = eval_share(cfg.evaluate, cfg.eval_split, rank, 1 if single else world)
    test_set = load_dataset(cfg.dataset, Path(cfg.data_dir), False, cfg.download, cfg.test_samples, cfg.seed, text) \
        if share else None
    model = build_model(cfg.model, train_set.num_classes, cfg.weights, cfg.frozen_dropout,
                        cfg.text_pooling).to(device)
    sync = synchronizer(device)  # so that the phases' times are the device's, not its queue's
    channels = input_channels(model)
    names = model.block_names
    block_bytes = _block_bytes(model)  # the model's, in float32: the no-freeze reference
    moves = _block_bytes(model, WIRE_DTYPES[cfg.push_dtype])  # what an all-reduce moves per block
    workers = cfg.num_workers  # data-parallel width: world for ddp, emulated for single
    steps_per_epoch = max(len(train_set) // (workers * cfg.batch_size), 1)
    total_steps = cfg.steps or cfg.epochs * steps_per_epoch
    labels = train_set.labels.numpy()
    shards = [shard_indices(labels, r, workers, cfg.sharding, cfg.dirichlet_alpha, cfg.seed)
              for r in (range(workers) if single else [rank])]
    ranks = list(range(workers)) if single else [rank]

    policy = freeze_policy(cfg)
    engine = make_engine(policy.spec)
    frozen = engine.initial(len(names))
    model.set_frozen(frozen)
    optimizer = _optimizer(cfg, model.blocks, block_lr_scales(len(names), cfg.lr_block_decay))
    net = model if single else _ddp(model, cfg.push_dtype, device)
    log = JsonlLog(run_dir / "ddp.jsonl" if run_dir is not None and rank == 0 else None)
    wlog = JsonlLog(run_dir / f"worker-{rank}.jsonl" if run_dir is not None else None)
    if frozen:
        log.write({"event": "freeze", "step": 0, "from": 0, "to": frozen, "blocks": names[:frozen], "initial": True})
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    totals = {"forward_s": 0.0, "backward_s": 0.0, "step_s": 0.0}
    allreduce = {"in": 0, "out": 0}
    by_block_total: dict[str, int] = {}
    history, started, evals = FreezeHistory(), time.perf_counter(), []
    for step in range(total_steps):
        if share and eval_due(step, steps_per_epoch, cfg.eval_every):
            evals.append(evaluate(model, test_set, cfg, channels, step, steps_per_epoch, share=share))
            wlog.write(evals[-1])
        t0 = time.perf_counter()
        epoch, pos = step // steps_per_epoch, (step % steps_per_epoch) * cfg.batch_size
        idx = np.concatenate([np.take(batch_order(s, epoch, r, cfg.seed), np.arange(pos, pos + cfg.batch_size),
                                      mode="wrap") for r, s in zip(ranks, shards)])
        x, y = (t.to(device) for t in make_batch(train_set, idx, cfg.image_size, channels, cfg.augment, gen))
        lr = learning_rate(step, base_lr=cfg.lr, schedule=cfg.lr_schedule, total_steps=total_steps,
                           warmup_steps=cfg.warmup_steps, step_size=cfg.lr_step_size, gamma=cfg.lr_gamma)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]  # the PS's product (BlockStore.apply), so the rates agree to the bit
        optimizer.zero_grad(set_to_none=True)
        sync()
        t1 = time.perf_counter()
        loss = F.cross_entropy(net(x), y)
        sync()
        t2 = time.perf_counter()
        loss.backward()  # DDP all-reduces the active blocks' gradients, bucket by bucket, as they are ready
        sync()
        t3 = time.perf_counter()

        # The freeze decision on rank 0, from the averaged gradients, before the step applies them.
        active = range(frozen, len(names))
        stats = RoundStats(step=step, num_blocks=len(names), frozen_blocks=frozen, total_steps=total_steps,
                           steps_per_epoch=steps_per_epoch,
                           grads={b: [p.grad.reshape(-1) for p in model.blocks[b].parameters() if p.grad is not None]
                                  for b in active} if policy.needs_gradients else {})
        decided, info, history = decide(policy, engine, stats, [], history) if rank == 0 else (frozen, {}, history)
        optimizer.step()
        if not single:
            _average_running_stats(model, frozen, world)
        sync()
        t4 = time.perf_counter()
        if not single:
            decision = torch.tensor([decided], device=device)
            dist.broadcast(decision, src=0)
            decided = int(decision)
        moved = {names[b]: moves[b] for b in active if moves[b]}
        for name, n in moved.items():
            by_block_total[name] = by_block_total.get(name, 0) + n * workers
        allreduce["in"] += sum(moved.values()) * workers
        allreduce["out"] += sum(moved.values()) * workers
        losses = torch.tensor([loss.item()], device=device)
        if not single:
            dist.all_reduce(losses)  # for the log only: the mean training loss of the step
            losses /= world
        for key, seconds in zip(totals, (t2 - t1, t3 - t2, t4 - t3)):
            totals[key] += seconds
        log.write({"event": "round", "step": step, "round_s": round(t4 - t0, 6), "lr": lr, "frozen_blocks": frozen,
                   "samples": len(y) * (1 if single else world), "loss": float(losses),
                   **({"decision": info} if info else {}),
                   "bytes": {"by_block": {"Allreduce": {d: {str(names.index(n)): {"payload": v * workers,
                                                                                  "message": v * workers,
                                                                                  "messages": workers}
                                                            for n, v in moved.items()} for d in ("in", "out")}}}})
        if decided > frozen:
            log.write({"event": "freeze", "step": step + 1, "epoch": (step + 1) / steps_per_epoch, "from": frozen,
                       "to": decided, "blocks": names[frozen:decided], **info})
            for block in model.blocks[frozen:decided]:
                for p in block.parameters():
                    optimizer.state.pop(p, None)  # frozen blocks' optimizer state is freed, as on the PS
                    p.grad = None
            frozen = decided
            model.set_frozen(frozen)
            if not single:  # DDP over the parameters that still train
                net = _ddp(model, cfg.push_dtype, device)
    if share and total_steps > 0:
        evals.append(evaluate(model, test_set, cfg, channels, total_steps, steps_per_epoch, share=share))
        wlog.write(evals[-1])
    wall = time.perf_counter() - started
    wlog.write({"event": "worker_summary", "rank": rank, "steps": total_steps, "wall_s": wall,
                "phases_s": totals, "evals": evals})
    blocks = [{"name": n, "bytes": b} for n, b in zip(names, block_bytes)]
    log.write({"event": "summary", "mode": "single" if single else "ddp", "model": cfg.model,
               "num_workers": workers, "steps": total_steps, "wall_s": round(wall, 3), "frozen_blocks": frozen,
               "model_bytes": sum(block_bytes), "blocks": blocks,
               "push_payload": allreduce["in"], "pull_payload": allreduce["out"],
               "push_payload_no_freeze": total_steps * workers * sum(block_bytes),
               "pull_payload_no_freeze": total_steps * workers * sum(block_bytes),
               "push_by_block": by_block_total, "pull_by_block": by_block_total,
               "message_bytes": {"Allreduce": dict(allreduce)},
               "bytes": {"Allreduce": {d: {str(names.index(n)): {"payload": v, "message": v, "messages": 0}
                                           for n, v in by_block_total.items()} for d in ("in", "out")}}})
    log.close()
    wlog.close()
    if run_dir is not None and rank == 0:
        save_params(FlatModel(model).values_by_name(), run_dir / "params.pt")
    return model


def _optimizer(cfg: Config, blocks, lr_scales: list[float]) -> torch.optim.Optimizer:
    """torch's optimizer for the PS's (ps/optim.py): the same update, so runs compare; one
    parameter group per block, at that block's share of the learning rate."""
    params = [{"params": list(block.parameters()), "lr_scale": scale} for block, scale in zip(blocks, lr_scales)]
    if cfg.optimizer == "adamw":
        return torch_adamw(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                           weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov)


def _ddp(model, push_dtype: str, device: torch.device) -> DistributedDataParallel:
    # Running statistics are averaged over the ranks after each step, as the PS does, rather
    # than DDP's default of broadcasting rank 0's before each forward: the two modes then compute
    # the same thing. (The wrapper still broadcasts rank 0's buffers when it is built, which
    # changes nothing: the ranks' buffers are equal then, at the start and after every average.)
    net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                  forward_sync_buffers=False)
    if push_dtype == "bfloat16":
        # torch's own: each rank's gradient / world, rounded to bf16, all-reduced (summed in
        # bf16) and widened back. Not the PS's float32 sum, so the two modes no longer agree
        # to the bit; the bytes halve alike.
        net.register_comm_hook(None, default_hooks.bf16_compress_hook)
    return net


def _average_running_stats(model, frozen: int, world: int) -> None:
    """Average the active blocks' float buffers (BatchNorm running statistics) over the ranks."""
    buffers = [b for block in model.blocks[frozen:] for b in block.buffers() if b.is_floating_point()]
    if buffers:
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for b in buffers:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m freezeps.ddp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the run's config.toml")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world", type=int, default=1, help="processes; 1 with --single")
    parser.add_argument("--master", default="127.0.0.1:29500", help="rank 0's host:port for the rendezvous")
    parser.add_argument("--single", action="store_true", help="one process, no communication")
    parser.add_argument("--run-dir", help="where ddp.jsonl and worker-RANK.jsonl go")
    args = parser.parse_args(argv)
    cfg = load_config({}, args.config)
    run_dir = Path(args.run_dir) if args.run_dir else None
    try:
        device = resolve_device(cfg.device, local_rank(os.environ, cfg.device, default=args.rank),
                                torch.cuda.device_count())
    except ValueError as e:
        print(f"freezeps ddp: {e}", file=sys.stderr)
        return 2
    try:
        if args.single:
            train(cfg, 0, 1, run_dir, single=True, device=device)
            return 0
        # CI twice saw a rank end with SIGABRT ("terminate called without an active exception") and
        # no other output; never reproduced here (140 pairs of ranks under load). faulthandler puts
        # every thread's Python stack into the rank's log should it happen again.
        faulthandler.enable()
        # NCCL all-reduces CUDA tensors only; gloo the CPU's.
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://{args.master}",
                                rank=args.rank, world_size=args.world,
                                timeout=datetime.timedelta(seconds=cfg.round_timeout_s))
        try:
            train(cfg, args.rank, args.world, run_dir, device=device)
            dist.barrier()  # leave together: rank 0 still evaluates and saves after the last step
        finally:
            dist.destroy_process_group()
    except (ValueError, FileNotFoundError) as e:  # the data does not fit the settings; a rank is never restarted
        print(f"freezeps {'single' if args.single else 'ddp'}: {e}", file=sys.stderr)
        return 2
    print(f"rank {args.rank}: done", file=sys.stderr, flush=True)
    # Everything is written and closed, but gloo's loop and work threads outlive
    # destroy_process_group; the interpreter's teardown with them still running is the likely
    # place of that abort, so the rank leaves without it.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
