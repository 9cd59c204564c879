"""Datasets as in-memory tensors, deterministic shards by rank, and batches.

Images stay uint8 (or the synthetic set's float) in memory and are normalised per batch,
so four workers on one machine do not each hold a float copy of the training set.
"""
from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from worker.text import TEXT_DATASETS, TextSettings, text_dataset

DATASETS = ("fashion_mnist", "cifar10", "synthetic", *TEXT_DATASETS)
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_FMNIST_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_FMNIST_MEAN, _FMNIST_STD = 0.2860, 0.3530


@dataclass
class Dataset:
    inputs: torch.Tensor  # images N x C x H x W, uint8 (real sets) or float32 (synthetic); text N x L token ids
    labels: torch.Tensor  # N, int64
    num_classes: int
    mean: tuple[float, ...]  # of the images' channels; empty for text
    std: tuple[float, ...]
    source: str = ""  # what the inputs are: a dataset, its split (the synthetic set's seed, the tokenization)
    ids: torch.Tensor | None = None  # each sample's index in the whole split (None: 0..N-1)

    @property
    def text(self) -> bool:
        return not self.mean

    def sample_ids(self, idx: np.ndarray) -> np.ndarray:
        """The split-wide ids of positions `idx`: the same image has the same id in every run,
        whatever subset `limit` kept (what the activation cache keys entries by)."""
        return idx if self.ids is None else self.ids.numpy()[idx]

    def digest(self, with_labels: bool = False) -> str:
        """A short name for which samples of the split this holds (and, `with_labels`, their labels)."""
        h = hashlib.sha256(self.sample_ids(np.arange(len(self))).astype(np.int64).tobytes())
        if with_labels:
            h.update(self.labels.numpy().astype(np.int64).tobytes())
        return h.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.labels)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def fashion_mnist(root: Path, train: bool, download: bool) -> Dataset:
    """From ROOT/FashionMNIST/raw (torchvision's layout), Debian's package, or a download."""
    img_stem, lbl_stem = _FMNIST_FILES[train]
    for folder in (root / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST):
        img, lbl = _find_idx(folder, img_stem), _find_idx(folder, lbl_stem)
        if img and lbl:
            images = torch.from_numpy(_read_idx(img).copy()).unsqueeze(1)
            labels = torch.from_numpy(_read_idx(lbl).astype(np.int64))
            return Dataset(images, labels, 10, (_FMNIST_MEAN,), (_FMNIST_STD,), _split("fashion_mnist", train))
    if not download:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root / 'FashionMNIST' / 'raw'} or {DEBIAN_FASHION_MNIST}; "
            "install it with `apt-get install dataset-fashion-mnist`, or pass --download where there is internet")
    import torchvision
    ds = torchvision.datasets.FashionMNIST(str(root), train=train, download=True)
    return Dataset(ds.data.unsqueeze(1).clone(), ds.targets.clone(), 10, (_FMNIST_MEAN,), (_FMNIST_STD,),
                   _split("fashion_mnist", train))


def cifar10(root: Path, train: bool, download: bool) -> Dataset:
    import torchvision
    try:
        ds = torchvision.datasets.CIFAR10(str(root), train=train, download=download)
    except RuntimeError as e:
        raise FileNotFoundError(f"CIFAR-10 not found under {root} ({e}); pass --download where there is internet") from e
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return Dataset(images, torch.tensor(ds.targets, dtype=torch.int64), 10, _CIFAR_MEAN, _CIFAR_STD,
                   _split("cifar10", train))


def synthetic(train: bool, samples: int = 2048, seed: int = 0, num_classes: int = 4) -> Dataset:
    """A learnable set for tests: 3x8x8 Gaussian images, labels from a fixed linear teacher."""
    gen = torch.Generator().manual_seed(seed * 2 + (0 if train else 1))
    teacher = torch.randn(3 * 8 * 8, num_classes, generator=torch.Generator().manual_seed(seed + 1000))
    images = torch.randn(samples, 3, 8, 8, generator=gen)
    labels = (images.flatten(1) @ teacher).argmax(1)
    return Dataset(images, labels, num_classes, (0.0,) * 3, (1.0,) * 3,
                   f"{_split('synthetic', train)}:seed{seed}:n{samples}:c{num_classes}")


def _split(name: str, train: bool) -> str:
    return f"{name}:{'train' if train else 'test'}"


def pipeline_spec(ds: Dataset, image_size: int, channels: int, augment: bool) -> str:
    """What make_batch turns a sample id into: with the id, it names a model input exactly."""
    return f"{ds.source}|size{image_size}|ch{channels}|mean{ds.mean}|std{ds.std}|augment{int(augment)}"


