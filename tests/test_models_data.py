"""The registry's block partitions, freezing inside a model, and the real datasets."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from proto import freezeps_pb2 as pb
from worker.data import DEBIAN_FASHION_MNIST, load_dataset, make_batch
from worker.flat import FlatModel
from worker.models import build_model


def _param_bytes(flat: FlatModel) -> dict[str, int]:
    return {b.name: sum(t.nbytes for t in b.tensors if t.kind == pb.PARAMETER) for b in flat.layout}


def test_resnet18_blocks_match_the_seed_groups():
    flat = FlatModel(build_model("resnet18", 10, "random"))
    sizes = _param_bytes(flat)
    # Parameter bytes per group as measured for the seed's ResNet-18 (REFERENCE section 3).
    assert sizes == {"conv1": 9408 * 4, "bn1": 128 * 4, "layer1": 591872, "layer2": 2102272,
                     "layer3": 8398848, "layer4": 33574912, "fc": 20520}
    assert len(FlatModel(build_model("resnet18-fine", 10, "random")).layout) == 11


def test_efficientnet_lite0_offline_weights_and_freezing():
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", 10, "imagenet")
    flat = FlatModel(model)
    assert [b.name for b in flat.layout][:2] == ["stem", "mbconv0"] and len(flat.layout) == 19
    model.set_frozen(15)
    assert not model.blocks[0].training and model.blocks[15].training
    loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    # Frozen blocks get no gradient; gradients land in the flat buffers the push sends.
    assert flat.grads[0].abs().sum() == 0 and flat.grads[14].abs().sum() == 0
    assert flat.grads[15].abs().sum() > 0 and flat.grads[18].abs().sum() > 0


def test_freezing_sets_each_blocks_mode_and_unfreezing_restores_it():
    model = build_model("resnet18", 10, "random")
    model.set_frozen(3)
    assert not model.blocks[1].bn1.training and all(m.training for m in model.blocks[3].modules())
    model.set_frozen(0)  # a worker rejoining a PS that restarted before its freeze
    assert all(m.training for m in model.modules())
    model.eval()
    model.set_frozen(2)  # an evaluating model stays in eval mode
    assert not any(m.training for m in model.modules())


def test_frozen_dropout_leaves_batchnorm_frozen():
    """frozen_dropout puts a frozen block back in train mode but for its BatchNorm, whose
    running statistics are part of what was frozen."""
    model = build_model("resnet18", 10, "random", frozen_dropout=True)
    model.set_frozen(3)
    bn = model.blocks[1].bn1
    stats = bn.running_mean.clone()
    model.prefix(torch.randn(2, 3, 32, 32))
    assert torch.equal(bn.running_mean, stats) and not bn.training and model.blocks[1].relu.training


def test_flat_binding_shares_memory_with_the_model():
    model = build_model("tiny_cnn", 4)
    flat = FlatModel(model)
    flat.values[0].fill_(0.25)
    assert torch.all(model.blocks[0].conv.weight == 0.25)
    assert torch.all(model.blocks[0].bn.running_var == 0.25)  # buffers are bound too


@pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed (scripts/setup.sh installs it)")
def test_fashion_mnist_from_the_debian_package(tmp_path: Path):
    train = load_dataset("fashion_mnist", tmp_path, True, limit=500)
    test = load_dataset("fashion_mnist", tmp_path, False)
    assert len(train) == 500 and len(test) == 10000
    assert train.inputs.dtype == torch.uint8 and set(train.labels.unique().tolist()) <= set(range(10))
    x, y = make_batch(train, np.arange(8), 32, 3, augment=True, gen=torch.Generator().manual_seed(0))
    assert x.shape == (8, 3, 32, 32) and y.shape == (8,)


def test_missing_dataset_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("worker.data.DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_dataset("fashion_mnist", tmp_path, True)


def test_weights_files_and_bad_weights(tmp_path):
    torch.manual_seed(1)
    source = build_model("tiny_cnn", 4)
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    loaded = build_model("tiny_cnn", 4, str(path))
    assert torch.equal(loaded.blocks[0].conv.weight, source.blocks[0].conv.weight)
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_model("mlp", 4, "imagenet")
    with pytest.raises(ValueError, match="existing file"):
        build_model("mlp", 4, str(tmp_path / "missing.pt"))
