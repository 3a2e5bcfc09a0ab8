"""Checkpoints: named pytrees plus a JSON description, one folder per epoch, kept by orbax.

    RUN/checkpoints/<epoch>/
        <tree>/          one orbax item per pytree the caller names (params, opt_state, ...)
        description/     JSON: whatever the caller says it is (epoch, config, model, class names,
                         history, best-so-far)
        checksums.json   the seal: the sha256 of every file orbax wrote

Every save is atomic (orbax renames a finished temporary folder; those a killed process left are
removed when the folder is reopened). The latest `keep_latest` saves are kept, and for each named
metric the one where it was lowest, so a run's best epoch (per seed) is never deleted. Nothing is
read from a checkpoint before its files are checked against its seal (`damage`): a changed byte, a
missing or cut-off file, or a save killed before its seal makes it damaged. A run resumes from the
newest intact one; loading a damaged model is an error naming it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from cnnjax import files, grid, models
from cnnjax.files import strict_json

log = logging.getLogger(__name__)

DESCRIPTION = "description"
CHECKSUMS = "checksums.json"


class CheckpointError(Exception):
    """A checkpoint that is missing, incomplete or does not fit what is asked of it."""


def _finite_or_inf(value: Any) -> float:
    return float(value) if value is not None and math.isfinite(value) else math.inf


def _another_run(
    description: dict[str, Any], differs: Callable[[dict[str, Any]], list[str]]
) -> str | None:
    """Why a sealed checkpoint is not of this run (the seal proves its files are as saved, not
    whose they are), or None."""
    try:
        differences = differs(description)
    except (KeyError, TypeError, ValueError):
        return "damaged (its description holds no readable config)"
    if not differences:
        return None
    more = f", and {len(differences) - 1} more" if len(differences) > 1 else ""
    return f"another run's checkpoint ({differences[0]}{more})"


class Checkpoints:
    """The checkpoints of one run folder (see the module docstring).

    tree_names: the pytrees each save holds. best_metrics: metric names (lower is better)
    whose best save is kept besides the latest ones, e.g. ["val_loss/0", "val_loss/1"].
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        tree_names: Sequence[str],
        keep_latest: int = 2,
        best_metrics: Sequence[str] = (),
    ):
        self.directory = Path(directory).absolute()
        self.tree_names = tuple(tree_names)
        policies: list[Any] = [checkpoint_managers.LatestN(keep_latest)]
        policies += [
            checkpoint_managers.BestN(
                get_metric_fn=lambda metrics, name=name: _finite_or_inf(metrics.get(name)),
                n=1,
                reverse=True,
            )
            for name in best_metrics
        ]
        # best_fn only makes orbax write each save's metrics to disk (the preservation policy
        # decides what is kept): without them a reopened folder would not know its old checkpoints'
        # metrics, and would keep stale ones forever.
        first = best_metrics[0] if best_metrics else None
        options = ocp.CheckpointManagerOptions(
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            best_fn=(lambda metrics: _finite_or_inf(metrics.get(first))) if first else None,
            best_mode="min",
            cleanup_tmp_directories=True,
            # a save is complete when save() returns: the epoch is safe
            enable_async_checkpointing=False,
            create=True,
        )
        handlers = {name: ocp.StandardCheckpointHandler() for name in self.tree_names}
        handlers[DESCRIPTION] = ocp.JsonCheckpointHandler()
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=tuple(handlers), item_handlers=handlers
        )
        cleanup = getattr(self._manager, "_cleanup_tmp_directory_future", None)
        if (
            cleanup is not None
        ):  # orbax removes a killed save's temporary folder in the background: wait for it
            cleanup.result()

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_intact(
        self, differs: Callable[[dict[str, Any]], list[str]] | None = None
    ) -> int | None:
        """The newest step whose files are all as saved and, with `differs` (a description -> how
        its run differs from this one), of this run; a warning names each newer one passed over.
        None when there is none."""
        for step in reversed(self.steps()):
            damaged = damage(self.path(step))
            why = f"damaged ({damaged})" if damaged else None
            if why is None and differs is not None:
                why = _another_run(self.description(step), differs)
            if why is None:
                return step
            log.warning("warning: %s is %s and is not used", self.path(step), why)
        return None

    def save(
        self,
        step: int,
        trees: Mapping[str, Any],
        description: Mapping[str, Any],
        metrics: Mapping[str, float] = (),
    ) -> Path:
        """Save the trees and the description as step `step` (replacing an existing one of that
        number)."""
        if set(trees) != set(self.tree_names):
            raise ValueError(f"save needs the trees {self.tree_names}, got {tuple(trees)}")
        if self.path(step).is_symlink():  # linked in by hand: the link goes, not what it names
            self.path(step).unlink()
            self._manager.reload()
        if step in self._manager.all_steps():  # a redone epoch after a crash: the same content
            self._manager.delete(step)
        args = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()}
        args[DESCRIPTION] = ocp.args.JsonSave(strict_json(dict(description)))
        metrics = {k: _finite_or_inf(v) for k, v in dict(metrics).items()}
        self._manager.save(
            step, args=ocp.args.Composite(**args), metrics=metrics or None, force=True
        )
        if jax.process_index() == 0:
            seal(self.path(step))
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


