"""Keras ``ImageDataGenerator``'s random affine augmentation, batched and jitted, on the device.

The lecture augments with ``ImageDataGenerator(rotation_range=40, width_shift_range=0.1,
height_shift_range=0.1, shear_range=0.4, zoom_range=0.5, horizontal_flip=True,
fill_mode='nearest')``. Keras transforms image by image on the host with
``scipy.ndimage.affine_transform``; here a batch is one jitted gather, so augmentation can
live inside the compiled training step.

:func:`affine_transform` uses the matrix of Keras's ``apply_affine_transform``: with x the
column, y the row and (cx, cy) the centre, the output pixel (row, col) samples the input at::

    (source col, source row) = R @ (S @ Z @ (col - cx, row - cy) + (tx, ty)) + (cx, cy)
    R = [[cos t, -sin t], [sin t, cos t]]   S = [[1, -sin s], [0, cos s]]   Z = diag(zx, zy)

(t = theta, s = shear, in degrees). So tx > 0 moves the content left, ty > 0 up, zx > 1
zooms out horizontally and theta > 0 turns it counter-clockwise (row 0 at the top).
Sampling and ``fill_mode`` are scipy.ndimage's: order 1 bilinear, order 0 nearest (ties
round up); ``nearest`` clamps to the edge pixel; ``constant`` gives ``cval`` at any point
outside [0, n-1] (no blending at the border: scipy's ``constant``, not ``grid-constant``);
``reflect`` is half-sample symmetric (d c b a | a b c d); and ``wrap`` is scipy's, whose
period is n - 1, not n (the first and last rows meet at the seam): Keras passes
``fill_mode`` straight through, so ``wrap`` means this one, not ``grid-wrap``.

Deliberate differences from Keras, neither visible with the lecture's square images and
equal shift ranges:

1. Keras's ``transform_matrix_offset_center`` offsets the column axis by (rows-1)/2 and the
   row axis by (cols-1)/2, so non-square images turn about a wrong point (a 180 degree
   rotation comes out shifted by W - H pixels). Here the centre is ((W-1)/2, (H-1)/2).
2. Keras's ``get_random_transform`` draws the column shift tx from ``height_shift_range``
   times the height (and ty from the width range). Here ``width_shift_range`` moves images
   horizontally, times the width, as the names say.

The shear range is in degrees, as in current Keras (Keras 2.0.x took radians, so the
lecture's 0.4 was about 23 degrees there). Shift ranges below 1 are fractions of the image
size and ranges >= 1 are pixels, as in Keras, but every range is drawn continuously (Keras
draws integer ranges from a discrete set).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import Array

__all__ = [
    "FILL_MODES",
    "AugmentConfig",
    "affine_transform",
    "draw_bounds",
    "member_augment",
    "random_augment",
    "sample_params",
]

FILL_MODES = ("nearest", "constant", "reflect", "wrap")
_ORDERS = {"bilinear": 1, "nearest": 0}


def _map_coordinate(x: Array, n: int, mode: str) -> Array:
    """Fold a source coordinate into [0, n-1] as scipy.ndimage does for ``mode``.

    reflect and wrap follow scipy's ``map_coordinate`` (period 2n and n-1, the latter's
    period count truncated, not floored). scipy's reflect lands in [-1, n), where the
    half-sample extension is flat (pixels -1 and n are pixels 0 and n-1), so clipping to
    [0, n-1] afterwards changes no sample, for order 0 or 1. For constant, points outside
    are masked by the caller; clipping only keeps the gather in bounds.
    """
    if n == 1:
        return jnp.zeros_like(x)
    if mode == "reflect":
        p = 2.0 * n
        neg = jnp.where(x < -p, p * jnp.trunc(-x / p) + x, x)
        neg = jnp.where(neg < -n, neg + p, -neg - 1)
        pos = x - p * jnp.trunc(x / p)
        pos = jnp.where(pos >= n, p - pos - 1, pos)
        x = jnp.where(x < 0, neg, jnp.where(x > n - 1, pos, x))
    elif mode == "wrap":
        p = float(n - 1)
        neg = x + p * (jnp.trunc(-x / p) + 1)
        pos = x - p * jnp.trunc(x / p)
        x = jnp.where(x < 0, neg, jnp.where(x > n - 1, pos, x))
    return jnp.clip(x, 0, n - 1)


def _as_batch(v: Array | float, n: int, dtype) -> Array:
    v = jnp.asarray(v, dtype)
    if v.ndim > 1:
        raise ValueError(
            f"transform parameters must be scalars or shape ({n},), got shape {v.shape}"
        )
    return jnp.broadcast_to(v, (n,))


def _transform(
    images: Array, p: dict[str, Array | float], fill_mode: str, cval: float, order: int
) -> Array:
    """Each image's affine transform, then its flips; ``p`` has :func:`sample_params`'s keys."""
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
    if fill_mode not in FILL_MODES:
        raise ValueError(f"fill_mode must be one of {FILL_MODES}, got {fill_mode!r}")
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (bilinear), got {order!r}")
    dtype = images.dtype if jnp.issubdtype(images.dtype, jnp.floating) else jnp.float32
    images = images.astype(dtype)
    n, h, w, c = images.shape
    theta, tx, ty, shear, zx, zy = (
        _as_batch(p[k], n, dtype) for k in ("theta", "tx", "ty", "shear", "zx", "zy")
    )
    t, s = jnp.deg2rad(theta), jnp.deg2rad(shear)
    cos_t, sin_t, sin_s, cos_s = jnp.cos(t), jnp.sin(t), jnp.sin(s), jnp.cos(s)
    # Linear part R @ Shear @ Zoom in the (x = col, y = row) frame, and the shift R @ (tx, ty).
    a00, a01 = cos_t * zx, -(cos_t * sin_s + sin_t * cos_s) * zy
    a10, a11 = sin_t * zx, (cos_t * cos_s - sin_t * sin_s) * zy
    b0, b1 = cos_t * tx - sin_t * ty, sin_t * tx + cos_t * ty
    # A flip after the transform reads the transformed image at the mirrored pixel, and
    # mirroring about the true centre only negates the centred coordinate: flips cost nothing.
    sx = jnp.where(_as_batch(p["flip"], n, bool), -1.0, 1.0).astype(dtype)
    sy = jnp.where(_as_batch(p["vflip"], n, bool), -1.0, 1.0).astype(dtype)
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    # Source coordinates are an outer sum of a per-column and a per-row term, on (N, H, W)
    # arrays: per pixel, not per channel.
    xs = (jnp.arange(w, dtype=dtype) - cx)[None, None, :] * sx[:, None, None]
    ys = (jnp.arange(h, dtype=dtype) - cy)[None, :, None] * sy[:, None, None]
    e = lambda v: v[:, None, None]  # noqa: E731
    src_col = e(a00) * xs + (e(a01) * ys + e(b0 + cx))
    src_row = e(a10) * xs + (e(a11) * ys + e(b1 + cy))

    row, col = _map_coordinate(src_row, h, fill_mode), _map_coordinate(src_col, w, fill_mode)
    if order == 0:
        # scipy rounds half up: floor(x + 0.5).
        row, col = jnp.floor(row + 0.5), jnp.floor(col + 0.5)
    r0, c0 = jnp.floor(row), jnp.floor(col)
    # One flat index per pixel into (N*H*W, C), so one index fetches all channels; the
    # other neighbours are +1 and +W. Where one of those falls off the image its weight is
    # exactly 0 (the coordinate is exactly n-1), and XLA's gather clamps it in bounds.
    base = (jnp.arange(n, dtype=jnp.int32) * (h * w))[:, None, None]
    idx = base + r0.astype(jnp.int32) * w + c0.astype(jnp.int32)
    if fill_mode == "constant":
        inside = (src_row >= 0) & (src_row <= h - 1) & (src_col >= 0) & (src_col <= w - 1)
        idx = jnp.where(inside, idx, -1)
    # XLA fuses all of this into one loop over the output; the gathers, not the index
    # arithmetic, dominate its cost (measured: materialising the per-pixel indices and
    # weights first saves nothing on CPU).
    flat = images.reshape(n * h * w, c)
    at = lambda i: flat.at[i].get(mode="clip")  # noqa: E731
    if order == 0:
        out = at(idx)
    else:
        fr, fc = (row - r0)[..., None], (col - c0)[..., None]
        top = at(idx) * (1 - fc) + at(idx + 1) * fc
        bottom = at(idx + w) * (1 - fc) + at(idx + w + 1) * fc
        out = top * (1 - fr) + bottom * fr
    if fill_mode == "constant":
        out = jnp.where(idx[..., None] < 0, jnp.asarray(cval, dtype), out)
    return out


@functools.partial(jax.jit, static_argnames=("fill_mode", "order"))
def affine_transform(
    images: Array,
    theta: Array | float,
    tx: Array | float,
    ty: Array | float,
    shear: Array | float,
    zx: Array | float,
    zy: Array | float,
    fill_mode: str = "nearest",
    cval: float = 0.0,
    order: int = 1,
) -> Array:
    """Apply one affine transform per image, as Keras's ``apply_affine_transform``.

    images: (N, H, W, C), channels last (integer images are converted to float32). theta
    and shear in degrees, tx and ty in pixels, zx and zy zoom factors, each a scalar or (N,).
    For square images this is ``apply_affine_transform(x, theta, tx, ty, shear, zx, zy,
    row_axis=0, col_axis=1, channel_axis=2, fill_mode=..., cval=..., order=...)`` image by
    image. Jitted (fill_mode and order static) and vmappable.
    """
    params = dict(theta=theta, tx=tx, ty=ty, shear=shear, zx=zx, zy=zy, flip=False, vflip=False)
    return _transform(images, params, fill_mode, cval, order)


def _check_range(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Random augmentation settings, with ``ImageDataGenerator``'s names and meanings.

    Rotation and shear ranges r are degrees, U[-r, r]; shift ranges s give U[-s, s] times
    the width (height) when s < 1, else pixels; zoom_range z gives zx, zy ~ U[1-z, 1+z]
    independently, or is a (lo, hi) pair (zoom > 1 zooms out); each flip has probability
    0.5, after the transform; interpolation is ``bilinear`` (Keras's) or ``nearest``.
    Frozen and hashable, so it can be a static argument of ``jax.jit``. Every field is a flag of the
    scripts (``--augment.NAME``, cnnjax.config), its metadata the flag's help and allowed values.
    """

    rotation_range: float = dataclasses.field(
        default=0.0, metadata={"help": "degrees, theta ~ U[-r, r]"}
    )
    width_shift_range: float = dataclasses.field(
        default=0.0, metadata={"help": "horizontal shift ~ U[-s, s] x width (pixels when >= 1)"}
    )
    height_shift_range: float = dataclasses.field(
        default=0.0, metadata={"help": "vertical shift ~ U[-s, s] x height (pixels when >= 1)"}
    )
    shear_range: float = dataclasses.field(
        default=0.0, metadata={"help": "degrees (Keras 2.0.x took radians)"}
    )
    zoom_range: float | tuple[float, float] = dataclasses.field(
        default=0.0, metadata={"help": "z: zx, zy ~ U[1-z, 1+z]; or LO,HI"}
    )
    horizontal_flip: bool = dataclasses.field(
        default=False, metadata={"help": "flip half the images left-right"}
    )
    vertical_flip: bool = dataclasses.field(
        default=False, metadata={"help": "flip half the images upside down"}
    )
    fill_mode: str = dataclasses.field(
        default="nearest", metadata={"help": "points outside the image", "choices": FILL_MODES}
    )
    cval: float = dataclasses.field(
        default=0.0, metadata={"help": "the fill value of fill_mode constant (0..255 scale)"}
    )
    interpolation: str = dataclasses.field(
        default="bilinear",
        metadata={
            "help": "sampling of the transformed image (Keras: bilinear)",
            "choices": tuple(_ORDERS),
        },
    )

    LECTURE: ClassVar[AugmentConfig]
    LECTURE_PREVIEW: ClassVar[AugmentConfig]

    def __post_init__(self) -> None:
        for name in ("rotation_range", "width_shift_range", "height_shift_range", "shear_range"):
            _check_range(name, getattr(self, name))
        z = self.zoom_range
        if isinstance(z, (list, tuple)):
            if len(z) != 2:
                raise ValueError(f"zoom_range must be a float or a (lo, hi) pair, got {z!r}")
            lo, hi = (_check_range("zoom_range", v) for v in z)
            if not 0 < lo <= hi:
                raise ValueError(f"zoom_range (lo, hi) needs 0 < lo <= hi, got {z!r}")
            # A list would make the config unhashable (and so unusable as a static argument).
            object.__setattr__(self, "zoom_range", (lo, hi))
        elif _check_range("zoom_range", z) >= 1:
            raise ValueError(
                f"zoom_range as a float must be in [0, 1) (it gives [1-z, 1+z]), got {z!r}"
            )
        for name in ("horizontal_flip", "vertical_flip"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.fill_mode not in FILL_MODES:
            raise ValueError(f"fill_mode must be one of {FILL_MODES}, got {self.fill_mode!r}")
        if self.interpolation not in _ORDERS:
            raise ValueError(
                f"interpolation must be one of {tuple(_ORDERS)}, got {self.interpolation!r}"
            )
        if isinstance(self.cval, bool) or not isinstance(self.cval, (int, float)):
            raise ValueError(f"cval must be a number, got {self.cval!r}")

    @property
    def zoom_bounds(self) -> tuple[float, float]:
        z = self.zoom_range
        return (float(z[0]), float(z[1])) if isinstance(z, tuple) else (1.0 - z, 1.0 + z)

    @property
    def order(self) -> int:
        return _ORDERS[self.interpolation]

    @property
    def is_identity(self) -> bool:
        """True when every draw is the identity (nothing to do): every field at its default but
        those that only say how to sample (fill_mode, cval, interpolation), a zoom of (1, 1)
        included. So a field added here is drawn when set."""
        defaults = type(self)()
        how = {
            name: getattr(defaults, name)
            for name in ("fill_mode", "cval", "interpolation", "zoom_range")
        }
        return self.zoom_bounds == (1.0, 1.0) and dataclasses.replace(self, **how) == defaults


# Experiment 2 of the lecture, and the settings of its augmentation preview.
AugmentConfig.LECTURE = AugmentConfig(
    rotation_range=40,
    width_shift_range=0.1,
    height_shift_range=0.1,
    shear_range=0.4,
    zoom_range=0.5,
    horizontal_flip=True,
    fill_mode="nearest",
)
AugmentConfig.LECTURE_PREVIEW = AugmentConfig(
    rotation_range=30,
    width_shift_range=0.1,
    height_shift_range=0.1,
    shear_range=0.2,
    zoom_range=0.5,
    horizontal_flip=True,
)


PARAMS = ("theta", "tx", "ty", "shear", "zx", "zy")  # the drawn ones, in draw_bounds' order


def draw_bounds(config: AugmentConfig, height: int, width: int) -> tuple[tuple[float, float], ...]:
    """Per parameter of PARAMS, (lo, span): it is drawn as lo + span * U[0, 1), exactly lo (the
    identity) when span is 0. Computed in float64 on the host, so a grid member's bounds (arrays,
    cnnjax.grid) give the draws of its setting alone bit for bit."""

    def symmetric(r: float) -> tuple[float, float]:
        return (-r if r else 0.0), 2 * r  # U[-r, r]; a zero range is 0.0, not -0.0

    def shift(s: float, size: int) -> tuple[float, float]:
        return symmetric(s * size if s < 1 else s)  # Keras: below 1, fractions of the size

    lo, hi = config.zoom_bounds
    return (
        symmetric(config.rotation_range),
        shift(config.width_shift_range, width),
        shift(config.height_shift_range, height),
        symmetric(config.shear_range),
        (lo, hi - lo),
        (lo, hi - lo),
    )


def _uniforms(rng: Array, n: int) -> Array:
    """Eight independent U[0, 1) variates per image, one row per parameter (8, n). Image i draws
    from rng folded with i, its position in the (global) batch, so what an image gets does not
    depend on how the batch is split over devices."""
    return jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(rng, i), (8,), jnp.float32))(
        jnp.arange(n)
    ).T


