"""Checkpoints: pytrees and a description round-trip exactly; the latest and
the best per metric are kept."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import checkpoint, models


def trees(value: float) -> dict:
    return {
        "params": {"w": jnp.full((2, 3), value), "b": jnp.arange(3.0) + value},
        "progress": {"step": jnp.int32(value)},
    }


def abstract() -> dict:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), trees(0.0))


def test_round_trip_is_exact_and_the_description_reads_back(tmp_path):
    saved = trees(1.5)
    description = {
        "epoch": 1,
        "config": {"train": {"epochs": 3}},
        "class_names": ["cats", "dogs"],
        "history": [{"loss": float("nan")}],
    }
    with checkpoint.Checkpoints(tmp_path / "checkpoints", ("params", "progress")) as ckpts:
        path = ckpts.save(1, saved, description)
        restored = ckpts.restore(1, abstract())
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(a, b)
    read = checkpoint.read_description(path)
    assert read == {
        **description,
        "history": [{"loss": None}],
    }  # strict JSON: NaN is written as null
    only_params = checkpoint.restore_trees(path, {"params": abstract()["params"]})
    assert set(only_params) == {"params"}


def test_keeps_the_latest_and_each_metrics_best(tmp_path):
    seed0 = [0.9, 0.5, 0.7, 0.8, 0.6, 0.95]
    seed1 = [0.9, 0.8, 0.7, 0.3, 0.6, 0.95]
    with checkpoint.Checkpoints(
        tmp_path, ("params", "progress"), keep_latest=2, best_metrics=["val_loss/0", "val_loss/1"]
    ) as ckpts:
        for epoch, (a, b) in enumerate(zip(seed0, seed1), start=1):
            ckpts.save(epoch, trees(epoch), {"epoch": epoch}, {"val_loss/0": a, "val_loss/1": b})
        steps = ckpts.steps()
        assert (
            {2, 4, 5, 6} <= set(steps) and 1 not in steps and 3 not in steps
        )  # best of seed 0 (2), of seed 1 (4), latest two
        np.testing.assert_array_equal(
            ckpts.restore(2, abstract())["params"]["w"], np.full((2, 3), 2.0)
        )


def test_a_non_finite_metric_is_never_best(tmp_path):
    with checkpoint.Checkpoints(
        tmp_path, ("params", "progress"), keep_latest=1, best_metrics=["val_loss/0"]
    ) as ckpts:
        for epoch, value in enumerate([0.5, float("nan"), None, 0.9], start=1):
            ckpts.save(epoch, trees(epoch), {"epoch": epoch}, {"val_loss/0": value})
        assert ckpts.steps() == [1, 4]


def test_an_interrupted_save_is_cleaned_when_the_folder_is_opened_again(tmp_path):
    ckpts = checkpoint.Checkpoints(tmp_path, ("params", "progress"))
    ckpts.save(1, trees(1.0), {"epoch": 1})
    ckpts.close()
    half = tmp_path / "2.orbax-checkpoint-tmp-1234567"  # what orbax leaves when killed mid-save
    (half / "params").mkdir(parents=True)
    with checkpoint.Checkpoints(tmp_path, ("params", "progress")) as reopened:
        assert reopened.steps() == [1] and not half.exists()


def test_not_a_checkpoint_and_a_wrong_shape_are_clear_errors(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="not a cnnjax checkpoint"):
        checkpoint.read_description(tmp_path)
    with checkpoint.Checkpoints(tmp_path / "c", ("params", "progress")) as ckpts:
        path = ckpts.save(1, trees(1.0), {"epoch": 1})
    wrong = {
        "params": {
            "w": jax.ShapeDtypeStruct((4, 4), jnp.float32),
            "b": jax.ShapeDtypeStruct((3,), jnp.float32),
        }
    }
    with pytest.raises(checkpoint.CheckpointError, match="does not fit"):
        checkpoint.restore_trees(path, wrong)
    with pytest.raises(checkpoint.CheckpointError, match="has no opt_state"):
        checkpoint.restore_trees(path, {"opt_state": {}})


def test_load_model_rebuilds_the_model_from_the_folder_alone(tmp_path):
    model = models.CatsDogsConvNet(dropout_rate=0.5, input_shape=(48, 48, 3))
    params = models.init_params(model, jax.random.PRNGKey(3))
    path = checkpoint.save_model(tmp_path / "run", model, params, ["cats", "dogs"], epoch=7)
    assert path == tmp_path / "run" / "checkpoints" / "7"
    loaded, restored, description = checkpoint.load_model(tmp_path / "run", "latest")
    assert (
        loaded == model
        and description["epoch"] == 7
        and description["class_names"] == ["cats", "dogs"]
    )
    assert checkpoint.class_names(loaded, description) == ["cats", "dogs"]
    assert checkpoint.class_names(loaded, {}) == [
        "0",
        "1",
    ]  # none stored: the indices, one per output
    written = b"".join(f.read_bytes() for f in path.rglob("*") if f.is_file())
    assert (
        str(tmp_path).encode() not in written
    )  # a checkpoint can be moved or shipped: it names no folder
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(
        checkpoint.CheckpointError, match="holds seed.s. 0; seed 1 is not one of them"
    ):
        checkpoint.load_model(path, seed=1)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint of epoch 3"):
        checkpoint.find(tmp_path / "run", 3)


def test_run_checkpoints_means_the_run_and_float16_parameters_load_as_float32(tmp_path):
    model = models.MnistConvNet()
    params = models.init_params(model, jax.random.PRNGKey(0))
    half = jax.tree.map(lambda leaf: leaf.astype(jnp.float16), params)
    checkpoint.save_model(tmp_path / "run", model, half, epoch=1, extra={"best": [{"epoch": 1}]})
    checkpoint.save_model(
        tmp_path / "run", model, params, epoch=2, extra={"best": [{"epoch": 1}]}
    )  # epoch 1 stays the best
    for given in (
        tmp_path / "run",
        tmp_path / "run" / "checkpoints",
    ):  # RUN/checkpoints is the run, as a user types it
        assert checkpoint.find(given) == tmp_path / "run" / "checkpoints" / "1"
        assert checkpoint.find(given, "latest") == tmp_path / "run" / "checkpoints" / "2"
    _, restored, _ = checkpoint.load_model(tmp_path / "run" / "checkpoints")
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(half)):
        assert a.dtype == jnp.float32
        np.testing.assert_array_equal(a, np.asarray(b, np.float32))


def test_a_reopened_folder_still_knows_each_checkpoints_metrics(tmp_path):
    """A resumed run reopens its checkpoints: old saves must be judged by their
    own metrics, not kept forever."""
    args = {"tree_names": ("params", "progress"), "keep_latest": 2, "best_metrics": ["val_loss/0"]}
    with checkpoint.Checkpoints(tmp_path, **args) as ckpts:
        for epoch, value in enumerate([0.9, 0.8, 0.85], start=1):
            ckpts.save(epoch, trees(epoch), {"epoch": epoch}, {"val_loss/0": value})
        assert ckpts.steps() == [2, 3]
    with checkpoint.Checkpoints(tmp_path, **args) as ckpts:
        ckpts.save(4, trees(4), {"epoch": 4}, {"val_loss/0": 0.95})
        ckpts.save(5, trees(5), {"epoch": 5}, {"val_loss/0": 0.97})
        assert ckpts.steps() == [2, 4, 5]  # 3 is neither best nor among the latest two
