"""The one owner of a pretraining workdir, opened once and closed once by the loop.

It creates the directory (or recognises one of its own: a non-empty directory that rr_jax
did not make is refused, so that no file of another program is ever trimmed, replaced or
moved), takes its lock (so that two launches never train into one
workdir), writes config.json, trims metrics.jsonl back to the restored step, and keeps
third-party log chatter (Orbax, TensorFlow) in WORKDIR/log.txt while the console shows
rr_jax's own lines, warnings and errors. Checkpoints themselves belong to
rr_jax.checkpoint; comparing a resumed config with the checkpoint's is `check_resumable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import fcntl
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from absl import logging as absl_logging

from rr_jax.errors import ResumeError, UserError, WorkdirBusyError

LOCK_FILE = "lock"
LOG_FILE = "log.txt"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
_OTHER_PROCESS_LOG = re.compile(r"log\.process\d+\.txt")  # RunDirectory's log file of process > 0
# What `RunDirectory._take_lock` writes into the lock file: its holder.
_LOCK_HOLDER = re.compile(r"process \d+ on \S+ since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d")

# Fields that may differ between a checkpoint's config and the config resuming it: how
# long to train, how often to log, monitor and checkpoint, where the data lives and how
# it is read (streamed or in memory give the same batches), and the evaluation that runs
# after pretraining (not its hold-out: pretraining leaves those images out). Everything
# else changes what is trained.
RESUMABLE_FIELDS = (
    "max_steps", "num_epochs", "log_every_steps", "data_dir", "image_folder", "data.streaming",
    "data.in_memory_limit_mib", "data.read_threads", "data.prefetch_steps", "checkpoint.*",
    "knn_monitor.*", "online_probe.*", "probe.enabled", "probe.epochs",
)
# The fields that shape imported weights (a converted checkpoint has no train state).
WEIGHT_FIELDS = ("dataset", "model.backbone")

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_ASYNCIO_DIR = os.path.dirname(os.path.abspath(asyncio.__file__))
# TensorFlow only reads datasets and writes TensorBoard events here; without these its
# C++ start-up lines (oneDNN notice, CPU features) and the warnings that repeat an error
# rr_jax reports (a full disk) reach the console. A user's own setting always wins.
NATIVE_LOG_DEFAULTS = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}


def quiet_native_logs() -> None:
    """Sets NATIVE_LOG_DEFAULTS in the environment where unset. Entry points call it
    before TensorFlow is imported (it reads them once, when it loads)."""
    for name, value in NATIVE_LOG_DEFAULTS.items():
        os.environ.setdefault(name, value)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become tuples so JSON and configs compare."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = tuple(value) if isinstance(value, list | tuple) else value
    return flat


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(key == p or (p.endswith(".*") and key.startswith(p[:-1])) for p in patterns)


def check_resumable(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    step: int,
    only: Iterable[str] | None = None,
    allow: Iterable[str] = (),
) -> None:
    """Raises ResumeError naming every field that differs between the checkpoint's config
    (`saved`) and this run's (`current`), except RESUMABLE_FIELDS and `allow`.

    `only`: compare just these fields (patterns like 'checkpoint.*' allowed), e.g. the
    fields that shape imported weights.
    """
    saved_flat, current_flat = flatten(saved), flatten(current)
    allowed = (*RESUMABLE_FIELDS, *allow)
    differing = [  # fields added to (or dropped from) rr_jax since the checkpoint are not compared
        key for key in sorted(set(saved_flat) & set(current_flat))
        if saved_flat[key] != current_flat[key]
        and not _matches(key, allowed) and (only is None or _matches(key, only))
    ]
    if differing:
        lines = "\n".join(f"  {key}: checkpoint {saved_flat[key]!r}, now {current_flat[key]!r}" for key in differing)
        raise ResumeError(
            f"Cannot resume the checkpoint of step {step} with a different config:\n{lines}\n"
            "Use a new --workdir for a different experiment, or pass "
            f"--allow_config_change={','.join(differing)} to resume anyway. "
            f"Fields that may always change: {', '.join(RESUMABLE_FIELDS)}."
        )


def unknown_key_message(override: str, config: Mapping[str, Any]) -> str | None:
    """The message for a --config.KEY=VALUE override naming a key the config lacks;
    None when the config has the key."""
    path = override.split("=", 1)[0].removeprefix("--").removeprefix("config.")
    node: Any = config
    known = []
    for depth, part in enumerate(path.split(".")):
        if not isinstance(node, Mapping) or part not in node:
            known = sorted(node) if isinstance(node, Mapping) else []
            break
        node = node[part]
    else:
        return None
    bad = ".".join(path.split(".")[: depth + 1])
    close = difflib.get_close_matches(part, known, n=1)
    hint = f" (did you mean {'.'.join([*path.split('.')[:depth], close[0]])!r}?)" if close else ""
    return f"unknown config key {bad!r}{hint}."


def is_run_directory(workdir: str) -> bool:
    """Whether `workdir` is a directory rr_jax made: it holds the lock file of a run
    (written first by every run: empty, or naming its holder), only the log files of a
    multi-host run's other processes (which may start before process 0 locks), or the
    checkpoints of imported weights (`rr_jax.convert`: checkpoints/<step>/backbone)."""
    entries = os.listdir(workdir)
    if entries and all(_OTHER_PROCESS_LOG.fullmatch(name) for name in entries):
        return True
    lock = os.path.join(workdir, LOCK_FILE)
    if os.path.isfile(lock):
        with open(lock, errors="replace") as f:
            text = f.read(200).strip()
        if not text or _LOCK_HOLDER.fullmatch(text):
            return True
    checkpoints = os.path.join(workdir, "checkpoints")
    return os.path.isdir(checkpoints) and any(
        name.isdigit() and os.path.isdir(os.path.join(checkpoints, name, "backbone")) for name in os.listdir(checkpoints)
    )


def check_workdir(workdir: str) -> None:
    """Raises UserError when `workdir` is a non-empty directory that rr_jax did not make
    (`is_run_directory`), naming what it holds; absent or empty directories are fine."""
    if not os.path.isdir(workdir) or not (entries := sorted(os.listdir(workdir))) or is_run_directory(workdir):
        return
    shown = [name + "/" * os.path.isdir(os.path.join(workdir, name)) for name in entries[:8]]
    more = f" and {len(entries) - 8} more" if len(entries) > 8 else ""
    raise UserError(
        f"--workdir={workdir} is not empty and is not an rr_jax workdir: it holds {', '.join(shown)}{more}. "
        f"A run writes {LOCK_FILE}, {LOG_FILE}, {CONFIG_FILE}, {METRICS_FILE}, tensorboard/ and checkpoints/ "
        "there and trims or replaces files of those names, so it starts only in a new or empty directory. "
        "Choose another --workdir (nothing in this one was changed)."
    )


class _ConsoleFilter(logging.Filter):
    """Lets rr_jax's own records and any warning or error through to the console, except
    records that carry the exception of a failed checkpoint write: Orbax's threads log
    each failed write so, asyncio logs the exceptions of Orbax's other write tasks that
    nobody retrieved once the first one failed, and the same error reaches the loop,
    which reports it once (rr_jax.checkpoint)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and (f"{os.sep}orbax{os.sep}" in record.pathname
                                or os.path.dirname(record.pathname) == _ASYNCIO_DIR):
            return False
        return (
            record.levelno >= logging.WARNING
            or record.pathname.startswith(_PACKAGE_DIR)
            or os.path.basename(record.pathname) == "launch.py"
        )


