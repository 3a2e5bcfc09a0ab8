"""A grid's members: each one trains as its setting alone does with its seed (cnnjax.grid)."""

import dataclasses

import numpy as np
import pytest

from cnnjax import ablation, config, data, grid, train
from tests import test_ablation
from tests.conftest import tiny_cats_dogs

CLASSES = ["cats", "dogs"]
BASE = dataclasses.replace(
    config.override(test_ablation.BASE, {"run.tensorboard": False}), name="grid"
)
# Every number a member may have of its own, each away from the base recipe in some setting.
SETTINGS = [
    ablation.Setting.of("none"),
    ablation.Setting.of("flip", {"augment.horizontal_flip": True}),
    ablation.Setting.of(
        "lecture+dropout",
        {
            **{
                f"augment.{k}": v
                for k, v in dataclasses.asdict(config.AUGMENT_PRESETS["lecture"]).items()
            },
            "model.dropout": 0.3,
        },
    ),
    ablation.Setting.of("lr", {"optim.learning_rate": 3e-4, "augment.zoom_range": 0.2}),
]


@pytest.fixture(scope="module")
def splits():
    return {
        "train": data.Images(*tiny_cats_dogs(24), CLASSES),
        "validation": data.Images(*tiny_cats_dogs(10, 1), CLASSES),
    }


def _close(member: list[dict], alone: list[dict], examples: int) -> None:
    """Losses within 2e-4 relative, accuracies within one example."""
    assert len(member) == len(alone)
    for a, b in zip(member, alone):
        for key in ("loss", "val_loss"):
            np.testing.assert_allclose(a[key], b[key], rtol=2e-4)
        assert abs(a["accuracy"] - b["accuracy"]) * 24 <= 1 + 1e-9
        assert abs(a["val_accuracy"] - b["val_accuracy"]) * examples <= 1 + 1e-9


def test_each_member_trains_as_its_setting_alone(splits, tmp_path):
    named = [(s.name, ablation.setting_config(BASE, s)) for s in SETTINGS]
    assert grid.groups(named) == [[s.name for s in SETTINGS]]  # numbers only: one program
    members = grid.members(named)
    assert [(m.setting, m.seed) for m in members[:3]] == [("none", 0), ("none", 1), ("flip", 0)]
    program = grid.program_config(members, "grid")
    together = train.train_and_evaluate(
        program, tmp_path / "grid", splits, verbose=False, grid=members
    )
    by_member = dict(zip([(m.setting, m.seed) for m in members], together.histories))
    for name, cfg in named:
        alone = train.train_and_evaluate(cfg, tmp_path / name, splits, verbose=False)
        for seed, history in zip(alone.seeds, alone.histories):
            _close(by_member[name, seed], history, len(splits["validation"]))


def test_settings_that_change_code_or_shapes_are_programs_of_their_own(splits, tmp_path):
    settings = [
        *SETTINGS[:2],
        ablation.Setting.of(
            "sharp", {"augment.interpolation": "nearest", "augment.zoom_range": 0.2}
        ),
        ablation.Setting.of("rmsprop", {"optim.name": "rmsprop"}),
        ablation.Setting.of(
            "sharp-flip", {"augment.interpolation": "nearest", "augment.horizontal_flip": True}
        ),
    ]
    named = [(s.name, ablation.setting_config(BASE, s)) for s in settings]
    assert grid.groups(named) == [["none", "flip"], ["sharp", "sharp-flip"], ["rmsprop"]]
    base = config.override(BASE, {"train.epochs": 1})
    results = ablation.run_ablation(settings, base, splits, None, tmp_path, "grid", verbose=False)
    assert [r["status"] for r in results] == ["ok"] * 5 and all(
        r["mode"] == "grid" for r in results
    )
    assert len(list(tmp_path.glob("grid-*/checkpoints"))) == 3  # one program, one run, per group
    assert {r["grid"] for r in results[:2]} != {r["grid"] for r in results[2:3]}
