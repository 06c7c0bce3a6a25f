"""Errors a user can cause, and how the CLI reports them.

`UserError` is bad input (recipe, overrides, files): exit code 2, one paragraph, no
traceback. `StageFailed` is a stage that ran and failed: exit code 1. `StageStopped` is a
training stage that stopped early at a checkpoint (a stop signal: 128 + its number; its
time limit: 75); rerunning continues it.
"""

from __future__ import annotations


class RetroError(Exception):
    exit_code = 1


class UserError(RetroError):
    """Bad input. The message names the key or file and says how to fix it."""

    exit_code = 2


class StageFailed(RetroError):
    exit_code = 1


class StageStopped(RetroError):
    def __init__(self, message: str, exit_code: int, stopped_at: int | None = None):
        super().__init__(message)
        self.exit_code, self.stopped_at = exit_code, stopped_at
