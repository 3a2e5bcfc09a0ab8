"""Where a run computes: one device mesh with a `seed` axis and a `data` axis, on one or many hosts.

Train states are stacked over seeds (leading axis K, K=1 for a single run) and sharded over `seed`;
every batch is sharded over `data`; the dataset held in memory is replicated. The train step is
written for one seed and the global batch: jit's shardings, not `if` branches, decide how it spreads
(big_vision's way; no pmap). Many hosts join through jax.distributed (`initialize`); every process
then sees the global device list, builds the same mesh, and places only its own part of each array.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import math
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cnnjax.data.common import first_line, usable_cores

log = logging.getLogger(__name__)

SEED, DATA = "seed", "data"


# --- Processes ------------------------------------------------------------------------------------


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The arguments of jax.distributed.initialize, for runs over several processes or hosts."""
    group = parser.add_argument_group("several processes / hosts (jax.distributed)")
    group.add_argument(
        "--coordinator-address",
        metavar="HOST:PORT",
        help="process 0's address, the same for every process (jax uses PORT, cnnjax PORT+1)",
    )
    group.add_argument("--num-processes", type=int, metavar="N", help="how many processes join")
    group.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0..N-1")
    group.add_argument(
        "--join-timeout",
        type=float,
        default=120,
        metavar="S",
        help="seconds to wait for every process to start (default: %(default)s)",
    )


# Cluster environments that jax.distributed.initialize() reads by itself, and the variable that
# gives their process count.
CLUSTERS = {"SLURM": "SLURM_NTASKS", "Open MPI": "OMPI_COMM_WORLD_SIZE"}


def cluster_detected() -> str | None:
    """The cluster environment (SLURM, Open MPI) that launched this process among several, if any. A
    single task (srun --ntasks=1) is not joined: jax.distributed would give it one GPU of the node,
    not all of them."""
    for name, variable in CLUSTERS.items():
        if int(os.environ.get(variable, "1") or "1") > 1:
            return name
    return None


class JoinError(Exception):
    """The processes of a run could not meet (a wrong address, port or process count, or a process
    that never came)."""


