"""Export one checkpoint of a run as parameters only, optionally in 16 bits: what checkpoints/
ships.

    python experiments/export_model.py RUN checkpoints/catsdogs-exp2 --dtype float16
    python experiments/export_model.py RUN OUT --which 100 --seed 1

OUT gets OUT/checkpoints/<epoch>/ (sealed like a run's, no optimizer state) with the run's
config, class names and histories in its description, and RUN's history.json, history.csv and
history.png beside it, so that every script takes OUT as it takes the run (the config keeps
no folder of this machine: data.data_dir and run.out are left empty). float16 and
bfloat16 halve the size; loading casts back to float32, so the model computes in float32 on
weights rounded once. Exit codes: 0 written, 2 bad input (no checkpoint, OUT not empty).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp

from cnnjax import checkpoint, config, flags, runs

DTYPES = ("float32", "float16", "bfloat16")


def main(argv: list[str] | None = None) -> Path:
    parser = flags.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run folder, RUN/checkpoints or RUN/checkpoints/<epoch>")
    parser.add_argument("out", help="the folder to create")
    parser.add_argument(
        "--which", default="best", help="best (by validation loss), latest or an epoch number"
    )
    flags.add_member_flags(parser)
    parser.add_argument(
        "--dtype",
        default="float16",
        choices=DTYPES,
        help="the precision the parameters are stored in",
    )
    args = parser.parse_args(argv)
    runs.setup_logging()
    with runs.exits():
        out = Path(args.out)
        if out.exists() and any(out.iterdir()):
            raise config.ConfigError(f"{out} is not empty; remove it or choose another folder")
        model, params, description = checkpoint.load_model(
            args.run, args.which, args.seed, setting=args.setting
        )
        k = checkpoint.seed_index(description, args.seed, args.run, args.setting)
        stored = jax.tree.map(lambda leaf: jnp.asarray(leaf, args.dtype), params)
        keep = {
            key: [description[key][k]]
            for key in ("histories", "best", "diverged")
            if key in description
        }
        if (
            "config" in description
        ):  # without this machine's folders: a reader gives its own --data-dir
            saved = description["config"]
            keep["config"] = {
                **saved,
                "data": {**saved["data"], "data_dir": None},
                "run": {**saved["run"], "out": None},
            }
        run = Path(description["path"]).parent.parent
        source = {
            "run": run.name,
            "seed": description.get("seeds", [0])[k],
        }  # a name, not this machine's path
        path = checkpoint.save_model(
            out,
            model,
            stored,
            description.get("class_names"),
            description["epoch"],
            extra={**keep, "dtype": args.dtype, "exported_from": source},
        )
        for name in ("history.json", "history.csv", "history.png"):
            if (run / name).is_file():
                shutil.copy2(run / name, out / name)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"Wrote {path} (epoch {description['epoch']}, {args.dtype}, {size / 2**20:.1f} MiB)")
    return path


if __name__ == "__main__":
    runs.run_as_script(main)
