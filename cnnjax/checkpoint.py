"""Checkpoints: named pytrees plus a JSON description, one folder per epoch, kept by orbax.

    RUN/checkpoints/<epoch>/
        <tree>/          one orbax item per pytree the caller names (params, opt_state, ...)
        description/     JSON: whatever the caller says the checkpoint is (epoch, config,
                         model, class names, history, best-so-far)

`Checkpoints` wraps orbax's CheckpointManager: every save is atomic (orbax writes into
a temporary folder and renames it when complete; temporaries a killed process left are
removed when the manager opens the folder), the latest `keep_latest` saves are kept, and
for each named metric the save where it was lowest (orbax's BestN preservation policy),
so a run's best epoch (per seed) is never deleted.

`Checkpoints` knows pytrees and JSON, nothing about training: the caller builds the
abstract target of a restore (jax.eval_shape, with shardings) and reads the description.
`read_description` / `restore_trees` open a single epoch folder directly. At the bottom,
a saved model found and loaded from a run folder alone (`find`, `load_model`, `save_model`):
what evaluate.py, activations.py and the ablation's test accuracy use.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from cnnjax import models
from cnnjax.files import strict_json

DESCRIPTION = "description"


class CheckpointError(Exception):
    """A checkpoint that is missing, incomplete or does not fit what is asked of it."""


def _finite_or_inf(value: Any) -> float:
    return float(value) if value is not None and math.isfinite(value) else math.inf


class Checkpoints:
    """The checkpoints of one run folder (see the module docstring).

    tree_names: the pytrees each save holds. best_metrics: metric names (lower is better)
    whose best save is kept besides the latest ones, e.g. ["val_loss/0", "val_loss/1"].
    """

    def __init__(self, directory: str | os.PathLike, tree_names: Sequence[str], keep_latest: int = 2,
                 best_metrics: Sequence[str] = ()):
        self.directory = Path(directory).absolute()
        self.tree_names = tuple(tree_names)
        policies: list[Any] = [checkpoint_managers.LatestN(keep_latest)]
        policies += [
            checkpoint_managers.BestN(get_metric_fn=lambda metrics, name=name: _finite_or_inf(metrics.get(name)), n=1, reverse=True)
            for name in best_metrics
        ]
        # best_fn only makes orbax write each save's metrics to disk (the preservation policy
        # decides what is kept): without them a reopened folder would not know its old
        # checkpoints' metrics, and a resumed run would keep stale ones forever.
        first = best_metrics[0] if best_metrics else None
        options = ocp.CheckpointManagerOptions(
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            best_fn=(lambda metrics: _finite_or_inf(metrics.get(first))) if first else None,
            best_mode="min",
            cleanup_tmp_directories=True,
            enable_async_checkpointing=False,  # a save is complete when save() returns: the epoch is safe
            create=True,
        )
        handlers = {name: ocp.StandardCheckpointHandler() for name in self.tree_names}
        handlers[DESCRIPTION] = ocp.JsonCheckpointHandler()
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=tuple(handlers), item_handlers=handlers)
        cleanup = getattr(self._manager, "_cleanup_tmp_directory_future", None)
        if cleanup is not None:  # orbax removes a killed save's temporary folder in the background: wait for it
            cleanup.result()

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, trees: Mapping[str, Any], description: Mapping[str, Any], metrics: Mapping[str, float] = ()) -> Path:
        """Save the trees and the description as step `step` (replacing an existing one of that number)."""
        if set(trees) != set(self.tree_names):
            raise ValueError(f"save needs the trees {self.tree_names}, got {tuple(trees)}")
        if step in self._manager.all_steps():  # a redone epoch after a crash: the same content again
            self._manager.delete(step)
        args = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()}
        args[DESCRIPTION] = ocp.args.JsonSave(strict_json(dict(description)))
        metrics = {k: _finite_or_inf(v) for k, v in dict(metrics).items()}
        self._manager.save(step, args=ocp.args.Composite(**args), metrics=metrics or None, force=True)
        return self.path(step)

    def path(self, step: int) -> Path:
        return self.directory / str(step)

    def description(self, step: int) -> dict[str, Any]:
        return read_description(self.path(step))

    def restore(self, step: int, abstract: Mapping[str, Any]) -> dict[str, Any]:
        """The named trees of step `step`, shaped (and sharded) like `abstract`."""
        return restore_trees(self.path(step), abstract)

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / DESCRIPTION).is_dir()


def _require(path: Path) -> None:
    if not is_checkpoint(path):
        raise CheckpointError(f"{path} is not a cnnjax checkpoint (no {DESCRIPTION}/ inside); pass a run folder or one of its "
                              "checkpoints/<epoch> folders")


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def read_description(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON description of one checkpoint folder."""
    path = Path(path).absolute()
    _require(path)
    return _checkpointer().restore(path, ocp.args.Composite(**{DESCRIPTION: ocp.args.JsonRestore()}))[DESCRIPTION]


