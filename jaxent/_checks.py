"""Argument and label validation shared by every loss.

Every check runs at trace time (shapes, dtypes, static options) and raises ``ValueError`` or
``TypeError`` with a message that names the argument, what was expected and what was given.
Shape assertions use chex, the vocabulary JAX users know; its ``AssertionError`` is turned
into a ``ValueError`` that names the argument.

Label *values* can only be checked when they are concrete: :func:`check_label_values` raises
on concrete labels and registers a :func:`jax.experimental.checkify.debug_check` (a no-op
unless the caller wraps the function in ``checkify.checkify``) on traced ones. Under ``jit``
without checkify the losses of out-of-range labels come out as ``nan``
(see :mod:`jaxent._core`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jax.typing import ArrayLike

REDUCTIONS = ("mean", "sum", "none")
RESIDUALS = ("auto", "grad", "lse")


def _describe(x: jax.Array) -> str:
    return f"shape {tuple(x.shape)} and dtype {x.dtype}"


def float_array(x: ArrayLike, name: str) -> jax.Array:
    """``x`` as a JAX array of a floating dtype, else ``TypeError`` naming ``name``."""
    if x is None:
        raise TypeError(f"`{name}` must be a floating-point array, got None")
    arr = jnp.asarray(x)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must be a floating-point array (float16, bfloat16, float32 or "
            f"float64), got dtype {arr.dtype}"
        )
    return arr


def normalize_axis(axis: int, ndim: int, name: str = "axis") -> int:
    """``axis`` in ``[0, ndim)``; negative values count from the end."""
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise TypeError(f"`{name}` must be a Python int, got {type(axis).__name__} {axis!r}")
    if ndim == 0:
        raise ValueError("`logits` must have at least one dimension (the class axis), got a scalar")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"`{name}` must be in [{-ndim}, {ndim}) for logits of rank {ndim}, got {axis}"
        )
    return int(axis) % ndim


def expect_shape(x: jax.Array, shape: Sequence[int], name: str, what: str) -> None:
    """Raise ``ValueError`` unless ``x.shape == shape``; ``what`` explains the expectation."""
    try:
        chex.assert_shape(x, tuple(shape))
    except AssertionError as err:
        raise ValueError(
            f"`{name}` must have shape {tuple(shape)} ({what}), got shape {tuple(x.shape)}"
        ) from err


def int_labels(labels: ArrayLike, shape: Sequence[int], name: str = "labels") -> jax.Array:
    """Integer class labels of the given shape (logits' shape without the class axis)."""
    arr = jnp.asarray(labels)
    if jnp.issubdtype(arr.dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must be integer class indices, got dtype {arr.dtype}; for probability "
            "(one-hot or soft) targets use jaxent.soft_cross_entropy"
        )
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(
            f"`{name}` must be an integer array of class indices, got dtype {arr.dtype}"
        )
    expect_shape(arr, shape, name, "the logits' shape without the class axis")
    return arr


def where_mask(where: ArrayLike | None, shape: Sequence[int]) -> jax.Array | None:
    """Boolean mask shaped like the labels, or None."""
    if where is None:
        return None
    arr = jnp.asarray(where)
    if arr.dtype != jnp.bool_:
        raise TypeError(f"`where` must be a boolean array, got dtype {arr.dtype}")
    expect_shape(arr, shape, "where", "shaped like the labels")
    return arr


def class_weight(weight: ArrayLike | None, num_classes: int, name: str = "weight"):
    """Per-class weights ``[C]`` as float32 (constants: no gradient flows into them)."""
    if weight is None:
        return None
    arr = float_array(weight, name)
    if arr.ndim != 1 or arr.shape[0] != num_classes:
        raise ValueError(
            f"`{name}` must be a 1-D array of length {num_classes} (one weight per class), "
            f"got {_describe(arr)}"
        )
    return jax.lax.stop_gradient(arr.astype(jnp.promote_types(arr.dtype, jnp.float32)))


def static_float(value, name: str) -> float:
    """A concrete Python float from a static option, else ``TypeError``."""
    try:
        out = float(value)
    except (TypeError, jax.errors.ConcretizationTypeError) as err:
        raise TypeError(
            f"`{name}` must be a concrete Python number (it is static configuration), got "
            f"{type(value).__name__}; pass it as a Python float, not a traced array"
        ) from err
    if math.isnan(out):
        raise ValueError(f"`{name}` must not be nan")
    return out


def options(
    *,
    reduction: str,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    temperature: float = 1.0,
    logit_softcap: float | None = None,
) -> tuple[float, float, float, float | None]:
    """Validate the static options; return them as Python floats."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    eps = static_float(label_smoothing, "label_smoothing")
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"`label_smoothing` must be in [0, 1], got {eps}")
    zl = static_float(z_loss, "z_loss")
    if not (zl >= 0.0 and math.isfinite(zl)):
        raise ValueError(f"`z_loss` must be a finite number >= 0, got {zl}")
    temp = static_float(temperature, "temperature")
    if not (temp > 0.0 and math.isfinite(temp)):
        raise ValueError(f"`temperature` must be a finite number > 0, got {temp}")
    cap = None
    if logit_softcap is not None:
        cap = static_float(logit_softcap, "logit_softcap")
        if not (cap > 0.0 and math.isfinite(cap)):
            raise ValueError(f"`logit_softcap` must be None or a finite number > 0, got {cap}")
    return eps, zl, temp, cap


def residual(value: str) -> None:
    """What a softmax loss's forward keeps for its backward: ``"auto"``, ``"grad"`` or ``"lse"``."""
    if value not in RESIDUALS:
        raise ValueError(f"`residual` must be one of {RESIDUALS}, got {value!r}")


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def label_values(
    labels: jax.Array,
    num_classes: int,
    ignore_index: int,
    where: jax.Array | None = None,
    name: str = "labels",
) -> None:
    """Labels must lie in ``[0, num_classes)`` unless ignored or masked out by ``where``.

    Concrete labels: ``ValueError`` naming the bad values and their positions. Traced labels:
    a checkify ``debug_check`` (reported when the caller uses ``checkify.checkify``).
    """
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int | np.integer):
        raise TypeError(f"`ignore_index` must be a Python int, got {ignore_index!r}")
    if _is_concrete(labels, where):
        y = np.asarray(labels)
        bad = (y != ignore_index) & ((y < 0) | (y >= num_classes))
        if where is not None:
            bad &= np.asarray(where)
        if bad.any():
            pos = np.argwhere(bad)
            shown = ", ".join(
                f"{name}[{', '.join(map(str, p))}]={y[tuple(p)]}" for p in pos[:8]
            )
            more = f" (and {len(pos) - 8} more)" if len(pos) > 8 else ""
            raise ValueError(
                f"`{name}` must be class indices in [0, {num_classes}) or ignore_index="
                f"{ignore_index}; got {len(pos)} out-of-range value(s): {shown}{more}"
            )
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if where is not None:
        bad = bad & where
    checkify.debug_check(
        ~jnp.any(bad),
        f"`{name}` has values outside [0, {num_classes}) that are not ignore_index="
        f"{ignore_index}; their losses are nan",
    )


