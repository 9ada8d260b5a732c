"""Errors a user can fix: the CLI prints them as one line and exits 1 (no traceback)."""


class UserError(Exception):
    """Bad input (file, checkpoint, data or config); the message names the file or key and the fix."""
