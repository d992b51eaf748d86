"""The errors a run reports to its user, and how launch.py ends on each.

`UserError`s are caused by what the user gave (config, workdir, dataset, resume): the
command line prints their message alone, without a traceback. `Preempted` is not an
error of the run but a stop: the checkpoint is saved and re-running resumes.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

from absl import logging

# Exit codes of launch.py (README, "Resuming").
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 128 + 15  # the shell's code for a process ended by SIGTERM


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


class OutOfMemoryError(UserError, MemoryError):
    """The train step does not fit in the device's memory at this config."""


class Preempted(Exception):
    """The run stopped on SIGTERM after saving the checkpoint of `step`."""

    def __init__(self, step: int, total_steps: int, workdir: str):
        self.step, self.total_steps, self.workdir = step, total_steps, workdir
        super().__init__(
            f"Preempted at step {step} of {total_steps}; the checkpoint of step {step} is "
            f"saved in {workdir}/checkpoints. Re-run the same command to resume."
        )


def exit_cleanly_on_user_errors(main: Callable) -> Callable:
    """Wraps a command's main: a UserError ends the process with its message alone and
    exit code EXIT_USER_ERROR (the traceback too with absl's --verbosity=1 or more)."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            if logging.get_verbosity() >= 1:
                raise
            print(f"Error: {error}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)

    return wrapped