def load_dataset(name: str, root: Path, train: bool, download: bool = False,
                 limit: int = 0, seed: int = 0, text: TextSettings | None = None) -> Dataset:
    """Load a dataset; `limit` > 0 keeps a fixed random subset of that many samples. A text
    dataset needs `text` (the tokenizer and how to read the file)."""
    if name in TEXT_DATASETS:
        if text is None:
            raise ValueError(f"{name} is a text dataset: it needs a text model's tokenizer")
        inputs, labels, num_classes, source = text_dataset(name, train, text, root / "tokenized")
        ds = Dataset(inputs, labels, num_classes, (), (), source)
    elif name == "fashion_mnist":
        ds = fashion_mnist(root, train, download)
    elif name == "cifar10":
        ds = cifar10(root, train, download)
    elif name == "synthetic":
        ds = synthetic(train, samples=2048 if train else 512, seed=seed)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if 0 < limit < len(ds):
        keep = torch.from_numpy(np.random.default_rng(seed + (0 if train else 1)).permutation(len(ds))[:limit])
        ds = Dataset(ds.inputs[keep], ds.labels[keep], ds.num_classes, ds.mean, ds.std, ds.source, keep)
    return ds


SHARD_DRAWS = 100  # dirichlet: partitions drawn before giving up on one where every worker has a sample


def shard_indices(labels: np.ndarray, rank: int, world: int, scheme: str = "iid",
                  alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """The sample indices of worker `rank` of `world`, the same on every host.

    iid: a seeded permutation dealt round-robin. dirichlet: for each class, the shares
    of the workers are drawn from Dirichlet(alpha); small alpha means strong label skew. A
    partition that leaves a worker without samples (likely with a small alpha, few classes or
    many workers) is drawn again, up to SHARD_DRAWS times: every worker must train on something.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside 0..{world - 1}")
    if len(labels) < world:
        raise ValueError(f"{len(labels)} training samples for {world} workers: each needs at least one")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return np.sort(rng.permutation(len(labels))[rank::world])
    if scheme != "dirichlet":
        raise ValueError(f"unknown sharding {scheme!r}; choose iid or dirichlet")
    if alpha <= 0:
        raise ValueError("dirichlet alpha must be > 0")
    for _ in range(SHARD_DRAWS):
        shards = [[] for _ in range(world)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * world))[:-1] * len(idx)).astype(int)
            for shard, part in zip(shards, np.split(idx, cuts)):
                shard.append(part)
        if all(sum(len(p) for p in shard) for shard in shards):
            return np.sort(np.concatenate(shards[rank]))
    raise ValueError(f"dirichlet sharding with alpha {alpha}: each of {SHARD_DRAWS} draws left one of {world} "
                     f"workers without samples ({len(labels)} samples, {len(np.unique(labels))} classes); "
                     "raise dirichlet_alpha, or use fewer workers or more samples")


def label_balance(labels: np.ndarray, num_classes: int) -> float:
    """Normalised entropy of a shard's labels: 1 for uniform, 0 for a single label."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    p = counts[counts > 0] / max(counts.sum(), 1)
    return float(-(p * np.log(p)).sum() / np.log(num_classes)) if num_classes > 1 else 1.0


def batch_order(shard: np.ndarray, epoch: int, rank: int, seed: int) -> np.ndarray:
    """This worker's sample order for one epoch: known in advance from the seed."""
    return np.random.default_rng([seed, epoch, rank]).permutation(shard)


def batch_positions(shard: np.ndarray, rank: int, seed: int, steps_per_epoch: int, batch_size: int,
                    first: int, end: int) -> np.ndarray:
    """The worker's batches at steps first..end-1, one after the other: at each step the next
    batch_size of its shard in that epoch's batch_order (from its start again where a shard holds
    fewer than an epoch's rows). Each epoch's order is drawn once per call."""
    parts = [np.zeros(0, np.int64)]
    for epoch in range(first // steps_per_epoch, (end - 1) // steps_per_epoch + 1) if end > first else ():
        order = batch_order(shard, epoch, rank, seed)
        start = epoch * steps_per_epoch  # the epoch's first step; lo..hi-1: its steps wanted
        lo, hi = max(first - start, 0), min(end - start, steps_per_epoch)
        parts.append(np.take(order, np.arange(lo * batch_size, hi * batch_size), mode="wrap"))
    return np.concatenate(parts)


def make_batch(ds: Dataset, idx: np.ndarray, image_size: int, channels: int, augment: bool,
               gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise (and optionally random-crop and flip) a batch of images, sized for the model;
    a batch of text is its token ids as they are."""
    if ds.text:
        return ds.inputs[torch.from_numpy(idx)], ds.labels[torch.from_numpy(idx)]
    x = ds.inputs[torch.from_numpy(idx)]
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    mean = torch.tensor(ds.mean).view(1, -1, 1, 1)
    std = torch.tensor(ds.std).view(1, -1, 1, 1)
    x = (x - mean) / std
    if x.shape[-1] != image_size:
        pad = image_size - x.shape[-1]
        x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)) if pad > 0 else \
            F.interpolate(x, size=image_size, mode="bilinear", align_corners=False)
    if x.shape[1] != channels:
        x = x.expand(-1, channels, -1, -1)
    if augment:
        x = _crop_flip(x, gen)
    return x.contiguous(), ds.labels[torch.from_numpy(idx)]


def _crop_flip(x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """The seed's augmentation: random 4-pixel-padded crop and horizontal flip, per sample."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=gen)
    dx = torch.randint(0, 9, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        crop = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out

