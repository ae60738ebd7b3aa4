"""Real pretrained backbones from their wheels: they must recognise real COCO photos before we trust them."""

import math

import pytest
import torch
import torchvision

from captioner.encoder import Encoder, get_backbone, prepare_cpu_inference
from captioner.images import open_image

CATEGORIES = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]  # in the code, no download

# coco-mini val photos whose ImageNet class is unambiguous.
PHOTOS = {
    "000000024585.jpg": {"airliner"},  # "A large passenger jet sitting on an airport tarmac."
    "000000020247.jpg": {"brown bear", "American black bear"},  # "Bears lope over the ground ..."
}


def _top5(encoder, coco_mini, name):
    x = encoder.preprocessing(open_image(coco_mini / "val" / name))[None]
    with torch.no_grad():
        features = encoder(x)
        probs = encoder.class_logits(features).softmax(-1)[0]
    return features, {CATEGORIES[i] for i in probs.topk(5).indices}


@pytest.mark.backbone
@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite2", "resnet152-resmem"])
def test_offline_backbone_recognises_real_photos_and_gives_a_14x14_grid(name, coco_mini):
    prepare_cpu_inference()
    encoder = Encoder(name).eval()
    for photo, expected in PHOTOS.items():
        features, top5 = _top5(encoder, coco_mini, photo)
        assert features.shape == (1, 196, get_backbone(name).feature_dim)
        assert top5 & expected, f"{name} on {photo}: top-5 {top5}"
    assert encoder.grid_size() == (14, 14)


def test_backbones_carry_their_preprocessing(coco_mini):
    """An encoder normalises with its own backbone's statistics: a real photo, resized to the input side, comes out
    as (pixel - mean) / std per channel: EfficientNet-Lite's (x - 127) / 128 on 0..255, ImageNet statistics for
    torchvision's ResNets."""
    from PIL import Image

    from captioner.encoder import pil_to_tensor

    photo = open_image(coco_mini / "val" / "000000024585.jpg")
    resized = pil_to_tensor(photo.resize((64, 64), Image.Resampling.BICUBIC))  # (3, 64, 64) in [0, 1]
    outputs = {}
    for name in ("efficientnet-lite0", "resnet50"):
        encoder = Encoder(name, pretrained=False, image_size=64)
        spec = get_backbone(name)
        x = encoder.preprocessing(photo)
        assert x.shape == (3, 64, 64)
        mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
        torch.testing.assert_close(x * std + mean, resized)
        outputs[name] = x
    lite = outputs["efficientnet-lite0"]
    torch.testing.assert_close(lite, (resized * 255 - 127) / 128)
    assert lite.min() >= -127 / 128 and lite.max() <= 1.0
    assert not torch.allclose(outputs["resnet50"], lite)  # ImageNet statistics differ from Lite's


def test_torchvision_backbone_without_weights_gives_a_grid():
    encoder = Encoder("resnet50", pretrained=False, image_size=224).eval()
    with torch.no_grad():
        features = encoder(torch.rand(2, 3, 224, 224))
    assert features.shape == (2, 49, 2048)


def test_encoder_is_frozen_by_default_and_fine_tunes_last_blocks():
    frozen = Encoder("efficientnet-lite0", pretrained=False, image_size=64)
    assert not any(p.requires_grad for p in frozen.parameters())
    tuned = Encoder("efficientnet-lite0", pretrained=False, image_size=64, fine_tune_blocks=2)
    trainable = {n for n, p in tuned.cnn.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("net._conv_head", "net._bn1", "net._blocks.15")) for n in trainable)
    tuned.train()
    assert not tuned.cnn.net._bn0.training  # frozen batch-norm stays in eval mode
    assert tuned.cnn.net._bn1.training


@pytest.mark.parametrize(("name", "size", "blocks"), [("efficientnet-lite0", 96, 2), ("efficientnet-lite0", 96, 5),
                                                     ("resnet50", 64, 1)])
def test_the_tuned_part_on_the_frozen_part_is_the_whole_encoder(name, size, blocks):
    """Fine-tuning caches `frozen_part` once per photo and trains `tuned_part` on it: together they must be the
    whole encoder, and only the tuned part may carry gradients."""
    from captioner.encoder import FrozenPart

    torch.manual_seed(0)
    encoder = Encoder(name, pretrained=False, image_size=size, fine_tune_blocks=blocks).eval()
    images = torch.rand(2, 3, size, size)
    frozen = encoder.frozen_part(images)
    assert not frozen.requires_grad and frozen.shape[:2] == (2, math.prod(encoder.frozen_grid()))
    features = encoder.tuned_part(frozen)
    assert features.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(features, encoder(images))
    # One photo's captions in a row go through the tuned blocks once, with the same features and gradients.
    from captioner.train import tuned_once_per_photo

    rows = frozen[[0, 0, 1, 1, 1, 0]]  # three runs of one photo
    whole, seen = encoder.tuned_part, []
    encoder.tuned_part = lambda x: seen.append(x.size(0)) or whole(x)
    once = tuned_once_per_photo(encoder, rows)
    del encoder.tuned_part
    assert seen == [3]
    torch.testing.assert_close(once, encoder.tuned_part(rows))
    part = FrozenPart(encoder)
    assert part.feature_dim == frozen.size(2) and part.grid_size() == encoder.frozen_grid()
    # Its cache name follows the frozen weights, not the tuned ones.
    with torch.no_grad():
        next(encoder._trainable[-1].parameters()).add_(1.0)
        assert FrozenPart(encoder).name == part.name
        next(encoder.cnn.parameters()).add_(1.0)
        assert FrozenPart(encoder).name != part.name


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backbone"):
        get_backbone("vgg-imaginary")
