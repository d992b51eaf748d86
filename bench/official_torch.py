"""The official PyTorch pretraining step, rebuilt for side-by-side timing (benchmark only).

mpatacchiola/self-supervised-relational-reasoning trains with: a torchvision DataLoader
whose dataset returns K PIL-augmented views of each image (RandomResizedCrop(scale 0.08-1,
bilinear), RandomHorizontalFlip, ColorJitter(0.8, 0.8, 0.8, 0.2) with p=0.8,
RandomGrayscale(0.2), ToTensor, Normalize), the views concatenated view-major, the
backbone, `aggregate` (a Python loop over view pairs, negatives by torch.roll with a
shift that grows per pair), the relation head Linear(2D, 256) -> BatchNorm1d ->
LeakyReLU -> Linear(256, 1), its focal loss (gamma 2, alpha 0.5) and Adam 1e-3. This
module reproduces that step in our own code. torchvision is not needed: the PIL
augmentations are written here the way torchvision applies them to PIL images (same
sampling of crop boxes and jitter factors, PIL's resize and enhancers, hue through
HSV), so the loader does the same work per view. The backbones are PyTorch mirrors of
rr_jax.backbones' Conv4 and ResNet-32 (same layers, NCHW), in `TORCH_MODELS`.
"""

from __future__ import annotations

import functools
import math
import os
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageEnhance

torch.set_num_threads(os.cpu_count())  # XLA:CPU also uses every core


