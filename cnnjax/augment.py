"""Keras ``ImageDataGenerator``-style random affine augmentation, on the device, jitted and batched.

The lecture augments with ``ImageDataGenerator(rotation_range=40, width_shift_range=0.1,
height_shift_range=0.1, shear_range=0.4, zoom_range=0.5, horizontal_flip=True,
fill_mode='nearest')``. Keras draws one set of parameters per image on the host and calls
``scipy.ndimage.affine_transform`` once per channel; here the whole batch is one jitted
gather, so augmentation can live inside the compiled training step.

Semantics
---------
:func:`affine_transform` is the deterministic core. For an image of size H x W, an output
pixel at (row, col) samples the input at::

    (x, y) = (col - cx, row - cy)       # about the centre (cx, cy) = ((W-1)/2, (H-1)/2)
    src    = R @ (S @ Z @ (x, y) + (tx, ty)) + (cx, cy)      # (source col, source row)

    R = [[cos t, -sin t], [sin t, cos t]]   S = [[1, -sin s], [0, cos s]]   Z = diag(zx, zy)

with t = theta and s = shear in degrees, x = column and y = row. This is the matrix
Keras's ``apply_affine_transform`` builds (rotation, shift, shear and zoom composed in that
order, then moved to the centre), so for channels-last images: ``tx`` moves the sampling point along columns (tx > 0 moves the
content left), ``ty`` along rows (ty > 0 moves it up), ``zx`` scales columns (zx > 1 zooms
out horizontally), ``zy`` rows, and theta > 0 turns the content counter-clockwise as shown
with row 0 at the top. Sampling is scipy.ndimage's: ``order=1`` bilinear, ``order=0``
nearest (ties round up), and points outside the image follow scipy's ``mode``:

- ``nearest``: clamp to the edge pixel (a a a | a b c d | d d d);
- ``constant``: ``cval`` for any point outside [0, n-1] on either axis (no blending with
  ``cval`` at the border, as in scipy's ``constant``, not ``grid-constant``);
- ``reflect``: half-sample symmetric (d c b a | a b c d | d c b a);
- ``wrap``: scipy's ``wrap``, which folds coordinates with period n - 1, not n (so the
  first and last rows/columns meet at the seam); scipy's period-n mode is ``grid-wrap``,
  but Keras passes ``fill_mode`` straight through, so ``wrap`` means this one.

:func:`random_augment` draws one parameter set per image (:func:`sample_params`), applies
the affine transform, then flips, like ``ImageDataGenerator.apply_transform``. Flips are
folded into the sampling coordinates, so they cost nothing.

Differences from Keras (deliberate)
-----------------------------------
1. Centre of non-square images. Keras's ``transform_matrix_offset_center`` is passed
   (rows, cols) but offsets the x = column axis by (rows-1)/2 and the y = row axis by
   (cols-1)/2, so for H != W every rotation, shear and zoom turns about a wrong point (a
   180 degree rotation comes out shifted by W - H pixels along both axes). Here the centre
   is the true one, ((W-1)/2, (H-1)/2); for square images the two agree exactly.
2. Which shift range moves which way. ``ImageDataGenerator.get_random_transform`` draws
   ``tx`` (a column shift) from ``height_shift_range`` times the height and ``ty`` (a row
   shift) from ``width_shift_range`` times the width, so its "height" shift moves images
   sideways. Here ``width_shift_range`` moves images horizontally (times the width) and
   ``height_shift_range`` vertically (times the height), as the names say. With the
   lecture's equal ranges on square images the two draw from the same distribution.

Also worth knowing: the shear range is in degrees, as in current Keras (Keras 2.0.x took
radians, so the lecture's ``shear_range=0.4`` was about 23 degrees there and is 0.4 degrees
now); shift ranges below 1 are fractions of the image size and ranges >= 1 are pixels, as
in Keras, except that Keras draws integer ranges from a discrete set and here every range
is continuous.
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
    "random_augment",
    "sample_params",
]

FILL_MODES = ("nearest", "constant", "reflect", "wrap")
_ORDERS = {"bilinear": 1, "nearest": 0}


# --- The deterministic core ---------------------------------------------------------------


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
        raise ValueError(f"transform parameters must be scalars or shape ({n},), got shape {v.shape}")
    return jnp.broadcast_to(v, (n,))


def _transform(
    images: Array,
    theta: Array | float,
    tx: Array | float,
    ty: Array | float,
    shear: Array | float,
    zx: Array | float,
    zy: Array | float,
    hflip: Array | bool,
    vflip: Array | bool,
    fill_mode: str,
    cval: float,
    order: int,
) -> Array:
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
    if fill_mode not in FILL_MODES:
        raise ValueError(f"fill_mode must be one of {FILL_MODES}, got {fill_mode!r}")
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (bilinear), got {order!r}")
    dtype = images.dtype if jnp.issubdtype(images.dtype, jnp.floating) else jnp.float32
    images = images.astype(dtype)
    n, h, w, c = images.shape
    theta, tx, ty, shear, zx, zy = (_as_batch(v, n, dtype) for v in (theta, tx, ty, shear, zx, zy))
    t, s = jnp.deg2rad(theta), jnp.deg2rad(shear)
    cos_t, sin_t, sin_s, cos_s = jnp.cos(t), jnp.sin(t), jnp.sin(s), jnp.cos(s)
    # Linear part R @ Shear @ Zoom in the (x = col, y = row) frame, and the shift R @ (tx, ty).
    a00, a01 = cos_t * zx, -(cos_t * sin_s + sin_t * cos_s) * zy
    a10, a11 = sin_t * zx, (cos_t * cos_s - sin_t * sin_s) * zy
    b0, b1 = cos_t * tx - sin_t * ty, sin_t * tx + cos_t * ty
    # A flip after the transform reads the transformed image at the mirrored pixel, and
    # mirroring about the true centre only negates the centred coordinate.
    sx = jnp.where(_as_batch(hflip, n, bool), -1.0, 1.0).astype(dtype)
    sy = jnp.where(_as_batch(vflip, n, bool), -1.0, 1.0).astype(dtype)
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    # Source coordinates are an outer sum of a per-column and a per-row term, on (N, H, W)
    # arrays: per pixel, not per channel.
    xs = (jnp.arange(w, dtype=dtype) - cx)[None, None, :] * sx[:, None, None]
    ys = (jnp.arange(h, dtype=dtype) - cy)[None, :, None] * sy[:, None, None]
    e = lambda v: v[:, None, None]  # noqa: E731
    src_col = e(a00) * xs + (e(a01) * ys + e(b0 + cx))
    src_row = e(a10) * xs + (e(a11) * ys + e(b1 + cy))

    row = _map_coordinate(src_row, h, fill_mode)
    col = _map_coordinate(src_col, w, fill_mode)
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

    images: (N, H, W, C), channels last (integer images are converted to float32).
    theta, shear: degrees; tx, ty: pixels (tx along columns, ty along rows); zx, zy: zoom
    factors for columns and rows. Each is a scalar or an array of shape (N,).
    fill_mode: ``nearest`` | ``constant`` | ``reflect`` | ``wrap`` (scipy.ndimage's
    meanings); cval: the ``constant`` fill; order: 1 bilinear, 0 nearest.

    For square images this equals ``apply_affine_transform(x, theta, tx, ty, shear, zx,
    zy, row_axis=0, col_axis=1, channel_axis=2, fill_mode=..., cval=..., order=...)`` image
    by image; for non-square ones it turns about the true centre (see the module
    docstring). Jitted here (fill_mode and order static) and vmappable.
    """
    return _transform(images, theta, tx, ty, shear, zx, zy, False, False, fill_mode, cval, order)


