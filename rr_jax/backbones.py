"""Feature extractors f: images [N, H, W, C] -> features [N, D] (Flax linen, NHWC).

Conv4 and the CIFAR ResNets follow the official PyTorch code of the paper; ResNet-18/34/50
follow torchvision. Layer names mirror the PyTorch names (``layer1.0.conv1`` becomes
``layer1_0/conv1``, ``layer2.0.downsample.0/1`` become ``layer2_0/downsample_conv/bn``) so
that PyTorch state dicts map onto our variables name by name.

Every backbone takes the same keyword options:
  axis_name: name of the mapped axis for cross-device BatchNorm statistics (under
    ``jax.pmap``); None outside pmap.
  dtype: compute dtype of activations and convolutions (e.g. ``jnp.bfloat16`` on
    TPU/GPU). Parameters, BatchNorm statistics and output features stay float32.

Initialisation and BatchNorm match PyTorch: convolution kernels are He-normal with
fan-out (``kaiming_normal_(mode='fan_out', nonlinearity='relu')``), BatchNorm scale 1
and bias 0, momentum 0.1 in PyTorch's convention (0.9 in Flax's), epsilon 1e-5. One
difference remains: the running variance averages the biased batch variance, PyTorch's
the unbiased one (a factor n / (n - 1) with n = N*H*W, in the thousands here).
BatchNorm is ``rr_jax.batch_norm.BatchNorm`` (Flax's variables and statistics, a
cheaper backward pass on CPU).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rr_jax.batch_norm import BatchNorm

Dtype = Any

_HE_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_STEMS = ("cifar", "imagenet")
_CIFAR_WIDTHS = (16, 32, 64)
_IMAGENET_WIDTHS = (64, 128, 256, 512)


def _check_images(x: jax.Array) -> None:
    if x.ndim != 4:
        raise ValueError(
            f"Backbones take images of shape [N, H, W, C] (rank 4, NHWC), got shape "
            f"{tuple(x.shape)} (rank {x.ndim})."
        )


def _layer_factories(
    train: bool, axis_name: str | None, dtype: Dtype
) -> tuple[Callable[..., nn.Conv], Callable[..., BatchNorm]]:
    """Convolution and BatchNorm constructors with the options every backbone shares.

    ``conv(features, kernel, stride=1, name=...)`` pads symmetrically by kernel // 2 as
    PyTorch does (XLA's 'SAME' pads a stride-2 convolution on an even size asymmetrically).
    """

    def conv(features: int, kernel: int, stride: int = 1, *, name: str) -> nn.Conv:
        return nn.Conv(
            features,
            (kernel, kernel),
            strides=stride,
            padding=kernel // 2,
            use_bias=False,
            kernel_init=_HE_FAN_OUT,
            dtype=dtype,
            param_dtype=jnp.float32,
            name=name,
        )

    norm = functools.partial(
        BatchNorm,
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        axis_name=axis_name,
        dtype=dtype,
        param_dtype=jnp.float32,
    )
    return conv, norm


def _materialized(x: jax.Array) -> jax.Array:
    """``x`` unchanged, but computed into memory once on XLA:CPU (a fusion barrier).

    XLA:CPU fuses elementwise producers into each of their consumers, duplicating them.
    A ResNet's block outputs form one elementwise chain (BatchNorm affine, residual add,
    ReLU of every earlier block), so without a barrier each fusion that reads a block
    output, the transposes feeding the kernel-gradient convolutions above all, recomputes
    the whole chain from up to 30 arrays read with large strides. A sum with zeros over
    a new leading axis is a reduction, which XLA:CPU does not fuse into consumers; it is
    exact (x + 0 = x) and costs one pass over ``x``. ResNet-32 forward + backward runs
    ~1.6x faster with it (BENCHMARKS.md). Other backends fuse by a cost model and get
    ``x`` as is: the barrier is chosen per lowering platform (`lax.platform_dependent`),
    so a program lowered for GPU or TPU does not contain it.
    """
    return jax.lax.platform_dependent(
        x, cpu=lambda x: jnp.sum(jnp.stack([x, jnp.zeros_like(x)]), axis=0), default=lambda x: x
    )


def _global_average(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=(1, 2), dtype=jnp.float32)


class _ConvBlock(nn.Module):
    """3x3 convolution (padding 1, no bias) -> BatchNorm -> ReLU."""

    features: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.relu(self.norm(name="bn")(self.conv(self.features, 3, name="conv")(x)))


class Conv4(nn.Module):
    """Four conv blocks with 8, 16, 32, 64 channels; 2x2 average pools, the last global.

    ``__call__(x: [N, H, W, C], train) -> float32[N, 64]``; 24 648 parameters for C = 3.
    """

    axis_name: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        _check_images(x)
        conv, norm = _layer_factories(train, self.axis_name, self.dtype)
        x = jnp.asarray(x, self.dtype)
        for i, features in enumerate((8, 16, 32, 64), start=1):
            if i > 1:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
            x = _ConvBlock(features, conv, norm, name=f"layer{i}")(x)
        return _global_average(x)


class BasicBlock(nn.Module):
    """ResNet basic block: 3x3 conv-BN-ReLU-3x3 conv-BN, plus the shortcut, then ReLU.

    The shortcut is a 1x1 convolution (no bias) + BN where the stride or the channel
    count changes, the identity otherwise.
    """

    features: int
    stride: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(self.features, 3, self.stride, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.features, 3, name="conv2")(y)
        y = self.norm(name="bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = self.conv(self.features, 1, self.stride, name="downsample_conv")(x)
            x = self.norm(name="downsample_bn")(x)
        return _materialized(nn.relu(x + y))


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck: 1x1 conv-BN-ReLU, 3x3 conv (the stride)-BN-ReLU,
    1x1 conv to ``4 * features``-BN, plus the shortcut, then ReLU.

    The shortcut is a 1x1 convolution (no bias) + BN where the stride or the channel
    count changes, the identity otherwise.
    """

    features: int
    stride: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.features * self.expansion
        y = nn.relu(self.norm(name="bn1")(self.conv(self.features, 1, name="conv1")(x)))
        y = nn.relu(self.norm(name="bn2")(self.conv(self.features, 3, self.stride, name="conv2")(y)))
        y = self.norm(name="bn3")(self.conv(out, 1, name="conv3")(y))
        if self.stride != 1 or x.shape[-1] != out:
            x = self.conv(out, 1, self.stride, name="downsample_conv")(x)
            x = self.norm(name="downsample_bn")(x)
        return _materialized(nn.relu(x + y))


