"""Pretrains a backbone by relational reasoning, then runs the linear probe on it.

    python launch.py --config=configs/cifar10.py --workdir=/tmp/rr_cifar10 \
        [--config.model.backbone=conv4 ...]

Re-running the same command resumes from the latest checkpoint in --workdir.
Multi-host (TPU pods, GPU clusters): add --distributed (or give --coordinator_address,
--num_processes and --process_id) on every host.

Exit codes: 0 done; 2 a problem with the config, workdir, dataset, memory or resume (one
message; add --verbosity=1 for the traceback); 74 a checkpoint or the metrics could not
be written (disk full, permissions, quota: one message; fix the cause and re-run to
resume); 130
interrupted by Ctrl-C and 143 preempted by SIGTERM, after saving the checkpoint of the
step reached (re-run to resume).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from rr_jax.errors import (
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    Preempted,
    exit_cleanly_on_known_errors,
)
from rr_jax.run_dir import LOG_FILE, quiet_console, quiet_native_logs, third_party_logs_to_file, unknown_key_message
from rr_jax.xla_flags import with_cpu_defaults

quiet_native_logs()  # before anything imports TensorFlow

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_list("allow_config_change", [], "Config fields that may differ from the checkpoint's on resume.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a one-line message for a --config.KEY override naming a key
    the config does not have (instead of ml_collections' chained tracebacks)."""
    try:
        return app.parse_flags_with_usage(argv)
    except (KeyError, AttributeError) as error:
        path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
        if path is None:
            raise
        from rr_jax.config import load_config_file  # here: it imports JAX, which reads XLA_FLAGS once

        config = load_config_file(path.split(":")[0]).to_dict()
        messages = [m for a in argv if a.startswith("--config.") and (m := unknown_key_message(a, config))]
        print(f"Error: {messages[0] if messages else error}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


@exit_cleanly_on_known_errors
def main(argv):
    del argv
    quiet_console()
    os.environ["XLA_FLAGS"] = with_cpu_defaults(os.environ.get("XLA_FLAGS", ""))
    logging.info("XLA_FLAGS=%r (CPU defaults in rr_jax/xla_flags.py).", os.environ["XLA_FLAGS"])
    import jax

    if FLAGS.distributed or FLAGS.num_processes:
        if jax.config.jax_platforms in (None, "", "cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    from rr_jax import linear_probe, train

    config = FLAGS.config
    checkpoints = os.path.join(os.path.abspath(FLAGS.workdir), "checkpoints")
    try:
        train.pretrain(config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change)
    except Preempted as stop:  # the step reached is saved
        logging.warning("%s", stop)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:  # before the loop, or a second Ctrl-C while the last checkpoint was written
        logging.warning("Interrupted; the checkpoints are those in %s. Re-run the same command to resume.", checkpoints)
        sys.exit(EXIT_INTERRUPTED)
    logging.info("Pretraining finished; checkpoints are in %s.", checkpoints)
    if config.probe.enabled:
        try:
            with third_party_logs_to_file(os.path.join(FLAGS.workdir, LOG_FILE)):
                results = linear_probe.run_probe(FLAGS.workdir, epochs=config.probe.epochs, data_dir=config.data_dir)
        except KeyboardInterrupt:
            logging.warning("Interrupted during the linear probe; pretraining is complete (checkpoints in %s). "
                            "Re-run the same command to run the probe.", checkpoints)
            sys.exit(EXIT_INTERRUPTED)
        logging.info("Linear probe on %s: top-1 %.2f%%, top-5 %.2f%%.",
                     results["dataset"], 100 * results["top1"], 100 * results["top5"])


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