# --- Random parameters ------------------------------------------------------------------


def _check_range(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Random augmentation settings, with ``ImageDataGenerator``'s names and meanings.

    rotation_range: degrees, theta ~ U[-r, r].
    width_shift_range / height_shift_range: horizontal / vertical shift ~ U[-s, s] times
        the width / height when s < 1, or U[-s, s] pixels when s >= 1.
    shear_range: degrees, shear ~ U[-s, s] (Keras 2.0.x took radians).
    zoom_range: z gives zx, zy ~ U[1-z, 1+z] independently; or a (lo, hi) pair. zoom > 1
        zooms out.
    horizontal_flip / vertical_flip: each with probability 0.5, after the transform.
    fill_mode, cval: points outside the image (see the module docstring).
    interpolation: ``bilinear`` (scipy order 1, Keras's default) or ``nearest`` (order 0).

    Frozen and hashable, so it can be a static argument of ``jax.jit``.
    """

    rotation_range: float = 0.0
    width_shift_range: float = 0.0
    height_shift_range: float = 0.0
    shear_range: float = 0.0
    zoom_range: float | tuple[float, float] = 0.0
    horizontal_flip: bool = False
    vertical_flip: bool = False
    fill_mode: str = "nearest"
    cval: float = 0.0
    interpolation: str = "bilinear"

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
            raise ValueError(f"zoom_range as a float must be in [0, 1) (it gives [1-z, 1+z]), got {z!r}")
        for name in ("horizontal_flip", "vertical_flip"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.fill_mode not in FILL_MODES:
            raise ValueError(f"fill_mode must be one of {FILL_MODES}, got {self.fill_mode!r}")
        if self.interpolation not in _ORDERS:
            raise ValueError(f"interpolation must be one of {tuple(_ORDERS)}, got {self.interpolation!r}")
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
        """True when every draw is the identity (nothing to do)."""
        return (
            self.rotation_range == 0
            and self.width_shift_range == 0
            and self.height_shift_range == 0
            and self.shear_range == 0
            and self.zoom_bounds == (1.0, 1.0)
            and not self.horizontal_flip
            and not self.vertical_flip
        )


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


@functools.partial(jax.jit, static_argnames=("config", "n", "height", "width"))
def sample_params(rng: Array, config: AugmentConfig, n: int, height: int, width: int) -> dict[str, Array]:
    """Draw one parameter set per image: a dict of (n,) arrays.

    Keys: theta (degrees), tx (pixels, horizontal), ty (pixels, vertical), shear
    (degrees), zx, zy, flip (horizontal, bool) and vflip (bool), in the units
    :func:`affine_transform` takes. Ranges that are zero give exact identity values.
    """
    # Eight independent U[0, 1) variates per image, one row per parameter. Image i draws
    # from rng folded with i, its position in the (global) batch, so what an image gets
    # does not depend on how the batch is split over devices.
    u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(rng, i), (8,), jnp.float32))(jnp.arange(n)).T
    zeros, ones = jnp.zeros((n,), jnp.float32), jnp.ones((n,), jnp.float32)

    def between(row: int, lo: float, hi: float, identity: Array) -> Array:
        return identity if lo == hi else lo + (hi - lo) * u[row]

    def shift(row: int, s: float, size: int) -> Array:
        pixels = s * size if s < 1 else s  # Keras: ranges below 1 are fractions of the size
        return between(row, -pixels, pixels, zeros)

    lo, hi = config.zoom_bounds
    return {
        "theta": between(0, -config.rotation_range, config.rotation_range, zeros),
        "tx": shift(1, config.width_shift_range, width),
        "ty": shift(2, config.height_shift_range, height),
        "shear": between(3, -config.shear_range, config.shear_range, zeros),
        "zx": between(4, lo, hi, ones),
        "zy": between(5, lo, hi, ones),
        "flip": (u[6] < 0.5) & config.horizontal_flip,
        "vflip": (u[7] < 0.5) & config.vertical_flip,
    }


@functools.partial(jax.jit, static_argnames="config")
def random_augment(rng: Array, images: Array, config: AugmentConfig) -> Array:
    """Augment a batch (N, H, W, C) of float images on the 0..255 scale, one draw per image.

    Jitted here with ``config`` static (called inside another jit, it is simply inlined);
    the parameters come from ``rng`` alone.
    """
    if config.is_identity:
        return images
    n, h, w, _ = images.shape
    p = sample_params(rng, config, n, h, w)
    return _transform(
        images,
        p["theta"],
        p["tx"],
        p["ty"],
        p["shear"],
        p["zx"],
        p["zy"],
        p["flip"],
        p["vflip"],
        config.fill_mode,
        config.cval,
        config.order,
    )
