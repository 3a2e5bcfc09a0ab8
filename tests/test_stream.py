"""Streaming input (cnnjax.data.Stream): the stream's batches are the in-memory arrays
gathered, every example once per seed and epoch (in one process or split over two), bounded
host memory, a broken file skipped mid-stream, TFDS by name (mocked), the input choice, and a
core that never imports TensorFlow."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from PIL import Image

from cnnjax import mesh
from cnnjax import step as steps
from cnnjax.data import DataError, SkippedImageWarning, Stream, choose_input, folders, inputs, load
from cnnjax.data import tfds as tfds_data
from tests.conftest import REPO, write_cats_dogs_folder

pytest.importorskip(
    "tensorflow", reason="the tfds extra: pip install -e '.[dev,tfds]' (CI installs it)"
)

SIZE = 24


def numbered_folder(root: Path, n: int, size: int = SIZE) -> Path:
    """root/{cats,dogs}/NN.png: image i is filled with the value 10 + i, so a
    pixel says which file it is."""
    for i in range(n):
        folder = root / ("cats", "dogs")[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((size + 8, size + 4, 3), 10 + i, np.uint8)).save(
            folder / f"{i:02d}.png"
        )
    return root


def file_ids(images: np.ndarray) -> np.ndarray:
    return images[..., 0, 0, 0].astype(int) - 10


def folder_stream(folder: Path, size: int = SIZE) -> Stream:
    return Stream(folders.FolderSource(folders.list_folder(folder), (size, size)))


# --- The same epoch as in memory ------------------------------------------------------------------


def test_stream_batches_are_the_memory_arrays_gathered(tmp_path):
    """Two seeds, a padded last batch, two epochs: every step of the stream holds exactly the
    in-memory images and labels the index matrices name (zeros on padding rows), so a training step
    cannot tell the two inputs apart."""
    root = write_cats_dogs_folder(tmp_path / "data", {"train": 16}, size=SIZE + 6)
    memory = folders.load_image_folder(root / "train", (SIZE, SIZE))
    streamed = folder_stream(root / "train")
    np.testing.assert_array_equal(streamed.labels, memory.labels)
    assert streamed.labels.dtype == np.int32 and streamed.class_names == memory.class_names == [
        "cats",
        "dogs",
    ]
    for epoch in (0, 1):
        indices, weights = steps.epoch_order(np.array([[0, 1], [0, 2]], np.uint32), 16, 6, epoch)
        batches = list(streamed.batches(indices, weights))
        assert (
            len(batches) == indices.shape[1] == 3 and weights[:, -1].min() == 0
        )  # 16 = 6 + 6 + 4: padded
        for step, batch in enumerate(batches):
            real = weights[:, step] > 0
            expected = np.where(real[..., None, None, None], memory.images[indices[:, step]], 0)
            assert (
                batch["image"].dtype == np.uint8
                and batch["label"].dtype == np.int32
                and batch["weight"].dtype == np.float32
            )
            np.testing.assert_array_equal(batch["image"], expected)
            np.testing.assert_array_equal(
                batch["label"], np.where(real, memory.labels[indices[:, step]], 0)
            )
            np.testing.assert_array_equal(batch["weight"], weights[:, step])
        assert not np.array_equal(
            indices[0], indices[1]
        )  # the seeds differ, so the test can tell them apart


# --- Every example once per seed and epoch -------------------------------------------------------


@pytest.mark.parametrize("processes", [1, 2])
def test_every_example_once_per_seed_and_epoch(tmp_path, processes):
    n, batch, seeds = 11, 4, 2
    data = folder_stream(numbered_folder(tmp_path / "numbered", n))
    index_of = {
        int(Path(f).stem): i for i, f in enumerate(data.source.listing.files)
    }  # the listing has cats first, then dogs
    for epoch in (0, 1):
        indices, weights = steps.epoch_order(np.array([[0, 7], [0, 8]], np.uint32), n, batch, epoch)
        seen = [[] for _ in range(seeds)]
        parts = []
        for p in range(processes):  # each process: a common order, its block of rows of every batch
            rows = slice(p * batch // processes, (p + 1) * batch // processes)
            part = []
            for b in data.batches(indices[:, :, rows], weights[:, :, rows]):
                images, labels, w = b["image"], b["label"], b["weight"]
                assert (
                    images.shape == (seeds, batch // processes, SIZE, SIZE, 3)
                    and images.dtype == np.uint8
                )
                for k in range(seeds):
                    ids = np.array([index_of[i] for i in file_ids(images[k][w[k] > 0])], int)
                    np.testing.assert_array_equal(labels[k][w[k] > 0], data.labels[ids])
                    seen[k].extend(ids.tolist())
                    part.extend((k, i) for i in ids)
                assert not images[w == 0].any()  # padding is never read
            parts.append(set(part))
        for k in range(seeds):
            assert sorted(seen[k]) == list(range(n)), (epoch, k, seen[k])
        assert seen[0] != seen[1]  # two seeds, two orders
        if processes == 2:
            assert parts[0] and parts[1] and not parts[0] & parts[1]


def test_local_block_of_a_process():
    class TwoOfFour:  # the map a process holding devices 2 and 3 of a (1, 4) data axis sees
        def addressable_devices_indices_map(self, shape):
            return {"d2": (slice(0, 1), slice(4, 6)), "d3": (slice(0, 1), slice(6, 8))}

    class Scattered:
        def addressable_devices_indices_map(self, shape):
            return {"d0": (slice(0, 1), slice(0, 2)), "d3": (slice(0, 1), slice(6, 8))}

    assert mesh.local_block(TwoOfFour(), (1, 8)) == (slice(0, 1), slice(4, 8))
    with pytest.raises(ValueError, match="non-contiguous"):
        mesh.local_block(Scattered(), (1, 8))


# --- A broken file --------------------------------------------------------------------------------


def test_broken_file_mid_stream_is_skipped_with_a_warning(tmp_path):
    root = numbered_folder(tmp_path / "numbered", 12)
    (root / "cats" / "06.png").write_bytes(b"not a png at all")
    data = folder_stream(root)
    broken = data.source.listing.files.index("cats/06.png")
    for epoch in (0, 1):
        indices, weights = steps.epoch_order(np.array([[0, 3]], np.uint32), 12, 4, epoch)
        with pytest.warns(SkippedImageWarning, match=r"skipped .*cats/06\.png: cannot be decoded"):
            batches = list(data.batches(indices, weights))
        total = sum(float(b["weight"].sum()) for b in batches)
        seen = sorted(i for b in batches for i in file_ids(b["image"][0][b["weight"][0] > 0]))
        assert total == 11 and seen == [i for i in range(12) if i != 6]
        ((step, row),) = np.argwhere(indices[0] == broken)
        bad = batches[step]
        assert (
            bad["weight"][0, row] == 0
            and bad["label"][0, row] == 0
            and not bad["image"][0, row].any()
        )  # counts as padding


# --- Host memory stays bounded --------------------------------------------------------------------

MEMORY_SCRIPT = r"""
import json, sys, threading, time
from pathlib import Path
import numpy as np
from PIL import Image
from cnnjax import feed, step as steps
from cnnjax.data import Stream, choose_input, folders

