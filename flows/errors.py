"""The errors the flows raise, and how the command lines report them.

Input errors (exit code 2) are raised before anything runs; a failed DVC command (exit code 1)
carries its last output lines. Imports nothing beyond the standard library.
"""

from __future__ import annotations

import sys


class FlowInputError(ValueError):
    """Bad input to a flow or command line: the message says what is wrong and what is valid."""


class NotADvcRepoError(FlowInputError):
    """The folder is not the root of a DVC repository."""


class UnknownStageError(FlowInputError):
    """A requested stage is not in the repository's pipeline."""


class UnknownParamError(FlowInputError):
    """An override or sweep key that is neither a params key nor a Hydra config group."""


class ServerUnreachableError(RuntimeError):
    """The Prefect API does not answer its health check."""


class StageFailedError(RuntimeError):
    """A DVC command exited with an error; the message ends with its last output lines."""


class StageTimeoutError(StageFailedError):
    """A DVC command ran past its timeout and was killed."""


# What a command line catches and turns into one ``error: ...`` line.
CLI_ERRORS = (FlowInputError, ServerUnreachableError, StageFailedError)


def report_error(e: BaseException) -> int:
    """Print ``error: <message>`` to stderr; the exit code: 1 for a failed command, 2 for bad input."""
    print(f"error: {e}", file=sys.stderr)
    return 1 if isinstance(e, StageFailedError) else 2
