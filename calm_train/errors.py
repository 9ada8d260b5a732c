"""Errors a user can fix, and the exit codes of every command (DESIGN.md "Exit codes")."""
from __future__ import annotations

import sys
import traceback

EXIT_ERROR, EXIT_USAGE, EXIT_INTERNAL = 1, 2, 70


class UserError(Exception):
    """Bad input (file, checkpoint, data or config); the message names the file or key and the fix.  Every
    error a user can fix derives from it (data's DataError, convert's CheckpointError, ...), so it is
    printed in one line without a traceback."""


def run_command(command: str, func, *args) -> int:
    """func(*args) with the exit codes of every command: its own status (0 done, 75 checkpoint saved, ...);
    1 and one line `calm-train COMMAND: error: ...` for bad input (a user error, or an OSError naming a file:
    permissions, a full disk); 70 and the traceback for anything else, which is a bug."""
    try:
        return int(func(*args) or 0)
    except UserError as err:
        message = str(err)
    except OSError as err:
        message = f"{err}. Fix: check that path (it exists, its permissions, free space)"
    except Exception:       # noqa: BLE001 - every other exception is a bug: say so, with its traceback
        traceback.print_exc()
        print(f"calm-train {command}: internal error (a bug; the traceback is above). Please report it",
              file=sys.stderr)
        return EXIT_INTERNAL
    print(f"calm-train {command}: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def positive_int(text: str) -> int:
    """argparse type of counts (tokens, samples, workers): an integer >= 1, else a usage error (exit 2)."""
    import argparse
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value
