"""Errors that the CLI turns into one clear line and exit status 2."""


class LatkitError(Exception):
    """A user-facing error: bad input, missing data, a corrupt artifact.

    The message must name what is wrong (file, field) in one line; commands print it
    without a traceback and exit with status 2.
    """
