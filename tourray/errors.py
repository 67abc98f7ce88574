"""Errors that are the user's to fix: the CLI prints them without a traceback and exits 2."""


class UserError(Exception):
    """A mistake in input, flags or lake state. The message names the file, row or flag at fault."""

    exit_code = 2
