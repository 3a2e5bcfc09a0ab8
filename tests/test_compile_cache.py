"""Compiled programs kept on disk (cnnjax.compile_cache): read back, never trusted when damaged.

In process: a program written, read back after jax forgets it, a damaged entry compiled again and
replaced. Then the scripts as users run them: a second run of the same recipe loads its programs
from the cache, and gives the same history.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import compile_cache
from tests.conftest import write_mnist_folder
from tests.test_runs import run_script, without_seconds


@pytest.fixture()
def store(cache_dir, monkeypatch):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    enabled = compile_cache.enable()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # keep even tiny ones
    try:
        yield enabled
    finally:
        compile_cache.disable()
        jax.clear_caches()


def whole(entry) -> bool:
    stored = entry.read_bytes()
    return hashlib.sha256(stored[32:]).digest() == stored[:32]


def test_a_program_is_read_back_and_a_damaged_entry_compiled_again(store, cache_dir):
    assert store is not None and store.path.is_relative_to(cache_dir / "xla")
    x = jnp.arange(12.0).reshape(3, 4)

    def program(a):
        return jnp.tanh(a @ a.T).sum(axis=0) * 3.0

    expected = np.asarray(jax.jit(program)(x))
    (entry,) = [p for p in store.path.iterdir() if p.name.startswith("jit_program")]
    assert whole(entry)

    jax.clear_caches()  # jax forgets the compiled program: the next call asks the cache
    np.testing.assert_array_equal(jax.jit(program)(x), expected)
    assert store.hits == 1

    damaged = bytearray(entry.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    entry.write_bytes(bytes(damaged))
    jax.clear_caches()
    np.testing.assert_array_equal(jax.jit(program)(x), expected)
    assert store.hits == 1  # the damaged entry was not used ...
    assert whole(entry)  # ... and the fresh compile replaced it


def test_off_keeps_nothing_and_the_folder_is_pruned_oldest_first(cache_dir, monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.enable() is None
    assert not (cache_dir / "xla").exists()

    for age, name in enumerate(["new", "middle", "old"]):
        (tmp_path / name).write_bytes(b"x" * 100)
        os.utime(tmp_path / name, (1e9 - age, 1e9 - age))
    (tmp_path / ".new.tmp-1-00000000").write_bytes(b"x" * 1000)  # a writer's: not an entry
    assert compile_cache.prune(tmp_path, max_bytes=300) == []
    assert [p.name for p in compile_cache.prune(tmp_path, max_bytes=250)] == ["old", "middle"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".new.tmp-1-00000000", "new"]


def test_a_second_run_loads_its_programs_and_gives_the_same_history(tmp_path):
    data = write_mnist_folder(tmp_path / "mnist", n_train=64, n_test=32)
    cache = tmp_path / "cache"
    env = {"CNNJAX_CACHE_DIR": str(cache), "JAX_DEBUG_LOG_MODULES": "jax._src.compiler"}
    args = ["experiments/mnist.py", "--epochs", "1", "--batch-size", "32", "--data-dir", str(data)]

    first = run_script([*args, "--out", str(tmp_path / "a")], env)
    assert first.returncode == 0, first.stderr[-2000:]
    entries = sorted((cache / "xla").glob("*/jit_*"))
    assert entries and all(whole(entry) for entry in entries)
    largest = max(entries, key=lambda entry: entry.stat().st_size)  # the training step
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])  # as if killed

    second = run_script([*args, "--out", str(tmp_path / "b")], env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "Persistent compilation cache hit" in second.stderr
    assert "Traceback" not in second.stderr and "Error reading" not in second.stderr
    assert whole(largest)
    histories = [json.loads((tmp_path / run / "history.json").read_text()) for run in "ab"]
    assert without_seconds(histories[0]) == without_seconds(histories[1])
