"""SlimageNet64 (1000 ImageNet classes at 64x64): resnet32, M=64, K=16, Adam 1e-3, 200 epochs.

    python launch.py --config=configs/slimagenet64.py --workdir=/tmp/rr_slimagenet64 \
        --config.image_folder=/path/to/SlimageNet64

--config.image_folder is the SlimageNet64/ directory as distributed (train/<class>/ and
test/<class>/ image folders). Each split is prepared once into ArrayRecord under the
TFDS data directory and, being larger than data.in_memory_limit_mib, streamed.
Normalisation: mean 0.5 and std 0.25 per channel, the official code's for its 64x64
datasets; backbone and K as for tiny-ImageNet.
"""

from configs import tiny_imagenet


def get_config():
    config = tiny_imagenet.get_config()
    config.dataset = "slimagenet64"
    return config