root, n, size, budget = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
for i in range(n):  # smooth random pictures: JPEGs of a few kB that decode to size x size x 3 bytes
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    folder = root / ("cats", "dogs")[i % 2]
    folder.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(small).resize((size, size), Image.BILINEAR)
    picture.save(folder / f"{i:04d}.jpg", quality=90)
    if i < 32:
        warm = root.parent / "warm" / folder.name
        warm.mkdir(parents=True, exist_ok=True)
        picture.save(warm / f"{i}.jpg")

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

peak, stop = [0], threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)

big = Stream(folders.FolderSource(folders.list_folder(root), (size, size)))
nbytes = len(big) * size * size * 3
choice, why = choose_input("auto", nbytes, (budget, "test budget"))
warm = Stream(folders.FolderSource(folders.list_folder(root.parent / "warm"), (size, size)))
rngs = np.zeros((1, 2), np.uint32)
from cnnjax import mesh
sharding = mesh.sharding(mesh.make_mesh(1), mesh.SEED, mesh.DATA)

def epoch(data, order):  # the Trainer's data path: tf.data, then two batches ahead on the device
    total = 0.0
    for batch in feed.prefetch(data.batches(*order), sharding):
        total += float(batch["weight"].sum())
    return total

order = steps.epoch_order(rngs, len(big), 16, 0)  # compiled here, not inside the measurement
for e in range(3):
    epoch(warm, steps.epoch_order(rngs, len(warm), 16, e))
base = rss()
threading.Thread(target=sample, daemon=True).start()
seen = epoch(big, order)
stop.set(); time.sleep(0.01)
stream_growth = peak[0] - base
base = rss()
loaded = folders.load_image_folder(root, (size, size), cache=False)
memory_growth = rss() - base
print(json.dumps({"choice": choice, "nbytes": nbytes, "seen": seen, "stream_growth": stream_growth,
                  "memory_growth": memory_growth, "loaded": int(loaded.images.nbytes)}))
