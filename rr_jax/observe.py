"""What a run shows: metrics.jsonl, TensorBoard event files and a progress bar."""

from __future__ import annotations

import contextlib
import json
import os

import tensorflow as tf
import tqdm

from rr_jax.errors import MetricsWriteError, os_error


class MetricsLog:
    """Appends one JSON object per logged step to WORKDIR/metrics.jsonl and writes the
    same scalars as TensorBoard events under WORKDIR/tensorboard.

    Only one process should write (`enabled=False` elsewhere). A write the operating
    system refuses (disk full, permissions, quota) raises MetricsWriteError.
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self._enabled = enabled
        if enabled:
            self._jsonl_path = os.path.join(workdir, "metrics.jsonl")
            self._events_path = os.path.join(workdir, "tensorboard")
            self._jsonl = open(self._jsonl_path, "a")
            self._events = tf.summary.create_file_writer(self._events_path)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self._enabled:
            return
        try:
            self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
            self._jsonl.flush()
            with self._events.as_default(step=step):
                for name, value in scalars.items():
                    tf.summary.scalar(name, value)
            self._events.flush()
        except OSError as error:
            raise MetricsWriteError(self._jsonl_path, step, os_error(error) or str(error)) from error
        except tf.errors.OpError as error:
            raise MetricsWriteError(self._events_path, step, os_error(error) or error.message) from error

    def close(self) -> None:
        """Closes the files; what cannot be flushed now was reported by `write`."""
        if self._enabled:
            with contextlib.suppress(OSError, tf.errors.OpError):
                self._jsonl.close()
            with contextlib.suppress(OSError, tf.errors.OpError):
                self._events.close()


class ProgressBar:
    """A tqdm bar over steps showing the loss, the objective's accuracy (when it has one),
    images per second, and the latest monitor values (online probe top-1, kNN top-1)
    once they are logged."""

    _SHOWN = (  # scalar name, label, format
        ("loss", "loss", ".4f"), ("accuracy", "acc", ".3f"), ("images_per_second", "img_s", ".0f"),
        ("online_probe_top1", "probe", ".3f"), ("knn_top1", "knn", ".3f"),
    )

    def __init__(self, total_steps: int, start_step: int = 0):
        self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._postfix = {}

    def __enter__(self):
        return self

    def update(self, step: int, scalars: dict[str, float]) -> None:
        """Moves the bar to `step` and shows those of `scalars` it knows, keeping the
        latest value of the others."""
        for name, label, fmt in self._SHOWN:
            if name in scalars:
                self._postfix[label] = format(scalars[name], fmt)
        self._bar.set_postfix({label: self._postfix[label] for _, label, _ in self._SHOWN if label in self._postfix})
        self._bar.update(step - self._bar.n)

    def __exit__(self, *exc):
        self._bar.close()