def restore_trees(path: str | os.PathLike, abstract: Mapping[str, Any]) -> dict[str, Any]:
    """The named trees of one checkpoint folder, shaped (and sharded, where the leaves say so) like `abstract`.

    Leaves of `abstract` are arrays or jax.ShapeDtypeStruct (from jax.eval_shape); only the
    trees named are read.
    """
    path = Path(path).absolute()
    _require(path)
    missing = [name for name in abstract if not (path / name).is_dir()]
    if missing:
        raise CheckpointError(f"{path} has no {', '.join(missing)}; it was saved by another kind of run")
    targets = {name: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree) for name, tree in abstract.items()}
    try:
        restored = _checkpointer().restore(
            path, ocp.args.Composite(**{name: ocp.args.StandardRestore(tree) for name, tree in targets.items()})
        )
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} does not fit what was asked for ({str(e).splitlines()[0][:200]})") from None
    return {name: restored[name] for name in abstract}


# --- A saved model, from a run folder alone -----------------------------------------------------


def find(path: str | os.PathLike, which: str | int = "best", seed_index: int = 0) -> Path:
    """The checkpoint folder `path` means: a checkpoint folder itself, or a run folder (its
    best epoch for `seed_index`, its latest, or epoch N), or RUN/best, RUN/latest."""
    if isinstance(which, str) and which.isdigit():
        which = int(which)
    if which not in ("best", "latest") and not (isinstance(which, int) and which >= 0):
        raise CheckpointError(f"which checkpoint must be best, latest or an epoch number, got {which!r}")
    path = Path(path).expanduser().absolute()
    if is_checkpoint(path):
        return path
    if path.name in ("best", "latest") and not path.exists():
        path, which = path.parent, path.name
    folder = path / "checkpoints"
    steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and is_checkpoint(p)) if folder.is_dir() else []
    if not steps:
        raise CheckpointError(f"{path} holds no checkpoint (neither a run folder with checkpoints/<epoch>/ nor a checkpoint folder)")
    if which == "latest":
        return folder / str(steps[-1])
    if which == "best":
        best = read_description(folder / str(steps[-1])).get("best", [])
        if not 0 <= seed_index < len(best):
            raise CheckpointError(f"{path} has {len(best)} seed(s); seed index {seed_index} is not one of them")
        if best[seed_index] is None:
            raise CheckpointError(f"{path}: seed index {seed_index} has no finite validation loss, so no best epoch")
        return folder / str(best[seed_index]["epoch"])
    if which not in steps:
        raise CheckpointError(f"{path} has no checkpoint of epoch {which}; it keeps epochs {', '.join(map(str, steps))}")
    return folder / str(which)


def load_model(path: str | os.PathLike, which: str | int = "best", seed_index: int = 0) -> tuple[Any, Any, dict[str, Any]]:
    """(model, params, description) of one seed from a checkpoint, rebuilt from the folder alone;
    the description gains "path", the checkpoint folder read."""
    step_dir = find(path, which, seed_index)
    description = read_description(step_dir)
    model = models.build_model(description["model"])
    num_seeds = len(description.get("seeds", [0]))
    if not 0 <= seed_index < num_seeds:
        raise CheckpointError(f"{step_dir} holds {num_seeds} seed(s); seed index {seed_index} is not one of them")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shapes = jax.eval_shape(jax.vmap(lambda rng: models.init_params(model, rng)), jax.ShapeDtypeStruct((num_seeds, 2), jnp.uint32))
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
    params = restore_trees(step_dir, {"params": abstract})["params"]
    return model, jax.tree.map(lambda leaf: leaf[seed_index], params), {**description, "path": str(step_dir)}


def save_model(folder: str | os.PathLike, model: Any, params: Any, class_names: Sequence[str] | None = None, epoch: int = 0,
               extra: Mapping[str, Any] | None = None) -> Path:
    """One seed's parameters as FOLDER/checkpoints/<epoch>, which load_model, evaluate.py and
    activations.py read (for a model trained or changed outside a run)."""
    with Checkpoints(Path(folder) / "checkpoints", ("params",)) as ckpts:
        description = {"epoch": epoch, "model": models.model_config(model), "class_names": list(class_names or []),
                       "seeds": [0], "best": [{"epoch": epoch}], **(extra or {})}
        return ckpts.save(epoch, {"params": jax.tree.map(lambda leaf: jnp.asarray(leaf)[None], params)}, description)
