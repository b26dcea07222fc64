"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class UsageError(Exception):
    """Bad input (config, names, files): the message names the problem and the fix."""


class DataError(UsageError):
    """A dataset file is missing, corrupt, truncated or fails its checksum; the message names the file."""
