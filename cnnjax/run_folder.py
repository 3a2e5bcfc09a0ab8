"""A run's folder: refused, locked, described by config.json.

RUN/ holds config.json, .lock (pid and host of process 0), checkpoints/<epoch>/ (the latest
`run.keep` and each seed's best), history.json/.csv/.png and tensorboard/. The rules, stricter
than Keras's BackupAndRestore and ModelCheckpoint:
- A non-empty folder is refused unless resumed, and so is one a live process writes. The lock
  is the kernel's (fcntl.flock on RUN/.lock), so a process that dies, however it dies, lets go
  of it: what it left in the file is only read to name it.
- `--resume` ends with exactly what an uninterrupted run would have; a resume whose recipe
  differs from the saved one is refused, naming the fields.
- A run whose loss stops being finite stops, its checkpoints keeping the last finite state
  (EXIT_DIVERGED).
- Every check on flags and data happens before the folder is created.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from cnnjax import checkpoint, files
from cnnjax import config as configlib
from cnnjax import mesh as meshlib
from cnnjax.config import SECTIONS, Config

log = logging.getLogger(__name__)


class RunError(Exception):
    """A run folder that cannot be used as asked; the message says why and what to do."""


def default_out(name: str, seed: int) -> Path:
    stamp = int(time.time())
    if jax.process_count() > 1:  # every process must name the same folder
        from jax.experimental import multihost_utils

        stamp = int(multihost_utils.broadcast_one_to_all(np.int64(stamp)))
    return (
        Path("runs") / f"{name}-seed{seed}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(stamp))}"
    )


def inspect_folder(checkpoint_dir: Path) -> Path:
    """Where activations.py and evaluate.py put their figures by default: RUN/inspect for a
    checkpoint RUN/checkpoints/<epoch>, else <checkpoint>/inspect (git-ignored for the shipped
    models)."""
    checkpoint_dir = Path(checkpoint_dir)
    in_run = checkpoint_dir.parent.name == "checkpoints"
    return (checkpoint_dir.parent.parent if in_run else checkpoint_dir) / "inspect"


def saved_config(path: Path) -> Config:
    """The config a run folder's config.json holds; RunError, naming it, when it holds none."""
    record = files.read_json(path)
    try:
        sections = set(record["config"]) - {"name"}
        missing, unknown = set(SECTIONS) - sections, sections - set(SECTIONS)
        if missing or unknown:
            named = [f"no {s!r} section" for s in sorted(missing)]
            named += [f"an unknown section {s!r}" for s in sorted(unknown)]
            raise RunError(
                f"{path} holds {' and '.join(named)} (sections are {', '.join(SECTIONS)}); it was "
                "edited or damaged: put it back as the run wrote it, or start a new run with "
                "another --out"
            )
        return configlib.from_dict(record["config"])
    # A list, a missing key, a section that is not a dict.
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        raise RunError(
            f"{path} holds no run config ({type(e).__name__}: {e}); it was damaged or edited by "
            "hand: start the run again with another --out"
        ) from None


