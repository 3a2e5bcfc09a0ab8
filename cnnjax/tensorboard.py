"""TensorBoard logs, as users of Keras's TensorBoard callback expect them, without TensorFlow.

Writing uses tensorboardX (a core dependency, pure Python and protobuf); reading back,
for tests and scripts, uses the `tensorboard` package (`pip install tensorboard`, in the
`dev` extra). Importing this module imports neither TensorFlow nor `tensorboard`.

One run is one folder (`logdir`), holding event files and nothing else that TensorBoard
would take for another run:

- `log_config` writes the run's resolved configuration, flattened to "section.field"
  keys, as TensorBoard hparams *into the run's own folder* (tensorboardX's `add_hparams`
  would make a timestamped sub-run instead). The HParams tab then shows one row per run,
  its configuration beside its final metrics.
- `log_epoch` writes one scalar per metric at step = epoch (1-based), tags
  "epoch/loss", "epoch/accuracy", "epoch/val_loss", "epoch/val_accuracy",
  "epoch/learning_rate". None, NaN and infinite values are skipped (a gap in the curve,
  as strict JSON's null in history.json). Keras's callback writes the same curves as
  "epoch_loss" in two runs, `train/` and `validation/`; here training and validation
  stay in one run, so that one run is one training (one row of hparams, one folder per
  seed or setting) and the "val_" prefix says which is which, as it does in Keras's
  history and in cnnjax's history.json. Scalars are stored as float32, as Keras stores
  them.
- `log_image` (an array) and `log_png` (a file such as history.png or preview.png,
  its bytes stored unchanged) fill the Images tab.

Each call is on disk when it returns (each logger writes its own event file itself, with
tensorboardX's event writer; see `TensorBoardLogger`). `read_events(logdir)` reads one run
back: scalars, images and hparams.

Several runs side by side (seeds, ablation settings) are several logdirs under one
parent, e.g. `RUNS/seed0`, `RUNS/seed1`, `RUNS/flip/seed0`: `tensorboard --logdir RUNS`
overlays their curves and lists them together in the HParams tab, named by their paths
under RUNS.

In a multi-process (multi-host) JAX job, create and call the logger on process 0 only::

    logger = TensorBoardLogger(out) if jax.process_index() == 0 else None
    ...
    if logger:
        logger.log_epoch(row)  # once per epoch, the same row that goes into history.json

and `close()` it at the end (or use it as a context manager): only then does the
HParams tab mark the run as finished.
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.summary import hparams as hparams_summaries
from tensorboardX.summary import scalar as scalar_summary

HParam = bool | float | int | str

# history row key -> scalar tag
METRICS: dict[str, str] = {
    "loss": "epoch/loss",
    "accuracy": "epoch/accuracy",
    "val_loss": "epoch/val_loss",
    "val_accuracy": "epoch/val_accuracy",
    "learning_rate": "epoch/learning_rate",
}


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, HParam]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 0.001}: the keys TensorBoard's hparams show.

    Booleans, numbers and strings stay as they are (numpy scalars become Python ones);
    anything else (None, lists, paths) is written as its `str`, since hparams hold only
    booleans, numbers and strings.
    """
    flat: dict[str, HParam] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{name}."))
            continue
        if isinstance(value, np.generic):
            value = value.item()
        flat[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def _finite(value: Any) -> float | None:
    """value as a float, or None where it is None, NaN or infinite."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _uint8_image(image: Any) -> np.ndarray:
    """HxW or HxWxC (C in 1, 3, 4), uint8 or float in 0..1, as HxWxC uint8 (floats clipped and rounded)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"an image is HxW or HxWxC with C in 1, 3, 4; got shape {image.shape}")
    if np.issubdtype(image.dtype, np.floating):
        return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    if image.dtype == np.uint8:
        return image
    raise TypeError(f"an image is uint8 (0..255) or float (0..1); got {image.dtype}")


def _image_summary(tag: str, encoded: bytes, width: int, height: int, channels: int) -> Summary:
    image = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=encoded)
    return Summary(value=[Summary.Value(tag=tag, image=image)])


