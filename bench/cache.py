"""What the activation cache buys: step time per frozen depth, and a whole adaptive run.

    python -m bench.cache --out docs/results/cache [--models resnet18,efficientnet_lite0] [--runs efficientnet,minilm-rt]

Part 1, per model and frozen depth d (batch 64, 32x32 inputs, `--threads` torch threads,
weights random: speed does not depend on them), over `--repeats` turns, each turn the steps of
each kind in a fresh order:
  - full: the prefix's forward under no_grad, then the active blocks' forward and backward
    (a worker's step without the cache);
  - cached: the prefix's output from a warm memory cache, then the same forward and backward.
    As in training: the rows were cached in one epoch's shuffled order, the store laid them
    out in the next epoch's order at its start (CachedPrefix.arrange), and each batch of that
    epoch is read (CachedPrefix.outputs) as a view of the slab;
  - arrange: that lay-out, per step: it happens once an epoch for the worker's whole shard,
    so it is timed alone on a shard of SHARD rows of the same entries, x batch / SHARD;
  - gather: the rows gathered (one index_select) from one tensor that holds them all, then the
    same forward and backward: what a cache that copies each batch out must at least pay;
  - suffix: the forward and backward alone on a tensor already in place: the physical limit.
Goal: (cached + arrange) <= 1.1 x suffix at every depth, the ratio taken within each turn
(median over the turns).

Part 2: adaptive `freezeps run`s (a PS and 4 workers on this machine) without and with the
cache, everything else equal, per workload (WHOLE_RUNS): training time, hit rate, cache bytes.
Goal: >= 1.3x faster.

Part 3 (`--scattered FRACTIONS`): an epoch of a worker's MiniLM shard (SCATTER_BATCHES batches
of 16, 128 tokens) where a fraction of the rows must be run (extended from a shallower depth
to the frozen one, as after a freeze, or from the input: `--scattered-depths`), the rest hits,
scattered at random over the batches; each turn
once with the coming batches handed to the cache (their rows take a short run's places) and
once without (a short run padded with copies), in a fresh order, each from a fresh store. The
prefix's seconds for the epoch, the number of runs, and the outputs checked equal bit for bit.

Writes OUT/results.json and OUT/README.md (the tables, the command, the machine, the date).
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench import FREEZEPS, machine, run_freezeps
from bench.compare import ADAPTIVE, WORKLOADS
from freezeps.report import format_cache, summarize_run
from worker.cache import ActivationCache
from worker.cached_prefix import CachedPrefix
from worker.models import build_model

BATCH, SIDE, WARM_BATCHES = 64, 32, 4
SHARD = 3072  # a worker's shard in the EfficientNet whole run: 12,288 samples over 4 workers


def _time(fns: list, turns: int, kept_s: float = 0.05) -> np.ndarray:
    """Seconds of each of `fns` per turn, shape (turns, len(fns)).

    A turn runs each of them in a fresh order, each several times in a row, and keeps the mean
    of all but the first of those: a training run at a frozen depth takes one kind of step
    after another, and a short step right after a long one of another kind finds the CPU caches
    cold (in a fixed order of single steps, the cached step, always after the full one,
    measured 0.90 ms against the suffix-only step's 0.52 ms at ResNet-18's depth 6). A kind's
    kept runs last about `kept_s` per turn (one for a long step, up to 50 for a step under a
    millisecond, whose single timings jitter by a quarter). Turns are short and many, so that
    the machine's drift over seconds is shared out evenly (runs of 5 in 6 turns put
    EfficientNet-Lite0's cached and suffix-only steps 0.86-1.23x apart); ratios between kinds
    are taken within each turn (see `_paired`)."""
    kept = []
    for fn in fns:  # warm-up: allocator, kernel selection; and how long a step takes
        fn()
        t0 = time.perf_counter()
        fn()
        kept.append(max(1, min(50, round(kept_s / (time.perf_counter() - t0)))))
    times = np.zeros((turns, len(fns)))
    order = np.random.default_rng(0)
    for turn in range(turns):
        for i in order.permutation(len(fns)):
            fns[i]()
            t0 = time.perf_counter()
            for _ in range(kept[i]):
                fns[i]()
            times[turn, i] = (time.perf_counter() - t0) / kept[i]
    return times


def _paired(numerator: np.ndarray, denominator: np.ndarray) -> tuple[float, float, float]:
    """Median and quartiles of numerator/denominator taken turn by turn: steps of 70-420 ms
    drift by +-10% over a minute on a shared host, and a ratio of two steps taken seconds apart
    in the same turn cancels most of that drift, where a ratio of two medians does not."""
    q1, median, q3 = np.percentile(numerator / denominator, [25, 50, 75])
    return float(median), float(q1), float(q3)


def _arrange_time(entry: torch.Tensor, repeats: int) -> float:
    """Median seconds to lay out a shard of SHARD entries like `entry` in a new order."""
    store = ActivationCache(1 << 34)
    store.put_many("shard", np.arange(SHARD), entry.expand(SHARD, *entry.shape).clone())
    rng, times = np.random.default_rng(1), []
    for _ in range(max(5, repeats // 4)):
        order = rng.permutation(SHARD)
        t0 = time.perf_counter()
        if not store.arrange("shard", order):
            raise RuntimeError("the bench's shard could not be laid out")
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_times(name: str, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(name, 10)
    images = torch.randn(BATCH * WARM_BATCHES, 3, SIDE, SIDE)
    labels = torch.randint(0, 10, (BATCH * WARM_BATCHES,))
    rng = np.random.default_rng(0)
    first_epoch, epoch = (rng.permutation(len(images)) for _ in range(2))
    batches = np.split(epoch, WARM_BATCHES)
    rows = []
    for depth in range(1, len(model.blocks)):
        model.set_frozen(depth)
        cached = CachedPrefix(model, ActivationCache(1 << 31), f"bench-{depth}", from_depth=1, prefetch_batches=0)
        cached.follow(depth, len(images))
        for ids in np.split(first_epoch, WARM_BATCHES):  # warm: every row in the memory tier
            cached.outputs(ids, lambda r, ids=ids: images[ids[r]])
        cached.arrange(epoch)
        arrange_s = _arrange_time(cached.store.read(cached.key, epoch[:1])[0][0], repeats) * BATCH / SHARD
        turn = iter(range(1 << 30))

        def step(prefix_output):
            ids = batches[next(turn) % WARM_BATCHES]
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model.suffix(prefix_output(ids)), labels[ids]).backward()

        h = {int(ids[0]): model.prefix(images[ids]) for ids in batches}
        every_row = torch.empty(len(images), *h[int(epoch[0])].shape[1:])
        for ids in batches:
            every_row[torch.from_numpy(ids)] = h[int(ids[0])]
        gathered = torch.empty_like(h[int(epoch[0])])
        times = _time([
            lambda: step(lambda ids: model.prefix(images[ids])),
            lambda: step(lambda ids: cached.outputs(ids, lambda r: images[ids[r]])),
            lambda: step(lambda ids: torch.index_select(every_row, 0, torch.from_numpy(ids), out=gathered)),
            lambda: step(lambda ids: h[int(ids[0])])], repeats)
        # Checks of what was timed, kept under python -O (an assert would vanish there).
        if cached.counters.computed != len(images):
            raise RuntimeError(f"{cached.counters.computed - len(images)} timed cached steps missed the cache")
        if cached.store.stats.views * BATCH != cached.counters.cached:
            raise RuntimeError("a timed cached step did not read its rows as one view")
        full, warm, gather, suffix = np.median(times, axis=0)
        cost = times[:, 1] + arrange_s
        cost_ratio, cost_q1, cost_q3 = _paired(cost, times[:, 3])
        entry = every_row[0].numel() * every_row.element_size()
        rows.append({"model": name, "depth": depth, "frozen": model.block_names[depth - 1],
                     "full_ms": full * 1e3, "cached_ms": warm * 1e3, "arrange_ms": arrange_s * 1e3,
                     "gather_ms": gather * 1e3, "suffix_ms": suffix * 1e3, "cached_over_suffix": cost_ratio,
                     "cached_over_suffix_quartiles": [cost_q1, cost_q3],
                     "gather_over_suffix": _paired(times[:, 2], times[:, 3])[0],
                     "speedup": _paired(times[:, 0], cost)[0], "entry_bytes": entry})
        print(f"[cache] {name} depth {depth:2d}: full {full * 1e3:7.1f} ms, cached {warm * 1e3:8.2f} + arrange "
              f"{arrange_s * 1e3:6.3f} ms, gather {gather * 1e3:8.2f} ms, suffix {suffix * 1e3:8.2f} ms, "
              f"(cached + arrange)/suffix {cost_ratio:.2f} ({cost_q1:.2f}-{cost_q3:.2f}), "
              f"gather/suffix {rows[-1]['gather_over_suffix']:.2f}, entry {entry} B", flush=True)
    return rows


# Part 3: an epoch with scattered rows to run, the coming batches handed to the cache or not.
SCATTER_MODEL, SCATTER_BATCH, SCATTER_BATCHES, SCATTER_TOKENS = "minilm", 16, 32, 128


def _token_ids(n: int, rng: np.random.Generator) -> torch.Tensor:
    """n texts of 20-128 random tokens ([CLS] first), padded with 0 to SCATTER_TOKENS."""
    ids = torch.from_numpy(rng.integers(1000, 20000, (n, SCATTER_TOKENS)))
    ids[:, 0] = 101
    for row, length in enumerate(rng.integers(20, SCATTER_TOKENS + 1, n).tolist()):
        ids[row, length:] = 0
    return ids


def _entries(model, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Blocks start..end-1 on x, SCATTER_BATCH rows at a time (as the cache runs them)."""
    return torch.cat([model.prefix(x[i:i + SCATTER_BATCH], start, end) for i in range(0, len(x), SCATTER_BATCH)])