def _read_lock(path: Path) -> dict[str, Any]:
    """What a lock file says of its holder; {} for one that cannot be read (or holds no object)."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


class RunFolder:
    """The folder of one run, held by one process at a time (see the module docstring)."""

    def __init__(self, path: Path, resume: bool, writer: bool):
        self.path, self.resume, self.writer = path, resume, writer
        self._lock_fd: int | None = None
        # mesh's watch thread may let go while the main thread does: the second waits until the
        # lock file is gone, since either may end the process (os._exit) right after.
        self._closing = threading.Lock()

    @classmethod
    def open(cls, cfg: Config) -> RunFolder:
        """Check, create and lock the run folder (process 0); other processes only find it."""
        path = (
            Path(cfg.run.out).expanduser() if cfg.run.out else default_out(cfg.name, cfg.train.seed)
        )
        folder = cls(path.absolute(), cfg.run.resume, meshlib.is_main_process())
        refusal = None
        if folder.writer:
            try:
                folder._prepare(cfg)
            except RunError as e:
                refusal = str(e)
        # Every process stops with process 0's words, none waits for it.
        refusal = meshlib.from_process_0(refusal)
        if refusal is not None:
            raise RunError(refusal)
        return folder

    def _prepare(self, cfg: Config) -> None:
        path = self.path
        if path.exists() and not path.is_dir():
            raise RunError(f"--out {path} is a file, not a folder")
        # A live run's folder is refused as in use, not as merely full; when nobody holds the
        # lock, let go again at once, the file untouched.
        if (path / ".lock").is_file():
            os.close(self._flock(path / ".lock"))
        entries = [p.name for p in path.iterdir() if p.name != ".lock"] if path.is_dir() else []
        if entries and not self.resume:
            raise RunError(
                f"--out {path} already holds a run ({', '.join(sorted(entries)[:4])}...); "
                "add --resume to continue it, or choose another --out"
            )
        if self.resume and entries and not (path / "config.json").is_file():
            raise _not_a_run_folder(path)
        path.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            files.clean_orphans(path, recursive=True)
            saved = path / "config.json"
            differ = configlib.recipe_diff(saved_config(saved), cfg) if saved.is_file() else []
            if differ:
                raise RunError(
                    f"--resume with another recipe than {path}/config.json: {'; '.join(differ)}. "
                    "Resume with the run's own flags, or start a new run with another --out"
                )
        except BaseException:
            self.close()
            raise

    def _flock(self, lock: Path) -> int:
        """An open descriptor of `lock` holding the kernel's lock on it; RunError while a live
        process holds it."""
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _read_lock(lock)
            raise RunError(
                f"{self.path} is in use by process {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')} (since {holder.get('started', '?')}); wait for it to "
                "finish"
            ) from None
        return fd

    def _lock(self) -> None:
        """Take RUN/.lock with the kernel's flock; refuse the folder while a live process holds
        it."""
        lock = self.path / ".lock"
        while True:
            fd = self._flock(lock)
            if os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the holder removed the file as it let go: lock the new one
        left = _read_lock(lock)
        # A process that died holding the folder (the kernel let go of its lock).
        if left:
            log.warning(
                f"warning: {lock} was left by process {left.get('pid')}, which is no longer "
                "running; taking it over"
            )
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._lock_fd = fd
        meshlib.before_leaving.append(self.close)

    def close(self) -> None:
        """Let go of the folder; safe to call twice, and from mesh's watch of the peers while the
        run ends."""
        with self._closing:
            fd, self._lock_fd = self._lock_fd, None
            if fd is not None:
                # While still holding it: see _lock's inode check.
                (self.path / ".lock").unlink(missing_ok=True)
                os.close(fd)
                if self.close in meshlib.before_leaving:
                    meshlib.before_leaving.remove(self.close)

    def write_config(self, record: dict[str, Any]) -> None:
        """config.json: the run's config as it now runs (a resume may have extended it), when it
        first started."""
        path = self.path / "config.json"
        if self.writer:
            first = files.read_json(path).get("started") if path.is_file() else None
            files.write_json(
                path, {**record, "started": first or time.strftime("%Y-%m-%d %H:%M:%S")}
            )


def resumable(out: str | None, recipe: Config) -> Config:
    """The config of run folder `out`, which `--resume` continues, checked before anything loads:
    RunError when there is nothing to resume, when it is another experiment's run (not `recipe`'s
    data and model), or when its config.json disagrees with all of its checkpoints."""
    if not out:
        raise RunError("--resume needs --out RUN, the run folder to continue")
    path = Path(out).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise RunError(f"--out {path} is a file, not a folder")
    if not (path / "config.json").is_file():
        if path.is_dir() and any(p.name != ".lock" for p in path.iterdir()):
            raise _not_a_run_folder(path)
        raise RunError(
            f"--out {path} holds nothing to resume (no run was started there): drop --resume to "
            "start a new run in it"
        )
    cfg = saved_config(path / "config.json")
    if (cfg.data.dataset, cfg.model.name) != (recipe.data.dataset, recipe.model.name):
        command = files.read_json(path / "config.json").get("command") or ["another script"]
        raise RunError(
            f"--out {path} holds a run of {cfg.name} ({cfg.data.dataset} data, started by "
            f"{command[0]}), not of this script's {recipe.data.dataset}: resume it with the "
            "script that started it"
        )
    _check_checkpoints_agree(path, cfg)
    return cfg


def checkpoint_differs(description: dict[str, Any], cfg: Config) -> list[str]:
    """How a checkpoint's recipe differs from `cfg`'s (its seeds among them, and more epochs
    asked than it was saved with allowed); [] for a checkpoint of this run."""
    return configlib.recipe_diff(configlib.from_dict(description["config"]), cfg)


def _check_checkpoints_agree(path: Path, cfg: Config) -> None:
    """RunError when RUN/config.json's recipe is that of none of its intact checkpoints: the
    file was edited (the checkpoints are what the run computed)."""
    newest = None
    folders = (path / "checkpoints").iterdir() if (path / "checkpoints").is_dir() else ()
    steps = sorted((int(p.name) for p in folders if p.name.isdigit()), reverse=True)
    for step in steps:
        step_dir = path / "checkpoints" / str(step)
        if checkpoint.damage(step_dir) is not None:
            continue
        try:
            differ = checkpoint_differs(checkpoint.read_description(step_dir), cfg)
        except (KeyError, TypeError, ValueError, checkpoint.CheckpointError):
            continue
        if not differ:
            return
        newest = newest or (step_dir, differ)
    if newest is not None:
        step_dir, differ = newest
        raise RunError(
            f"{path}/config.json disagrees with the run's checkpoints ({step_dir}: "
            f"{'; '.join(differ)}): it was edited; put it back as the run wrote it, or start a "
            "new run with another --out"
        )


def _not_a_run_folder(path: Path) -> RunError:
    return RunError(
        f"--out {path} is not empty and holds no config.json: not a cnnjax run folder, nothing "
        "to resume"
    )
