"""What the data sources share: the error type, where data and caches live."""

from __future__ import annotations

import os
import socket
from pathlib import Path


class DataError(Exception):
    """Data that cannot be found or read; the message says what was wrong and what to do."""


def data_dir_from_env() -> Path | None:
    value = os.environ.get("CNNJAX_DATA_DIR")
    return Path(value) if value else None


def cache_root() -> Path:
    """`$CNNJAX_CACHE_DIR`, else `$XDG_CACHE_HOME/cnnjax`, else `~/.cache/cnnjax`."""
    if os.environ.get("CNNJAX_CACHE_DIR"):
        return Path(os.environ["CNNJAX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cnnjax"


def tfds_reachable(host: str = "storage.googleapis.com", timeout: float = 5.0) -> bool:
    """Whether TFDS's download server answers at all: checked before a download so an
    offline machine fails in seconds instead of hanging in retries."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def first_line(error: BaseException, limit: int = 300) -> str:
    """An error's first non-empty line (its type name when it has no message), for one-line errors."""
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:limit]
