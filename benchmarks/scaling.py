"""Training steps per second against the device count, one recipe, the same global batch.

    python benchmarks/scaling.py [--devices 1,2,4] [--recipe mnist|catsdogs1|catsdogs2]
        [--image-size N] [--steps 40] [--json FILE]

The device count is fixed when jax starts, so each count runs in its own process: with
XLA_FLAGS=--xla_force_host_platform_device_count=N on a CPU-only machine (N CPU "devices"),
on the first N accelerators otherwise (a count the machine lacks is skipped). Each
process builds the recipe's training (cnnjax.config; the loop's compiled steps and feeding,
cnnjax.train's internals; random uint8 images: speed does not depend on the values) on a
mesh over its N devices, trains one epoch of --steps steps to compile, then the same epoch
again, timed. Prints steps per second, the time per step
relative to one device (the overhead; below 1 is a speedup) and the epoch's loss, which
must agree across counts (the same numbers on any device count).

On the CPU, forced devices share the same cores: the figures show that the sharded
program computes the same thing and what splitting it costs, not a speedup.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the repository, for benchmarks.common
from benchmarks.common import write_json  # noqa: E402

HERE = Path(__file__).resolve()


def worker(count: int, name: str, image_size: int | None, steps: int) -> dict:
    """In a process of its own: one epoch of `steps` steps on the first `count` devices."""
    import jax

    from benchmarks.common import epoch_twice, random_data, recipe, training

    if jax.device_count() < count:
        return {
            "devices": count,
            "skipped": f"this machine has {jax.device_count()} {jax.default_backend()} device(s)",
        }
    cfg = recipe(name, {"data.image_size": image_size} if image_size else {})
    batch = cfg.train.batch_size
    run = training(cfg, random_data(cfg, steps * batch), devices=jax.devices()[:count])
    seconds, metrics = epoch_twice(run)
    loss = metrics[0]["loss"]
    kind = getattr(jax.devices()[0], "device_kind", jax.default_backend())
    return {
        "devices": count,
        "mesh": dict(run.mesh.shape),
        "jax": jax.__version__,
        "platform": jax.default_backend(),
        "kind": kind,
        "steps": steps,
        "batch_size": batch,
        "steps_per_s": steps / seconds[-1],
        "first_epoch_s": seconds[0],
        "epoch_s": seconds[-1],
        "loss": loss,
    }


def run_counts(
    counts: list[int], name: str, image_size: int | None, steps: int, timeout: float = 900
) -> list[dict]:
    """worker() for each count in a fresh process; a failed or timed-out count is reported, not
    fatal."""
    rows = []
    for count in counts:
        flags = os.environ.get("XLA_FLAGS", "")
        env = {
            **os.environ,
            "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={count}".strip(),
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(HERE.parents[1]), os.environ.get("PYTHONPATH")])
            ),
        }
        cmd = [
            sys.executable,
            str(HERE),
            "--worker",
            str(count),
            "--recipe",
            name,
            "--steps",
            str(steps),
        ]
        if image_size:
            cmd += ["--image-size", str(image_size)]
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            rows.append({"devices": count, "skipped": f"no result within {timeout:.0f} s"})
            continue
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["?"])[-1]
            rows.append({"devices": count, "skipped": f"exit {done.returncode}: {last[:300]}"})
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = next((r for r in rows if r["devices"] == 1 and "steps_per_s" in r), None)
    for row in rows:
        if base is not None and "steps_per_s" in row:
            row["time_vs_1_device"] = base["steps_per_s"] / row["steps_per_s"]
            row["loss_diff_vs_1_device"] = abs(row["loss"] - base["loss"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="1,2,4", help="comma-separated device counts")
    parser.add_argument("--recipe", default="mnist", choices=("mnist", "catsdogs1", "catsdogs2"))
    parser.add_argument(
        "--image-size", type=int, default=None, help="cats vs dogs only (default: the recipe's 150)"
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.recipe, args.image_size, args.steps)))
        return
    rows = run_counts(
        [int(c) for c in args.devices.split(",")], args.recipe, args.image_size, args.steps
    )
    done = [r for r in rows if "steps_per_s" in r]
    if done:
        first = done[0]
        print(
            f"jax {first['jax']}, {first['platform']} ({first['kind']}); {args.recipe}, "
            f"global batch {first['batch_size']}, {args.steps} steps"
        )
    print(f"{'devices':>7}  {'mesh':>18}  {'steps/s':>8}  {'time / 1 device':>15}  {'loss':>10}")
    for row in rows:
        if "steps_per_s" not in row:
            print(f"{row['devices']:>7}  skipped: {row['skipped']}")
            continue
        mesh = f"seed={row['mesh']['seed']} x data={row['mesh']['data']}"
        ratio = f"{row['time_vs_1_device']:.2f}x" if "time_vs_1_device" in row else "n/a"
        print(
            f"{row['devices']:>7}  {mesh:>18}  {row['steps_per_s']:8.2f}  "
            f"{ratio:>15}  {row['loss']:10.6f}"
        )
    if done and done[0]["platform"] == "cpu":
        print(
            "CPU: forced devices share the same cores, so these ratios are the cost of splitting "
            "the batch, not a speedup."
        )
    write_json(args.json, {"recipe": args.recipe, "steps": args.steps, "rows": rows})


if __name__ == "__main__":
    main()
