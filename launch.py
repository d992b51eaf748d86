"""Pretrains a backbone by relational reasoning, then runs the linear probe on it.

    python launch.py --config=configs/cifar10.py --workdir=/tmp/rr_cifar10 \
        [--config.model.backbone=conv4 ...]

Re-running the same command resumes from the latest checkpoint in --workdir.
Multi-host (TPU pods, GPU clusters): add --distributed (or give --coordinator_address,
--num_processes and --process_id) on every host.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from rr_jax.xla_flags import with_cpu_defaults

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    os.environ["XLA_FLAGS"] = with_cpu_defaults(os.environ.get("XLA_FLAGS", ""))
    logging.info("XLA_FLAGS=%r (CPU defaults in rr_jax/xla_flags.py).", os.environ["XLA_FLAGS"])
    import jax

    if FLAGS.distributed or FLAGS.num_processes:
        if jax.config.jax_platforms in (None, "", "cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    from rr_jax import linear_probe, train

    config = FLAGS.config
    train.pretrain(config, FLAGS.workdir)
    logging.info("Pretraining finished; checkpoints are in %s/checkpoints.", FLAGS.workdir)
    if config.probe.enabled:
        results = linear_probe.run_probe(FLAGS.workdir, epochs=config.probe.epochs, data_dir=config.data_dir)
        logging.info("Linear probe on %s: top-1 %.2f%%, top-5 %.2f%%.",
                     results["dataset"], 100 * results["top1"], 100 * results["top5"])


if __name__ == "__main__":
    app.run(main)
