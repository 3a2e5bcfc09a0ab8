"""Every convolution of both convnets against a matrix product of its size, and the whole training
step against the products it holds: how near the CPU's matmul rate cnnjax's convolutions run.

    python benchmarks/conv_layers.py [--models mnist,cats] [--reps 5] [--out FILE.jsonl]

One JSON line per conv layer of MnistConvNet and CatsDogsConvNet, at the batch and image size of
their recipes (cnnjax.config), with
  gflop            forward + backward arithmetic of one call (2 multiply-adds per tap; the
                   first layer has no input gradient, as in a training step),
  ours_gflops      that arithmetic per second through cnnjax.ops.conv2d_nhwc (the routes
                   cnnjax.routes chose on this machine, listed in "routes"),
  lax_gflops       the same through plain lax.conv_general_dilated,
  matmul_gflops    a float32 matmul of the layer's size, (N*oh*ow, kh*kw*C_in) x
                   (kh*kw*C_in, C_out): the product im2col turns its forward pass into,
  fraction         ours / matmul, and lax_fraction lax / matmul.
Then one line per model for its whole training step (experiment 2's for the cats: augmentation
and dropout included): "fraction" is the time its convolutions and dense layers would take at
their matmuls' rates (each pass as the matmul of its size), divided by the step's time. A line
"machine" comes first, with a 2048 x 2048 matmul's rate and the time the route choice cost.
Best of --reps interleaved rounds, wall clock.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import recipe  # noqa: E402
from benchmarks.conv_grad import layer_shapes  # noqa: E402
from cnnjax import models, ops, optim, routes, step  # noqa: E402

RECIPES = {"mnist": "mnist", "cats": "catsdogs2"}  # experiment 2: the step the issue times


def best_seconds(fns: dict[str, Callable], args: tuple, reps: int) -> dict[str, float]:
    """Best seconds per call of each (already compiled) function over `reps` interleaved rounds
    of enough calls to last about 0.2 s."""
    calls = {}
    for name, fn in fns.items():
        jax.block_until_ready(fn(*args))
        begin = time.perf_counter()
        jax.block_until_ready(fn(*args))
        calls[name] = max(1, int(0.2 / max(time.perf_counter() - begin, 1e-6)))
    best = dict.fromkeys(fns, math.inf)
    for _ in range(reps):
        for name, fn in fns.items():
            begin = time.perf_counter()
            for _ in range(calls[name]):
                out = fn(*args)
            jax.block_until_ready(out)
            best[name] = min(best[name], (time.perf_counter() - begin) / calls[name])
    return best


def matmul_seconds(m: int, k: int, n: int, reps: int) -> float:
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    return best_seconds({"matmul": jax.jit(jnp.dot)}, (a, b), reps)["matmul"]


def conv_training_pass(conv: Callable, first: bool) -> Callable:
    """(x, k, dy) -> what a training step needs of the layer: y, dK and (but for the first
    layer, whose input is the data) dx."""

    def run(x, k, dy):
        if first:
            y, vjp = jax.vjp(lambda k_: conv(x, k_), k)
            return y, vjp(dy)[0]
        y, vjp = jax.vjp(conv, x, k)
        return (y, *vjp(dy))

    return jax.jit(run)


def layer_lines(model_name: str, reps: int) -> list[dict]:
    conv_layers, _ = layer_shapes(model_name)
    rng = np.random.default_rng(0)
    lines = []
    for i, (name, n, h, w, c_in, c_out) in enumerate(conv_layers):
        oh, ow = h - 2, w - 2
        x = jnp.asarray(rng.standard_normal((n, h, w, c_in)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((3, 3, c_in, c_out)) / np.sqrt(9 * c_in), jnp.float32)
        dy = jnp.asarray(rng.standard_normal((n, oh, ow, c_out)), jnp.float32)
        fns = {
            "ours": conv_training_pass(ops.conv2d_nhwc, i == 0),
            "lax": conv_training_pass(ops._lax_conv, i == 0),
        }
        seconds = best_seconds(fns, (x, k, dy), reps)
        m, kk = n * oh * ow, 9 * c_in
        passes = 2 if i == 0 else 3
        gflop = passes * 2 * m * kk * c_out / 1e9
        matmul = matmul_seconds(m, kk, c_out, reps) * passes
        # The passes' keys name x (forward, kernel gradient) or dy and the kernel (input gradient).
        shapes = (f"[{n}, {h}, {w}, {c_in}]", f"[{n}, {oh}, {ow}, {c_out}] float32[3, 3, {c_in},")
        chosen = {
            key.split()[0]: route
            for key, route in routes.chosen().items()
            if any(shape in key for shape in shapes)
        }
        lines.append(
            {
                "model": model_name,
                "layer": name,
                "input": [n, h, w, c_in],
                "filters": c_out,
                "gflop": round(gflop, 4),
                "ours_gflops": round(gflop / seconds["ours"], 1),
                "lax_gflops": round(gflop / seconds["lax"], 1),
                "matmul_gflops": round(gflop / matmul, 1),
                "fraction": round(matmul / seconds["ours"], 3),
                "lax_fraction": round(matmul / seconds["lax"], 3),
                "routes": chosen,
            }
        )
    return lines


def step_line(model_name: str, reps: int, layers: list[dict]) -> dict:
    """The recipe's whole training step against the matmuls of its convolutions and dense
    layers."""
    cfg = recipe(RECIPES[model_name])
    model = models.from_config(cfg.model.name, cfg.data.image_size, cfg.model.dropout)
    tx = optim.make_optimizer(cfg.optim)
    batch_size = cfg.train.batch_size
    rng = np.random.default_rng(0)
    classes = 10 if cfg.model.name == "mnist" else 2
    batch = {
        "image": jnp.asarray(rng.integers(0, 256, (batch_size, *model.input_shape), np.uint8)),
        "label": jnp.asarray(rng.integers(0, classes, batch_size), jnp.int32),
        "weight": jnp.ones(batch_size, jnp.float32),
    }
    augment = None if cfg.augment.is_identity else cfg.augment
    train = jax.jit(lambda s, b: step.train_step(s, b, model=model, tx=tx, augment=augment)[0])
    state = step.init_state(model, tx, jax.random.PRNGKey(0))
    seconds = best_seconds({"step": train}, (state, batch), reps)["step"]
    # Dense layers: forward and both gradients of (batch, in) x (in, out), the first one's input
    # gradient included (it flows back into the convolutions).
    params = state.params
    dense = [p["kernel"].shape for p in params.values() if p["kernel"].ndim == 2]
    dense_matmul = sum(3 * matmul_seconds(batch_size, a, b, reps) for a, b in dense)
    dense_gflop = sum(3 * 2 * batch_size * a * b for a, b in dense) / 1e9
    conv_matmul = sum(line["gflop"] / line["matmul_gflops"] for line in layers)
    gflop = sum(line["gflop"] for line in layers) + dense_gflop
    return {
        "model": model_name,
        "layer": "whole training step",
        "recipe": RECIPES[model_name],
        "batch": batch_size,
        "gflop": round(gflop, 4),
        "ours_gflops": round(gflop / seconds, 1),
        "step_ms": round(seconds * 1e3, 2),
        "matmul_ms": round((conv_matmul + dense_matmul) * 1e3, 2),
        "fraction": round((conv_matmul + dense_matmul) / seconds, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mnist,cats", help="comma-separated: mnist, cats")
    parser.add_argument("--reps", type=int, default=5, help="interleaved rounds; the best is kept")
    parser.add_argument("--out", help="also write the lines to this file")
    args = parser.parse_args()
    square = 2 * 2048**3 / 1e9 / matmul_seconds(2048, 2048, 2048, args.reps)
    lines = []
    for model_name in args.models.split(","):
        layers = layer_lines(model_name, args.reps)
        lines += [*layers, step_line(model_name, args.reps, layers)]
    machine = {
        "machine": routes.machine(),
        "backend": jax.default_backend(),
        "matmul_2048_gflops": round(square, 1),
        "route_choice_s": round(routes.measure_seconds, 2),
        "route_policy": routes.policy(),
    }
    text = "\n".join(json.dumps(line) for line in [machine, *lines])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