def scattered_epochs(fractions: list[float], source: int, depth: int, turns: int) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(SCATTER_MODEL, 8)  # random weights: speed does not depend on them
    if depth >= len(model.blocks):
        raise ValueError(f"{SCATTER_MODEL} has {len(model.blocks)} blocks: a frozen depth of {depth} leaves none to train")
    model.set_frozen(depth)  # the frozen blocks in eval mode, the others training
    rng = np.random.default_rng(0)
    n = SCATTER_BATCH * SCATTER_BATCHES
    x = _token_ids(n, rng)
    at_source = _entries(model, x, 0, source)
    want = _entries(model, at_source, source, depth)
    batches = np.split(rng.permutation(n), SCATTER_BATCHES)
    rows = []
    for fraction in fractions:
        to_run = rng.choice(n, round(fraction * n), replace=False)
        hits = np.setdiff1d(np.arange(n), to_run)

        def epoch(reading_ahead: bool, check: bool = False) -> tuple[float, int]:
            cached = CachedPrefix(model, ActivationCache(1 << 33), "bench-scattered", from_depth=1, prefetch_batches=0)
            if source:  # else the rows to run are misses
                model.set_frozen(source)
                cached.follow(source, n)
                cached.store.put_many(cached.key, to_run, at_source[torch.from_numpy(to_run)])
                model.set_frozen(depth)
            cached.follow(depth, n)
            if len(hits):
                cached.store.put_many(cached.key, hits, want[torch.from_numpy(hits)])
            runs = 0
            t0 = time.perf_counter()
            for i, ids in enumerate(batches):
                def coming(k: int, i: int = i):
                    ahead = np.concatenate(batches[i + 1:i + 1 + k] or [np.zeros(0, np.int64)])
                    return ahead, lambda r: x[ahead[r]]
                got = cached.outputs(ids, lambda r, ids=ids: x[ids[r]], coming if reading_ahead else None)
                runs += cached.last_batch["ran"] > 0
                if check and not torch.equal(got, want[torch.from_numpy(ids)]):
                    raise RuntimeError(f"batch {i}: the cache's rows differ from the prefix's")
            spent = time.perf_counter() - t0
            if cached.counters.computed + cached.counters.extended != len(to_run):
                raise RuntimeError("every row to run must be counted once, as computed or extended")
            cached.close()
            return spent, runs

        runs = [epoch(False, check=True)[1], epoch(True, check=True)[1]]  # also the warm-up
        times = np.zeros((turns, 2))
        for turn in range(turns):
            for mode in np.random.default_rng(turn).permutation(2):
                times[turn, mode] = epoch(bool(mode))[0]
        ratio, q1, q3 = _paired(times[:, 1], times[:, 0])
        rows.append({"source": source, "depth": depth, "fraction": fraction, "rows_to_run": len(to_run), "padded_s": float(np.median(times[:, 0])),
                     "ahead_s": float(np.median(times[:, 1])), "ahead_over_padded": ratio,
                     "ahead_over_padded_quartiles": [q1, q3], "padded_runs": runs[0], "ahead_runs": runs[1]})
        print(f"[cache] scattered {fraction:.0%} ({len(to_run)} of {n} rows, depth {source}->{depth}): padded "
              f"{rows[-1]['padded_s']:.2f} s in {runs[0]} runs, ahead {rows[-1]['ahead_s']:.2f} s in {runs[1]} runs, "
              f"ratio {ratio:.2f} ({q1:.2f}-{q3:.2f})", flush=True)
    return rows


