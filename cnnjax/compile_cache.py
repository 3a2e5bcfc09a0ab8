"""Compiled programs kept on disk: a second run of the same program loads it instead of compiling.

This is jax's persistent compilation cache with a file store of cnnjax's own, because jax's writes
each entry in place: a process killed mid-write leaves a truncated entry, which every later run
fails to read and none rewrites. Here an entry is written atomically (cnnjax.files) and carries a
digest of its bytes; one that does not match reads as missing, is compiled again and replaced.

The folder, under the user cache, is one per kind of machine: the CPU model, its instruction-set
flags, the usable cores and the jax version, so a program compiled for one CPU's instructions is
never loaded on another's. A loaded program is the compiled one, so it computes the same bits.
`CNNJAX_COMPILE_CACHE=off` compiles everything afresh; a cache the user set up through jax
(`JAX_COMPILATION_CACHE_DIR`) is left to jax.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import jax

from cnnjax import files, routes
from cnnjax.data.common import cache_root

try:  # jax's cache takes its store through internals: without them, no cache (enable says so)
    from jax._src import compilation_cache
    from jax._src.compilation_cache_interface import CacheInterface
except ImportError:  # pragma: no cover - a jax without these modules
    compilation_cache = None
    CacheInterface = object

ENV = "CNNJAX_COMPILE_CACHE"
# Programs that compile faster than this are not kept: reading many tiny entries back costs
# about what compiling them does.
MIN_COMPILE_SECONDS = 0.2
# Past this many bytes, the least recently used entries are removed at start-up, down to half.
MAX_BYTES = 1 << 30
_DIGEST = hashlib.sha256().digest_size


class AtomicFileCache(CacheInterface):
    """jax's cache store (get/put by key) as one file per entry, its sha256 in front."""

    def __init__(self, path: Path):
        path.mkdir(parents=True, exist_ok=True)
        self.path = self._path = path  # _path: the name jax's interface gives it
        self.hits = 0  # entries read back whole, this process

    def get(self, key: str) -> bytes | None:
        entry = self.path / key
        try:
            stored = entry.read_bytes()
        except OSError:
            return None
        digest, value = stored[:_DIGEST], stored[_DIGEST:]
        if hashlib.sha256(value).digest() != digest:
            return None  # damaged: compiled again, and put() replaces it
        with contextlib.suppress(OSError):
            os.utime(entry)  # recently used: kept when the folder is pruned
        self.hits += 1
        return value

    def put(self, key: str, value: bytes) -> None:
        with contextlib.suppress(OSError):  # a full or read-only disk: the run compiles instead
            with files.atomic_write(self.path / key, "wb") as f:
                f.write(hashlib.sha256(value).digest() + value)


def folder() -> Path:
    """This machine's entries: cache_root()/xla/<CPU model, flags digest, cores, jax version>."""
    flags = hashlib.sha256((routes.cpuinfo("flags") or "").encode()).hexdigest()[:8]
    return cache_root() / "xla" / routes.slug(f"{routes.machine()} {flags}")


def enable() -> AtomicFileCache | None:
    """Keep compiled programs in `folder()` from now on; None where the cache stays off.

    Call it before the first compile (a script's start): programs compiled earlier are not kept."""
    if os.environ.get(ENV, "").lower() in ("off", "0", "false", "no"):
        return None
    if compilation_cache is None or jax.config.jax_compilation_cache_dir:
        return None
    store = AtomicFileCache(folder())
    files.clean_orphans(store.path)
    prune(store.path)
    jax.config.update("jax_compilation_cache_dir", str(store.path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    # XLA's own caches (GPU autotuning, kernels) write files cnnjax cannot vouch for.
    jax.config.update("jax_persistent_cache_enable_xla_caches", "none")
    compilation_cache.reset_cache()
    compilation_cache._cache = store
    return store


def disable() -> None:
    """Back to no persistent cache (for tests)."""
    if compilation_cache is not None:
        compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", None)


def prune(path: Path, max_bytes: int = MAX_BYTES) -> list[Path]:
    """Once the entries hold more than max_bytes, remove the least recently used, down to half."""
    entries = []
    for entry in path.iterdir():
        with contextlib.suppress(OSError):
            if not entry.name.startswith("."):  # a writer's temporary: clean_orphans' business
                stat = entry.stat()
                entries.append((stat.st_mtime, stat.st_size, entry))
    total = sum(size for _, size, _ in entries)
    removed = []
    if total <= max_bytes:
        return removed
    for _, size, entry in sorted(entries):
        if total <= max_bytes // 2:
            break
        entry.unlink(missing_ok=True)
        total -= size
        removed.append(entry)
    return removed
