"""The command line over a config: a `--section.field VALUE` flag for every field, the short
aliases users type (`ALIASES`), and an argparse whose errors are one line.

    parser = flags.ArgumentParser(description="...")
    flags.add_flags(parser, config.catsdogs())
    cfg = config.override(config.catsdogs(), flags.overrides_from_args(parser.parse_args()))
"""

from __future__ import annotations

import argparse
import difflib
import sys
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from cnnjax import config as configlib
from cnnjax.config import SECTIONS, Config

# The short flags users type, each an alias of one field.
ALIASES = {
    "--epochs": "train.epochs",
    "--batch-size": "train.batch_size",
    "--learning-rate": "optim.learning_rate",
    "--seed": "train.seed",
    "--seeds": "train.seeds",
    "--image-size": "data.image_size",
    "--data-dir": "data.data_dir",
    "--input": "data.input",
    "--out": "run.out",
    "--resume": "run.resume",
    "--rotation-range": "augment.rotation_range",
    "--width-shift-range": "augment.width_shift_range",
    "--height-shift-range": "augment.height_shift_range",
    "--shear-range": "augment.shear_range",
    "--zoom-range": "augment.zoom_range",
    "--horizontal-flip": "augment.horizontal_flip",
    "--fill-mode": "augment.fill_mode",
}


def add_member_flags(parser: argparse.ArgumentParser) -> None:
    """--seed and --setting: which model of a run that trained several (seeds, or a grid)."""
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="which seed of a run that trained several (default: its first)",
    )
    parser.add_argument(
        "--setting",
        default=None,
        help="in an ablation grid's run (OUT/grid-*), which setting's model (default: the first)",
    )


def add_flags(
    parser: argparse.ArgumentParser,
    defaults: Config,
    sections: Sequence[str] = SECTIONS,
    fixed: Sequence[str] = (),
    other_defaults: Mapping[str, Config] = (),
) -> None:
    """A --section.field flag (and its ALIASES) for every field of `sections` but `fixed`.
    `--help` shows each default once, and where `other_defaults` ({"experiment 2": cfg}) differ.
    A boolean takes yes/no or nothing (--resume, --no-resume). Absent flags stay absent:
    `overrides_from_args` sees only what was typed."""
    usable = [p for p in configlib.paths() if p.split(".")[0] in sections and p not in fixed]
    flat, others = (
        configlib.flatten(defaults),
        {label: configlib.flatten(cfg) for label, cfg in dict(other_defaults).items()},
    )
    short = {path: flag for flag, path in ALIASES.items()}
    fields = parser.add_argument_group(
        "config fields (--section.field VALUE; flax's --config.section.field=VALUE works too)"
    )
    for path in usable:
        meta = configlib.field_meta(path)
        choices = f" {{{', '.join(map(str, meta['choices']))}}}" if meta["choices"] else ""
        shown = f"default: {flat[path]!r}" + "".join(
            f"; {k}: {v[path]!r}" for k, v in others.items() if v[path] != flat[path]
        )
        alias = f"; short: {short[path]}" if path in short else ""
        _add(fields, f"--{path}", path, f"{meta['help']}{choices} [{shown}{alias}]")
    for path in (p for p in usable if p in short):  # listed in their field's help
        _add(fields, short[path], f"alias:{path}", argparse.SUPPRESS)


def _add(group: Any, flag: str, dest: str, help: str) -> None:
    if configlib.field_type(dest.removeprefix("alias:")) is bool:
        group.add_argument(
            flag,
            dest=dest,
            nargs="?",
            const="true",
            default=argparse.SUPPRESS,
            metavar="yes|no",
            help=help,
        )
        group.add_argument(
            f"--no-{flag[2:]}",
            dest=dest,
            action="store_const",
            const="false",
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
        )
    else:
        group.add_argument(flag, dest=dest, default=argparse.SUPPRESS, metavar="VALUE", help=help)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """{"section.field": value} for every flag given; a field given twice (short and full) is an
    error."""
    fields = set(configlib.paths())  # read now: a section class may have been extended
    overrides: dict[str, Any] = {}
    for dest, value in vars(args).items():
        path = dest.removeprefix("alias:")
        if path not in fields:
            continue
        if path in overrides and overrides[path] != value:
            raise configlib.ConfigError(
                f"{path} given twice ({overrides[path]!r} and {value!r}); give it once"
            )
        overrides[path] = value
    return overrides


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2), a suggestion for a misspelt flag, and flax's
    --config.PATH=VALUE spelling of --PATH VALUE."""

    def __init__(self, *args: Any, **kwargs: Any):
        # --augment must never be read as --augment.rotation_range
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("usage", "%(prog)s [flags] (--help lists every flag with its default)")
        super().__init__(*args, **kwargs)

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: Any = None
    ) -> Any:
        argv = [
            a.replace("--config.", "--", 1) if a.startswith("--config.") else a
            for a in (sys.argv[1:] if args is None else args)
        ]
        parsed, unknown = self.parse_known_args(argv, namespace)
        if unknown:
            flag = next((u.split("=")[0] for u in unknown if u.startswith("-")), unknown[0])
            options = [
                o
                for action in self._actions
                for o in action.option_strings
                if not o.startswith("--no-")
            ]
            typed = flag.lstrip("-").replace("-", "_")
            by_name = [
                o for o in options if o.lstrip("-").split(".")[-1].replace("-", "_") == typed
            ]
            near = by_name or difflib.get_close_matches(flag, options, n=1, cutoff=0.75)
            self.error(
                f"unknown flag {flag}" + (f"; did you mean {' or '.join(near)}?" if near else "")
            )
        return parsed

    def error(self, message: str) -> typing.NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        raise SystemExit(2)
