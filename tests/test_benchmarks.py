"""The benchmarks time cnnjax.train's own pieces outside its loop: what they time must be the
training the loop runs, or their figures measure something else."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from benchmarks import common

KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")


@pytest.mark.parametrize("overrides", [{}, {"optim.schedule": "cosine", "optim.warmup_epochs": 1}])
def test_the_benchmarks_epochs_are_the_loops_epochs(overrides):
    cfg = common.recipe(
        "mnist",
        {"train.epochs": 2, "train.batch_size": 32, "train.eval_batch_size": 50, **overrides},
    )
    train_set, val_set = common.random_data(cfg, 96, seed=1), common.random_data(cfg, 50, seed=2)
    timed = common.timed_fit(cfg, train_set, val_set, epochs=2)["histories"][0]
    looped = common.run_recipe(cfg, {"train": train_set, "test": val_set}).histories[0]
    assert [[row[k] for k in KEYS] for row in timed] == [[row[k] for k in KEYS] for row in looped]


def test_conv_layers_reports_every_conv_layer_with_its_arithmetic_and_routes():
    """benchmarks/conv_layers.py: one line per conv layer of the model, the arithmetic of the
    passes a training step runs, and the route of each of them."""
    from benchmarks import conv_layers
    from benchmarks.conv_grad import layer_shapes
    from cnnjax import cpu_conv

    lines = conv_layers.layer_lines("mnist", reps=1)
    shapes = layer_shapes("mnist")[0]
    assert [line["layer"] for line in lines] == [shape[0] for shape in shapes]
    for i, (line, (_, n, h, w, c_in, c_out)) in enumerate(zip(lines, shapes)):
        passes = 2 if i == 0 else 3  # the data needs no gradient
        assert line["gflop"] == round(
            passes * 2 * n * (h - 2) * (w - 2) * 9 * c_in * c_out / 1e9, 4
        )
        expected = {"conv_forward", "conv_kernel_grad"} | ({"conv_input_grad"} if i else set())
        assert set(line["routes"]) == expected
        # Each pass took one of the routes it offers at this layer's shape.
        x, dy = jnp.zeros((n, h, w, c_in)), jnp.zeros((n, h - 2, w - 2, c_out))
        offered = {
            "conv_forward": cpu_conv.FORWARD_ROUTES,
            "conv_kernel_grad": cpu_conv._kernel_grad_routes(x, dy),
            "conv_input_grad": cpu_conv.INPUT_GRAD_ROUTES,
        }
        for operation, route in line["routes"].items():
            assert route in offered[operation], (line["layer"], operation, route)
        assert line["fraction"] == pytest.approx(
            line["ours_gflops"] / line["matmul_gflops"], rel=0.02
        )
