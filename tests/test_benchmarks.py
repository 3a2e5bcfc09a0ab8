"""The benchmarks time cnnjax.train's own pieces outside its loop: what they time must be the
training the loop runs, or their figures measure something else."""

from __future__ import annotations

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
