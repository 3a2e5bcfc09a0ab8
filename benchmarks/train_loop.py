"""How `train.Trainer` drives an epoch: one jitted step per Python call (the loop) against
~10 calls of a lax.scan over consecutive steps (what `fit` uses), same process, same data.

    python benchmarks/train_loop.py [--models mnist,cats] [--rounds 3] [--examples-mnist 12800]

Each round trains one epoch from the same initial state with both drivers, interleaved:
the MNIST convnet (batch 64, RMSprop) and the cats-vs-dogs convnet of experiment 2 (batch
20, 150x150, lecture augmentation + Dropout(0.5), Adam, 2,000 examples). Images are random
uint8: speed does not depend on the values. Prints ms per step (wall clock; CPU time in
brackets) for the fastest round after the first (which compiles), the ratio scan / loop
(below 1: scan is faster), and checks that both drivers end with the same loss.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from cnnjax import augment, models, train


def setup(name: str, num_examples: int):
    if name == "mnist":
        model, tx, augment_fn, batch, shape, classes = models.MnistConvNet(), train.rmsprop_keras(), None, 64, (28, 28, 1), 10
    else:
        model, tx, batch, shape, classes = models.CatsDogsConvNet(dropout_rate=0.5), train.adam_keras(), 20, (150, 150, 3), 2
        augment_fn = augment.make_augment_fn(augment.AugmentConfig.LECTURE)
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.integers(0, 256, (num_examples, *shape), dtype=np.uint8))
    labels = jax.device_put(rng.integers(0, classes, num_examples).astype(np.int32))
    return model, tx, augment_fn, batch, images, labels


def time_epoch(trainer: train.Trainer, model, tx, images, labels, batch: int) -> tuple[float, float, float]:
    """(wall s, CPU s, training loss) of one epoch from seed 0's initial state."""
    state = train.create_train_state(model, tx, jax.random.PRNGKey(0))
    wall, cpu = time.perf_counter(), time.process_time()
    state, metrics = trainer.train_epoch(state, images, labels, batch, epoch=0)
    jax.block_until_ready(state)
    return time.perf_counter() - wall, time.process_time() - cpu, metrics["loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mnist,cats")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--examples-mnist", type=int, default=12_800)
    parser.add_argument("--examples-cats", type=int, default=2_000)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}; ms per step, best round after the first: wall (CPU)")
    for name in args.models.split(","):
        model, tx, augment_fn, batch, images, labels = setup(name, getattr(args, f"examples_{name}"))
        steps = train.steps_per_epoch(images.shape[0], batch)
        drivers = {"loop": train.Trainer(model, tx, augment_fn, use_scan=False),
                   "scan": train.Trainer(model, tx, augment_fn, use_scan=True)}
        runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in drivers}
        for _ in range(args.rounds):
            for kind, trainer in drivers.items():
                runs[kind].append(time_epoch(trainer, model, tx, images, labels, batch))
        best = {k: min(r[1:] or r) for k, r in runs.items()}
        losses = {k: r[0][2] for k, r in runs.items()}
        print(f"{name}: {steps} steps of batch {batch}, scan in calls of {train.steps_per_call(steps)} steps")
        for kind, (wall, cpu, _) in best.items():
            print(f"  {kind:5s} {wall / steps * 1e3:8.1f} ({cpu / steps * 1e3:8.1f})")
        print(f"  scan / loop = {best['scan'][0] / best['loop'][0]:.2f} wall, {best['scan'][1] / best['loop'][1]:.2f} CPU; "
              f"epoch loss loop {losses['loop']:.6f}, scan {losses['scan']:.6f}")


if __name__ == "__main__":
    main()
