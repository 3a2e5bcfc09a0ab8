"""Reading a run's TensorBoard events back (tests only), with the
`tensorboard` package's own reader."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def read_events(logdir: str | os.PathLike) -> dict[str, Any]:
    """The events of one run folder (its own event files, not those of sub-folders).

    {"scalars": {tag: [(step, value), ...]}, "images": {tag: [(step, encoded bytes), ...]},
    "hparams": {name: value}, "finished": bool}. Events TensorBoard itself would hide are
    dropped the same way (a tag written again at an earlier step drops its later points).
    """
    from google.protobuf import json_format
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    logdir = Path(logdir)
    if not any(logdir.glob("*tfevents*")):
        raise FileNotFoundError(f"no event files in {logdir}")
    accumulator = event_accumulator.EventAccumulator(
        str(logdir), size_guidance=dict.fromkeys(event_accumulator.DEFAULT_SIZE_GUIDANCE, 0)
    )
    accumulator.Reload()
    tags = accumulator.Tags()
    scalars = {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in tags["scalars"]
    }
    images = {
        tag: [(event.step, event.encoded_image_string) for event in accumulator.Images(tag)]
        for tag in tags["images"]
    }
    try:
        hparams_content = accumulator.PluginTagToContent("hparams")
    except KeyError:
        hparams_content = {}
    hparams: dict[str, Any] = {}
    finished = False
    for content in hparams_content.values():
        plugin_data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if plugin_data.HasField("session_start_info"):
            hparams = {
                name: json_format.MessageToDict(value)
                for name, value in plugin_data.session_start_info.hparams.items()
            }
        if plugin_data.HasField("session_end_info"):
            finished = plugin_data.session_end_info.status == api_pb2.STATUS_SUCCESS
    return {"scalars": scalars, "images": images, "hparams": hparams, "finished": finished}
