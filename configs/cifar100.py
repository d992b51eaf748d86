"""CIFAR-100, the paper's setup: resnet32, M=64, K=32, Adam 1e-3, 200 epochs.

    python launch.py --config=configs/cifar100.py --workdir=/tmp/rr_cifar100

Published linear-probe accuracy: 46.17 (resnet32, fine labels), 52.44 on the 20
coarse labels, 67.81 transferred to CIFAR-10.
"""

from rr_jax.config import base_config


def get_config():
    config = base_config()
    config.dataset = "cifar100"
    return config
