"""Run an experiment script as one process of a multi-process run, watched
(for tests/test_multiprocess.py).

    python -m tests._mp_worker --watch DIR --report FILE [--die-in-epoch N] -- SCRIPT ARGV...

--watch / --report: every file or folder this process creates, writes, renames or removes
    under DIR through Python (an audit hook) is appended to FILE as "event path", so a test
    can see which process wrote what. orbax's array data goes through tensorstore (C++) and
    is not seen; its per-process metadata files are.
--die-in-epoch N: SIGKILL this process as epoch N (1-based) starts, after the checkpoint
    of epoch N-1: the other processes are then waiting for it in their next collective.
"""

from __future__ import annotations

import argparse
import os
import runpy
import signal
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
EVENTS = (
    "open",
    "os.rename",
    "os.replace",
    "os.mkdir",
    "os.remove",
    "os.rmdir",
    "os.unlink",
    "shutil.rmtree",
    "os.truncate",
)


def watch_writes(folder: str, report: str) -> None:
    folder = os.path.abspath(folder)

    def hook(event: str, args: tuple) -> None:
        if event not in EVENTS or not args or isinstance(args[0], int):
            return
        if event == "open":
            mode, flags = args[1], args[2]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(
                flags & WRITE_FLAGS
            )
            if not writing:
                return
        targets = (
            args[:2] if event in ("os.rename", "os.replace") else args[:1]
        )  # a rename names its source and target
        for target in targets:
            try:
                path = os.path.abspath(os.fsdecode(target))
            except (TypeError, ValueError):
                continue
            if path == folder or path.startswith(folder + os.sep):
                with open(report, "a") as f:  # outside the watched folder: never reported itself
                    f.write(f"{event} {path}\n")

    sys.addaudithook(hook)


def die_in_epoch(epoch: int) -> None:
    from cnnjax import step

    real = step.epoch_order

    def epoch_order(rngs, num_examples, batch_size, e):
        if e + 1 == epoch:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(rngs, num_examples, batch_size, e)

    step.epoch_order = epoch_order


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--watch", required=True)
    parser.add_argument("--report", required=True)
    parser.add_argument("--die-in-epoch", type=int)
    parser.add_argument("script")
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    open(args.report, "a").close()
    watch_writes(args.watch, args.report)
    if args.die_in_epoch is not None:
        die_in_epoch(args.die_in_epoch)
    sys.argv = [args.script, *args.argv]
    runpy.run_path(args.script, run_name="__main__")


if __name__ == "__main__":
    main()