# A process of a run of several stopped because another one did (killed, crashed, lost its host):
# the run folder keeps every finished epoch, so all processes can start again with --resume.
EXIT_LOST = 5


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    join_timeout: float = 120,
) -> None:
    """Join the other processes of this run, or do nothing for a single process.

    With the three arguments, every process first meets process 0 on PORT+1 (`_meet`), so that a
    process that never starts is one JoinError within `join_timeout`, not a hang. With none, jax
    joins by itself only where a cluster environment is detected. Call it before anything else
    touches jax (jax.distributed refuses to join once a backend has started); calling it again does
    nothing.

    When a process dies, the others stop instead of waiting for it: `_watch` (its `_meet` connection
    closed) or `exit_on_error` (a collective lost its peer) ends them at once with one line,
    EXIT_LOST.
    """
    # the scripts join before checking their config, and execute() asks again
    if jax.distributed.is_initialized():
        return
    given = [a is not None for a in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError(
            "--coordinator-address, --num-processes and --process-id go together: "
            "give all three or none"
        )
    if not any(given) and cluster_detected() is None:
        return
    links: list[socket.socket] = []
    if all(given):
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(
                f"--process-id must be in 0..{num_processes - 1} and --num-processes >= 1"
            )
        if ":" not in coordinator_address or not coordinator_address.rsplit(":", 1)[1].isdigit():
            raise ValueError(
                f"--coordinator-address must be HOST:PORT, got {coordinator_address!r}"
            )
        links = _meet(coordinator_address, num_processes, process_id, join_timeout)
    # collectives on the CPU go through gloo
    if not jax.config.jax_platforms or "cpu" in jax.config.jax_platforms:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # shutdown_timeout_seconds: how long a process that leaves with an error of its own waits for
    # the others
    try:
        jax.distributed.initialize(
            coordinator_address,
            num_processes,
            process_id,
            initialization_timeout=int(join_timeout),
            heartbeat_timeout_seconds=30,
            shutdown_timeout_seconds=60,
        )
    # jax raises bare RuntimeErrors / XLA errors: one line says what failed
    except Exception as e:  # noqa: BLE001
        where = coordinator_address or "the address the cluster environment gives"
        raise JoinError(f"could not join the other processes at {where}: {first_line(e)}") from None
    _watch(links)


def _meet(address: str, count: int, index: int, timeout: float) -> list[socket.socket]:
    """Every process connects to process 0 on PORT+1 and waits for its "go", sent once all have
    come; the connections stay open for `_watch`. JoinError, naming who is missing, after `timeout`
    seconds."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    late = (
        f"within {timeout:g} s (--join-timeout); start every process with the same "
        "--coordinator-address and --num-processes"
    )
    if index == 0:
        peers: dict[int, socket.socket] = {}
        with socket.create_server(("", int(port) + 1)) as server:
            server.settimeout(0.5)
            while len(peers) < count - 1:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(1, count)) - set(peers))
                    names = ", ".join(map(str, missing))
                    raise JoinError(f"process(es) {names} did not join at {address} {late}")
                # no one yet, or a connection that did not say its index
                with contextlib.suppress(OSError, ValueError):
                    conn, _ = server.accept()
                    conn.settimeout(10)
                    peers[int(conn.recv(16).decode().strip())] = conn
        for conn in peers.values():
            conn.sendall(b"go\n")
            conn.settimeout(None)  # _watch waits on it for as long as the run lasts
        return list(peers.values())
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):  # process 0 not listening yet
            conn = socket.create_connection((host, int(port) + 1), timeout=2)
            conn.sendall(f"{index}\n".encode())
            conn.settimeout(max(1.0, deadline - time.monotonic()))
            if conn.recv(3) == b"go\n":
                conn.settimeout(None)
                return [conn]
        time.sleep(0.5)
    raise JoinError(f"process 0 did not gather the processes at {host}:{int(port) + 1} {late}")


def _watch(links: list[socket.socket]) -> None:
    """A daemon thread per connection of `_meet`: when the process at the other end is gone without
    saying goodbye (killed, crashed, lost its host), this one ends at once (`_lost`). A process that
    leaves normally says goodbye on its way out (atexit), so its peers do not mistake it for a
    loss."""

    def watch(conn: socket.socket) -> None:
        try:
            said = conn.recv(16)
        except OSError:
            said = b""
        if not said.startswith(b"bye"):
            parting = "no goodbye" if not said else said.decode(errors="replace")
            _lost(f"the connection to another process closed ({parting})")

    for conn in links:
        threading.Thread(target=watch, args=(conn,), daemon=True, name="cnnjax-peer-watch").start()
        atexit.register(_say_bye, conn)


def _say_bye(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(b"bye\n")


# What must happen before a process that lost its peers leaves (the run folder lets go of its lock).
before_leaving: list[Callable[[], None]] = []


# Held by the first thread that leaves: a peer's watch thread and the main thread (its collective
# failing) can both find the loss at once, and the process says it in one line.
_leaving = threading.Lock()


def _lost(why: str) -> None:
    _leaving.acquire()  # a second caller waits here until the first one's os._exit
    where = f"process {jax.process_index()} of {jax.process_count()}"
    for cleanup in list(before_leaving):
        # leaving anyway: one cleanup failing must not stop the others
        with contextlib.suppress(Exception):
            cleanup()
    try:
        sys.stdout.flush()
        print(
            f"error: {where} lost contact with the other processes of this run ({why}); "
            "another process stopped, see "
            "its log. Every finished epoch is kept: start all processes again with --resume",
            file=sys.stderr,
            flush=True,
        )
    finally:
        os._exit(EXIT_LOST)


_PEER_MARKERS = (
    "gloo",
    "coordination service",
    "heartbeat",
    "connection reset",
    "connection closed",
    "socket closed",
    "deadline_exceeded",
    "unavailable",
    "barrier",
)


def lost_contact(error: BaseException) -> bool:
    """Whether an error says that another process of the run is gone (rather than a bug here)."""
    return any(marker in str(error).lower() for marker in _PEER_MARKERS)


def exit_on_error(error: BaseException) -> None:
    """End a process of a run of several at once (os._exit) on an error it cannot carry on from: the
    normal exit would first wait at jax's shutdown barrier for processes blocked in a collective
    waiting for this one. A lost peer is one line, EXIT_LOST; anything else keeps its traceback
    (exit 1). Single process: nothing."""
    if jax.process_count() == 1:
        return
    if lost_contact(error):
        _lost(first_line(error))
    traceback.print_exception(error)
    try:
        sys.stdout.flush()
        print(
            f"error: process {jax.process_index()} of {jax.process_count()} stopped: "
            f"{type(error).__name__}: {first_line(error)}",
            file=sys.stderr,
            flush=True,
        )
    finally:
        os._exit(1)


def from_process_0(message: str | None, size: int = 4096) -> str | None:
    """Process 0's `message` (None: nothing to say) on every process, e.g. its refusal of the run
    folder, so the others stop with the same words instead of waiting for it. A sync point."""
    if jax.process_count() == 1:
        return message
    from jax.experimental import multihost_utils

    buffer = np.zeros(size, np.uint8)
    if message is not None:
        encoded = message.encode()[: size - 1]
        buffer[0] = 1
        buffer[1 : 1 + len(encoded)] = np.frombuffer(encoded, np.uint8)
    shared = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    return bytes(shared[1:]).rstrip(b"\0").decode(errors="replace") if shared[0] else None


def is_main_process() -> bool:
    """Process 0 alone writes the run folder, logs and plots."""
    return jax.process_index() == 0


# --- The mesh -------------------------------------------------------------------------------------


def make_mesh(num_seeds: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Axes (seed, data) over all devices: the seed axis is as large as both K and the device
    count allow (their greatest common divisor), the rest of the devices split the batch."""
    devices = list(jax.devices() if devices is None else devices)
    seed_size = math.gcd(num_seeds, len(devices))
    grid = np.array(devices, dtype=object).reshape(seed_size, len(devices) // seed_size)
    return Mesh(grid, (SEED, DATA))


def seeds_in_turn(mesh: Mesh) -> bool:
    """Whether several seeds take turns through the one-seed program (cnnjax.step.compile_steps)
    rather than run batched (vmap): on the CPU, where the batched step measured slower than the
    seeds in turn, and only where one device block holds every seed (a seed axis over several
    devices is vmapped, each device its own seeds)."""
    return mesh.devices.flat[0].platform == "cpu" and mesh.shape[SEED] == 1


def seeds_at_once(mesh: Mesh, num_seeds: int) -> int:
    """How many seeds taking turns (`seeds_in_turn`) run side by side: one per usable core, on a
    mesh of one device in one process. A program over several devices or processes runs alone:
    side by side, two programs' collectives could meet in different orders on different devices."""
    if mesh.devices.size > 1 or jax.process_count() > 1:
        return 1
    return min(num_seeds, usable_cores())


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
    return (
        f"devices: {d['count']} x {d['platform']} ({d['kind']}), {d['processes']} process(es), "
        f"mesh seed={d['mesh'][SEED]} x data={d['mesh'][DATA]}"
    )


def check_batch(mesh: Mesh, batch_size: int, what: str = "train.batch_size") -> None:
    data = mesh.shape[DATA]
    if batch_size % data:
        raise ValueError(
            f"{what} {batch_size} cannot be split over the {data} devices of the data axis; "
            f"use a multiple of {data}"
        )


def sharding(mesh: Mesh, *spec: str | None) -> NamedSharding:
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def local_block(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The block of a global array of `shape` that this process's devices hold under `sharding`, one
    slice per axis (the whole array in a single process). Raises when the block is not
    contiguous."""
    pieces = {
        tuple(s.indices(n)[:2] for s, n in zip(index, shape))
        for index in sharding.addressable_devices_indices_map(shape).values()
    }
    block = tuple(
        slice(min(p[d][0] for p in pieces), max(p[d][1] for p in pieces)) for d in range(len(shape))
    )
    if math.prod(b.stop - b.start for b in block) != sum(
        math.prod(hi - lo for lo, hi in p) for p in pieces
    ):
        raise ValueError(
            f"this process's devices hold a non-contiguous part of a {shape} batch; "
            "use a mesh whose processes each hold whole blocks"
        )
    return block


def put_local(local: np.ndarray, target: NamedSharding) -> jax.Array:
    """This process's block of a global array (local_block) placed with `target`: the global array
    has the block's shape scaled by how many blocks each sharded axis is cut into across
    processes."""
    if jax.process_count() == 1:
        return jax.device_put(local, target)
    return jax.make_array_from_process_local_data(target, local)


def put(array: Any, target: NamedSharding) -> jax.Array:
    """A host array (the same on every process) placed with `target`; each process fills only its
    devices."""
    array = np.asarray(array)
    if jax.process_count() == 1:
        return jax.device_put(array, target)
    return jax.make_array_from_callback(array.shape, target, lambda index: array[index])


def to_host(tree: Any) -> Any:
    """Device arrays back as numpy, whole, on every process (a gather across processes where
    needed)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(
        lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)), tree
    )