def _crop_box(width: int, height: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (left, top, w, h): 10 tries, then a centre crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return random.randint(0, width - w), random.randint(0, height - h), w, h
    in_ratio = width / height
    w, h = (width, round(width / ratio[0])) if in_ratio < ratio[0] else (
        (round(height * ratio[1]), height) if in_ratio > ratio[1] else (width, height))
    return (width - w) // 2, (height - h) // 2, w, h


def _shift_hue(image: Image.Image, factor: float) -> Image.Image:
    hsv = np.array(image.convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(factor * 255)).astype(np.uint8)
    return Image.fromarray(hsv, "HSV").convert("RGB")


def _color_jitter(image: Image.Image, strength=0.8, hue=0.2) -> Image.Image:
    """ColorJitter(strength, strength, strength, hue): the four changes in random order."""
    changes = [
        lambda im: ImageEnhance.Brightness(im).enhance(random.uniform(1 - strength, 1 + strength)),
        lambda im: ImageEnhance.Contrast(im).enhance(random.uniform(1 - strength, 1 + strength)),
        lambda im: ImageEnhance.Color(im).enhance(random.uniform(1 - strength, 1 + strength)),
        lambda im: _shift_hue(im, random.uniform(-hue, hue)),
    ]
    for index in torch.randperm(4).tolist():
        image = changes[index](image)
    return image


def augment(image: Image.Image, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """One view: crop + resize, flip, jitter, grayscale, to a normalised float [3, H, W]."""
    width, height = image.size
    left, top, w, h = _crop_box(width, height)
    view = image.resize((width, height), Image.BILINEAR, box=(left, top, left + w, top + h))
    if random.random() < 0.5:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    if random.random() < 0.8:
        view = _color_jitter(view)
    if random.random() < 0.2:
        view = view.convert("L").convert("RGB")
    array = np.asarray(view, np.float32) / 255.0
    return torch.from_numpy(((array - mean) / std).transpose(2, 0, 1).copy())


class MultiViewDataset(torch.utils.data.Dataset):
    """uint8 images [N, H, W, 3] -> (K augmented views [3, H, W] of image i, label)."""

    def __init__(self, images: np.ndarray, views: int, mean, std):
        self.images, self.views = images, views
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        picture = Image.fromarray(self.images[index])
        return [augment(picture.copy(), self.mean, self.std) for _ in range(self.views)], 0


def aggregate(features: torch.Tensor, views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official 'cat' aggregation: for every view pair (i < j) the M positives
    [z_i, z_j] and the M negatives [z_i, roll(z_j, shift)], shift 1, 2, ... wrapping at M."""
    size = features.shape[0] // views
    pairs, targets, shift = [], [], 1
    for first in range(0, size * views, size):
        for second in range(first + size, size * views, size):
            left, right = features[first:first + size], features[second:second + size]
            pairs += [torch.cat([left, right], 1), torch.cat([left, torch.roll(right, shifts=shift, dims=0)], 1)]
            targets += [torch.ones(size), torch.zeros(size)]
            shift = shift + 1 if shift + 1 < size else 1
    return torch.cat(pairs, 0), torch.cat(targets, 0)


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma=2.0, alpha=0.5) -> torch.Tensor:
    """The official FocalLoss: mean of alpha_t (1 - p_t)^gamma BCE."""
    cross_entropy = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    probabilities = torch.sigmoid(logits)
    p_t = targets * probabilities + (1 - targets) * (1 - probabilities)
    alpha_t = targets * alpha + (1 - targets) * (1 - alpha)
    return torch.mean((1.0 - p_t) ** gamma * alpha_t * cross_entropy)


def _forever(loader: torch.utils.data.DataLoader) -> Iterator:
    while True:
        yield from loader


def official_step(backbone: torch.nn.Module, feature_size: int, images: np.ndarray, views: int,
                  mean, std, *, batch: int = 64, workers: int = 2,
                  device: str = "cpu") -> Callable[[], float]:
    """A function running one official training step end to end (next batch from the
    DataLoader, forward, aggregate, head, focal loss, backward, Adam) on the torch
    `device`; returns the loss."""
    head = torch.nn.Sequential(
        torch.nn.Linear(2 * feature_size, 256), torch.nn.BatchNorm1d(256), torch.nn.LeakyReLU(),
        torch.nn.Linear(256, 1),
    ).to(device)
    backbone = backbone.to(device)
    optimizer = torch.optim.Adam([{"params": backbone.parameters(), "lr": 1e-3},
                                  {"params": head.parameters(), "lr": 1e-3}])
    loader = torch.utils.data.DataLoader(
        MultiViewDataset(images, views, mean, std), batch_size=batch, shuffle=True, drop_last=True,
        num_workers=workers, persistent_workers=workers > 0,
        multiprocessing_context="spawn" if workers else None,  # no fork of a multithreaded (JAX) process
    )
    batches = _forever(loader)
    backbone.train()
    head.train()

    def step() -> float:
        view_list, _ = next(batches)
        features = backbone(torch.cat(view_list, 0).to(device))
        pairs, targets = aggregate(features, views)
        loss = focal_loss(head(pairs).squeeze(), targets.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


# ------------------------------------------------- backbones mirroring rr_jax.backbones


class TorchConv4(torch.nn.Module):
    """rr_jax.backbones.Conv4: [N, 3, H, W] -> [N, 64]."""

    def __init__(self):
        super().__init__()
        layers, cin = [], 3
        for i, c in enumerate((8, 16, 32, 64)):
            if i:
                layers.append(torch.nn.AvgPool2d(2))
            layers += [torch.nn.Conv2d(cin, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c), torch.nn.ReLU()]
            cin = c
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x).mean((2, 3))


class TorchBasicBlock(torch.nn.Module):
    """rr_jax.backbones.BasicBlock: two 3x3 convolutions and a projection shortcut where the shape changes."""

    def __init__(self, cin, c, stride):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, c, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c)
        self.conv2 = torch.nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(c)
        self.downsample = None
        if stride != 1 or cin != c:
            self.downsample = torch.nn.Sequential(
                torch.nn.Conv2d(cin, c, 1, stride, bias=False), torch.nn.BatchNorm2d(c)
            )

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchCifarResNet(torch.nn.Module):
    """rr_jax's CIFAR ResNet of `depth` layers (16, 32, 64 channels): [N, 3, H, W] -> [N, 64]."""

    def __init__(self, depth):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for stage, c in enumerate((16, 32, 64)):
            for b in range((depth - 2) // 6):
                blocks.append(TorchBasicBlock(cin, c, 2 if stage and not b else 1))
                cin = c
        self.blocks = torch.nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(torch.relu(self.bn1(self.conv1(x)))).mean((2, 3))


TORCH_MODELS = {"conv4": TorchConv4, "resnet32": functools.partial(TorchCifarResNet, 32)}