"""

# The bound, measured: after a warm-up, streaming a 50 MiB or a 147 MiB folder grew RSS by 12-14 MiB
# (batches of 16 x 160 x 160 x 3 = 1.2 MiB, a few in flight, plus allocator slack that does not grow
# with the set), while loading the same folders into memory grew it by the whole set.
STREAM_GROWTH_BOUND = 32 * 2**20


@pytest.mark.slow  # writes and streams a 110 MiB folder in a subprocess
def test_host_memory_stays_bounded_while_streaming(tmp_path):
    n, size, budget = 1500, 160, 20 * 2**20
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            MEMORY_SCRIPT,
            str(tmp_path / "big"),
            str(n),
            str(size),
            str(budget),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["nbytes"] == n * size * size * 3 >= 5 * budget  # several times the budget
    assert result["choice"] == "stream" and result["seen"] == n
    assert result["stream_growth"] < STREAM_GROWTH_BOUND, result
    assert result["memory_growth"] >= 0.8 * result["nbytes"], (
        result
    )  # the same measurement sees a whole-set load


# --- TFDS by name and split -----------------------------------------------------------------------


def test_tfds_source_by_name_and_split_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=9):
        source = tfds_data.TfdsSource("mnist", "train")
        decoded_by_tfds = tfds.data_source("mnist", split="train")
        assert (
            len(source) == 9
            and source.image_shape == (28, 28, 1)
            and source.class_names[:2] == ["0", "1"]
        )
        data = Stream(source)
        indices, weights = steps.epoch_order(np.zeros((1, 2), np.uint32), 9, 4, 0)
        batches = [(b["image"], b["label"], b["weight"]) for b in data.batches(indices, weights)]
        assert [b[0].shape for b in batches] == [(1, 4, 28, 28, 1)] * 3 and data.image_shape == (
            28,
            28,
            1,
        )
        flat = indices[0].reshape(-1)
        for step, (images, labels, w) in enumerate(batches):
            for j in np.flatnonzero(w[0] > 0):
                record = decoded_by_tfds[int(flat[step * 4 + j])]
                np.testing.assert_array_equal(
                    images[0, j], record["image"]
                )  # PIL's pixels are TFDS's
                assert labels[0, j] == record["label"]
        cats = tfds_data.TfdsSource("cats_vs_dogs", "train", image_size=(SIZE, SIZE))
        image, label = cats.read(3)
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8 and label in (0, 1)
        assert cats.describe(3) == "tfds:cats_vs_dogs/train[3]"


def lecture_subset(labels: list[int], sizes: dict[str, int]) -> dict[str, list[int]]:
    """The rule, written plainly: per class, in TFDS order, the first sizes["train"] for train, then
    validation, then test; each split's cats, then its dogs (as TFDS indices)."""
    out = {split: [] for split in sizes}
    for label in (0, 1):
        indices = [i for i, lab in enumerate(labels) if lab == label]
        start = 0
        for split, n in sizes.items():
            out[split] += indices[start : start + n]
            start += n
    return out


