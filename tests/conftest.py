"""Shared test setup: where the real data lives, and a per-test cache folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keras, where the tests compare against it, runs on the JAX backend: no TensorFlow needed.
os.environ.setdefault("KERAS_BACKEND", "jax")

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """CNNJAX_DATA_DIR (set by .ci/run) or ../shared/data beside the checkout.

    Tests that need the real data fail, never skip, when it is missing: CI must run them.
    """
    folder = Path(os.environ.get("CNNJAX_DATA_DIR") or REPO.parent / "shared" / "data")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"real data not found at {folder}: set CNNJAX_DATA_DIR to the folder holding mnist/ and cats_and_dogs_small/"
        )
    return folder


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own cache folder: nothing leaks into ~/.cache or between tests."""
    monkeypatch.setenv("CNNJAX_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
