"""Errors a user can fix: the CLI prints them as one line and exits 1 (no traceback)."""


class UserError(Exception):
    """Bad input (file, checkpoint, data or config); the message names the file or key and the fix."""


def user_errors() -> tuple[type[Exception], ...]:
    """Every exception type that carries a user-fixable message (printed without a traceback)."""
    from calm_train.data.dataset_info import DataError
    return (UserError, DataError)
