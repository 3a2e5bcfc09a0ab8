"""One jitted training step, plain lax convolutions against `cnnjax.ops`, same process:
the MNIST recipe (cnnjax.config.mnist(): batch 64, RMSprop) and cats-vs-dogs experiment 1
(cnnjax.config.catsdogs(1): batch 20, 150x150, Adam).

    python benchmarks/mnist_step.py [--models mnist,cats] [--reps 15] [--tune-malloc]

Each model is compiled three times, differing only in the convolution and pooling its
layers call:
  lax       jax.lax.conv_general_dilated + the reshape-and-max pool (jax's autodiff),
  lax+pool  the same convolutions with `ops.max_pool_nhwc`,
  ours      `ops.conv2d_nhwc` + `ops.max_pool_nhwc` (what cnnjax.models runs).
The step is `cnnjax.step.train_step` for one seed, its batch gathered by index from the
images on the device and its totals added to the running ones (/255, loss and gradient,
update), jitted with the state donated: what `cnnjax.step.compile_steps` runs per seed and
step, without its vmap over seeds and scan over steps.
The images are random uint8 (speed does not depend on the values). Prints the best of
--reps interleaved rounds in ms per step, wall clock and CPU time (the steadier one on a
shared machine), and the ratios to `lax`. For Keras's step on the same machine, run
`benchmarks/mnist_epoch.py` or `benchmarks/catsdogs_epoch.py`, which time both in one run.

--tune-malloc: glibc returns every large freed block to the system and XLA:CPU allocates
a step's temporaries afresh each call, so each step page-faults its working set back in
(worst for cats-vs-dogs, whose activations are tens of MB). `tune_malloc` keeps freed
memory in the process; it changes no result.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import recipe  # noqa: E402
from cnnjax import models, ops, optim, step  # noqa: E402

RECIPES = {"mnist": "mnist", "cats": "catsdogs1"}


def reshape_max_pool(x: jax.Array, window: int = 2) -> jax.Array:
    """The reference pool: crop, reshape, max; its gradient is jax's reduce-max rule."""
    n, h, w, c = x.shape
    oh, ow = h // window, w // window
    x = x[:, : oh * window, : ow * window, :]
    return x.reshape(n, oh, window, ow, window, c).max(axis=(2, 4))


def lax_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return ops._lax_conv(x, kernel)


VARIANTS = {
    "lax": (lax_conv, reshape_max_pool),
    "lax+pool": (lax_conv, ops.max_pool_nhwc),
    "ours": (ops.conv2d_nhwc, ops.max_pool_nhwc),
}


def tune_malloc() -> None:
    """glibc: never return freed memory to the system, never mmap a block of its own."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_trim_threshold, 2**30)
    libc.mallopt(m_mmap_max, 0)


@contextlib.contextmanager
def layers_use(conv, pool):
    """Make the model layers call `conv` and `pool` while a step is traced."""
    saved = models.conv2d_nhwc, models.max_pool_nhwc
    models.conv2d_nhwc, models.max_pool_nhwc = conv, pool
    try:
        yield
    finally:
        models.conv2d_nhwc, models.max_pool_nhwc = saved


def setup(model_name: str, batch: int, steps: int):
    cfg = recipe(RECIPES[model_name])
    model = models.from_config(cfg.model.name, cfg.data.image_size, cfg.model.dropout)
    tx, labels_range = optim.make_optimizer(cfg.optim), 10 if cfg.model.name == "mnist" else 2
    rng = np.random.default_rng(0)
    n = batch * steps
    images = jnp.asarray(rng.integers(0, 256, (n, *model.input_shape), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, labels_range, (n,), dtype=np.int32))
    batch_indices, batch_weights = step.epoch_batches(jax.random.PRNGKey(1), n, batch)
    return model, tx, (images, labels, batch_indices, batch_weights)


def gathering_step(model, tx):
    """step(state, totals, images, labels, indices, weights, i): train step i of an epoch, its
    batch gathered from the images by index (as compile_steps does with resident data)."""

    def run(state, totals, images, labels, indices, weights, i):
        batch = {"image": images[indices[i]], "label": labels[indices[i]], "weight": weights[i]}
        state, batch_totals = step.train_step(state, batch, model=model, tx=tx, augment=None)
        return state, jax.tree.map(jnp.add, totals, batch_totals)

    return jax.jit(run, donate_argnums=(0, 1))


def compiled_step(model, tx, data, conv, pool):
    """A jitted step traced with the given layers, and a fresh state it has run once on."""
    fn = gathering_step(model, tx)
    state = step.init_state(model, tx, jax.random.PRNGKey(0))
    totals = {k: jnp.zeros(()) for k in step.zero_totals(1)}
    with layers_use(conv, pool):
        state, totals = fn(state, totals, *data, np.int32(0))
    jax.block_until_ready(state)
    return fn, state, totals


def time_model(
    model_name: str, reps: int, batch: int, calls: int
) -> dict[str, tuple[float, float]]:
    steps = 10
    model, tx, data = setup(model_name, batch, steps)
    runs = {
        name: list(compiled_step(model, tx, data, *layers)) for name, layers in VARIANTS.items()
    }
    best = {name: (float("inf"), float("inf")) for name in runs}
    for r in range(reps):
        for name, run in runs.items():
            fn, state, totals = run
            wall, cpu = time.perf_counter(), time.process_time()
            for i in range(calls):
                state, totals = fn(state, totals, *data, np.int32((r * calls + i) % steps))
            jax.block_until_ready(state)
            wall, cpu = (
                (time.perf_counter() - wall) / calls * 1e3,
                (time.process_time() - cpu) / calls * 1e3,
            )
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
            run[1], run[2] = state, totals
    # Every step ran the program traced inside `layers_use` (a retrace would use the defaults).
    assert all(run[0]._cache_size() == 1 for run in runs.values())
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mnist,cats", help="comma-separated: mnist, cats")
    parser.add_argument("--reps", type=int, default=15, help="interleaved rounds; the best is kept")
    parser.add_argument(
        "--tune-malloc", action="store_true", help="keep freed memory in the process (see above)"
    )
    args = parser.parse_args()
    if args.tune_malloc:
        tune_malloc()
    tuned = ", malloc tuned" if args.tune_malloc else ""
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs{tuned}")
    for model_name in args.models.split(","):
        batch = recipe(RECIPES[model_name]).train.batch_size
        calls, reps = (5, args.reps) if model_name == "mnist" else (1, max(2, args.reps // 3))
        best = time_model(model_name, reps, batch, calls)
        base = best["lax"]
        print(
            f"{model_name} (batch {batch}), ms per step, best of {reps}:   "
            "wall     CPU    lax/this (wall, CPU)"
        )
        for name, (wall, cpu) in best.items():
            wall_ratio, cpu_ratio = base[0] / wall, base[1] / cpu
            print(
                f"  {name:10s}                                 {wall:8.1f} {cpu:8.1f}   "
                f"{wall_ratio:5.2f}x {cpu_ratio:5.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
