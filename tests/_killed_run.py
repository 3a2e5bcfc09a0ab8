"""Run an experiment script in this process and SIGKILL it at a chosen
moment (for tests/test_runs.py).

    python -m tests._killed_run mnist|catsdogs|images|ablate \
        compile|mid-epoch|mid-save|after-save EPOCH -- ARGV...

compile:    as the first training program is about to compile (before any epoch ran)
mid-epoch:  in the middle of epoch EPOCH (1-based), after its first scanned call
mid-save:   inside the checkpoint save of epoch EPOCH, after orbax wrote the parameters
            into its temporary folder and before it finished
after-save: right after epoch EPOCH's checkpoint, before the history files are rewritten
"""

from __future__ import annotations

import os
import signal
import sys


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    script, point, epoch, dash, *argv = sys.argv[1:]
    assert dash == "--"
    epoch = int(epoch)
    import jax
    import orbax.checkpoint as ocp

    from cnnjax import checkpoint, feed, step

    if point in ("compile", "mid-epoch"):
        real_train_fn, real_order = feed.train_fn, step.epoch_order
        current = {"epoch": 0}

        def epoch_order(rngs, num_examples, batch_size, e):
            current["epoch"] = e + 1
            return real_order(rngs, num_examples, batch_size, e)

        def train_fn(*args, **kwargs):
            fn = real_train_fn(*args, **kwargs)

            def run(*call):
                if point == "compile":  # jit compiles on the first call: die inside it
                    die()
                out = fn(*call)
                if current["epoch"] == epoch:  # after the epoch's first call
                    jax.block_until_ready(out)
                    die()
                return out

            return run

        step.epoch_order, feed.train_fn = epoch_order, train_fn
    elif point == "mid-save":
        real_json_save = ocp.JsonCheckpointHandler.async_save

        async def json_save_then_die(self, directory, *args, **kwargs):
            if f"/{epoch}.orbax-checkpoint-tmp" in str(directory):
                die()
            return await real_json_save(self, directory, *args, **kwargs)

        ocp.JsonCheckpointHandler.async_save = json_save_then_die
    elif point == "after-save":
        real_save = checkpoint.Checkpoints.save

        def save_then_die(self, step, *args, **kwargs):
            path = real_save(self, step, *args, **kwargs)
            if step == epoch:
                die()
            return path

        checkpoint.Checkpoints.save = save_then_die
    else:
        raise SystemExit(f"unknown point {point}")
    sys.argv = [script, *argv]
    if script == "mnist":
        from experiments import mnist as experiment
    elif script == "images":
        from experiments import images as experiment
    elif script == "ablate":
        from experiments import ablate_augmentation as experiment
    else:
        from experiments import catsdogs as experiment
    experiment.main(argv)


if __name__ == "__main__":
    main()
