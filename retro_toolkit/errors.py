"""Errors a user can cause, and how the CLI reports them.

`UserError` is bad input (recipe, overrides, files): exit code 2, one paragraph, no
traceback. `StageFailed` is a stage that ran and failed: exit code 1.
"""


class RetroError(Exception):
    exit_code = 1


class UserError(RetroError):
    """Bad input. The message names the key or file and says how to fix it."""

    exit_code = 2


class StageFailed(RetroError):
    exit_code = 1
