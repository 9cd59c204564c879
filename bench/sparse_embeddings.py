"""How many push bytes a row-sparse encoding of the word-embedding gradient saves.

A batch of token ids touches a few hundred of the vocabulary's 30,522 rows; the gradient of
every other row of the word-embedding matrix is exactly zero. Sent as (row index, row) pairs
the embeddings block shrinks from its dense size to rows x (hidden x 4 + 4) bytes plus its other
tensors. This replays the batches a run would train on (the same sharding and batch order, 4
workers) and counts, per worker batch, the distinct token ids, the rows whose gradient is not
zero (a real MiniLM backward on the first batches: the padding row's gradient is zero), and the
push bytes dense and sparse, for the embeddings block and for the whole model.

    python -m bench.sparse_embeddings --out docs/results/sparse
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench import machine
from freezeps.config import Config
from proto.transport import iter_chunks
from worker.data import batch_order, load_dataset, make_batch, shard_indices
from worker.flat import FlatModel
from worker.models import build_model, text_model_folder
from worker.text import TextSettings

WORD_EMBEDDINGS = "embeddings/embeddings.word_embeddings.weight"
CHUNK_BYTES = 1 << 20  # the default chunk_bytes


def measure(dataset: str, max_len: int, batch_size: int, workers: int, epochs: int, checked_batches: int) -> dict:
    folder = text_model_folder("minilm", "pretrained")
    train = load_dataset(dataset, Path(Config().data_dir), True, text=TextSettings(folder, max_len=max_len))
    model = build_model("minilm", train.num_classes, "pretrained")
    flat = FlatModel(model, sparse_push=True)
    embeddings = flat.layout[0]
    word = next(t for t in embeddings.tensors if t.name == WORD_EMBEDDINGS)
    vocab, hidden = word.shape
    row_bytes = hidden * 4
    model_bytes = sum(b.nbytes for b in flat.layout)

    shards = [shard_indices(train.labels.numpy(), r, workers) for r in range(workers)]
    steps_per_epoch = min(len(s) for s in shards) // batch_size
    distinct, checked = [], []
    for epoch in range(epochs):
        for r, shard in enumerate(shards):
            order = batch_order(shard, epoch, r, 0)
            for step in range(steps_per_epoch):
                x, y = make_batch(train, order[step * batch_size:(step + 1) * batch_size], 0, 0, False)
                ids = x[:, :max_len].unique()  # the ids; the attention mask is carried after them
                distinct.append(len(ids))
                if len(checked) < checked_batches:  # the real gradient through the real encoder
                    flat.zero_grads(0)
                    F.cross_entropy(model(x), y).backward()
                    grad = flat.grads[0][word.offset // 4:(word.offset + word.nbytes) // 4].view(word.shape)
                    nonzero = grad.abs().sum(1).nonzero().flatten()
                    data = flat.push_bytes(0)
                    dense = list(iter_chunks(embeddings, data, CHUNK_BYTES))
                    sparse = list(iter_chunks(embeddings, data, CHUNK_BYTES, flat.push_rows(0)))
                    checked.append({"distinct_ids": len(ids), "nonzero_rows": len(nonzero),
                                    "nonzero_rows_are_ids_but_padding": bool(
                                        set(nonzero.tolist()) == set(ids.tolist()) - {0}),
                                    "embeddings_push": {
                                        "dense": {"payload": sum(f.chunk.payload for f in dense),
                                                  "message": sum(f.size for f in dense), "messages": len(dense)},
                                        "sparse": {"payload": sum(f.chunk.payload for f in sparse),
                                                   "message": sum(f.size for f in sparse), "messages": len(sparse)}}})
    rows = np.array(distinct)
    # Upper bound on the rows sent: the distinct ids (the padding row is zero, but it costs one row).
    sparse_word = rows * (row_bytes + 4)
    sparse_block = embeddings.nbytes - word.nbytes + sparse_word
    return {
        "dataset": dataset, "max_len": max_len, "batch_size": batch_size, "workers": workers, "epochs": epochs,
        "batches": len(rows), "vocab": vocab, "hidden": hidden,
        "distinct_ids": {"mean": float(rows.mean()), "p50": float(np.median(rows)), "max": int(rows.max())},
        "word_embeddings_bytes": word.nbytes, "embeddings_block_bytes": embeddings.nbytes, "model_bytes": model_bytes,
        "sparse_embeddings_block_bytes_mean": float(sparse_block.mean()),
        "embeddings_block_saving": float(1 - sparse_block.mean() / embeddings.nbytes),
        "whole_push_saving": float((embeddings.nbytes - sparse_block.mean()) / model_bytes),
        "checked_batches": checked,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="write OUT/results.json and OUT/README.md")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--checked-batches", type=int, default=4, help="batches checked with a real backward")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.time()
    results = [measure(d, max_len, bs, 4, args.epochs, args.checked_batches)
               for d, max_len in (("rotten_tomatoes", 64), ("reuters_r8", 128)) for bs in (16, 32)]
    for r in results:
        print(f"{r['dataset']:16s} len {r['max_len']:3d} batch {r['batch_size']:2d}: distinct ids "
              f"{r['distinct_ids']['mean']:6.0f} (max {r['distinct_ids']['max']}), embeddings push "
              f"{r['embeddings_block_bytes'] / 1e6:.1f} MB -> {r['sparse_embeddings_block_bytes_mean'] / 1e6:.2f} MB "
              f"({r['embeddings_block_saving']:.1%} less), whole push {r['whole_push_saving']:.1%} less; "
              f"grad rows = ids minus padding: {all(c['nonzero_rows_are_ids_but_padding'] for c in r['checked_batches'])}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"command": "python -m bench.sparse_embeddings --out " + str(args.out), "machine": machine.describe(), "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - started, 1)}
        (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        (args.out / "README.md").write_text(_readme(meta, results))


def _readme(meta: dict, results: list[dict]) -> str:
    lines = [
        "# Row-sparse embedding pushes: measured bytes", "",
        f"`{meta['command']}` on {meta['machine']}, {meta['date']}, {meta['seconds']:.0f} s.",
        "MiniLM-L6 (pretrained), 4 workers, IID shards, the batch order a run uses; every worker batch of "
        "one epoch. *Distinct ids* bound the word-embedding rows a push carries (the padding row's "
        "gradient is zero); the *checked* batches ran a real backward and the real encoder "
        "(`proto.transport.iter_chunks` with `FlatModel.push_rows`), which also sends the position "
        "embeddings (512 rows, at most max_len used) as rows: hence its smaller figure than the "
        "estimate, which keeps every tensor but the word embeddings dense. Message bytes are the "
        "serialized stream messages, protobuf framing included.", "",
        "| dataset | max_len | batch | distinct ids mean (max) | embeddings push dense | sparse (mean) | "
        "whole-model push saved | checked: grad rows = ids - padding | checked: embeddings payload / message bytes, "
        "dense -> sparse |",
        "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        checked = r["checked_batches"]
        dense = sum(c["embeddings_push"]["dense"]["payload"] for c in checked) / len(checked)
        sparse = sum(c["embeddings_push"]["sparse"]["payload"] for c in checked) / len(checked)
        dense_msg = sum(c["embeddings_push"]["dense"]["message"] for c in checked) / len(checked)
        sparse_msg = sum(c["embeddings_push"]["sparse"]["message"] for c in checked) / len(checked)
        lines.append(
            f"| {r['dataset']} | {r['max_len']} | {r['batch_size']} | {r['distinct_ids']['mean']:.0f} "
            f"({r['distinct_ids']['max']}) | {r['embeddings_block_bytes'] / 1e6:.2f} MB | "
            f"{r['sparse_embeddings_block_bytes_mean'] / 1e6:.2f} MB | {r['whole_push_saving']:.1%} | "
            f"{all(c['nonzero_rows_are_ids_but_padding'] for c in checked)} ({len(checked)} batches) | "
            f"{dense / 1e6:.2f} / {dense_msg / 1e6:.2f} MB -> {sparse / 1e6:.3f} / {sparse_msg / 1e6:.3f} MB |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
