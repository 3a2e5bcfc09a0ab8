"""Where a run computes: one device mesh with a `seed` axis and a `data` axis, on one or many hosts.

Train states are stacked over seeds (leading axis K, K=1 for a single run) and sharded
over `seed`; every batch is sharded over `data`; the dataset held in memory is
replicated. The train step is written for one seed and the global batch: jit's
shardings, not `if` branches, decide how it spreads (big_vision's way; no pmap).

Many hosts join through jax.distributed (`initialize`); every process then sees the
global device list, builds the same mesh, and places only its own part of each array.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

SEED, DATA = "seed", "data"


# --- Processes --------------------------------------------------------------------------------------


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The arguments of jax.distributed.initialize, for runs over several processes or hosts."""
    group = parser.add_argument_group("several processes / hosts (jax.distributed)")
    group.add_argument("--coordinator-address", metavar="HOST:PORT", help="process 0's address, the same for every process")
    group.add_argument("--num-processes", type=int, metavar="N", help="how many processes join")
    group.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0..N-1")


def cluster_detected() -> str | None:
    """The name of a cluster environment jax.distributed can read by itself (SLURM, Open MPI, ...), if any."""
    try:
        from jax._src import clusters  # private: the same detection jax.distributed.initialize() runs
    except ImportError:  # pragma: no cover - a jax without it: fall back to the environment
        clusters = None
    if clusters is not None:
        for env in getattr(clusters.ClusterEnv, "_cluster_types", []):
            try:
                if env.is_env_present() and env.__name__ not in ("GceTpuCluster", "GkeTpuCluster"):
                    return env.__name__
            except Exception:  # noqa: BLE001 - a detector that fails means "not this cluster"
                continue
        return None
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "SlurmCluster"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "OmpiCluster"
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               heartbeat_timeout_seconds: int = 30) -> None:
    """Join the other processes of this run, or do nothing for a single process.

    With the three arguments, jax.distributed.initialize(...) with them; with none, the
    no-argument call only where a cluster environment is detected (SLURM, Open MPI, ...),
    else nothing. On the CPU the collectives go through gloo. A process that dies makes
    the others fail within about `heartbeat_timeout_seconds` instead of waiting forever.
    """
    given = [a is not None for a in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("--coordinator-address, --num-processes and --process-id go together: give all three or none")
    if not any(given) and cluster_detected() is None:
        return
    if all(given):
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id must be in 0..{num_processes - 1} and --num-processes >= 1")
        if ":" not in coordinator_address:
            raise ValueError(f"--coordinator-address must be HOST:PORT, got {coordinator_address!r}")
    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {"heartbeat_timeout_seconds": heartbeat_timeout_seconds, "initialization_timeout": 120}
    if all(given):
        kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**kwargs)


def is_main_process() -> bool:
    """Process 0 alone writes the run folder, logs and plots."""
    return jax.process_index() == 0


# --- The mesh ---------------------------------------------------------------------------------------


def make_mesh(num_seeds: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Axes (seed, data) over all devices: the seed axis is as large as both K and the device
    count allow (their greatest common divisor), the rest of the devices split the batch."""
    devices = list(jax.devices() if devices is None else devices)
    seed_size = math.gcd(num_seeds, len(devices))
    grid = np.array(devices, dtype=object).reshape(seed_size, len(devices) // seed_size)
    return Mesh(grid, (SEED, DATA))


def describe(mesh: Mesh) -> dict[str, Any]:
    """What config.json records under "devices"."""
    device = mesh.devices.flat[0]
    return {
        "platform": device.platform,
        "kind": getattr(device, "device_kind", device.platform),
        "count": int(mesh.devices.size),
        "processes": jax.process_count(),
        "mesh": {SEED: int(mesh.shape[SEED]), DATA: int(mesh.shape[DATA])},
    }


def summary_line(mesh: Mesh) -> str:
    d = describe(mesh)
    return (f"devices: {d['count']} x {d['platform']} ({d['kind']}), {d['processes']} process(es), "
            f"mesh seed={d['mesh'][SEED]} x data={d['mesh'][DATA]}")


def check_batch(mesh: Mesh, batch_size: int, what: str = "train.batch_size") -> None:
    data = mesh.shape[DATA]
    if batch_size % data:
        raise ValueError(f"{what} {batch_size} cannot be split over the {data} devices of the data axis; "
                         f"use a multiple of {data}")


def sharding(mesh: Mesh, *spec: str | None) -> NamedSharding:
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put(array: Any, target: NamedSharding) -> jax.Array:
    """A host array (the same on every process) placed with `target`; each process fills only its devices."""
    array = np.asarray(array)
    if jax.process_count() == 1:
        return jax.device_put(array, target)
    return jax.make_array_from_callback(array.shape, target, lambda index: array[index])


def to_host(tree: Any) -> Any:
    """Device arrays back as numpy, whole, on every process (a gather across processes where needed)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)), tree)
