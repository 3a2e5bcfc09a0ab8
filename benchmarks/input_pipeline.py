"""Streaming input against the in-memory path: experiment 2's epoch (cnnjax.config.catsdogs(2):
augmentation + Dropout(0.5), Adam, batch 20, validation included) from the real folders, through
tf.data (--input stream) and from device memory (--input memory), in the same process, epochs
interleaved; and the pipeline alone (decode, batch, no step) against the step alone, so a
starving step shows.

    python benchmarks/input_pipeline.py --data-dir ../shared/data [--epochs 2] [--image-size 150]

Both inputs train from the same initial state in the same order, so their losses must agree.
Prints seconds per epoch for each (the fastest after the first, which compiles), the ratio
stream / memory (goal: <= 1.15 on a CPU), images/s of the pipeline alone and of the training
step alone (goal: pipeline faster), the CPU time the pipeline spends per image, and the load
average before and after (the machine may be shared).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repository, for benchmarks.common
from benchmarks.common import real_data, recipe, training  # noqa: E402
from cnnjax import data, step  # noqa: E402


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pipeline_alone(stream: data.Stream, batch_size: int, epoch: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) of one epoch through tf.data, nothing consuming it but a sum."""
    indices, weights = step.epoch_order(np.zeros((1, 2), np.uint32), len(stream), batch_size, epoch)
    wall, cpu, seen = time.perf_counter(), cpu_seconds(), 0.0
    for batch in stream.batches(indices, weights):
        seen += float(batch["weight"].sum())
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return seen / wall, 1000 * cpu / seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=150)
    args = parser.parse_args()
    cfg = recipe("catsdogs2", {"data.image_size": args.image_size})
    batch, eval_batch = cfg.train.batch_size, cfg.train.eval_batch_size
    load_before = os.getloadavg()
    print(
        f"{os.cpu_count()} CPUs, load average {load_before[0]:.1f} (1 min) {load_before[1]:.1f} "
        f"(5 min); jax {jax.__version__}, {jax.devices()[0].platform}"
    )

    splits = ("train", "validation")
    inputs = {
        name: real_data(cfg, args.data_dir, splits, input=name) for name in ("memory", "stream")
    }
    streams = inputs["stream"]
    n = len(streams["train"])
    assert isinstance(streams["train"], data.Stream) and isinstance(
        inputs["memory"]["train"], data.Images
    )
    assert n == len(inputs["memory"]["train"]) and np.array_equal(
        streams["train"].labels, inputs["memory"]["train"].labels
    )

    pipeline_alone(streams["train"], batch, 0)  # TensorFlow's start-up
    rate, cpu_ms = pipeline_alone(streams["train"], batch, 1)
    val_rate, val_cpu_ms = pipeline_alone(streams["validation"], eval_batch, 0)
    print(
        f"pipeline alone: train {rate:.0f} images/s ({cpu_ms:.2f} CPU ms/image), "
        f"validation {val_rate:.0f} images/s ({val_cpu_ms:.2f} CPU ms/image)"
    )

    # The loop's own epochs (cnnjax.train's internals: order, feeding, compiled steps, validation),
    # from one initial state.
    runs = {name: training(cfg, datasets["train"]) for name, datasets in inputs.items()}
    validate = {name: runs[name].evaluator(inputs[name]["validation"]) for name in inputs}
    states = {name: run.place() for name, run in runs.items()}
    seconds: dict[str, list[float]] = {name: [] for name in inputs}
    step_seconds: dict[str, list[float]] = {name: [] for name in inputs}
    losses: dict[str, list[float]] = {name: [] for name in inputs}
    for epoch in range(args.epochs):
        # interleaved: load drifts evenly
        order = ("memory", "stream") if epoch % 2 == 0 else ("stream", "memory")
        for name in order:
            start = time.perf_counter()
            states[name], metrics = runs[name].epoch(states[name], epoch)
            trained = time.perf_counter()
            val = validate[name](states[name].params)
            seconds[name].append(time.perf_counter() - start)
            step_seconds[name].append(trained - start)
            losses[name].append(metrics[0]["loss"])
            print(
                f"epoch {epoch + 1} {name:6s}: {seconds[name][-1]:6.1f} s "
                f"(training {trained - start:5.1f} s) "
                f"loss {metrics[0]['loss']:.6f} val_loss {val[0]['loss']:.6f}",
                flush=True,
            )

    def best(values: list[float]) -> float:
        return min(values[1:]) if len(values) > 1 else values[0]

    mem, st = best(seconds["memory"]), best(seconds["stream"])
    step_rate = n / best(step_seconds["memory"])
    load_after = os.getloadavg()
    print(
        f"\nepoch (validation included), fastest after the first: memory {mem:.1f} s, "
        f"stream {st:.1f} s, ratio stream / memory {st / mem:.3f} (goal <= 1.15)"
    )
    print(
        f"images/s: pipeline alone {rate:.0f}, training step alone {step_rate:.1f} "
        f"(memory epoch's training part): pipeline / step {rate / step_rate:.1f}x (goal > 1)"
    )
    largest = max(abs(a - b) for a, b in zip(losses["memory"], losses["stream"]))
    print(f"largest |loss difference| stream vs memory: {largest:.2e}")
    print(f"load average after: {load_after[0]:.1f} (1 min) {load_after[1]:.1f} (5 min)")


if __name__ == "__main__":
    main()
