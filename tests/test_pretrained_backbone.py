"""The offline default backbone really is ImageNet-pretrained EfficientNet-Lite0."""

import pytest
import skimage.data
import torch
import torch.nn.functional as F
from torch import nn

from models.efficientnet_lite import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_efficientnet_lite0,
    lite0_weights_path,
    remap_lite0_state_dict,
)


@pytest.fixture(scope="module")
def lite0():
    return build_efficientnet_lite0(image_size=224, pretrained=True).eval()


def _imagenet_input(photo) -> torch.Tensor:
    image = torch.from_numpy(photo).permute(2, 0, 1).float().unsqueeze(0) / 255.0
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (image - mean) / std


@pytest.mark.parametrize(
    ("photo", "classes"),
    [("chelsea", set(range(281, 286))), ("coffee", {967, 968})],
)
def test_classifies_natural_photos(lite0, photo, classes):
    with torch.no_grad():
        top = lite0(_imagenet_input(getattr(skimage.data, photo)())).argmax(dim=1).item()
    assert top in classes, f"{photo}: predicted ImageNet class {top}, expected one of {classes}"


def test_every_key_of_the_file_is_mapped(lite0):
    flat = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    mapped = remap_lite0_state_dict(flat, lite0)
    assert set(mapped) == set(lite0.state_dict())
    assert len(mapped) == len(flat)


def test_lite_architecture(lite0):
    activations = {type(m) for m in lite0.modules() if "swish" in type(m).__name__.lower()}
    assert not activations, f"swish left in the network: {activations}"
    assert sum(isinstance(m, nn.ReLU6) for m in lite0.modules()) == 17  # 16 blocks + stem/head
    assert not any("_se_" in name for name, _ in lite0.named_modules())
