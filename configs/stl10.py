"""STL-10: pretrain resnet34 on the 100 000 unlabelled 96x96 images, K=25, 300 epochs.

    python launch.py --config=configs/stl10.py --workdir=/tmp/rr_stl10

The official code uses K=25 for resnet34 on STL-10; the probe trains on the labelled
train split and is evaluated on test.
"""

from rr_jax.config import base_config


def get_config():
    config = base_config()
    config.dataset = "stl10"
    config.model.backbone = "resnet34"
    config.relational.num_views = 25
    config.num_epochs = 300
    return config
