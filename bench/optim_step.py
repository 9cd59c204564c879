"""Time the PS's optimizer step on a whole model against torch.optim on the model's tensors.

    python -m bench.optim_step --model resnet18 --repeats 20
    python -m bench.optim_step --model minilm --optimizer adamw --threads 2

The PS steps over views into its flat per-block buffers (ps/optim.py), after averaging the
summed gradients in place (one division by the round's sample count), and takes the gradient
norms the freeze engines read (BlockStore.apply). torch.optim alone steps the model's own
parameters with the gradient already averaged, as DDP hands it, in each of its
implementations. The PS process runs with torch's default threads (one per core); --threads
sets them here. Prints one JSON line per optimizer: median ms per step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench import machine
from proto.layout import layout_from_manifest
from ps.optim import OPTIMIZERS, make_optimizer
from ps.store import BlockStore
from worker.flat import manifest_for
from worker.models import build_model


def _median_ms(step, repeats: int) -> float:
    step()  # first step allocates the momentum buffers
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--weight", type=float, default=240.0, help="the round's sample count W (15 workers x 16)")
    parser.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = dict(momentum=0.9, weight_decay=1e-4) if args.optimizer == "sgd" else dict(weight_decay=0.01)
    lr = 0.1 if args.optimizer == "sgd" else 1e-4

    model = build_model(args.model, args.classes)
    blocks = layout_from_manifest(manifest_for(model))
    store = BlockStore(blocks, range(len(blocks)), make_optimizer(args.optimizer, **settings))
    gen = torch.Generator().manual_seed(0)
    for b in store.owned:
        store.values[b].copy_(torch.randn(store.values[b].shape, generator=gen))
    summed = {b: torch.randn(store.acc[b].shape, generator=gen) for b in store.owned}

    def refill():  # a fresh round's sums: the step averages the accumulators in place
        for b in store.owned:
            store.acc[b].copy_(summed[b])

    def ps_step():
        refill()
        store.apply(store.owned, args.weight, lr)

    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    results = {"ps (BlockStore.apply)": _median_ms(ps_step, args.repeats) - _median_ms(refill, args.repeats)}
    torch_class = torch.optim.SGD if args.optimizer == "sgd" else torch.optim.AdamW
    for implementation in ("for-loop", "foreach", "fused"):
        chosen = {"foreach": implementation == "foreach", "fused": implementation == "fused"}
        opt = torch_class(params, lr=lr, **chosen, **settings)
        results[f"{torch_class.__module__}.{torch_class.__name__} {implementation}"] = _median_ms(opt.step, args.repeats)
    parameters = sum(p.numel() for p in params)
    for name, ms in results.items():
        print(json.dumps({"optimizer": name, "model": args.model, "parameters": parameters, "threads": args.threads,
                          "median_ms": round(ms, 1), "machine": machine.describe()}))


if __name__ == "__main__":
    main()
