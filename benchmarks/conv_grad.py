"""Per-layer timings of the convolutions (and 2x2 max pools) the two convnets run:
plain `jax.lax` against `cnnjax.ops` (the CPU-routed versions), same process, same inputs.

    python benchmarks/conv_grad.py [--models mnist,cats] [--reps 7] [--tune-malloc]

For every conv layer of MnistConvNet and CatsDogsConvNet, at the batch size and image size of
their recipes (cnnjax.config; the shapes are read from the models' layers), it times
  fwd   the convolution alone,
  grad  forward + kernel gradient (+ input gradient, except for the first layer, whose
        input is the data): what one training step needs from the layer,
and for every pooling layer the ReLU + pool forward and gradient (reshape-and-max with
jax's autodiff against `ops.max_pool_nhwc`). Prints the best of --reps interleaved
rounds in ms (wall clock; CPU time in brackets: on a shared machine the CPU time is the
steadier of the two), the ratio lax / ours (above 1: ours is faster) and, for the convs,
the largest relative difference of the results (float32 summation order only).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import recipe  # noqa: E402
from benchmarks.mnist_step import RECIPES, reshape_max_pool, tune_malloc  # noqa: E402
from cnnjax import models, ops  # noqa: E402


def layer_shapes(name: str) -> tuple[list[tuple], list[tuple]]:
    """The conv layers (name, batch, height, width, C_in, C_out) and the max-pool inputs (name,
    batch, height, width, C) of the recipe's model at its batch size, read from the model's
    layers."""
    cfg = recipe(RECIPES[name])
    model = models.from_config(cfg.model.name, cfg.data.image_size, cfg.model.dropout)
    previous = (cfg.train.batch_size, *model.input_shape)
    params = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0)))
    outputs = jax.eval_shape(
        lambda p, x: models.layer_outputs(model, p, x),
        params,
        jax.ShapeDtypeStruct(previous, jnp.float32),
    )
    convs, pools = [], []
    for layer in models.layer_names(model):
        if models.layer_type(layer) == "Conv2D":
            convs.append((layer, *previous, outputs[layer].shape[-1]))
        elif models.layer_type(layer) == "MaxPooling2D":
            pools.append((layer, *previous))
        previous = outputs[layer].shape
    return convs, pools


def lax_conv(x, k):
    return ops._lax_conv(x, k)


def layer_fns(conv, first: bool):
    """fwd(x, k) and grad(x, k, dy) -> (y, dk[, dx]) for one convolution implementation."""

    def grad(x, k, dy):
        if first:  # the data needs no gradient: only dK, as in a training step
            y, vjp = jax.vjp(lambda k_: conv(x, k_), k)
            return y, vjp(dy)[0]
        y, vjp = jax.vjp(conv, x, k)
        return (y, *vjp(dy))

    return jax.jit(conv), jax.jit(grad)


def best_times(fns: dict, args: tuple, reps: int, calls: int) -> dict[str, tuple[float, float]]:
    """Best (wall ms, CPU ms) per call over `reps` interleaved rounds of `calls` calls."""
    for f in fns.values():
        jax.block_until_ready(f(*args))
    best = {name: (float("inf"), float("inf")) for name in fns}
    for _ in range(reps):
        for name, f in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(calls):
                out = f(*args)
            jax.block_until_ready(out)
            wall, cpu = (
                (time.perf_counter() - wall) / calls * 1e3,
                (time.process_time() - cpu) / calls * 1e3,
            )
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def rel_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(u - v)) / (jnp.max(jnp.abs(v)) + 1e-30)) for u, v in zip(a, b))


def fmt(t: tuple[float, float]) -> str:
    return f"{t[0]:8.2f} ({t[1]:8.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mnist,cats", help="comma-separated: mnist, cats")
    parser.add_argument("--reps", type=int, default=7, help="interleaved rounds; the best is kept")
    parser.add_argument(
        "--tune-malloc",
        action="store_true",
        help="keep freed memory in the process (see mnist_step.py)",
    )
    args = parser.parse_args()
    if args.tune_malloc:
        tune_malloc()
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs; "
        f"ms per call, best of {args.reps}: wall (CPU)"
    )
    rng = np.random.default_rng(0)
    for model in args.models.split(","):
        conv_layers, pool_layers = layer_shapes(model)
        print(
            f"\n{model}: convolutions{'':30s}lax                    ours           "
            "lax/ours   max rel diff"
        )
        for i, (name, n, h, w, c_in, c_out) in enumerate(conv_layers):
            x = jnp.asarray(rng.standard_normal((n, h, w, c_in)), jnp.float32)
            k = jnp.asarray(
                rng.standard_normal((3, 3, c_in, c_out)) * np.sqrt(2 / (9 * c_in)), jnp.float32
            )
            dy = jnp.asarray(rng.standard_normal((n, h - 2, w - 2, c_out)), jnp.float32)
            # about 1 GFLOP per round, 2 calls at least
            calls = max(2, int(1e9 // (n * h * w * c_in * c_out * 18)))
            (lax_fwd, lax_grad), (our_fwd, our_grad) = (
                layer_fns(lax_conv, i == 0),
                layer_fns(ops.conv2d_nhwc, i == 0),
            )
            fwd = best_times({"lax": lax_fwd, "ours": our_fwd}, (x, k), args.reps, calls)
            grad = best_times({"lax": lax_grad, "ours": our_grad}, (x, k, dy), args.reps, calls)
            diff = rel_diff(our_grad(x, k, dy), lax_grad(x, k, dy))
            label = f"{name} {h}x{w}x{c_in}->{c_out}"
            fwd_ratio = fwd["lax"][0] / fwd["ours"][0]
            grad_ratio = grad["lax"][0] / grad["ours"][0]
            print(f"  {label:30s} fwd  {fmt(fwd['lax'])} {fmt(fwd['ours'])}   {fwd_ratio:5.2f}x")
            print(
                f"  {'':30s} grad {fmt(grad['lax'])} {fmt(grad['ours'])}   {grad_ratio:5.2f}x   "
                f"{diff:.1e}",
                flush=True,
            )
        print(
            f"{model}: ReLU + 2x2 max pool, forward + gradient   reshape-and-max        "
            "ours           ratio"
        )
        for name, n, h, w, c in pool_layers:
            pre = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
            g = jnp.asarray(rng.standard_normal((n, h // 2, w // 2, c)), jnp.float32)
            fns = {
                label: jax.jit(
                    jax.grad(lambda pre, g, pool=pool: jnp.sum(pool(jax.nn.relu(pre)) * g))
                )
                for label, pool in (("reshape", reshape_max_pool), ("ours", ops.max_pool_nhwc))
            }
            same = bool(jnp.all(fns["reshape"](pre, g) == fns["ours"](pre, g)))
            t = best_times(fns, (pre, g), args.reps, max(1, int(3e6 // pre.size)))
            ratio = t["reshape"][0] / t["ours"][0]
            equal = "bitwise equal" if same else "DIFFERENT"
            print(
                f"  {name + f' {h}x{w}x{c}':30s}      {fmt(t['reshape'])} {fmt(t['ours'])}   "
                f"{ratio:5.2f}x   {equal}",
                flush=True,
            )


if __name__ == "__main__":
    main()
