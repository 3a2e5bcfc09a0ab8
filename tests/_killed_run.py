"""Run an experiment script in this process and SIGKILL it at a chosen moment (for tests/test_runs.py).

    python -m tests._killed_run mnist|catsdogs compile|mid-epoch|mid-save|after-save EPOCH -- ARGV...

compile:    while the first program compiles (before any epoch ran)
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
    import orbax.checkpoint as ocp

    from cnnjax import checkpoint, runs, train

    if point == "compile":
        real_compile = train.Trainer._compile

        def compile_then_die(self, kind, num_steps):
            fn = real_compile(self, kind, num_steps)
            die()
            return fn

        train.Trainer._compile = compile_then_die
    elif point == "mid-epoch":
        real_run = train.Trainer._run

        def run_then_die(self, kind, carry, data, indices, weights, bar):
            calls = {"n": 0}
            real_step = self._compile(kind, indices.shape[-2])

            def counting(*args):
                out = real_step(*args)
                calls["n"] += 1
                if kind == "train" and self._epoch == epoch and calls["n"] == 1:
                    die()
                return out

            key = (kind, self._steps_each_call(indices.shape[-2]))
            self._compiled[key] = counting
            try:
                return real_run(self, kind, carry, data, indices, weights, bar)
            finally:
                self._compiled[key] = real_step

        real_epoch = train.Trainer.train_epoch

        def train_epoch(self, state, data, batch_size, e, progress=False):
            self._epoch = e + 1
            return real_epoch(self, state, data, batch_size, e, progress)

        train.Trainer._run = run_then_die
        train.Trainer.train_epoch = train_epoch
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
    del runs
    sys.argv = [script, *argv]
    if script == "mnist":
        from experiments import mnist as experiment
    else:
        from experiments import catsdogs as experiment
    experiment.main(argv)


if __name__ == "__main__":
    main()
