"""User-facing errors.

Anything a user can cause (bad name, bad file, no network) raises
``FfchatError``; the CLI prints its message on one line and exits non-zero
without a traceback. Everything else is a bug and keeps its traceback.
"""


class FfchatError(Exception):
    """An error with a message meant for the user, and the exit code to use."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        message = super().__str__()
        return f"{message} ({self.hint})" if self.hint else message

