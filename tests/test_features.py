"""rr_jax.features: eval-mode features of normalised images, the input-shape check."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rr_jax import features


class _MeanPixel(nn.Module):
    """A parameter-free 'backbone': the mean pixel of each image, [N, C]."""

    @nn.compact
    def __call__(self, x, train):
        return jnp.mean(x, axis=(1, 2))


def test_features_normalise_as_pretraining_and_keep_order():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (37, 4, 4, 3), dtype=np.uint8)  # not a multiple of the batch
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    expected = ((images / 255.0 - np.array(mean)) / np.array(std)).mean(axis=(1, 2))
    for devices in (jax.local_devices(), jax.local_devices()[:1]):
        got = features.extract_features(_MeanPixel(), {}, images, mean=mean, std=std, batch_size=12, devices=devices)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="images must be uint8\\[N, H, W, C\\], got float32"):
        features.extract_features(_MeanPixel(), {}, images.astype(np.float32), mean=mean, std=std)


class _Dense(nn.Module):
    """Flattens the image into a Dense layer of 5 features: it takes one input size only."""

    @nn.compact
    def __call__(self, x, train):
        return nn.Dense(5)(x.reshape(x.shape[0], -1))


def test_feature_dim_and_the_input_shape_check():
    variables = _Dense().init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)), train=False)
    assert features.feature_dim(_Dense(), variables, (4, 4, 3)) == 5
    with pytest.raises(ValueError, match="cannot take images of shape \\(4, 4, 1\\) of dataset 'gray'"):
        features.feature_dim(_Dense(), variables, (4, 4, 1), "gray")