def _digests(path: Path) -> dict[str, str]:
    return {
        p.relative_to(path).as_posix(): files.sha256(p)
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != CHECKSUMS
    }


def seal(path: str | os.PathLike) -> None:
    """Record the sha256 of every file of a finished checkpoint, in its checksums.json.

    Orbax's commit markers name the folder's absolute path: they are first rewritten without it,
    so that a checkpoint moved or shipped carries no machine's folders (orbax reads only that
    they exist)."""
    for marker in Path(path).rglob("commit_success.txt"):
        marker.write_text("Checkpoint commit was successful.\n")
    files.write_json(Path(path) / CHECKSUMS, _digests(Path(path)))


def damage(path: str | os.PathLike) -> str | None:
    """Why a checkpoint folder is not as it was saved (a file changed, missing or cut off, or no
    seal), or None."""
    path = Path(path)
    try:
        expected = json.loads((path / CHECKSUMS).read_text())
    except FileNotFoundError:
        return f"no {CHECKSUMS}: its save did not finish"
    except (OSError, ValueError):
        return f"its {CHECKSUMS} cannot be read"
    if not isinstance(expected, dict) or DESCRIPTION not in {
        name.split("/")[0] for name in expected
    }:
        return f"its {CHECKSUMS} is not a seal of its files"
    found = _digests(path)
    wrong = [name for name, digest in expected.items() if found.get(name) != digest] + sorted(
        set(found) - set(expected)
    )
    if wrong:
        what = (
            "is missing"
            if wrong[0] not in found
            else "is not in the seal"
            if wrong[0] not in expected
            else "differs from what was saved"
        )
        return f"{wrong[0]} {what}" + (
            f", and {len(wrong) - 1} more file(s)" if len(wrong) > 1 else ""
        )
    return None


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / DESCRIPTION).is_dir()


def _saved(path: Path) -> bool:
    """Whether `path` is a checkpoint folder, whole or damaged."""
    return is_checkpoint(path) or (path / CHECKSUMS).is_file()