class ResNet(nn.Module):
    """ResNet; stage s has ``stage_sizes[s]`` blocks (``block``: BasicBlock or
    Bottleneck) of ``widths[s]`` channels (times 4 at a bottleneck's output).

    The first stage keeps the resolution, each later one halves it. ``stem='cifar'``:
    3x3 stride-1 convolution; ``stem='imagenet'``: torchvision's 7x7 stride-2
    convolution and 3x3 stride-2 max pool. Both end in BN + ReLU (before the pool).
    ``__call__(x: [N, H, W, C], train) -> float32[N, D]`` (global average pool),
    D = widths[-1] (x4 with bottlenecks).
    """

    stage_sizes: Sequence[int]
    widths: Sequence[int]
    stem: str = "cifar"
    block: type[nn.Module] = BasicBlock
    axis_name: str | None = None
    dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        if self.stem not in _STEMS:
            raise ValueError(f"stem must be one of {_STEMS}, got stem={self.stem!r}.")
        if len(self.stage_sizes) != len(self.widths) or not self.widths:
            raise ValueError(
                "stage_sizes and widths need one entry per stage, got "
                f"stage_sizes={self.stage_sizes!r}, widths={self.widths!r}."
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        _check_images(x)
        conv, norm = _layer_factories(train, self.axis_name, self.dtype)
        x = jnp.asarray(x, self.dtype)
        if self.stem == "cifar":
            x = conv(self.widths[0], 3, name="conv1")(x)
        else:
            x = conv(self.widths[0], 7, 2, name="conv1")(x)
        x = nn.relu(norm(name="bn1")(x))
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for s, (blocks, features) in enumerate(zip(self.stage_sizes, self.widths)):
            for b in range(blocks):
                stride = 2 if s > 0 and b == 0 else 1
                x = self.block(features, stride, conv, norm, name=f"layer{s + 1}_{b}")(x)
        return _global_average(x)


def _cifar_resnet(depth: int, **options: Any) -> ResNet:
    """CIFAR ResNet-``depth``: three stages of (depth - 2) / 6 blocks, 16/32/64 channels."""
    return ResNet(stage_sizes=((depth - 2) // 6,) * 3, widths=_CIFAR_WIDTHS, **options)


def _imagenet_resnet(
    stage_sizes: Sequence[int], stem: str = "imagenet", block: type[nn.Module] = BasicBlock, **options: Any
) -> ResNet:
    """torchvision ResNet-18/34/50 without classifier; ``stem='cifar'`` for small images."""
    return ResNet(stage_sizes=stage_sizes, widths=_IMAGENET_WIDTHS, stem=stem, block=block, **options)


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "conv4": Conv4,
    "resnet8": functools.partial(_cifar_resnet, 8),
    "resnet20": functools.partial(_cifar_resnet, 20),
    "resnet32": functools.partial(_cifar_resnet, 32),
    "resnet56": functools.partial(_cifar_resnet, 56),
    "resnet18": functools.partial(_imagenet_resnet, (2, 2, 2, 2)),
    "resnet34": functools.partial(_imagenet_resnet, (3, 4, 6, 3)),
    "resnet50": functools.partial(_imagenet_resnet, (3, 4, 6, 3), block=Bottleneck),
}
"""Backbone name -> constructor taking keyword options (axis_name, dtype; stem for ResNets)."""


def create_backbone(name: str, **options: Any) -> nn.Module:
    """The backbone called ``name`` (a key of BACKBONES), built with keyword ``options``.

    Example: ``create_backbone('resnet32', axis_name='batch', dtype=jnp.bfloat16)``.
    """
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}; valid names: {sorted(BACKBONES)}.")
    return BACKBONES[name](**options)
