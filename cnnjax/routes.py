"""Which implementation of an operation runs: each candidate timed once on this machine.

An operation with several implementations of the same sums (cnnjax.cpu_conv's convolution passes)
asks `choose` which to trace. Under the default policy, "measure", the first use of a shape
compiles every candidate, times them on random inputs of that shape and keeps the fastest;
the choice is remembered in memory and in a file under the user cache, one per CPU model,
core count, jax version and revision of cnnjax's code. The measuring happens while the caller
is being traced, so its cost is paid once per shape, at compile time, and a rerun on the same
machine takes the same routes (and so gives the same float sums). Why measure at all: which
implementation is fastest differs between CPUs of the same instruction set, and moves with
jaxlib.

`CNNJAX_CONV_ROUTES` (or `pinned`) sets the policy instead: "measure", or the name of a route
("xla", "matmul"), taken wherever an operation has it. Several processes joined by
jax.distributed never measure: each would time its own machine and might trace another program
than its peers, so they take the first candidate, the one an operation lists as its default.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from cnnjax import files
from cnnjax.data.common import cache_root, usable_cores

log = logging.getLogger(__name__)

POLICY_ENV = "CNNJAX_CONV_ROUTES"
FILE_ENV = "CNNJAX_ROUTES_FILE"  # where the choices are kept, instead of the user cache
MEASURE = "measure"
# A candidate replaces the default only when it is faster by more than this fraction: timing
# noise alone should not swap the route, and with it the float sums, from one machine to the next.
MARGIN = 0.05
_ROUNDS = 3  # interleaved rounds per candidate; the best round counts
_ROUND_SECONDS = 0.02  # calls per round: enough that one round lasts about this long

_pinned: list[str] = []  # innermost `pinned` policy last
_chosen: dict[str, str] = {}  # key -> route, this process
measure_seconds = 0.0  # spent measuring in this process: what the choice costs at start-up


def policy() -> str:
    """The policy in force: the innermost `pinned`, else $CNNJAX_CONV_ROUTES, else "measure"."""
    return _pinned[-1] if _pinned else os.environ.get(POLICY_ENV) or MEASURE


@contextlib.contextmanager
def pinned(route_policy: str) -> Iterator[None]:
    """Trace under another policy ("measure" or a route name); for tests and benchmarks.

    Only what is traced inside counts: a function jit already compiled keeps its routes."""
    _pinned.append(route_policy)
    try:
        yield
    finally:
        _pinned.pop()


def cpuinfo(field: str) -> str | None:
    """One field of the first CPU in /proc/cpuinfo ("model name", "flags"); None where absent."""
    with contextlib.suppress(OSError):
        found = re.search(rf"^{field}\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        return found.group(1).strip() if found else None
    return None


def machine() -> str:
    """The CPU model, the cores usable and the jax version: what choices hold for."""
    model = cpuinfo("model name") or platform.processor() or platform.machine()
    return f"{model}, {usable_cores()} cores, jax {jax.__version__}"


def slug(text: str) -> str:
    """text as a file name: each run of other characters than letters, digits and dots a dash."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


@functools.lru_cache(maxsize=4)
def code_revision(package: Path = Path(__file__).parent) -> str:
    """A digest of cnnjax's own sources: a choice holds for the routes' code it timed."""
    digest = hashlib.sha256()
    for source in sorted(package.rglob("*.py")):
        digest.update(source.relative_to(package).as_posix().encode() + source.read_bytes())
    return digest.hexdigest()[:12]


def cache_file() -> Path:
    """Where this machine's choices are kept (one JSON object, key -> route): $CNNJAX_ROUTES_FILE,
    else a file per machine and revision of cnnjax's code under the user cache."""
    if os.environ.get(FILE_ENV):
        return Path(os.environ[FILE_ENV])
    return cache_root() / "routes" / f"{slug(machine())}-{code_revision()}.json"


def choose(operation: str, candidates: Mapping[str, Callable], args: Sequence[Any]) -> str:
    """The route to trace for `operation` on arrays shaped like `args` (tracers are fine).

    candidates: route name -> function of args, the default first."""
    names = list(candidates)
    wanted = policy()
    if wanted != MEASURE:
        return wanted if wanted in candidates else names[0]
    if len(names) == 1 or jax.process_count() > 1:
        return names[0]
    shapes = [jax.ShapeDtypeStruct(np.shape(a), a.dtype) for a in args]
    key = f"{operation} " + " ".join(f"{s.dtype}{list(s.shape)}" for s in shapes)
    if key not in _chosen:
        stored = _read_cache().get(key)
        _chosen[key] = stored if stored in candidates else _measure(key, candidates, shapes)
    return _chosen[key]


def _measure(key: str, candidates: Mapping[str, Callable], shapes: list) -> str:
    """Time every candidate on random inputs of these shapes; keep the fastest and store it."""
    global measure_seconds
    start = time.perf_counter()
    best = _best_seconds(candidates, shapes)
    default = next(iter(candidates))
    fastest = min(best, key=best.get)
    route = fastest if best[fastest] < best[default] * (1 - MARGIN) else default
    measure_seconds += time.perf_counter() - start
    timings = ", ".join(f"{name} {t * 1e3:.2f} ms" for name, t in best.items())
    log.debug("%s: %s (%s)", key, route, timings)
    _write_cache(key, route)
    return route


def _best_seconds(candidates: Mapping[str, Callable], shapes: list) -> dict[str, float]:
    """Each candidate's best seconds per call over _ROUNDS interleaved rounds."""
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(s.shape).astype(s.dtype) for s in shapes]
    # A compiled executable runs at once even while the caller is being traced.
    compiled = {name: jax.jit(fn).lower(*shapes).compile() for name, fn in candidates.items()}
    seconds = {}
    for name, fn in compiled.items():
        once = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        seconds[name] = time.perf_counter() - once
    calls = {name: max(1, int(_ROUND_SECONDS / max(s, 1e-6))) for name, s in seconds.items()}
    best = dict.fromkeys(compiled, float("inf"))
    for _ in range(_ROUNDS):
        for name, fn in compiled.items():
            once = time.perf_counter()
            for _ in range(calls[name]):
                out = fn(*inputs)
            jax.block_until_ready(out)
            best[name] = min(best[name], (time.perf_counter() - once) / calls[name])
    return best


def _read_cache() -> dict[str, str]:
    """This machine's stored choices; a missing, unreadable or damaged file is no choices."""
    try:
        stored = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def _write_cache(key: str, route: str) -> None:
    """Add one choice to the file, atomically; where it cannot be written, memory holds it."""
    with contextlib.suppress(OSError):
        files.write_json(cache_file(), {**_read_cache(), key: route})


def chosen() -> dict[str, str]:
    """The routes this process has taken under "measure", key -> route."""
    return dict(_chosen)
