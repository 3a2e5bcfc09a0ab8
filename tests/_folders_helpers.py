"""Helpers of the image-folder tests (tests/test_folders.py, tests/test_folders_cache.py)."""

from __future__ import annotations

from pathlib import Path

from cnnjax.data import folders


def cache_files(cache_dir: Path) -> list[str]:
    return (
        sorted(p.name for p in (cache_dir / "folders").iterdir())
        if (cache_dir / "folders").is_dir()
        else []
    )


def forbid_decoding(monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("decoded although it should not have")

    monkeypatch.setattr(folders, "decode_file", boom)