# Part 2, whole adaptive runs without and with the cache, on two workloads:
# - efficientnet: the default model (EfficientNet-Lite0, ImageNet weights) on Fashion-MNIST with
#   AutoFreeze's percentile rule, as gradnorm-pct of the freeze sweep (docs/results/freeze-sweep),
#   on half the samples for more epochs;
# - minilm-rt: bench/compare's MiniLM workload (docs/text.md) for 4 epochs with its gradnorm rule,
#   where the boundary settles deep in the second epoch.
WHOLE_RUNS = {
    "efficientnet": (["--num-workers", "4", "--epochs", "5", "--train-samples", "12288", "--test-samples", "1000",
                      "--seed", "0", "--freeze", "gradnorm", "--freeze-warmup", "16", "--freeze-interval", "8"],
                     ["--cache-memory-bytes", str(256 << 20), "--cache-disk-bytes", str(1 << 30)]),
    "minilm-rt": ([*WORKLOADS["minilm-rt"], *ADAPTIVE, "--epochs", "4"], ["--cache-memory-bytes", str(1 << 30)]),
}


def whole_run(workload: str, cache: bool, run_dir: Path) -> dict:
    run_args, cache_args = WHOLE_RUNS[workload]
    args = [*run_args, *cache_args] if cache else run_args
    cmd = [*FREEZEPS, "run", *args, "--run-dir", str(run_dir)]
    print(f"[cache] {workload} run: {' '.join(cmd[len(FREEZEPS):])}", flush=True)
    started = time.monotonic()
    run_freezeps(cmd, timeout_s=3600)
    facts = summarize_run(run_dir)
    return {"name": "cache" if cache else "no cache", "workload": workload, "args": args,
            "process_wall_s": time.monotonic() - started, "train_s": facts["train_s"], "eval_s": facts["eval_s"],
            "accuracy": facts["accuracy"], "freezes": facts["freezes"], "cache": facts["cache"],
            "eval_cache": facts["eval_cache"], "phase_ms_per_step": facts["phase_ms_per_step"]}


