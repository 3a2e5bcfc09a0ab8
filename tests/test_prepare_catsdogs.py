"""experiments/prepare_catsdogs.py: the book's small split from a (tiny, generated)
Kaggle Dogs vs. Cats folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnjax import files
from cnnjax.data import DataError, load_splits
from cnnjax.data import kaggle as kaggle_data
from experiments import prepare_catsdogs as script
from tests.conftest import dead_pid

SIZES = ["--sizes", "3", "2", "2"]  # per class: cat.0-2 train, cat.3-4 validation, cat.5-6 test
SPLITS = {"train": range(0, 3), "validation": range(3, 5), "test": range(5, 7)}


def kaggle(folder: Path, per_class: int = 9) -> Path:
    """cat.0.jpg ... and dog.0.jpg ..., each a different small JPEG, plus Kaggle's
    neighbours that must not be copied."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix in ("cat", "dog"):
        for i in range(per_class):
            pixels = rng.integers(0, 256, (6 + i % 3, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{prefix}.{i}.jpg", quality=90)
    (folder / "notes.txt").write_text("not an image")
    return folder


def outputs(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def expected_outputs() -> list[str]:
    return sorted(
        f"{split}/{cls}/{prefix}.{i}.jpg"
        for split, r in SPLITS.items()
        for prefix, cls in (("cat", "cats"), ("dog", "dogs"))
        for i in r
    )


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """main()'s exit status (0 when it returns), its stdout and its stderr."""
    try:
        script.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_main_makes_the_split_with_the_same_names_and_bytes(tmp_path, capsys):
    src, out = kaggle(tmp_path / "kaggle"), tmp_path / "small"
    code, stdout, stderr = run_main(["--kaggle-dir", str(src), "--out", str(out), *SIZES], capsys)
    assert code == 0, stderr
    assert outputs(out) == expected_outputs()
    for rel in outputs(out):
        assert (out / rel).read_bytes() == (src / Path(rel).name).read_bytes(), rel
    lines = stdout.splitlines()  # the library's progress lines (logging), then the summary
    assert lines[0].startswith(f"checked 14 Kaggle images in {src}") and len(lines) == 3
    summary = (
        f"{out}: train 6, validation 4, test 4 images (cats and dogs, 14 in all); "
        "copied 14, already there 0"
    )
    assert lines[-1] == summary
    data = load_splits(
        out, ("train", "validation", "test"), image_size=(6, 8)
    )  # loads as the lecture's folder
    assert data["train"].files == [f"cats/cat.{i}.jpg" for i in range(3)] + [
        f"dogs/dog.{i}.jpg" for i in range(3)
    ]


def test_the_kaggle_zip_layout_is_found(tmp_path, capsys):
    kaggle(tmp_path / "dogs-vs-cats" / "train")
    code, stdout, _ = run_main(
        ["--kaggle-dir", str(tmp_path / "dogs-vs-cats"), "--out", str(tmp_path / "small"), *SIZES],
        capsys,
    )
    assert code == 0 and "copied 14" in stdout


def test_defaults_are_the_books_split(tmp_path, capsys):
    plan = kaggle_data.small_split_plan(tmp_path / "k", tmp_path / "o")
    where = {src.name: dest.relative_to(tmp_path / "o").as_posix() for src, dest in plan}
    assert len(plan) == 4000
    assert (
        where["cat.0.jpg"] == "train/cats/cat.0.jpg"
        and where["cat.999.jpg"] == "train/cats/cat.999.jpg"
    )
    assert (
        where["cat.1000.jpg"] == "validation/cats/cat.1000.jpg"
        and where["dog.1499.jpg"] == "validation/dogs/dog.1499.jpg"
    )
    assert (
        where["cat.1500.jpg"] == "test/cats/cat.1500.jpg"
        and where["dog.1999.jpg"] == "test/dogs/dog.1999.jpg"
    )
    # The script's defaults are the same: on a folder of 9 per class, it asks for images up to 1999.
    src = kaggle(tmp_path / "kaggle")
    code, _, stderr = run_main(["--kaggle-dir", str(src), "--out", str(tmp_path / "small")], capsys)
    assert code == 2 and stderr.startswith(f"error: {src / 'cat.9.jpg'} is missing (and 3981 more)")
    assert "cat.0.jpg ... cat.1999.jpg and dog.0.jpg ... dog.1999.jpg" in stderr


def test_missing_source_is_one_line_exit_2_nothing_written(tmp_path, capsys):
    src, out = kaggle(tmp_path / "kaggle"), tmp_path / "small"
    (src / "dog.4.jpg").unlink()
    code, stdout, stderr = run_main(["--kaggle-dir", str(src), "--out", str(out), *SIZES], capsys)
    assert code == 2 and stdout == ""
    assert stderr == (
        f"error: {src / 'dog.4.jpg'} is missing: "
        "--kaggle-dir must be Kaggle's Dogs vs. Cats train folder, "
        "holding cat.0.jpg ... cat.6.jpg and dog.0.jpg ... dog.6.jpg\n"
    )
    assert not out.exists()
    code, _, stderr = run_main(
        ["--kaggle-dir", str(tmp_path / "nowhere"), "--out", str(out)], capsys
    )
    assert code == 2 and "nowhere does not exist" in stderr and stderr.count("\n") == 1
    code, _, stderr = run_main(
        ["--kaggle-dir", str(src), "--out", str(out), "--sizes", "3", "2"], capsys
    )  # a bad flag
    assert (
        code == 2
        and "--sizes" in stderr
        and stderr.count("\n") == 1
        and stderr.startswith("error: ")
    )
    assert not out.exists()


@pytest.mark.parametrize("damage", ["junk", "truncated"])
def test_undecodable_source_is_one_line_exit_2_nothing_written(tmp_path, capsys, damage):
    src, out = kaggle(tmp_path / "kaggle"), tmp_path / "small"
    bad = src / "cat.5.jpg"
    bad.write_bytes(b"not a jpeg at all" if damage == "junk" else bad.read_bytes()[:60])
    code, _, stderr = run_main(["--kaggle-dir", str(src), "--out", str(out), *SIZES], capsys)
    assert (
        code == 2
        and stderr.startswith(f"error: {bad} cannot be decoded (")
        and stderr.count("\n") == 1
    ), stderr
    assert not out.exists()


def test_rerun_skips_identical_files(tmp_path, capsys):
    src, out = kaggle(tmp_path / "kaggle"), tmp_path / "small"
    argv = ["--kaggle-dir", str(src), "--out", str(out), *SIZES]
    assert run_main(argv, capsys)[0] == 0
    before = {
        rel: ((out / rel).stat().st_ino, (out / rel).stat().st_mtime_ns) for rel in outputs(out)
    }
    code, stdout, _ = run_main(argv, capsys)
    assert code == 0 and stdout.endswith("copied 0, already there 14\n")
    assert {
        rel: ((out / rel).stat().st_ino, (out / rel).stat().st_mtime_ns) for rel in outputs(out)
    } == before  # not rewritten


def test_a_rerun_with_other_sizes_is_refused_before_splits_share_images(tmp_path, capsys):
    src, out = kaggle(tmp_path / "kaggle"), tmp_path / "small"
    assert run_main(["--kaggle-dir", str(src), "--out", str(out), *SIZES], capsys)[0] == 0
    before = outputs(out)
    code, stdout, stderr = run_main(
        ["--kaggle-dir", str(src), "--out", str(out), "--sizes", "2", "2", "2"], capsys
    )
    assert code == 2 and stdout == "" and stderr.count("\n") == 1
    assert stderr.startswith(
        f"error: {out / 'test' / 'cats'} holds cat.6.jpg, which this split puts elsewhere"
    )
    assert "another --out" in stderr
    assert outputs(out) == before  # nothing copied
    (tmp_path / "a_file").write_text("")
    code, _, stderr = run_main(
        ["--kaggle-dir", str(src), "--out", str(tmp_path / "a_file"), *SIZES], capsys
    )
    assert (
        code == 2
        and stderr == f"error: --out {tmp_path / 'a_file'} is a file; pass the folder to make\n"
    )


def test_a_different_file_at_a_destination_is_refused_before_anything_is_written(tmp_path, capsys):
    src, out = kaggle(tmp_path / "kaggle"), tmp_path / "small"
    argv = ["--kaggle-dir", str(src), "--out", str(out), *SIZES]
    assert run_main(argv, capsys)[0] == 0
    mine = out / "validation" / "dogs" / "dog.3.jpg"
    mine.write_bytes(b"someone else's file")
    (out / "test" / "cats" / "cat.6.jpg").unlink()  # would be copied, if anything were written
    code, stdout, stderr = run_main(argv, capsys)
    assert code == 2 and "copied" not in stdout
    refusal = (
        f"error: refusing to overwrite {mine}: it differs from {src / 'dog.3.jpg'}; "
        "move it away or choose another --out\n"
    )
    assert stderr == refusal
    assert (
        mine.read_bytes() == b"someone else's file"
        and not (out / "test" / "cats" / "cat.6.jpg").exists()
    )


def test_a_run_killed_midway_is_completed_by_the_next(tmp_path, capsys, monkeypatch):
    src, out = kaggle(tmp_path / "kaggle"), tmp_path / "small"
    argv = ["--kaggle-dir", str(src), "--out", str(out), *SIZES]
    real_copyfile = kaggle_data.shutil.copyfile
    calls = []

    def copy_then_die(a, b):  # killed while writing the fifth copy: half of it is on disk
        calls.append(a)
        if len(calls) == 5:
            Path(b).write_bytes(Path(a).read_bytes()[:50])
            raise KeyboardInterrupt
        return real_copyfile(a, b)

    monkeypatch.setattr(kaggle_data.shutil, "copyfile", copy_then_die)
    with pytest.raises(
        SystemExit
    ) as interrupted:  # Ctrl-C: the script's one line and exit 130, no traceback
        script.main([*argv[:4], *SIZES])
    assert (
        interrupted.value.code == 130
        and capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"
    )
    monkeypatch.setattr(kaggle_data.shutil, "copyfile", real_copyfile)
    done = outputs(out)
    assert 0 < len(done) < 14
    for rel in done:  # whatever is at a destination is a whole copy, never the half-written one
        assert (out / rel).read_bytes() == (src / Path(rel).name).read_bytes(), rel
    # What a SIGKILL leaves (no cleanup ran): a temporary of a dead process beside a destination.
    orphan = (
        out
        / "test"
        / "dogs"
        / files.temporary_name(out / "test" / "dogs" / "dog.6.jpg").name.replace(
            f".tmp-{os.getpid()}-", f".tmp-{dead_pid()}-"
        )
    )
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"\xff\xd8 half")
    code, stdout, stderr = run_main(argv, capsys)
    assert code == 0, stderr
    assert outputs(out) == expected_outputs() and not orphan.exists()
    assert stdout.endswith(f"copied {14 - len(done)}, already there {len(done)}\n")
    for rel in outputs(out):
        assert (out / rel).read_bytes() == (src / Path(rel).name).read_bytes(), rel


def test_a_copy_that_differs_from_its_source_never_lands(tmp_path, monkeypatch):
    src, out = kaggle(tmp_path / "kaggle"), tmp_path / "small"

    def bad_copy(a, b):
        Path(b).write_bytes(Path(a).read_bytes()[:-1] + b"\x00")

    monkeypatch.setattr(kaggle_data.shutil, "copyfile", bad_copy)
    with pytest.raises(DataError, match=r"copying .*cat\.\d\.jpg to .* gave different bytes"):
        kaggle_data.prepare_small_split(
            src, out, [("train", 3), ("validation", 2), ("test", 2)], workers=1
        )
    assert (
        outputs(out) == []
        and [p for p in out.rglob("*") if p.is_file() or p.name.startswith(".")] == []
    )


def test_bad_sizes(tmp_path, capsys):
    src = kaggle(tmp_path / "kaggle")
    code, _, stderr = run_main(
        ["--kaggle-dir", str(src), "--out", str(tmp_path / "small"), "--sizes", "3", "0", "2"],
        capsys,
    )
    assert code == 2 and "counts >= 1" in stderr
