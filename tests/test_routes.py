"""cnnjax.routes: each candidate timed once per shape and machine, the fastest kept, remembered."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import ops, routes


def _slow(x):
    """The same value as `_fast`, after many matrix products that add nothing."""
    y = x
    for _ in range(40):
        y = y @ jnp.eye(x.shape[-1], dtype=x.dtype)
    return y + 1


def _fast(x):
    return x + 1


CANDIDATES = {"default": _slow, "fast": _fast}


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    """Each test starts with nothing chosen in this process and its own cache folder
    (conftest's per-test CNNJAX_CACHE_DIR), under the default policy."""
    monkeypatch.setattr(routes, "_chosen", {})
    monkeypatch.delenv(routes.POLICY_ENV, raising=False)
    monkeypatch.delenv(routes.FILE_ENV, raising=False)


def _choose(shape=(64, 64), candidates=CANDIDATES):
    return routes.choose("test_op", candidates, [jax.ShapeDtypeStruct(shape, jnp.float32)])


def test_the_measurably_faster_route_is_chosen_and_kept_in_the_machines_file():
    assert _choose() == "fast"
    stored = json.loads(routes.cache_file().read_text())
    assert stored == {"test_op float32[64, 64]": "fast"}
    assert routes.chosen() == stored


def test_choices_are_kept_per_revision_of_the_code(tmp_path):
    """A choice timed for one version of the routes is not taken by another: the machine's file
    is named by a digest of cnnjax's sources, which any edit changes."""
    package = tmp_path / "package"
    (package / "sub").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    (package / "sub" / "b.py").write_text("y = 2\n")
    before = routes.code_revision(package)
    (package / "sub" / "b.py").write_text("y = 3\n")
    routes.code_revision.cache_clear()
    assert routes.code_revision(package) != before
    assert routes.code_revision() in routes.cache_file().name


def test_the_routes_file_can_be_named(tmp_path, monkeypatch):
    monkeypatch.setenv(routes.FILE_ENV, str(tmp_path / "mine.json"))
    assert _choose() == "fast"
    assert json.loads((tmp_path / "mine.json").read_text()) == {"test_op float32[64, 64]": "fast"}


@pytest.mark.parametrize(("other_seconds", "chosen"), [(0.97, "default"), (0.9, "other")])
def test_a_route_no_faster_than_the_margin_leaves_the_default(monkeypatch, other_seconds, chosen):
    """Timings made up, not measured: two runs of one function differ by more than 5% on a busy
    machine."""
    timings = {"default": 1.0, "other": other_seconds}
    monkeypatch.setattr(routes, "_best_seconds", lambda candidates, shapes: timings)
    assert _choose(candidates={"default": _fast, "other": _fast}) == chosen


def test_a_stored_choice_is_taken_without_measuring(monkeypatch):
    routes.cache_file().parent.mkdir(parents=True)
    routes.cache_file().write_text(json.dumps({"test_op float32[64, 64]": "default"}))

    def fail(*args):
        raise AssertionError("measured although the choice was stored")

    monkeypatch.setattr(routes, "_measure", fail)
    assert _choose() == "default"


@pytest.mark.parametrize(
    "content", ["{not json", '["a list"]', '{"test_op float32[64, 64]": "gone"}']
)
def test_a_damaged_or_stale_file_is_measured_again_and_rewritten(content):
    routes.cache_file().parent.mkdir(parents=True)
    routes.cache_file().write_text(content)
    assert _choose() == "fast"
    assert json.loads(routes.cache_file().read_text())["test_op float32[64, 64]"] == "fast"


def test_an_unwritable_cache_still_chooses(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("CNNJAX_CACHE_DIR", str(blocker / "cache"))  # under a file: not creatable
    assert _choose() == "fast"
    assert _choose() == "fast"  # from memory


def test_each_shape_is_measured_once(monkeypatch):
    measured = []
    real = routes._measure
    monkeypatch.setattr(routes, "_measure", lambda key, *a: measured.append(key) or real(key, *a))
    for shape in [(64, 64), (32, 64), (64, 64), (32, 64)]:
        _choose(shape)
    assert measured == ["test_op float32[64, 64]", "test_op float32[32, 64]"]


def test_the_policy_pins_a_route_without_measuring(monkeypatch):
    monkeypatch.setattr(routes, "_measure", None)  # calling it would fail
    monkeypatch.setenv(routes.POLICY_ENV, "default")
    assert _choose() == "default"
    with routes.pinned("fast"):
        assert _choose() == "fast"
    with routes.pinned("a route this operation lacks"):
        assert _choose() == "default"


def test_several_processes_take_the_default_without_measuring(monkeypatch):
    monkeypatch.setattr(routes, "_measure", None)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert _choose() == "default"


def test_a_jitted_model_step_measures_at_trace_time_and_runs_the_chosen_route():
    """Through conv2d_nhwc, as the models call it: the choice is made while tracing, each pass
    once, and the first layer's input gradient (the data needs none) is never traced."""
    if jax.default_backend() != "cpu":
        pytest.skip("off the CPU conv2d_nhwc is plain lax: nothing to choose")  # never in CI
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 10, 10, 3)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
    grad = jax.jit(jax.grad(lambda k: jnp.sum(ops.conv2d_nhwc(x, k) ** 2)))
    expected = jax.grad(lambda k: jnp.sum(ops._lax_conv(x, k) ** 2))(kernel)
    # float32 sums of a few hundred terms: the tolerance scales with the gradient's size
    atol = 1e-5 * float(jnp.max(jnp.abs(expected)))
    np.testing.assert_allclose(grad(kernel), expected, rtol=1e-5, atol=atol)
    assert sorted(key.split()[0] for key in routes.chosen()) == [
        "conv_forward",
        "conv_kernel_grad",
    ]
    assert set(routes.chosen().values()) <= {"xla", "matmul"}
