"""One-channel torchvision ResNets sized for 28x28 and 64x64 characters."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn
from torchvision import models

from kmnist_sweep.errors import UserError


def build_model(cfg: DictConfig, num_classes: int) -> nn.Module:
    """A torchvision ResNet with a one-channel stem and `num_classes` outputs."""
    net: models.ResNet = getattr(models, cfg.arch)(weights=None, num_classes=1000)
    if cfg.pretrained:
        net.load_state_dict(_imagenet_state(cfg.arch))
    rgb_conv1 = net.conv1.weight.data
    if cfg.stem == "imagenet":
        net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        if cfg.pretrained:
            # A grey pixel is R=G=B, so summing the RGB filters keeps the pretrained response.
            net.conv1.weight.data.copy_(rgb_conv1.sum(dim=1, keepdim=True))
    else:
        # At 28x28 the 7x7/2 conv and max-pool throw away 15 of every 16 positions before
        # the first block; a 3x3/1 stem keeps them (costlier, usually more accurate).
        # Pretrained 7x7 filters do not fit a 3x3 kernel, so this conv stays freshly initialised.
        net.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()  # type: ignore[assignment]
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return net


def _imagenet_state(arch: str) -> dict[str, torch.Tensor]:
    weights = models.get_model_weights(arch).DEFAULT
    try:
        return weights.get_state_dict(progress=True)
    except Exception as exc:  # urllib, SSL and hash errors all mean "no weights here"
        raise UserError(
            f"cannot fetch ImageNet weights for {arch} from {weights.url} "
            f"({type(exc).__name__}: {exc}); set model.pretrained=false or put the file in "
            f"{torch.hub.get_dir()}/checkpoints/"
        ) from exc
