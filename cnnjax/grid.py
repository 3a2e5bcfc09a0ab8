"""A grid: the settings of one recipe that differ only in numbers, trained as the members of one
compiled program.

A member is one (setting, seed) pair. Its numbers (augmentation ranges and flips, dropout rate,
learning rate) are arrays in its training state: `TrainState.numbers` for the first two, the
optimizer state for the rate (optax.inject_hyperparams). Every member so runs the same compiled
step, vmapped on accelerators and in turn on the CPU (cnnjax.step.compile_steps), and draws what
its setting trained alone would draw: the same initial weights, epoch order, augmentation and
dropout for the same seed, so the settings stay paired by seed (tests/test_grid.py compares a
member with its setting alone).

Settings that differ in anything else (image size, model, optimizer, fill mode, schedule, ...)
change shapes or code: `groups` puts them in separate programs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax

from cnnjax import augment as augmentlib
from cnnjax import config as configlib
from cnnjax.config import Config

# The fields a member may have of its own; any other difference makes another program.
NUMBERS = (
    "augment.rotation_range",
    "augment.width_shift_range",
    "augment.height_shift_range",
    "augment.shear_range",
    "augment.zoom_range",
    "augment.horizontal_flip",
    "augment.vertical_flip",
    "model.dropout",
    "optim.learning_rate",
)


@dataclasses.dataclass(frozen=True)
class Member:
    """One member of a grid: its setting's name and recipe, with the member's seed."""

    setting: str
    cfg: Config

    @property
    def seed(self) -> int:
        return self.cfg.train.seed

    @property
    def label(self) -> str:
        """What its history files, figures and printed lines are named by."""
        return f"{self.setting}-seed{self.seed}"


def members(settings: Sequence[tuple[str, Config]]) -> list[Member]:
    """Every (setting, seed) pair: each setting's cfg.train.seeds seeds from cfg.train.seed, setting
    by setting."""
    return [
        Member(name, configlib.override(cfg, {"train.seed": seed, "train.seeds": 1}))
        for name, cfg in settings
        for seed in range(cfg.train.seed, cfg.train.seed + cfg.train.seeds)
    ]


def seeds_of(
    cfg: Config, grid: Sequence[Member] | None = None
) -> tuple[list[Config], list[str], list[str]]:
    """Per seed of a run of cfg (a grid's: per member), its own recipe, the label of its files
    (seed0, none-seed0) and its name in printed lines (seed 0, none seed 0)."""
    if grid:
        return (
            [m.cfg for m in grid],
            [m.label for m in grid],
            [f"{m.setting} seed {m.seed}" for m in grid],
        )
    one = members([("", cfg)])
    return [m.cfg for m in one], [f"seed{m.seed}" for m in one], [f"seed {m.seed}" for m in one]


def program_key(cfg: Config) -> tuple[tuple[str, Any], ...]:
    """What members of one program must share: every recipe field but the numbers, the name and
    the seeds."""
    own = {*NUMBERS, "train.seed", "train.seeds"}
    return tuple(
        (path, value)
        for path, value in configlib.flatten(cfg).items()
        if path not in own and configlib.field_meta(path)["recipe"]
    )


def groups(settings: Sequence[tuple[str, Config]]) -> list[list[str]]:
    """The settings' names, grouped into programs: those of equal `program_key`, in first-seen
    order."""
    by_key: dict[tuple, list[str]] = {}
    for name, cfg in settings:
        by_key.setdefault(program_key(cfg), []).append(name)
    return list(by_key.values())


def program_config(grid: Sequence[Member], name: str) -> Config:
    """The recipe the program is compiled from: the members' shared fields, with augmentation
    when any member augments (its fill mode and interpolation are every member's) and the model's
    Dropout layer when any member drops out. Each member's own numbers then come from its state."""
    first = grid[0].cfg
    augmenting = [m.cfg.augment for m in grid if not m.cfg.augment.is_identity]
    dropout = max(m.cfg.model.dropout for m in grid)
    return dataclasses.replace(
        first,
        name=name,
        augment=augmenting[0] if augmenting else first.augment,
        model=dataclasses.replace(first.model, dropout=dropout),
        train=dataclasses.replace(first.train, seeds=len(grid)),
    )


def member_numbers(grid: Sequence[Member], height: int, width: int) -> dict[str, np.ndarray]:
    """TrainState.numbers of every member, stacked: "augments" (bool), "bounds" (6, 2: augment.
    draw_bounds' lo and span per parameter), "flips" (2: horizontal, vertical), "dropout_keep"
    (1 - rate, in float64 then float32, as the model's own constant)."""
    return {
        "augments": np.array([not m.cfg.augment.is_identity for m in grid]),
        "bounds": np.array(
            [augmentlib.draw_bounds(m.cfg.augment, height, width) for m in grid], np.float32
        ),
        "flips": np.array(
            [(m.cfg.augment.horizontal_flip, m.cfg.augment.vertical_flip) for m in grid]
        ),
        "dropout_keep": np.array([1.0 - m.cfg.model.dropout for m in grid], np.float32),
    }


def with_numbers(state: Any, grid: Sequence[Member], height: int, width: int, sharding: Any) -> Any:
    """`state` (stacked over the members) with each member's numbers and learning rate."""
    rates = np.array([m.cfg.optim.learning_rate for m in grid], np.float32)
    numbers = jax.device_put(member_numbers(grid, height, width), sharding)
    opt_state = optax.tree_utils.tree_set(
        state.opt_state, learning_rate=jax.device_put(rates, sharding)
    )
    return state.replace(numbers=numbers, opt_state=opt_state)


def describe(grid: Sequence[Member]) -> list[dict[str, Any]]:
    """What a grid's checkpoints and config.json record of each member: setting, seed, numbers."""
    return [
        {
            "setting": m.setting,
            "seed": m.seed,
            **{path: configlib.flatten(m.cfg)[path] for path in NUMBERS},
        }
        for m in grid
    ]


def position(description: Mapping[str, Any], seed: int | None, setting: str | None = None) -> int:
    """Where a checkpoint's `description` holds `seed` (default: its first) of `setting` (a grid's
    members share seeds: there, seed alone names no member); ValueError saying why none."""
    members = description.get("members") or []
    settings = list(dict.fromkeys(m["setting"] for m in members))
    if setting is None and seed is not None and len(settings) > 1:
        raise ValueError(
            f"is an ablation grid: seed {seed} is one of each setting ({', '.join(settings)}); "
            "name one with --setting"
        )
    if setting is not None and setting not in settings:
        held = f"the settings {', '.join(settings)}" if settings else "no ablation grid's settings"
        raise ValueError(f"holds {held}; --setting {setting!r} is not one")
    seeds = list(description.get("seeds", [0]))
    if setting is not None:
        seeds = [m["seed"] if m["setting"] == setting else None for m in members]
        seed = next(s for s in seeds if s is not None) if seed is None else seed
    if seed is not None and seed not in seeds:
        held = ", ".join(str(s) for s in seeds if s is not None)
        of = f" of {setting}" if setting else ""
        raise ValueError(f"holds seed(s) {held}{of}; seed {seed} is not one of them")
    return 0 if seed is None else seeds.index(seed)