class TensorBoardLogger:
    """Writes one run's TensorBoard events into `logdir` (created if needed); see the module docstring.

    Every call writes its events to disk before it returns (one event file per logger,
    written synchronously: tensorboardX's SummaryWriter writes from a background thread
    whose `flush` does not wait for queued events, so an epoch could be missing from disk
    after it was logged). Several loggers may write into one folder (a resumed run): each
    gets its own event file.
    """

    def __init__(self, logdir: str | os.PathLike) -> None:
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        # events.out.tfevents.SECONDS.HOST.NANOSECONDS-PID: two loggers in one folder within one second get two
        # files, and TensorBoard (which reads a run's files in name order) reads them in the order they were opened
        self._events: EventsWriter | None = EventsWriter(str(self.logdir / "events"), f".{time.time_ns()}-{os.getpid()}")
        self._session_end: Summary | None = None  # written by close() once log_config has run

    def _write(self, summary: Summary, step: int | None = None) -> None:
        if self._events is None:
            raise RuntimeError(f"TensorBoardLogger({str(self.logdir)!r}) is closed")
        event = Event(wall_time=time.time(), summary=summary)
        if step is not None:
            event.step = int(step)
        self._events.write_event(event)

    def log_config(self, config: Mapping[str, Any]) -> dict[str, HParam]:
        """Write the run's configuration (a nested dict) as hparams of this run; returns the flattened dict.

        Integers are shown (and read back) as floats: TensorBoard's hparams have one number type.
        Only the session's start (and, at `close`, its end) is written, not tensorboardX's
        experiment summary: TensorBoard reads that from one run only, the first it finds, so
        with it in every run the HParams tab would show the first run's keys alone. Without
        it TensorBoard lists every key of every run and takes the metrics from the runs' scalars.
        """
        flat = flatten_config(config)
        _experiment, session_start, session_end = hparams_summaries(flat, {})
        self._write(session_start)
        self._session_end = session_end
        self.flush()
        return flat

    def log_epoch(self, row: Mapping[str, Any]) -> dict[str, float]:
        """One history row: scalars at step = row["epoch"] (1-based); returns {tag: value} as written.

        Keys other than "epoch" and those of `METRICS` (e.g. "seconds", "diverged") are
        ignored; None / NaN / infinite values are skipped.
        """
        epoch = int(row["epoch"])
        written = {}
        for key, tag in METRICS.items():
            value = _finite(row.get(key))
            if value is not None:
                self._write(scalar_summary(tag, value), epoch)
                written[tag] = value
        self.flush()
        return written

    def log_image(self, tag: str, image: Any, step: int) -> None:
        """An image array, HxW or HxWxC (C in 1, 3, 4), uint8 or float in 0..1, under `tag` at `step` (stored as PNG)."""
        from PIL import Image

        pixels = _uint8_image(image)
        buffer = io.BytesIO()
        Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, format="PNG")
        height, width, channels = pixels.shape
        self._write(_image_summary(tag, buffer.getvalue(), width, height, channels), step)
        self.flush()

    def log_png(self, tag: str, path: str | os.PathLike, step: int) -> None:
        """An image file (PNG; any format browsers show) under `tag` at `step`, its bytes unchanged."""
        from PIL import Image

        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            width, height, channels = image.width, image.height, len(image.getbands())
        self._write(_image_summary(tag, data, width, height, channels), step)
        self.flush()

    def flush(self) -> None:
        """Push what was written to the operating system (every log_* call ends with one)."""
        if self._events is not None:
            self._events.flush()

    def close(self, finished: bool = True) -> None:
        """Flush and close; with `finished` (and a config logged) the HParams tab shows the run as finished.

        Closing twice is harmless; logging after closing raises RuntimeError.
        """
        if self._events is None:
            return
        if finished and self._session_end is not None:
            self._write(self._session_end)
        self._events.close()
        self._events = None

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close(finished=exc_type is None)


def read_events(logdir: str | os.PathLike) -> dict[str, Any]:
    """The events of one run folder (its own event files, not those of sub-folders), read back.

    Returns {"scalars": {tag: [(step, value), ...]}, "images": {tag: [(step, encoded bytes), ...]},
    "hparams": {name: value}, "finished": bool (the run was closed as finished)}, steps in
    the order written. Needs the `tensorboard` package.
    Events that TensorBoard itself would hide are dropped the same way (a tag written again
    at an earlier step, as by a resumed run, drops that tag's later points).
    """
    try:
        from tensorboard.backend.event_processing import event_accumulator
        from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
    except ImportError as error:
        raise ImportError(f"reading TensorBoard events needs the tensorboard package: pip install tensorboard ({error})") from error
    from google.protobuf import json_format

    logdir = Path(logdir)
    if not logdir.is_dir():
        raise FileNotFoundError(f"no run folder at {logdir}")
    if not any(logdir.glob("*tfevents*")):
        runs = sorted({str(path.parent.relative_to(logdir)) for path in logdir.rglob("*tfevents*")})
        raise FileNotFoundError(f"no event files in {logdir}" + (f"; its sub-folders hold runs: {', '.join(runs)}" if runs else ""))
    accumulator = event_accumulator.EventAccumulator(str(logdir), size_guidance=dict.fromkeys(event_accumulator.DEFAULT_SIZE_GUIDANCE, 0))
    accumulator.Reload()
    tags = accumulator.Tags()
    scalars = {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in tags["scalars"]}
    images = {tag: [(event.step, event.encoded_image_string) for event in accumulator.Images(tag)] for tag in tags["images"]}
    try:
        hparams_content = accumulator.PluginTagToContent("hparams")
    except KeyError:  # no hparams written
        hparams_content = {}
    hparams: dict[str, Any] = {}
    finished = False
    for content in hparams_content.values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            hparams = {name: json_format.MessageToDict(value) for name, value in data.session_start_info.hparams.items()}
        if data.HasField("session_end_info"):
            finished = data.session_end_info.status == api_pb2.STATUS_SUCCESS
    return {"scalars": scalars, "images": images, "hparams": hparams, "finished": finished}
