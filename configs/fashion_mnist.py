"""Offline quick start on a laptop CPU: conv4 on Fashion-MNIST (real data, no network).

    apt-get install dataset-fashion-mnist   # Debian/Ubuntu; or let TFDS download it
    python launch.py --config=configs/fashion_mnist.py --workdir=/tmp/rr_fmnist

Sized for 2 CPU cores: K=4 views, M=64, 300 steps.
"""

from rr_jax.config import base_config


def get_config():
    config = base_config()
    config.dataset = "fashion_mnist"
    config.model.backbone = "conv4"
    config.relational.num_views = 4
    config.num_epochs = 1
    config.max_steps = 300
    config.log_every_steps = 20
    config.checkpoint.every_steps = 100
    config.augment.hue = 0.0  # one channel: hue and saturation are no-ops anyway
    config.augment.saturation = 0.0
    return config