_CONSOLE_FILTER = _ConsoleFilter()


class _LogFile(logging.FileHandler):
    """A FileHandler that stops writing at the first record it cannot write (a full disk)
    instead of printing a traceback for every record that follows; the console still
    shows rr_jax's lines, and the error that stops the run says what failed."""

    def __init__(self, path: str):
        super().__init__(path)
        self._failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self._failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        self._failed = True

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # the lines still buffered cannot be written either
            pass


def quiet_console() -> None:
    """From now on the console shows only rr_jax's own records and any warning or error.
    Entry points call it first, so that third-party INFO lines written before the
    workdir's log file opens (JAX looking for a TPU, say) stay off the console too."""
    absl_logging.get_absl_handler().addFilter(_CONSOLE_FILTER)


@contextlib.contextmanager
def third_party_logs_to_file(log_path: str) -> Iterator[None]:
    """While open: every log record (INFO and up) also goes to `log_path`, and the
    console shows only rr_jax's own records and any warning or error."""
    handler = _LogFile(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(filename)s:%(lineno)d] %(message)s"))
    console_filter = _ConsoleFilter()
    logging.getLogger().addHandler(handler)
    absl_logging.get_absl_handler().addFilter(console_filter)
    try:
        yield
    finally:
        absl_logging.get_absl_handler().removeFilter(console_filter)
        logging.getLogger().removeHandler(handler)
        handler.close()


