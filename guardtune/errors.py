"""The exception hierarchy and its exit codes, shared by every module and mapped by the CLI.

Library code raises these with a message a user can act on; `guardtune.cli` prints the message
as one red line and exits with the class's code. Anything else escaping is a bug (exit 1).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    BUG = 1
    USAGE = 2  # Typer's own code for bad arguments
    BAD_DATA = 3
    BAD_POLICY = 4
    BAD_SIGNATURE = 5
    MODEL_MISMATCH = 6
    INTEGRITY_VIOLATION = 7


class GuardtuneError(Exception):
    """Base of every error a user can cause; `hint` says what to do about it."""

    exit_code: ExitCode = ExitCode.BUG

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def one_line(self) -> str:
        text = str(self).replace("\n", " ")
        return f"{text} ({self.hint})" if self.hint else text


class UsageError(GuardtuneError):
    """A command that needs an option it was not given (Typer's own usage errors share the code)."""

    exit_code = ExitCode.USAGE


class DataError(GuardtuneError):
    """Bad data or input file: missing folder, unreadable image, missing caption, bad model."""

    exit_code = ExitCode.BAD_DATA


class PolicyError(GuardtuneError):
    """A freeze policy that is malformed or invalid."""

    exit_code = ExitCode.BAD_POLICY


class SignatureError(GuardtuneError):
    """A signature that does not verify, or a key that is not trusted."""

    exit_code = ExitCode.BAD_SIGNATURE


class ModelMismatchError(GuardtuneError):
    """A model whose weights are not the ones a policy was made for."""

    exit_code = ExitCode.MODEL_MISMATCH


class IntegrityError(GuardtuneError):
    """A derivative changed a tensor that the policy froze."""

    exit_code = ExitCode.INTEGRITY_VIOLATION
