"""Augmentation: the affine core equals scipy.ndimage / Keras, and the random
draws have the documented laws.

Tolerance rule for the comparisons with scipy and Keras: values must agree within 1e-4
(images in [0, 1]) at every pixel, except where scipy's sampling is discontinuous and
float32 (here) vs float64 (scipy) coordinates may legitimately fall on different sides:
for order 0 (rounding ties), and for the ``constant`` border and the ``wrap`` seam with
order 1, a pixel is exempt when one of its float64 source coordinates lies within 5e-4 of
a multiple of 1/2. Those are the only places the sampling jumps (ties at half-integers,
borders and seams at integers); fewer than 1% of pixels may be exempt, so the test stays
a real one. ``nearest`` and ``reflect`` with order 1 are continuous and have no exemption.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from cnnjax import augment
from cnnjax.augment import AugmentConfig

# Keras's legacy module calls scipy through a deprecated namespace; that is not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Please import `affine_transform`:DeprecationWarning"
)

MODES = ("nearest", "constant", "reflect", "wrap")
KEYS = ("theta", "tx", "ty", "shear", "zx", "zy")

affine = augment.affine_transform  # jitted, with fill_mode and order static


def reference_matrix(theta, tx, ty, shear, zx, zy, h, w):
    """Keras's matrix in float64, built as apply_affine_transform does but about the true centre.

    Returns (2x2 matrix, offset) acting on (row, col), for scipy.ndimage.affine_transform.
    """
    t, s = np.deg2rad(theta), np.deg2rad(shear)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    shift = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
    shr = np.array([[1, -np.sin(s), 0], [0, np.cos(s), 0], [0, 0, 1]])
    zoom = np.array([[zx, 0, 0], [0, zy, 0], [0, 0, 1]])
    m = rot @ shift @ shr @ zoom  # in (x = col, y = row)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    m = (
        np.array([[1, 0, cx], [0, 1, cy], [0, 0, 1]])
        @ m
        @ np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]])
    )
    perm = np.array(
        [[0, 1, 0], [1, 0, 0], [0, 0, 1]]
    )  # to (row, col), as Keras swaps for channels-last
    m = perm @ m @ perm
    return m[:2, :2], m[:2, 2]


def scipy_reference(x, params, mode, cval, order):
    """Per image and channel scipy.ndimage.affine_transform, plus the exemption mask."""
    n, h, w, c = x.shape
    out = np.empty(x.shape, np.float64)
    exempt = np.zeros((n, h, w), bool)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for i in range(n):
        mat, off = reference_matrix(*(float(params[k][i]) for k in KEYS), h, w)
        for ch in range(c):
            out[i, ..., ch] = scipy.ndimage.affine_transform(
                x[i, ..., ch].astype(np.float64), mat, off, order=order, mode=mode, cval=cval
            )
        if order == 0 or mode in ("constant", "wrap"):
            src = np.einsum("ij,jhw->ihw", mat, np.stack([rows, cols])) + off[:, None, None]
            near_jump = np.abs(src * 2 - np.round(src * 2)) < 1e-3
            exempt[i] = near_jump.any(axis=0)
    return out, exempt


def random_params(rng, n, *, extreme=False):
    # "extreme" sends coordinates several image sizes out, to exercise multi-period folding.
    zoom = (0.3, 3.0) if extreme else (0.5, 1.5)
    shift = 30.0 if extreme else 5.0
    return {
        "theta": rng.uniform(-180, 180, n),
        "tx": rng.uniform(-shift, shift, n),
        "ty": rng.uniform(-shift, shift, n),
        "shear": rng.uniform(-40, 40, n),
        "zx": rng.uniform(*zoom, n),
        "zy": rng.uniform(*zoom, n),
    }


def run_ours(x, params, mode, cval, order):
    args = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    return np.asarray(affine(jnp.asarray(x), **args, fill_mode=mode, cval=cval, order=order))


def assert_agrees(ours, ref, exempt, tol=1e-4):
    assert exempt.mean() < 0.01, (
        f"too many exempt pixels ({exempt.mean():.2%}): the test would be weak"
    )
    bad = (np.abs(ours - ref) > tol).any(axis=-1) & ~exempt
    assert not bad.any(), (
        f"{bad.sum()} pixels differ by > {tol}; worst {np.abs(ours - ref)[bad].max():.3g}"
    )


# --- The core against scipy.ndimage -----------------------------------------------------


@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(17, 17), (13, 19)])
def test_affine_matches_scipy(mode, order, shape):
    rng = np.random.default_rng(zlib.crc32(repr((mode, order, shape)).encode()))
    h, w = shape
    x = rng.uniform(0, 1, (8, h, w, 3)).astype(np.float32)
    for extreme in (False, True):
        params = random_params(rng, len(x), extreme=extreme)
        ref, exempt = scipy_reference(x, params, mode, 0.25, order)
        assert_agrees(run_ours(x, params, mode, 0.25, order), ref, exempt)


def test_exemption_rule_is_rarely_used():
    # Order 0 with the lecture's fill mode: almost every pixel must be compared exactly.
    rng = np.random.default_rng(7)
    x = rng.uniform(0, 1, (16, 20, 20, 1)).astype(np.float32)
    params = random_params(rng, len(x))
    ref, exempt = scipy_reference(x, params, "nearest", 0.0, 0)
    ours = run_ours(x, params, "nearest", 0.0, 0)
    assert exempt.mean() < 0.005
    np.testing.assert_array_equal(ours[~exempt], ref[~exempt].astype(np.float32))


@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("mode", MODES)
def test_identity_params_give_the_input_back(mode, order):
    x = np.random.default_rng(1).uniform(0, 255, (3, 9, 14, 2)).astype(np.float32)
    ident = {"theta": 0.0, "tx": 0.0, "ty": 0.0, "shear": 0.0, "zx": 1.0, "zy": 1.0}
    out = affine(jnp.asarray(x), **ident, fill_mode=mode, cval=-1.0, order=order)
    np.testing.assert_array_equal(np.asarray(out), x)


def test_rotation_by_180_about_the_true_centre_of_a_non_square_image():
    x = np.random.default_rng(2).uniform(0, 1, (2, 7, 12, 3)).astype(np.float32)
    # (nearest fill: float32 sin(pi) is not 0, so border pixels sample a hair outside the image.)
    out = affine(
        jnp.asarray(x), 180.0, 0.0, 0.0, 0.0, 1.0, 1.0, fill_mode="nearest", cval=0.0, order=1
    )
    np.testing.assert_allclose(np.asarray(out), x[:, ::-1, ::-1], atol=1e-4)


def test_known_directions():
    # A single bright pixel in a 5x5 image (centre (2, 2)): where each parameter sends it.
    x = np.zeros((1, 5, 5, 1), np.float32)
    x[0, 1, 2, 0] = 1.0  # one row above the centre

    def moved(**kw):
        p = {"theta": 0.0, "tx": 0.0, "ty": 0.0, "shear": 0.0, "zx": 1.0, "zy": 1.0} | kw
        out = np.asarray(affine(jnp.asarray(x), **p, fill_mode="constant", cval=0.0, order=0))
        return [tuple(int(v) for v in rc) for rc in np.argwhere(out[0, ..., 0] > 0.5)]

    assert moved(tx=1.0) == [(1, 1)]  # tx samples one column to the right: content moves left
    assert moved(ty=-1.0) == [(2, 2)]  # ty samples one row up: content moves down
    assert moved(theta=90.0) == [(2, 1)]  # above the centre -> left of it: counter-clockwise
    assert moved(zy=0.5) == [
        (0, 2)
    ]  # zy < 1 samples nearer the centre: content moves away (zoom in)


# --- Against Keras's own implementation ---------------------------------------------------


@pytest.fixture(scope="module")
def keras_image():
    try:
        from keras.src.legacy.preprocessing import image
    except ImportError:  # Keras 2 layout
        from keras.preprocessing import image
    return image


@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("mode", MODES)
def test_affine_matches_keras_on_square_images(keras_image, mode, order):
    rng = np.random.default_rng(zlib.crc32(repr((mode, order, "keras")).encode()))
    x = rng.uniform(0, 1, (8, 16, 16, 3)).astype(np.float32)
    params = random_params(rng, len(x), extreme=mode in ("reflect", "wrap"))
    ref = np.stack(
        [
            keras_image.apply_affine_transform(
                x[i].astype(np.float64),
                *(float(params[k][i]) for k in KEYS),
                row_axis=0,
                col_axis=1,
                channel_axis=2,
                fill_mode=mode,
                cval=0.5,
                order=order,
            )
            for i in range(len(x))
        ]
    )
    # Keras's result is exactly scipy's with our reference matrix (square: same centre) ...
    ref_scipy, exempt = scipy_reference(x, params, mode, 0.5, order)
    np.testing.assert_allclose(ref, ref_scipy, atol=1e-12)
    # ... so we agree with Keras under the same tolerance rule.
    assert_agrees(run_ours(x, params, mode, 0.5, order), ref, exempt)


def test_keras_misplaces_the_centre_of_non_square_images(keras_image):
    # The documented difference: Keras's 180 degree turn of a 7 x 12 image is not a flip.
    x = np.random.default_rng(3).uniform(0, 1, (7, 12, 1))
    k = keras_image.apply_affine_transform(
        x, theta=180, row_axis=0, col_axis=1, channel_axis=2, fill_mode="constant"
    )
    assert np.abs(k - x[::-1, ::-1]).max() > 0.5


def test_keras_generator_draws_horizontal_shift_from_height_range(keras_image):
    # The other documented difference: Keras's "height" shift is a column (tx) shift.
    gen = keras_image.ImageDataGenerator(height_shift_range=0.1)
    state = np.random.get_state()  # a seed here reseeds numpy's global generator
    try:
        t = gen.get_random_transform((150, 150, 3), seed=0)
    finally:
        np.random.set_state(state)
    assert t["tx"] != 0 and t["ty"] == 0


# --- Random parameters ----------------------------------------------------------------


def test_sample_params_laws():
    cfg = AugmentConfig(
        rotation_range=40,
        width_shift_range=0.1,
        # 0.1 x 200 = 20 px across, 0.3 x 100 = 30 px down: a swapped range or size shows
        height_shift_range=0.3,
        shear_range=10,
        zoom_range=0.5,
        horizontal_flip=True,
        vertical_flip=True,
    )
    n = 20_000
    p = jax.tree.map(np.asarray, augment.sample_params(jax.random.PRNGKey(0), cfg, n, 100, 200))
    assert set(p) == {*KEYS, "flip", "vflip"} and all(v.shape == (n,) for v in p.values())

    def uniform(v, lo, hi):
        assert lo <= v.min() and v.max() <= hi
        assert v.min() < lo + 0.01 * (hi - lo) and v.max() > hi - 0.01 * (
            hi - lo
        )  # fills the range
        mean, var = (lo + hi) / 2, (hi - lo) ** 2 / 12
        assert abs(v.mean() - mean) < 4 * np.sqrt(var / n)
        assert abs(v.var() / var - 1) < 0.04

    uniform(p["theta"], -40, 40)
    uniform(p["tx"], -20, 20)  # width_shift_range x width (200)
    uniform(p["ty"], -30, 30)  # height_shift_range x height (100)
    uniform(p["shear"], -10, 10)  # degrees
    uniform(p["zx"], 0.5, 1.5)
    uniform(p["zy"], 0.5, 1.5)
    assert abs(np.corrcoef(p["zx"], p["zy"])[0, 1]) < 0.04  # drawn independently
    assert abs(np.corrcoef(p["theta"], p["shear"])[0, 1]) < 0.04
    for flip in (p["flip"], p["vflip"]):
        assert flip.dtype == bool and abs(flip.mean() - 0.5) < 0.02
    assert abs(np.corrcoef(p["flip"], p["vflip"])[0, 1]) < 0.04


def test_sample_params_units_and_unused_ranges():
    key = jax.random.PRNGKey(1)
    # Shift ranges >= 1 are pixels, not fractions.
    p = augment.sample_params(key, AugmentConfig(width_shift_range=3.0), 5000, 50, 80)
    assert 2.9 < float(jnp.abs(p["tx"]).max()) <= 3.0
    # Ranges that are zero give exact identity values, and a (lo, hi) zoom pair is honoured.
    p = augment.sample_params(key, AugmentConfig(zoom_range=(0.8, 1.0)), 1000, 50, 80)
    for k in ("theta", "tx", "ty", "shear"):
        assert not np.any(np.asarray(p[k]))
    assert not np.any(np.asarray(p["flip"])) and not np.any(np.asarray(p["vflip"]))
    assert 0.8 <= float(p["zx"].min()) and float(p["zy"].max()) <= 1.0


def test_width_shift_moves_images_horizontally():
    rows = np.broadcast_to(np.arange(30, dtype=np.float32)[:, None, None], (30, 40, 1))
    cols = np.broadcast_to(np.arange(40, dtype=np.float32)[None, :, None], (30, 40, 1))
    x = jnp.asarray(np.stack([rows, cols] * 4))  # 8 images: even ones vary by row, odd by column
    wide = augment.random_augment(jax.random.PRNGKey(0), x, AugmentConfig(width_shift_range=0.2))
    tall = augment.random_augment(jax.random.PRNGKey(0), x, AugmentConfig(height_shift_range=0.2))
    # A horizontal shift leaves a row-only pattern alone and moves a
    # column-only one; and vice versa.
    np.testing.assert_allclose(wide[0::2], x[0::2], atol=1e-5)
    assert float(jnp.abs(wide[1::2] - x[1::2]).max()) > 1
    np.testing.assert_allclose(tall[1::2], x[1::2], atol=1e-5)
    assert float(jnp.abs(tall[0::2] - x[0::2]).max()) > 1


def test_flips_happen_after_the_transform_about_half_the_time():
    x = jnp.asarray(np.random.default_rng(4).uniform(0, 255, (64, 6, 9, 3)).astype(np.float32))
    out = np.asarray(
        augment.random_augment(jax.random.PRNGKey(5), x, AugmentConfig(horizontal_flip=True))
    )
    same = np.all(out == np.asarray(x), axis=(1, 2, 3))
    flipped = np.all(out == np.asarray(x)[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same ^ flipped) and 16 < flipped.sum() < 48
    out = np.asarray(
        augment.random_augment(jax.random.PRNGKey(5), x, AugmentConfig(vertical_flip=True))
    )
    same = np.all(out == np.asarray(x), axis=(1, 2, 3))
    flipped = np.all(out == np.asarray(x)[:, ::-1], axis=(1, 2, 3))
    assert np.all(same ^ flipped) and 16 < flipped.sum() < 48
    # With a transform too: the output is the transformed image, mirrored.
    cfg = AugmentConfig(rotation_range=30, horizontal_flip=True, fill_mode="reflect")
    key = jax.random.PRNGKey(6)
    p = augment.sample_params(key, cfg, 64, 6, 9)
    plain = np.asarray(affine(x, *(p[k] for k in KEYS), fill_mode="reflect", cval=0.0, order=1))
    want = np.where(np.asarray(p["flip"])[:, None, None, None], plain[:, :, ::-1], plain)
    np.testing.assert_allclose(np.asarray(augment.random_augment(key, x, cfg)), want, atol=1e-3)


# --- jit, vmap, the training-step hook ------------------------------------------------


def test_jit_vmap_and_determinism():
    x = jnp.asarray(np.random.default_rng(8).uniform(0, 255, (4, 20, 20, 3)).astype(np.float32))
    cfg = AugmentConfig.LECTURE
    jitted = functools.partial(augment.random_augment, config=cfg)  # jitted, config static
    a = jitted(jax.random.PRNGKey(0), x)
    np.testing.assert_array_equal(a, jitted(jax.random.PRNGKey(0), x))
    assert float(jnp.abs(a - jitted(jax.random.PRNGKey(1), x)).max()) > 1
    assert a.shape == x.shape and a.dtype == jnp.float32
    assert float(a.min()) >= 0 and float(a.max()) <= 255  # bilinear + nearest fill stays in range

    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    batched = jax.vmap(lambda k: augment.random_augment(k, x, cfg))(keys)
    for i in range(3):
        np.testing.assert_allclose(batched[i], augment.random_augment(keys[i], x, cfg), atol=1e-3)

    theta = jnp.asarray([[10.0, -20.0, 30.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    f = functools.partial(
        augment.affine_transform, tx=1.5, ty=-2.0, shear=3.0, zx=1.1, zy=0.9, fill_mode="wrap"
    )
    stacked = jax.jit(jax.vmap(lambda t: f(x, t)))(theta)
    for i in range(2):
        np.testing.assert_allclose(stacked[i], f(x, theta[i]), atol=1e-3)


def test_preprocess_augments_on_the_0_255_scale_then_rescales():
    from cnnjax import step

    images = jnp.asarray(np.random.default_rng(9).integers(0, 256, (5, 24, 24, 3)).astype(np.uint8))
    rng = jax.random.PRNGKey(0)
    out = jax.jit(step.preprocess, static_argnums=2)(images, rng, AugmentConfig.LECTURE)
    assert out.shape == images.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(
        out,
        augment.random_augment(rng, images.astype(jnp.float32), AugmentConfig.LECTURE) / 255.0,
        atol=1e-6,
    )
    np.testing.assert_array_equal(
        step.preprocess(images, rng, AugmentConfig()), images / 255.0
    )  # identity: nothing drawn
    np.testing.assert_array_equal(step.preprocess(images), images / 255.0)


def test_lecture_configs():
    lec, pre = AugmentConfig.LECTURE, AugmentConfig.LECTURE_PREVIEW
    assert (lec.rotation_range, lec.width_shift_range, lec.height_shift_range) == (40, 0.1, 0.1)
    assert (lec.shear_range, lec.zoom_bounds, lec.horizontal_flip, lec.fill_mode) == (
        0.4,
        (0.5, 1.5),
        True,
        "nearest",
    )
    assert (pre.rotation_range, pre.shear_range, pre.zoom_range, pre.horizontal_flip) == (
        30,
        0.2,
        0.5,
        True,
    )
    assert (
        not lec.is_identity
        and AugmentConfig().is_identity
        and AugmentConfig(zoom_range=(1, 1)).is_identity
    )
    assert hash(AugmentConfig(zoom_range=[0.9, 1.1])) == hash(AugmentConfig(zoom_range=(0.9, 1.1)))


def test_identity_is_every_drawn_field_at_its_default_a_new_field_included():
    """How to sample (fill_mode, cval, interpolation) draws nothing; every other field
    does, one added to AugmentConfig too (the README's "where to change what": it must not
    be skipped as the identity)."""
    sampling_only = AugmentConfig(
        fill_mode="constant", cval=7.0, interpolation="nearest", zoom_range=(1.0, 1.0)
    )
    assert sampling_only.is_identity
    for name, value in [
        ("rotation_range", 1),
        ("width_shift_range", 0.1),
        ("height_shift_range", 2),
        ("shear_range", 1),
        ("zoom_range", 0.1),
        ("zoom_range", (1.0, 1.2)),
        ("horizontal_flip", True),
        ("vertical_flip", True),
    ]:
        assert not AugmentConfig(**{name: value}).is_identity, name

    @dataclasses.dataclass(frozen=True)
    class Extended(AugmentConfig):
        brightness_range: float = 0.0

    assert Extended().is_identity and not Extended(brightness_range=30.0).is_identity


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rotation_range": -1},
        {"width_shift_range": -0.1},
        {"height_shift_range": float("nan")},
        {"shear_range": "10"},
        {"zoom_range": 1.0},
        {"zoom_range": -0.1},
        {"zoom_range": (0.0, 1.0)},
        {"zoom_range": (1.2, 0.8)},
        {"zoom_range": (0.5, 1.0, 1.5)},
        {"fill_mode": "mirror"},
        {"interpolation": "bicubic"},
        {"horizontal_flip": 1},
    ],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError) as err:
        AugmentConfig(**kwargs)
    assert "\n" not in str(err.value) and next(iter(kwargs)) in str(err.value)


def test_bad_core_arguments_raise():
    x = jnp.zeros((2, 5, 5, 1))
    with pytest.raises(ValueError, match="fill_mode"):
        augment.affine_transform(x, 0, 0, 0, 0, 1, 1, fill_mode="grid-wrap")
    with pytest.raises(ValueError, match="order"):
        augment.affine_transform(x, 0, 0, 0, 0, 1, 1, order=3)
    with pytest.raises(ValueError, match="N, H, W, C"):
        augment.affine_transform(x[0], 0, 0, 0, 0, 1, 1)
