"""Writing files so that a reader never sees half of one, and cleaning up after dead writers.

Every file cnnjax writes (JSON, CSV, PNG, the decode cache, downloads) goes through `atomic_path` or
`atomic_write`: the bytes go to a hidden temporary file beside the target, are flushed to disk, and
replace the target in one `os.replace`. A process killed at any moment leaves either the old file or
the new one, plus at most a temporary named `.NAME.tmp-PID-XXXX` that `clean_orphans` removes once
PID is dead.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

_TMP = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]{8}(\.[A-Za-z0-9]+)?$")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(
            f, "sha256"
        ).hexdigest()  # releases the GIL while it hashes: threads help


def temporary_name(path: Path) -> Path:
    """`.NAME.tmp-PID-XXXXXXXX.SUFFIX` beside path (the suffix kept for writers that read it)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file name to write to, for writers that take one (matplotlib, PIL, shutil).

    On success the file replaces `path`; on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """`open(path, mode)` that only ever shows the finished file (see the module docstring)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f
        f.flush()


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def strict_json(obj: Any) -> Any:
    """obj with every non-finite float as None and numpy scalars as Python numbers: JSON has no
    NaN."""
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / jax scalars
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Rows as CSV (columns in first-seen order; NaN and infinities as empty cells, as strict JSON
    has null), atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=list(dict.fromkeys(key for row in rows for key in row))
    )
    writer.writeheader()
    writer.writerows(strict_json([dict(row) for row in rows]))
    return write_text(path, buffer.getvalue())


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Strict JSON (NaN and infinities written as null), atomically."""
    return write_text(
        path, json.dumps(strict_json(obj), indent=2, allow_nan=False, default=str) + "\n"
    )


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file cnnjax wrote; a damaged one is a ValueError that names it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}); it was damaged or edited by hand"
        ) from None


def clean_orphans(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Remove the temporaries that writers which are no longer alive left in `folder`."""
    folder = Path(folder)
    removed = []
    for path in folder.rglob(".*.tmp-*") if recursive else folder.glob(".*.tmp-*"):
        match = _TMP.match(path.name)
        if match and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed
