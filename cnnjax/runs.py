"""What every experiment script shares: flags from a config dataclass, the run folder.

A config is a frozen dataclass whose defaults are the lecture's recipe; every field is
a flag (`--batch-size 32`), and the resolved config is written into the run folder.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import time
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")


def _flag_type(annotation: Any):
    # Fields are annotated as "int", "float | None", ... (postponed annotations).
    hint = annotation if not isinstance(annotation, str) else eval(annotation, vars(typing), {})  # noqa: S307
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = args[0]
    return hint


def config_parser(config_cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one --flag per field of `config_cls` (bools become --flag/--no-flag)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for field in dataclasses.fields(config_cls):
        flag = "--" + field.name.replace("_", "-")
        kind = _flag_type(field.type)
        extra = {k: field.metadata[k] for k in ("nargs", "const", "choices") if k in field.metadata}
        help_text = field.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=field.default, help=help_text, **extra)
    return parser


def parse_config(config_cls: type[C], argv: Sequence[str] | None = None, description: str | None = None) -> C:
    return config_cls(**vars(config_parser(config_cls, description).parse_args(argv)))


def default_out(name: str, seed: int) -> Path:
    return Path("checkpoints") / f"{name}-seed{seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def write_history(history: Sequence[dict[str, Any]], folder: str | os.PathLike) -> None:
    """history.json and history.csv, one row per epoch."""
    folder = Path(folder)
    write_json(folder / "history.json", list(history))
    columns = list(dict.fromkeys(key for row in history for key in row))
    tmp = folder / f".history.csv.tmp-{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, folder / "history.csv")


def prepare_out(out: str | os.PathLike | None, name: str, seed: int) -> Path:
    """The run folder: --out when given, else checkpoints/NAME-seedN-TIME; created."""
    folder = Path(out) if out else default_out(name, seed)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