def test_tfds_cats_vs_dogs_subset_in_memory_and_streamed_follow_the_lecture_split(monkeypatch):
    """Both paths pick the lecture's splits from TFDS's single split (tfds.tfds_subset) and decode
    with PIL. TFDS's mock data differs between tfds.load and tfds.data_source, so each path is
    checked against the rule on the records it reads (real TFDS gives both the same records)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    import io

    sizes = {"train": 3, "validation": 2, "test": 1}
    monkeypatch.setattr(tfds_data, "TFDS_SPLIT_SIZES", tuple(sizes.items()))

    def pil(data: bytes) -> np.ndarray:
        return np.asarray(
            Image.open(io.BytesIO(data)).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
        )

    skip = {"image": tfds.decode.SkipDecoding()}
    with tfds.testing.mock_data(num_examples=40):
        memory = tfds_data.load_tfds_cats_vs_dogs(
            (SIZE, SIZE), "bilinear", cache=False, allow_download=False
        )
        records = list(
            tfds.as_numpy(
                tfds.load(
                    "cats_vs_dogs",
                    split="train",
                    as_supervised=True,
                    shuffle_files=False,
                    download=False,
                    decoders=skip,
                )
            )
        )
        streamed = tfds_data.tfds_cats_vs_dogs_subsets(
            tuple(sizes), (SIZE, SIZE), "bilinear", download=False
        )
        source = tfds.data_source("cats_vs_dogs", split="train", download=False, decoders=skip)
        by_index = [source[i] for i in range(len(source))]
    memory_rule = lecture_subset([int(label) for _, label in records], sizes)
    stream_rule = lecture_subset([int(r["label"]) for r in by_index], sizes)
    for split, n in sizes.items():
        held = memory[split]
        assert held.files == [f"tfds:cats_vs_dogs/train[{i}]" for i in memory_rule[split]]
        assert held.labels.tolist() == [0] * n + [1] * n
        for image, index in zip(held.images, memory_rule[split]):
            np.testing.assert_array_equal(image, pil(bytes(records[index][0])))
        part = streamed[split]
        assert [part.describe(i) for i in range(len(part))] == [
            f"tfds:cats_vs_dogs/train[{i}]" for i in stream_rule[split]
        ]
        for i, index in enumerate(stream_rule[split]):
            image, label = part.read(i)
            np.testing.assert_array_equal(image, pil(bytes(by_index[index]["image"])))
            assert label == int(by_index[index]["label"]) == (0 if i < n else 1)


def test_tfds_not_prepared_and_offline_fails_fast(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(tfds_data, "tfds_reachable", lambda *a, **k: False)
    start = time.perf_counter()
    with pytest.raises(
        DataError, match="TFDS 'mnist' is not prepared and its download server cannot be reached"
    ):
        tfds_data.TfdsSource("mnist", "train", data_dir=tmp_path)
    with pytest.raises(DataError, match="TFDS 'mnist' is not prepared and downloading is off"):
        tfds_data.TfdsSource("mnist", "train", data_dir=tmp_path, download=False)
    with pytest.raises(DataError, match="TFDS has no dataset 'no_such_dataset'"):
        tfds_data.TfdsSource("no_such_dataset", "train", data_dir=tmp_path)
    assert time.perf_counter() - start < 30
    assert not any(tmp_path.iterdir())  # nothing downloaded, nothing prepared


# --- Choosing the input ---------------------------------------------------------------------------


def test_auto_keeps_memory_under_the_budget_and_streams_over_it():
    budget = (100 * 2**20, "test")
    assert choose_input("auto", 100 * 2**20, budget)[0] == "memory"
    choice, why = choose_input("auto", 100 * 2**20 + 1, budget)
    assert choice == "stream" and "exceed the 100 MiB budget" in why
    assert choose_input("memory", 10 * 2**30, budget)[0] == "memory"
    assert choose_input("stream", 1, budget)[0] == "stream"
    limit, rule = inputs.memory_budget(jax.devices("cpu"))
    assert 0 < limit <= 2 * 2**30 and "at most 2 GiB" in rule


def test_without_tensorflow_stream_is_one_clear_error_and_auto_is_memory(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # importing it now raises ImportError
    with pytest.raises(
        DataError, match=r"TensorFlow is not installed: pip install 'cnnjax\[tfds\]'"
    ):
        choose_input("stream", 1)
    choice, why = choose_input("auto", 10 * 2**30, (2**20, "test"))
    assert choice == "memory" and "streaming needs TensorFlow (pip install 'cnnjax[tfds]')" in why
    root = write_cats_dogs_folder(tmp_path / "data", {"train": 4, "validation": 2})
    spec = SimpleNamespace(
        dataset="cats_dogs",
        data_dir=str(root),
        image_size=SIZE,
        interpolation="nearest",
        input="stream",
    )
    with pytest.raises(
        DataError, match=r"TensorFlow is not installed: pip install 'cnnjax\[tfds\]'"
    ) as e:
        load(spec, ("train", "validation"))
    assert "\n" not in str(e.value)
    monkeypatch.setattr(inputs, "memory_budget", lambda: (1, "test"))
    spec.input = "auto"  # over the budget, but streaming needs TensorFlow: memory
    held = load(spec, ("train", "validation"))
    assert [type(d).__name__ for d in held.values()] == ["Images", "Images"]


def test_the_core_never_imports_tensorflow(tmp_path):
    root = write_cats_dogs_folder(tmp_path / "data", {"train": 4, "validation": 2})
    code = textwrap.dedent("""
        import sys
        import cnnjax.train, cnnjax.runs, cnnjax.data, cnnjax.data.tfds, cnnjax.ablation
        from types import SimpleNamespace
        from cnnjax.data import load
        spec = SimpleNamespace(
            dataset="cats_dogs", data_dir=sys.argv[1], image_size=8,
            interpolation="nearest", input="auto",
        )
        assert len(load(spec, ("train", "validation"))["train"]) == 4
        tf = ("tensorflow", "tensorflow_datasets")
        print(sorted(m for m in sys.modules if m.split(".")[0] in tf))
    """)
    out = subprocess.run(
        [sys.executable, "-c", code, str(root)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