def reader_logs(workdir: str) -> contextlib.AbstractContextManager[None]:
    """For the commands that read a finished run (the linear probe, the evaluation):
    rr_jax's lines on the console, third-party INFO lines appended to the run's log
    file; in a directory that is not rr_jax's nothing is written (the command then
    stops with its own error)."""
    quiet_console()
    if os.path.isdir(workdir) and is_run_directory(workdir):
        return third_party_logs_to_file(os.path.join(workdir, LOG_FILE))
    return contextlib.nullcontext()


class RunDirectory:
    """A workdir held by one run: `with RunDirectory(workdir) as run: ...`.

    Args:
      workdir: the run's directory, created if absent; an existing one must be empty or
        rr_jax's own (`check_workdir`).
      primary: whether this process owns the shared files (process 0 of a multi-host
        run): only it locks, writes config.json and trims metrics. Every process keeps
        its own log file.
      process_index: names the log file of processes other than 0.
    """

    def __init__(self, workdir: str, *, primary: bool = True, process_index: int = 0):
        self.workdir = os.path.abspath(workdir)
        self.primary = primary
        self._log_name = LOG_FILE if process_index == 0 else f"log.process{process_index}.txt"
        self._lock = None
        self._logs = None

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, self._log_name)

    def __enter__(self) -> RunDirectory:
        check_workdir(self.workdir)  # every process: none writes into a directory rr_jax did not make
        try:
            os.makedirs(self.workdir, exist_ok=True)
        except OSError as error:
            raise UserError(f"--workdir={self.workdir!r} cannot be created: {error}.") from error
        if self.primary:
            self._take_lock()
        self._logs = third_party_logs_to_file(self.log_path)
        self._logs.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._logs is not None:
            self._logs.__exit__(None, None, None)
            self._logs = None
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def _take_lock(self) -> None:
        """An exclusive flock on WORKDIR/lock. The kernel drops it when its holder dies,
        however it dies, so a crashed run never leaves the workdir stuck."""
        path = os.path.join(self.workdir, LOCK_FILE)
        lock = open(path, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "an unknown process"
            lock.close()
            raise WorkdirBusyError(
                f"--workdir={self.workdir} is in use by {holder}. Wait for that run to end "
                "(or stop it), or choose another --workdir."
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"process {os.getpid()} on {socket.gethostname()} since "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        lock.flush()
        self._lock = lock

    def write_config(self, config: Mapping[str, Any]) -> None:
        """WORKDIR/config.json: the resolved config of this run."""
        if self.primary:
            _write_atomically(os.path.join(self.workdir, CONFIG_FILE),
                              json.dumps(config, indent=2, sort_keys=True))

    def trim_metrics(self, last_step: int) -> int:
        """Drops the records of metrics.jsonl past `last_step` (logged after the restored
        checkpoint, so about to be logged again) and any line a kill cut short; atomic.
        Returns the number of records dropped."""
        path = os.path.join(self.workdir, METRICS_FILE)
        if not self.primary or not os.path.exists(path):
            return 0
        with open(path) as f:
            lines = f.read().splitlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= last_step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                pass
        if len(kept) < len(lines):
            _write_atomically(path, "".join(line + "\n" for line in kept))
        return len(lines) - len(kept)


def _write_atomically(path: str, text: str) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
