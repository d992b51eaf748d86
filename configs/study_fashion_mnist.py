"""The reproduction study's base run (rr_jax/study): conv4 on Fashion-MNIST, 1 epoch.

    python launch.py --config=configs/study_fashion_mnist.py --workdir=runs/study/NAME \
        [--config.method=simclr --config.seed=1 ...]

One epoch over the 60 000 training images (938 steps of M=64) with K=8 views keeps a
run, linear probe included, within a few minutes on a 2-core CPU. The kNN monitor
writes a learning curve to metrics.jsonl.
"""

from configs import fashion_mnist


def get_config():
    config = fashion_mnist.get_config()
    config.max_steps = None
    config.num_epochs = 1
    config.relational.num_views = 8
    config.log_every_steps = 50
    config.checkpoint.every_steps = 200
    config.knn_monitor.every_steps = 200
    return config
