"""Saving and restoring a train state with orbax, the model's description beside it.

A checkpoint is one folder holding:
    params/, opt_state/, progress/   the TrainState, as orbax arrays
    model/                           JSON: `cnnjax.models.model_config(model)`
    meta/                            JSON: whatever the caller adds (epoch, metrics, run config)
so the folder alone says which architecture it holds: `restore_model` rebuilds it
without any training flags. Saving is atomic: orbax writes into a temporary folder
that replaces the old checkpoint only once complete, so an interrupted save never
leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

from cnnjax.models import build_model, init_params, model_config
from cnnjax.train import TrainState, create_train_state

# orbax logs every save and restore at INFO/WARNING through absl; keep runs readable.
logging.getLogger("absl").setLevel(logging.ERROR)


class CheckpointError(Exception):
    """A checkpoint that is missing, incomplete or of another architecture."""


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_checkpoint(path: str | os.PathLike, state: TrainState, model: nn.Module, meta: dict[str, Any] | None = None) -> Path:
    """Write `state` and the model's description to `path`, replacing what was there."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.saving-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    progress = {"step": state.step, "rng": state.rng}
    _checkpointer().save(
        staging,
        ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            progress=ocp.args.StandardSave(progress),
            model=ocp.args.JsonSave(model_config(model)),
            meta=ocp.args.JsonSave(meta or {}),
        ),
    )
    # Swap in the finished folder; the old one is removed only after the new one is in place.
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def _require_checkpoint(path: Path) -> None:
    if not (path / "model").is_dir() or not (path / "params").is_dir():
        raise CheckpointError(f"{path} is not a cnnjax checkpoint (no model/ and params/ inside); pass the folder a run saved")


def read_json_item(path: str | os.PathLike, item: str) -> dict[str, Any]:
    """The `model` or `meta` JSON of a checkpoint."""
    path = Path(path).absolute()
    _require_checkpoint(path)
    return _checkpointer().restore(path, ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]


def _check_architecture(path: Path, model: nn.Module) -> None:
    saved = read_json_item(path, "model")
    wanted = model_config(model)
    if saved != wanted:
        raise CheckpointError(f"{path} holds a different architecture: saved {saved}, asked for {wanted}")


def _restore_items(path: Path, targets: dict[str, Any]) -> dict[str, Any]:
    abstract = {k: jax.tree.map(ocp.utils.to_shape_dtype_struct, v) for k, v in targets.items()}
    try:
        return _checkpointer().restore(path, ocp.args.Composite(**{k: ocp.args.StandardRestore(v) for k, v in abstract.items()}))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path} does not fit this model ({str(e).splitlines()[0][:200]})") from None


def restore_model(path: str | os.PathLike) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Rebuild the model from the checkpoint folder alone: (model, params, meta)."""
    path = Path(path).absolute()
    model = build_model(read_json_item(path, "model"))
    target = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    params = _restore_items(path, {"params": target})["params"]
    return model, params, read_json_item(path, "meta")


def restore_train_state(
    path: str | os.PathLike, model: nn.Module, tx: optax.GradientTransformation, num_seeds: int | None = None
) -> tuple[TrainState, dict[str, Any]]:
    """The full TrainState (to resume training) for `model` and `tx`; errors on another architecture.

    num_seeds=K restores K stacked states (as saved from `train.stack_states`).
    """
    path = Path(path).absolute()
    _require_checkpoint(path)
    _check_architecture(path, model)

    def abstract_state(rng):
        return create_train_state(model, tx, rng)

    rngs = jax.ShapeDtypeStruct((2,) if num_seeds is None else (num_seeds, 2), jnp.uint32)
    target = jax.eval_shape(abstract_state if num_seeds is None else jax.vmap(abstract_state), rngs)
    targets = {"params": target.params, "opt_state": target.opt_state, "progress": {"step": target.step, "rng": target.rng}}
    items = _restore_items(path, targets)
    state = TrainState(step=items["progress"]["step"], params=items["params"], opt_state=items["opt_state"], rng=items["progress"]["rng"])
    return state, read_json_item(path, "meta")


class SaveBest:
    """An epoch callback for `train.fit`: keep the checkpoint with the lowest `monitor`.

    Keras's ModelCheckpoint(save_best_only=True): after each epoch whose monitored value
    improves on every earlier one, the state is saved to `path` (replacing the last best).
    """

    def __init__(self, path: str | os.PathLike, model: nn.Module, monitor: str = "val_loss", meta: dict[str, Any] | None = None):
        self.path, self.model, self.monitor, self.meta = Path(path), model, monitor, meta or {}
        self.best = float("inf")
        self.best_epoch: int | None = None

    def __call__(self, epoch: int, row: dict[str, float], state: TrainState) -> None:
        value = row.get(self.monitor, float("nan"))
        if value < self.best:  # NaN never compares smaller: a diverged epoch is never "best"
            self.best, self.best_epoch = value, epoch
            save_checkpoint(self.path, state, self.model, {**self.meta, "epoch": epoch, "metrics": row})