def _step_table(results: dict) -> list[str]:
    lines = ["", "## Step time per frozen depth (batch 64, 32x32, "
             f"{results['repeats']} turns, each turn the steps of each kind in a fresh order, each timed after one "
             f"of its kind, {results['threads']} threads)", "",
             "Times are medians over the turns; ratios are medians of the ratio within each turn (quartiles in "
             "brackets), which cancels the host's drift between turns.", "",
             "| model | depth | last frozen | full ms | cached ms | arrange ms per step | gather-only ms "
             "| suffix-only ms | (cached + arrange) / suffix | gather / suffix | speed-up | entry bytes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["steps"]:
        q1, q3 = r["cached_over_suffix_quartiles"]
        lines.append(f"| {r['model']} | {r['depth']} | {r['frozen']} | {r['full_ms']:.1f} | "
                     f"{r['cached_ms']:.2f} | {r['arrange_ms']:.3f} | {r['gather_ms']:.2f} | {r['suffix_ms']:.2f} | "
                     f"{r['cached_over_suffix']:.2f} [{q1:.2f}, {q3:.2f}] | {r['gather_over_suffix']:.2f} | "
                     f"{r['speedup']:.2f}x | "
                     f"{r['entry_bytes']} |")
    return lines


def write_readme(results: dict, out: Path, command: str) -> None:
    lines = ["# Activation cache: step time per frozen depth, and whole adaptive runs", "",
             f"Measured {results['date']} on {results['machine']} with `{command}`."]
    if results["steps"]:
        lines += _step_table(results)
    if results.get("scattered"):
        lines += ["", f"## An epoch with scattered rows to run ({SCATTER_MODEL}, {SCATTER_BATCHES} batches of "
                  f"{SCATTER_BATCH}, {SCATTER_TOKENS} tokens; rows extended from depth SOURCE to DEPTH, from the "
                  "input where SOURCE is 0)", "",
                  "Prefix seconds for the epoch, medians over the turns; the ratio is taken within each turn "
                  "(quartiles in brackets). Padded: a short run is padded to 16 rows with copies; ahead: the "
                  "coming batches' rows take those places.", "",
                  "| depths | rows to run | padded s (runs) | ahead s (runs) | ahead / padded |", "|---|---|---|---|---|"]
        for r in results["scattered"]:
            q1, q3 = r["ahead_over_padded_quartiles"]
            lines.append(f"| {r['source']} -> {r['depth']} | {r['fraction']:.0%} ({r['rows_to_run']}) | {r['padded_s']:.2f} ({r['padded_runs']}) | "
                         f"{r['ahead_s']:.2f} ({r['ahead_runs']}) | {r['ahead_over_padded']:.2f} [{q1:.2f}, {q3:.2f}] |")
    for workload, (plain, cached) in results.get("runs", {}).items():
        run_args, cache_args = WHOLE_RUNS[workload]
        lines += ["", f"## A whole adaptive run: {workload}", "", f"`freezeps run {' '.join(run_args)}`, then with "
                  f"`{' '.join(cache_args)}` added.", "",
                  "| run | train s | of which eval s | process s | final accuracy | freezes (step: blocks) |",
                  "|---|---|---|---|---|---|"]
        for r in (plain, cached):
            freezes = "; ".join(f"{f['step']}: {f['from']}->{f['to']}" for f in r["freezes"]) or "-"
            acc = f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "-"
            lines.append(f"| {r['name']} | {r['train_s']:.1f} | {r['eval_s']:.1f} | {r['process_wall_s']:.1f} | "
                         f"{acc} | {freezes} |")
        lines += ["", f"Speed-up (training time): {plain['train_s'] / cached['train_s']:.2f}x; leaving out the "
                  f"evaluations: {(plain['train_s'] - plain['eval_s']) / (cached['train_s'] - cached['eval_s']):.2f}x.",
                  "", format_cache(cached["cache"])]
        if cached.get("eval_cache"):
            lines += ["", format_cache(cached["eval_cache"], "evaluation through the cache")]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def _write(results: dict, out: Path, command: str) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_readme(results, out, command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/results/cache"))
    parser.add_argument("--models", default="resnet18,efficientnet_lite0")
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", default=",".join(WHOLE_RUNS),
                        help=f"whole runs, of {', '.join(WHOLE_RUNS)}; '' for part 1 only")
    parser.add_argument("--scattered", default="",
                        help="part 3: fractions of an epoch's rows to run, e.g. 0.01,0.05,0.2,0.6 ('': skip)")
    parser.add_argument("--scattered-depths", default="4:5",
                        help="part 3: SOURCE:DEPTH[,...]: the depth the rows to run are cached at (0: misses), "
                             "and the frozen depth")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs") / time.strftime("cache-%Y-%m-%d-%H%M%S"),
                        help="where the whole runs go (a new folder: freezeps run refuses one that holds a run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"date": date.today().isoformat(), "machine": machine.describe(), "repeats": args.repeats, "threads": args.threads,
               "steps": [row for name in filter(None, args.models.split(",")) for row in step_times(name, args.repeats)]}
    if args.scattered:
        pairs = [tuple(int(d) for d in pair.split(":")) for pair in args.scattered_depths.split(",")]
        if any(len(pair) != 2 or not 0 <= pair[0] < pair[1] for pair in pairs):
            raise ValueError(f"--scattered-depths {args.scattered_depths}: SOURCE:DEPTH pairs, the source below the depth")
        results["scattered"] = [row for source, depth in pairs for row in scattered_epochs(
            [float(f) for f in args.scattered.split(",")], source, depth, max(3, args.repeats // 4))]
    command = "python -m bench.cache " + shlex.join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    results["runs"] = {}
    for workload in filter(None, args.runs.split(",")):
        _write(results, args.out, command)  # what is measured so far survives a failed run
        results["runs"][workload] = [whole_run(workload, False, args.runs_dir / f"{workload}-plain"),
                                     whole_run(workload, True, args.runs_dir / workload)]
    _write(results, args.out, command)
    print((args.out / "README.md").read_text())


if __name__ == "__main__":
    main()
