"""K seeds trained together (jax.vmap, one compiled program) against the same K seeds one
after another, same settings, same process. The ablation runner relies on the first.

    python benchmarks/ablation_vmap.py --data-dir ../shared/data [--seeds 8] [--image-size 64] [--steps 20]

Times `--steps` training steps of the cats-vs-dogs convnet (experiment 2: lecture
augmentation + dropout, batch 20) after a warm-up, for one seed, for K seeds vmapped, and
K x one seed, and prints the ratios. On a GPU the goal is K = 8 seeds for at most 2x the
time of one; on a 2-core CPU the work itself is the limit, so expect about K x.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from cnnjax import augment, data, models, train


def time_steps(trainer: train.Trainer, state, images, labels, steps: int, batch_size: int) -> float:
    """Seconds per step, after one warm-up step that compiles."""
    n = images.shape[0]
    order = trainer._epoch_order(state, n, batch_size, epoch=0)
    step = trainer._compile("train", order[0].shape[-2])
    totals = train.zero_totals(trainer.num_seeds)
    state, totals = step(state, totals, images, labels, *order, np.int32(0))
    jax.block_until_ready(state)
    start = time.perf_counter()
    for i in range(1, steps + 1):
        state, totals = step(state, totals, images, labels, *order, np.int32(i % order[0].shape[-2]))
    jax.block_until_ready(state)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    size = (args.image_size, args.image_size)
    split = data.load_cats_dogs(args.data_dir, ("train",), size)["train"]
    images, labels = jax.device_put(split.images), jax.device_put(split.labels)
    model = models.CatsDogsConvNet(dropout_rate=0.5, input_shape=(*size, 3))
    tx = train.adam_keras()
    augment_fn = augment.make_augment_fn(augment.AugmentConfig.LECTURE)
    use_scan = False  # the per-step loop: the same dispatch for both, so the ratio isolates vmap
    print(f"backend {jax.default_backend()}, {args.image_size}px, batch 20, {args.steps} steps")

    one = train.Trainer(model, tx, augment_fn, use_scan=use_scan)
    t_one = time_steps(one, train.create_train_state(model, tx, jax.random.PRNGKey(0)), images, labels, args.steps, 20)
    t_sequential = args.seeds * t_one  # K seeds one after another: K runs of the same compiled step
    print(f"1 seed: {t_one * 1e3:.1f} ms/step; {args.seeds} seeds one after another: {t_sequential * 1e3:.1f} ms/step")
    stacked = train.stack_states([train.create_train_state(model, tx, jax.random.PRNGKey(s)) for s in range(args.seeds)])
    together = train.Trainer(model, tx, augment_fn, use_scan=use_scan, num_seeds=args.seeds)
    t_vmap = time_steps(together, stacked, images, labels, args.steps, 20)
    print(f"{args.seeds} seeds vmapped: {t_vmap * 1e3:.1f} ms/step; vmapped / one seed = {t_vmap / t_one:.2f}x "
          f"(GPU goal: <= 2x for 8 seeds); vmapped / sequential = {t_vmap / t_sequential:.2f}")


if __name__ == "__main__":
    main()