def temperature_array(
    temperature, shape: Sequence[int], dtype
) -> tuple[float, jax.Array | None]:
    """A temperature that is either static or one value per row.

    A Python number (or NumPy scalar) is static configuration: returns ``(T, None)`` after
    the checks of :func:`options`. An array (NumPy or JAX, any rank) must be broadcastable
    to the labels' ``shape``: returns ``(1.0, temp)`` with ``temp`` broadcast, flattened to
    ``[prod(shape)]``, cast to ``dtype`` and under ``stop_gradient`` (a constant). Concrete
    arrays must be finite and ``> 0``. A wrong shape raises ``ValueError`` naming
    ``temperature``.
    """
    is_array = isinstance(temperature, jax.Array) or (
        isinstance(temperature, np.ndarray) and temperature.ndim > 0)
    if not is_array:
        temp = static_float(temperature, "temperature")
        if not (temp > 0.0 and math.isfinite(temp)):
            raise ValueError(f"`temperature` must be a finite number > 0, got {temp}")
        return temp, None
    arr = jnp.asarray(temperature)
    if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
        raise TypeError(f"`temperature` must be a real number or array, got dtype {arr.dtype}")
    try:
        ok = jnp.broadcast_shapes(arr.shape, tuple(shape)) == tuple(shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"`temperature` must be a number or an array broadcastable to the labels' shape "
            f"{tuple(shape)} (one value per row), got shape {tuple(arr.shape)}")
    if _is_concrete(arr):
        a = np.asarray(arr, np.float64)
        if not np.all(np.isfinite(a) & (a > 0)):
            raise ValueError("`temperature` must be finite and > 0 everywhere")
    arr = jnp.broadcast_to(arr.astype(dtype), tuple(shape)).reshape(-1)
    return 1.0, jax.lax.stop_gradient(arr)


def token_values(tokens: jax.Array, num_classes: int, where: jax.Array | None = None,
                 name: str = "tokens") -> None:
    """Token ids must lie in ``[0, num_classes)`` where ``where`` is True (no ignore value).

    Concrete ids: ``ValueError`` naming the bad values and positions; traced ids: a checkify
    ``debug_check`` (their outputs are ``nan``).
    """
    if _is_concrete(tokens, where):
        y = np.asarray(tokens)
        bad = (y < 0) | (y >= num_classes)
        if where is not None:
            bad &= np.asarray(where)
        if bad.any():
            pos = np.argwhere(bad)
            shown = ", ".join(
                f"{name}[{', '.join(map(str, p))}]={y[tuple(p)]}" for p in pos[:8])
            raise ValueError(
                f"`{name}` must be ids in [0, {num_classes}) where `where` is True; got "
                f"{len(pos)} out-of-range value(s): {shown}")
        return
    bad = (tokens < 0) | (tokens >= num_classes)
    if where is not None:
        bad = bad & where
    checkify.debug_check(~jnp.any(bad), f"`{name}` has values outside [0, {num_classes}); "
                         "their outputs are nan")
