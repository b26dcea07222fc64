"""Errors a user can fix (the CLI prints them as one line and exits with code 2), and :func:`one_line`."""


class UsageError(Exception):
    """Bad input (config, names, files): the message names the problem and the fix."""


class DataError(UsageError):
    """A dataset file is missing, corrupt, truncated or fails its checksum; the message names the file."""


def last_line(text: str, limit: int = 500) -> str:
    """The last non-blank line of ``text`` (a traceback's last line is its error), at most ``limit`` characters."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:limit] if lines else ""


def one_line(e: BaseException, limit: int = 500) -> str:
    """``"<ExceptionType>: <last line of its message>"``, at most ``limit`` characters: an error fit for one
    log line or table cell (a Ray error's message holds the whole remote traceback; its last line says what failed)."""
    return f"{type(e).__name__}: {last_line(str(e), limit)}"[:limit]
