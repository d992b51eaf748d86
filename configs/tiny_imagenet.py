"""tiny-ImageNet, the paper's setup: resnet32, M=64, K=16, Adam 1e-3, 200 epochs, 64x64.

    python launch.py --config=configs/tiny_imagenet.py --workdir=/tmp/rr_tiny_imagenet \
        --config.image_folder=/path/to/tiny-imagenet-200

--config.image_folder is the tiny-imagenet-200/ directory as distributed
(http://cs231n.stanford.edu/tiny-imagenet-200.zip): train/<wnid>/images/*.JPEG for
pretraining and the probe's training, val/ (labelled by val_annotations.txt) as the test
split. The first run prepares each split once into ArrayRecord under the TFDS data
directory (config.data_dir); later runs reuse it. Normalisation: mean 0.5 and std 0.25
per channel, as in the official code.

Published linear-probe accuracy: 30.54 (resnet32, 200 epochs, mean of 3 seeds).
"""

from rr_jax.config import base_config


def get_config():
    config = base_config()
    config.dataset = "tiny_imagenet"
    config.model.backbone = "resnet32"
    config.relational.num_views = 16
    config.data.mean = (0.5, 0.5, 0.5)
    config.data.std = (0.25, 0.25, 0.25)
    return config
