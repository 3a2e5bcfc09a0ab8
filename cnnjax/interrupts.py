"""Ctrl-C and SIGTERM while a script is still starting (loading jax, reading its flags): nothing
has been written yet, so a stop is one line and exit 130 at once.

Light on purpose (no jax): a script installs it before its other imports. In a training script
cnnjax.runs.start replaces it once there is a run to stop cleanly; predict.py, which writes
nothing, keeps it, and evaluate.py until it writes its figure (`writing`).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

EXIT_INTERRUPTED = 130  # Ctrl-C, or SIGTERM from `kill` or a scheduler


def _stopped_while_starting(signum: int, frame: Any) -> None:
    sys.stderr.write("\ninterrupted while starting: nothing was written\n")
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


def install() -> None:
    """Take Ctrl-C and SIGTERM as a stop before anything started."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stopped_while_starting)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def writing() -> None:
    """From here on the script writes files: a stop that `install` took is a KeyboardInterrupt
    again, so the file being written is removed (files.atomic_path) and runs.exits says it, where
    os._exit would leave a temporary behind and "nothing was written" would not be true. Handlers
    set by anyone else (a test runner, runs.start) are left alone."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is _stopped_while_starting:
            signal.signal(signum, _raise_interrupt)
