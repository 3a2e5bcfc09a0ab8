"""Where one training step's time goes: augmentation, convolutions, pooling, dense layers and the
optimizer, each timed alone at the step's shapes, as shares of the whole step.

    python benchmarks/step_parts.py [--models mnist,cats] [--reps 5]

For MNIST's recipe and experiment 2's (150 px, batch 20, augmentation and dropout), prints the
whole step's milliseconds and then each part's, with its share of the step:
  augment      the random affine transform of the batch (cnnjax.augment, as the step runs it),
  convolution  every conv layer's forward and gradients (cnnjax.ops.conv2d_nhwc, routes as
               chosen on this machine) with its bias and ReLU,
  pool         every ReLU + 2x2 max pool, forward and gradient,
  dense        Flatten and the dense layers (dropout included), forward and gradients,
  optimizer    the optimizer's update and applying it to the parameters,
  rest         the step minus the parts: the loss, and what XLA fuses differently when the parts
               run together (negative when the whole is cheaper than its parts).
The whole step is timed as a one-seed run compiles it (unbatched, cnnjax.step.compile_steps) and
also vmapped over a seed axis of 1, the shape a multi-seed run's step has.
Best of --reps interleaved rounds, wall clock, one JSON line per model after the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import recipe  # noqa: E402
from benchmarks.conv_grad import layer_shapes  # noqa: E402
from benchmarks.conv_layers import RECIPES, best_seconds, conv_training_pass  # noqa: E402
from cnnjax import models, ops, optim, step  # noqa: E402


def _normal(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def parts(model_name: str, reps: int) -> dict[str, float]:
    """Seconds per call of the whole step and of each part."""
    cfg = recipe(RECIPES[model_name])
    model = models.from_config(cfg.model.name, cfg.data.image_size, cfg.model.dropout)
    tx = optim.make_optimizer(cfg.optim)
    n = cfg.train.batch_size
    rng = np.random.default_rng(0)
    classes = 10 if cfg.model.name == "mnist" else 2
    batch = {
        "image": jnp.asarray(rng.integers(0, 256, (n, *model.input_shape), np.uint8)),
        "label": jnp.asarray(rng.integers(0, classes, n), jnp.int32),
        "weight": jnp.ones(n, jnp.float32),
    }
    augment = None if cfg.augment.is_identity else cfg.augment
    state = step.init_state(model, tx, jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(1)

    def one_step(state, batch):
        return step.train_step(state, batch, model=model, tx=tx, augment=augment)

    seconds = {"step": best_seconds({"s": jax.jit(one_step)}, (state, batch), reps)["s"]}
    # As compile_steps runs one seed (unbatched), against the same step vmapped over one seed.
    vmapped = jax.jit(jax.vmap(one_step, in_axes=(0, None)))
    stacked = jax.tree.map(lambda leaf: leaf[None], state)
    vmapped_seconds = best_seconds({"v": vmapped}, (stacked, batch), reps)["v"]
    augment_fn = jax.jit(lambda images, k: step.preprocess(images, k, augment))
    seconds["augment"] = (
        best_seconds({"a": augment_fn}, (batch["image"], key), reps)["a"] if augment else 0.0
    )

    conv_layers, pool_layers = layer_shapes(model_name)
    total = 0.0
    for i, (_, b, h, w, c_in, c_out) in enumerate(conv_layers):
        x, k = _normal(rng, (b, h, w, c_in)), _normal(rng, (3, 3, c_in, c_out))
        bias, dy = _normal(rng, (c_out,)), _normal(rng, (b, h - 2, w - 2, c_out))
        layer = conv_training_pass(
            lambda x, k, bias=bias: jax.nn.relu(ops.conv2d_nhwc(x, k) + bias), i == 0
        )
        total += best_seconds({"c": layer}, (x, k, dy), reps)["c"]
    seconds["convolution"] = total
    total = 0.0
    for _, b, h, w, c in pool_layers:
        pre, g = _normal(rng, (b, h, w, c)), _normal(rng, (b, h // 2, w // 2, c))
        pool = jax.jit(jax.grad(lambda pre, g: jnp.sum(ops.max_pool_nhwc(jax.nn.relu(pre)) * g)))
        total += best_seconds({"p": pool}, (pre, g), reps)["p"]
    seconds["pool"] = total

    dense = [p for p in state.params.values() if p["kernel"].ndim == 2]
    flat = _normal(rng, (n, dense[0]["kernel"].shape[0]))

    def dense_loss(dense_params, flat, k):
        h = flat
        for i, p in enumerate(dense_params):
            if i == 0 and cfg.model.dropout:
                keep = jax.random.bernoulli(k, 1 - cfg.model.dropout, h.shape)
                h = jnp.where(keep, h / (1 - cfg.model.dropout), 0)
            h = h @ p["kernel"] + p["bias"]
            h = jax.nn.relu(h) if i < len(dense_params) - 1 else h
        return jnp.sum(h)

    dense_grad = jax.jit(jax.grad(dense_loss, argnums=(0, 1)))
    seconds["dense"] = best_seconds({"d": dense_grad}, (dense, flat, key), reps)["d"]

    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    grads = jax.tree.map(jnp.ones_like, state.params)
    seconds["optimizer"] = best_seconds(
        {"o": jax.jit(update)}, (state.params, state.opt_state, grads), reps
    )["o"]
    seconds["rest"] = seconds["step"] - sum(v for name, v in seconds.items() if name != "step")
    return seconds, vmapped_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mnist,cats", help="comma-separated: mnist, cats")
    parser.add_argument("--reps", type=int, default=5, help="interleaved rounds; the best is kept")
    args = parser.parse_args()
    for model_name in args.models.split(","):
        seconds, vmapped_seconds = parts(model_name, args.reps)
        step_ms = seconds["step"] * 1e3
        print(f"\n{model_name} ({RECIPES[model_name]}): one training step {step_ms:.2f} ms")
        print(f"  (vmapped over a seed axis of 1: {vmapped_seconds * 1e3:.2f} ms)")
        for name, s in seconds.items():
            if name != "step":
                print(f"  {name:12s} {s * 1e3:8.2f} ms  {s / seconds['step']:6.1%}")
        shares = {
            name: round(s / seconds["step"], 3) for name, s in seconds.items() if name != "step"
        }
        print(
            json.dumps(
                {
                    "model": model_name,
                    "step_ms": round(seconds["step"] * 1e3, 2),
                    "vmapped_one_seed_ms": round(vmapped_seconds * 1e3, 2),
                    "shares": shares,
                }
            )
        )


if __name__ == "__main__":
    main()