@functools.partial(jax.jit, static_argnames=("config", "n", "height", "width"))
def sample_params(
    rng: Array, config: AugmentConfig, n: int, height: int, width: int
) -> dict[str, Array]:
    """Draw one parameter set per image: a dict of (n,) arrays, in :func:`affine_transform`'s units.

    Keys: theta, tx (horizontal), ty (vertical), shear, zx, zy, flip (horizontal, bool) and
    vflip. Ranges that are zero give exact identity values.
    """
    u = _uniforms(rng, n)
    drawn = {
        name: jnp.full((n,), lo, jnp.float32) if span == 0 else lo + span * u[row]
        for row, (name, (lo, span)) in enumerate(zip(PARAMS, draw_bounds(config, height, width)))
    }
    flips = {
        "flip": (u[6] < 0.5) & config.horizontal_flip,
        "vflip": (u[7] < 0.5) & config.vertical_flip,
    }
    return {**drawn, **flips}


def sample_member_params(rng: Array, bounds: Array, flips: Array, n: int) -> dict[str, Array]:
    """sample_params with the ranges as arrays (a grid member's, cnnjax.grid): bounds (6, 2) holds
    draw_bounds' (lo, span) per parameter, flips (2,) whether each flip is on."""
    u = _uniforms(rng, n)
    drawn = {name: bounds[row, 0] + bounds[row, 1] * u[row] for row, name in enumerate(PARAMS)}
    return {**drawn, "flip": (u[6] < 0.5) & flips[0], "vflip": (u[7] < 0.5) & flips[1]}


@functools.partial(jax.jit, static_argnames="config")
def random_augment(rng: Array, images: Array, config: AugmentConfig) -> Array:
    """Augment a batch (N, H, W, C) of float images on the 0..255 scale, one draw per image.

    Like ``ImageDataGenerator.apply_transform``: the affine transform, then the flips. Jitted
    with ``config`` static (inside another jit it is simply inlined); the draws come from
    ``rng`` alone.
    """
    if config.is_identity:
        return images
    n, h, w, _ = images.shape
    return _transform(
        images, sample_params(rng, config, n, h, w), config.fill_mode, config.cval, config.order
    )


def member_augment(
    rng: Array, images: Array, config: AugmentConfig, bounds: Array, flips: Array
) -> Array:
    """random_augment with a grid member's ranges (sample_member_params); `config` says only how to
    sample (fill_mode, cval, interpolation)."""
    params = sample_member_params(rng, bounds, flips, images.shape[0])
    return _transform(images, params, config.fill_mode, config.cval, config.order)
