"""ImageNet (TFDS imagenet2012, manual download): resnet50, images resized to 224 on the host.

    # once: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (image-net.org) in
    # DATA_DIR/downloads/manual; the first run prepares them as ArrayRecord in DATA_DIR.
    python launch.py --config=configs/imagenet.py --workdir=/tmp/rr_imagenet \
        --config.data_dir=DATA_DIR [--config.data.image_size=128]

Not a setting of the paper: its recipe at ImageNet scale. Each host reads, decodes and
resizes (shorter side to data.image_size, centre crop) only its slice of every global
batch with Grain; the paper's augmentation runs on device. K=4 views of M=256 images per
step keep the K*M backbone passes of a step at 1024 images; probe on the validation split.
"""

from rr_jax.config import base_config


def get_config():
    config = base_config()
    config.dataset = "imagenet2012"
    config.model.backbone = "resnet50"
    config.batch_size = 256
    config.relational.num_views = 4
    config.num_epochs = 100
    config.data.image_size = 224
    config.data.streaming = "stream"
    config.data.read_threads = 16
    config.data.prefetch_steps = 16
    return config
