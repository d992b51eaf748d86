"""The errors a run reports to its user, and how launch.py ends on each.

`UserError`s are caused by what the user gave (config, workdir, dataset, resume): the
command line prints their message alone, without a traceback. `RunWriteError`s are a
file of the run that the operating system would not let it write (disk full,
permissions, quota): also one message, and re-running resumes once the cause is fixed.
`Preempted` is not an error of the run but a stop: the checkpoint is saved and
re-running resumes.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator

from absl import logging

# Exit codes of launch.py (README, "Resuming").
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, the shell's code for a process ended by Ctrl-C
EXIT_PREEMPTED = 128 + signal.SIGTERM  # 143, the shell's code for a process ended by SIGTERM
EXIT_CANNOT_WRITE = 74  # EX_IOERR of sysexits.h: a file of the run (checkpoint, metrics) could not be written


class UserError(Exception):
    """A problem with the run's inputs; its message says what to change."""


class ConfigError(UserError, ValueError):
    """A config field has a value that is not allowed."""


class ResumeError(UserError):
    """The workdir's checkpoint cannot be resumed with this config."""


class WorkdirBusyError(UserError):
    """Another live process holds the workdir's lock."""


class InputFileError(UserError, ValueError):
    """A file named on the command line is not what the command needs."""


class DatasetError(UserError, OSError):
    """A dataset's files are damaged."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset is not prepared and cannot be obtained."""


class DatasetContentError(DatasetError, ValueError):
    """A dataset's files are readable but not what they must be (an image that does not
    decode, a class folder the train split lacks, a malformed annotations line)."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """A workdir holds no checkpoint (or none of the step asked for)."""


class CheckpointContentError(UserError, ValueError):
    """A checkpoint is corrupt, incomplete, or not what the command reads."""


class OutOfMemoryError(UserError, MemoryError):
    """The train step does not fit in the device's memory at this config."""


class Preempted(Exception):
    """The run stopped on SIGTERM (a preemption notice) or SIGINT (Ctrl-C) after saving
    the checkpoint of `step`; `exit_code` is the shell's code for that signal."""

    def __init__(self, step: int, total_steps: int, workdir: str, signum: int = signal.SIGTERM):
        self.step, self.total_steps, self.workdir, self.signum = step, total_steps, workdir, signum
        interrupted = signum == signal.SIGINT
        self.exit_code = EXIT_INTERRUPTED if interrupted else EXIT_PREEMPTED
        stopped = "Interrupted" if interrupted else "Preempted"
        super().__init__(
            f"{stopped} at step {step} of {total_steps}; the checkpoint of step {step} is "
            f"saved in {workdir}/checkpoints. Re-run the same command to resume."
        )


class RunWriteError(Exception):
    """A file of the run could not be written for a reason of the operating system (disk
    full, permissions, quota); the message names the file, the step and the reason."""


_FIX_AND_RERUN = "Fix the cause (free space, permissions or quota) and re-run the same command to resume"


class CheckpointWriteError(RunWriteError):
    """The checkpoint of `step` could not be written to `directory` (`reason`: the
    operating system's error, e.g. 'No space left on device (errno 28)'). Its incomplete
    files are removed; `latest` is the newest step that remains (None: none)."""

    def __init__(self, directory: str, step: int, reason: str, latest: int | None):
        self.directory, self.step, self.reason, self.latest = directory, step, reason, latest
        earlier = (f"the checkpoints of earlier steps are intact (the latest is step {latest})" if latest is not None
                   else "there is no earlier checkpoint")
        super().__init__(
            f"Cannot write the checkpoint of step {step} in {directory}: {reason}. Its incomplete files were "
            f"removed and {earlier}. {_FIX_AND_RERUN}."
        )


class MetricsWriteError(RunWriteError):
    """The metrics of `step` could not be written to `path` (`reason` as for
    CheckpointWriteError); a resumed run drops whatever part of them was written."""

    def __init__(self, path: str, step: int, reason: str):
        self.path, self.step, self.reason = path, step, reason
        super().__init__(
            f"Cannot write the metrics of step {step} to {path}: {reason}. The checkpoints written so far are "
            f"intact. {_FIX_AND_RERUN} from the latest of them."
        )


class ResultWriteError(RunWriteError):
    """`what` (a probe's results, an evaluation's figures) could not be written to `path`."""

    def __init__(self, what: str, path: str, reason: str):
        self.what, self.path, self.reason = what, path, reason
        super().__init__(f"Cannot write {what} to {path}: {reason}. {_FIX_AND_RERUN}.")


@contextlib.contextmanager
def writing(what: str, path: str) -> Iterator[None]:
    """While open, a write the operating system refuses (disk full, permissions, quota)
    becomes one ResultWriteError naming `what` and `path`; other errors pass unchanged."""
    try:
        yield
    except (UserError, RunWriteError):
        raise
    except Exception as error:
        if (reason := os_error(error)) is None:
            raise
        raise ResultWriteError(what, path, reason) from error


def exit_cleanly_on_known_errors(main: Callable) -> Callable:
    """Wraps a command's main: a UserError ends the process with its message alone and
    exit code EXIT_USER_ERROR, a RunWriteError likewise with EXIT_CANNOT_WRITE (the
    traceback too with absl's --verbosity=1 or more)."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (UserError, RunWriteError) as error:
            if logging.get_verbosity() >= 1:
                raise
            print(f"Error: {error}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR if isinstance(error, UserError) else EXIT_CANNOT_WRITE)

    return wrapped


# How TensorStore (Orbax's array writer) reports the operating system's error of a write.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
# The errors of a write that TensorFlow reports by their text alone (no errno).
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EIO)


def os_error(error: BaseException) -> str | None:
    """The operating system's error behind `error` (itself, a cause, or a member of a
    group), as 'No space left on device (errno 28)'; None when there is none."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        code = current.errno if isinstance(current, OSError) else None
        if code is None and (match := _OS_ERROR_CODE.search(str(current))):
            code = int(match.group(1))
        if code is None:
            code = next((c for c in _WRITE_ERRNOS if os.strerror(c) in str(current)), None)
        if code:
            return f"{os.strerror(code)} (errno {code})"
        pending += [current.__cause__, current.__context__, *getattr(current, "exceptions", ())]
    return None