def _require(path: Path) -> None:
    if not is_checkpoint(path):
        raise CheckpointError(
            f"{path} is not a cnnjax checkpoint (no {DESCRIPTION}/ inside); "
            "pass a run folder or one of its checkpoints/<epoch> folders"
        )


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def read_description(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON description of one checkpoint folder."""
    path = Path(path).absolute()
    _require(path)
    return _checkpointer().restore(
        path, ocp.args.Composite(**{DESCRIPTION: ocp.args.JsonRestore()})
    )[DESCRIPTION]


def restore_trees(path: str | os.PathLike, abstract: Mapping[str, Any]) -> dict[str, Any]:
    """The trees named in `abstract` (only those are read), shaped and sharded like its leaves
    (arrays or ShapeDtypeStructs)."""
    path = Path(path).absolute()
    _require(path)
    missing = [name for name in abstract if not (path / name).is_dir()]
    if missing:
        raise CheckpointError(
            f"{path} has no {', '.join(missing)}; it was saved by another kind of run"
        )
    targets = {
        name: ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))
        for name, tree in abstract.items()
    }
    try:
        restored = _checkpointer().restore(path, ocp.args.Composite(**targets))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{path} does not fit what was asked for ({str(e).splitlines()[0][:200]})"
        ) from None
    return {name: restored[name] for name in abstract}


# --- A saved model, from a run folder alone -----------------------------------------------------


def find(
    path: str | os.PathLike,
    which: str | int = "best",
    seed: int | None = None,
    setting: str | None = None,
) -> Path:
    """The checkpoint folder `path` means: a checkpoint folder itself, or a run folder (its best
    epoch for `seed`, default the run's first seed, in an ablation grid's run of `setting`; its
    latest; or epoch N), or RUN/best, RUN/latest. The folder is
    checked (`damage`): a damaged one is an error naming it."""
    if isinstance(which, str) and which.isdigit():
        which = int(which)
    if which not in ("best", "latest") and not (isinstance(which, int) and which >= 0):
        raise CheckpointError(
            f"which checkpoint must be best, latest or an epoch number, got {which!r}"
        )
    path = Path(path).expanduser().absolute()
    if path.name == "checkpoints" and not is_checkpoint(path):
        path = path.parent
    if path.name in ("best", "latest") and not path.exists():
        path, which = path.parent, path.name
    folder = path / "checkpoints"
    # A sealed folder that lost its description/ is a damaged checkpoint, not none.
    steps = (
        sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and _saved(p))
        if folder.is_dir()
        else []
    )
    if _saved(path):
        chosen = path
    elif not steps:
        raise CheckpointError(
            f"{path} holds no checkpoint "
            "(neither a run folder with checkpoints/<epoch>/ nor a checkpoint folder)"
        )
    elif which == "latest":
        chosen = folder / str(steps[-1])
    elif which == "best":
        intact = next(
            (folder / str(step) for step in reversed(steps) if damage(folder / str(step)) is None),
            None,
        )
        if intact is None:
            raise CheckpointError(
                f"every checkpoint in {folder} is damaged "
                f"(the newest: {damage(folder / str(steps[-1]))}); none is used"
            )
        description = read_description(intact)
        k = seed_index(description, seed, path, setting)
        if description["best"][k] is None:
            raise CheckpointError(
                f"{path}: seed {description['seeds'][k]} has no finite validation loss, "
                "so no best epoch"
            )
        chosen = folder / str(description["best"][k]["epoch"])
    elif which in steps:
        chosen = folder / str(which)
    else:
        raise CheckpointError(
            f"{path} has no checkpoint of epoch {which}; "
            f"it keeps epochs {', '.join(map(str, steps))}"
        )
    why = damage(chosen)
    if why is not None and chosen == path:
        raise CheckpointError(
            f"{chosen} is damaged ({why}); its weights are not used: "
            "choose another epoch of its run"
        )
    if why is not None:
        raise CheckpointError(
            f"{chosen} is damaged ({why}); its weights are not used: choose another epoch "
            f"(--which; {folder} keeps {', '.join(map(str, steps)) or 'none'})"
        )
    return chosen


def seed_index(
    description: Mapping[str, Any], seed: int | None, where: Any, setting: str | None = None
) -> int:
    """The position of `seed` (default: the first) among the seeds a checkpoint holds; in an
    ablation grid's, of `setting`'s member with that seed (`cnnjax.grid.position`)."""
    try:
        return grid.position(description, seed, setting)
    except ValueError as error:
        raise CheckpointError(f"{where} {error}") from None


def load_model(
    path: str | os.PathLike,
    which: str | int = "best",
    seed: int | None = None,
    setting: str | None = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """(model, params, description) of one seed (default: the run's first; in an ablation grid's
    run, of `setting`) from a checkpoint, rebuilt from the folder alone; the description gains
    "path", the checkpoint folder read.

    On a run being written, the epoch found may be pruned while it is read (a new best replaced
    it): it is then found again, so what comes back is always one whole, checked checkpoint."""
    for attempt in range(5):
        step_dir = find(path, which, seed, setting)
        try:
            model, params, description = _read_model(step_dir, seed, setting)
            if damage(step_dir) is None:  # still whole after the read
                return model, params, description
        except (CheckpointError, OSError, ValueError):
            if step_dir.exists() or attempt == 4:
                raise
        time.sleep(0.2)
    raise CheckpointError(f"{path} kept changing while it was read; try again")


def _read_model(
    step_dir: Path, seed: int | None, setting: str | None = None
) -> tuple[Any, Any, dict[str, Any]]:
    description = read_description(step_dir)
    model = models.build_model(description["model"])
    k = seed_index(description, seed, step_dir, setting)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    count = len(description.get("seeds", [0]))
    shapes = jax.eval_shape(
        jax.vmap(lambda rng: models.init_params(model, rng)),
        jax.ShapeDtypeStruct((count, 2), jnp.uint32),
    )
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes
    )
    params = restore_trees(step_dir, {"params": abstract})["params"]
    return model, jax.tree.map(lambda leaf: leaf[k], params), {**description, "path": str(step_dir)}


def class_names(model: Any, description: Mapping[str, Any]) -> list[str]:
    """The class names a checkpoint was trained on; their indices as text where it stored none."""
    return list(description.get("class_names") or [str(c) for c in range(model.head.num_classes)])


def save_model(
    folder: str | os.PathLike,
    model: Any,
    params: Any,
    class_names: Sequence[str] | None = None,
    epoch: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """One seed's parameters as FOLDER/checkpoints/<epoch>, which load_model, evaluate.py and
    activations.py read (for a model trained or changed outside a run)."""
    with Checkpoints(Path(folder) / "checkpoints", ("params",)) as ckpts:
        description = {
            "epoch": epoch,
            "model": models.model_config(model),
            "class_names": list(class_names or []),
            "seeds": [0],
            "best": [{"epoch": epoch}],
            **(extra or {}),
        }
        return ckpts.save(
            epoch,
            {"params": jax.tree.map(lambda leaf: jnp.asarray(leaf)[None], params)},
            description,
        )
