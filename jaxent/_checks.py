"""Argument and label validation shared by every loss.

Every check runs at trace time (shapes, dtypes, static options) and raises ``ValueError`` or
``TypeError`` with a message that names the argument, what was expected and what was given.
Shape assertions use chex, the vocabulary JAX users know; its ``AssertionError`` is turned
into a ``ValueError`` that names the argument.

Label *values* can only be checked when they are concrete: :func:`label_values` raises on
concrete labels and passes traced ones through :data:`label_check_p`, a primitive that is
the identity in every program (it lowers to nothing and carries no effect, so the program
stays exportable and serializable) and that ``jax.experimental.checkify.checkify`` turns
into a check. Under ``jit`` without checkify the losses of out-of-range labels are ``nan``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core
from jax.interpreters import batching, mlir
from jax.typing import ArrayLike

from jaxent import _rowmath
from jaxent._options import LAYOUTS, REDUCTIONS, RESIDUALS, Options

# The smallest soft-cap and temperature accepted: normal float32 numbers (a subnormal one is
# flushed to 0 on some platforms, and x / 0 would give nan).
_TINY = 1e-30


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


def normalize_axis(axis: int, ndim: int, name: str = "axis", array: str = "logits") -> int:
    """``axis`` in ``[0, ndim)``; negative values count from the end."""
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise TypeError(f"`{name}` must be a Python int, got {type(axis).__name__} {axis!r}")
    if ndim == 0:
        raise ValueError(
            f"`{array}` must have at least one dimension (the class axis), got a scalar")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"`{name}` must be in [{-ndim}, {ndim}) for {array} of rank {ndim}, got {axis}"
        )
    return int(axis) % ndim


def num_classes(x: jax.Array, axis: int, name: str = "logits") -> int:
    """The size of the class axis, which must be at least 1."""
    c = x.shape[axis]
    if isinstance(c, int) and c < 1:
        raise ValueError(
            f"`{name}` must have at least one class along axis {axis}, got shape "
            f"{tuple(x.shape)}")
    return c


def expect_shape(x: jax.Array, shape: Sequence[int], name: str, what: str,
                 hint: str = "") -> None:
    """Raise ``ValueError`` unless ``x.shape == shape``; ``what`` explains the expectation."""
    try:
        chex.assert_shape(x, tuple(shape))
    except AssertionError:
        raise ValueError(
            f"`{name}` must have shape {tuple(shape)} ({what}), got shape "
            f"{tuple(x.shape)}{hint}"
        ) from None


def _label_shape_hint(got: tuple, want: tuple, logits_shape, axis) -> str:
    """A porting hint for labels shaped unlike ``want``, or ``""``.

    The squeeze and reshape hints need only the two shapes (the fused loss gets them too);
    the others need the logits' shape: the class axis (PyTorch's axis 1 against JAX's last
    axis, either way round) and one-hot targets shaped like the logits.
    """
    if want == () and got == (1,):
        return ("; one unbatched example takes a scalar label (labels[0]), or batch the "
                "logits to shape (1, C) (logits[None]) as PyTorch does for a (1,) target")
    if got == want + (1,):
        return "; squeeze the last axis of the labels (labels[..., 0])"
    if len(got) == 1 and len(want) > 1 and math.prod(want) == got[0]:
        return f"; reshape the labels to {list(want)}"
    if logits_shape is None:
        return ""
    logits_shape, rank = tuple(logits_shape), len(logits_shape)
    if got == logits_shape:
        return (f"; these look like one-hot targets: pass class indices "
                f"(labels.argmax(axis={axis})), or float probabilities "
                "(labels.astype(jnp.float32)) to jaxent.soft_cross_entropy or "
                "jaxent.CrossEntropyLoss")
    if axis == rank - 1 and rank >= 3 and got == (logits_shape[0],) + logits_shape[2:]:
        return ("; the classes look like axis 1 (PyTorch's (N, C, d1, ...) layout): "
                "did you mean axis=1?")
    if axis != rank - 1 and rank >= 2 and got == logits_shape[:-1]:
        return (f"; the classes look like the last axis (JAX's [..., C] layout), not axis "
                f"{axis}: did you mean axis=-1? (jaxent.CrossEntropyLoss and NLLLoss take "
                "them on axis 1, as PyTorch: call jaxent.cross_entropy(logits, labels), or "
                "jnp.moveaxis(logits, -1, 1))")
    return ""


def int_labels(labels: ArrayLike, shape: Sequence[int], name: str = "labels", *,
               logits_shape: Sequence[int] | None = None, axis: int | None = None,
               what: str = "the logits' shape without the class axis",
               soft: str = "jaxent.soft_cross_entropy") -> jax.Array:
    """Integer class labels of the given shape (logits' shape without the class axis);
    ``soft`` names what takes probability targets instead (in the error for float labels)."""
    _fits_canonical_dtype(labels, name)
    arr = jnp.asarray(labels)
    if jnp.issubdtype(arr.dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must be integer class indices, got dtype {arr.dtype}; for probability "
            f"(one-hot or soft) targets use {soft}"
        )
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(
            f"`{name}` must be an integer array of class indices, got dtype {arr.dtype}"
        )
    hint = _label_shape_hint(tuple(arr.shape), tuple(shape), logits_shape, axis)
    expect_shape(arr, shape, name, what, hint)
    return arr


def _fits_canonical_dtype(labels, name: str) -> None:
    """Concrete integer ids that JAX would wrap on conversion raise ``ValueError``.

    Without ``jax_enable_x64`` a NumPy int64 array becomes int32, so ``2**32 + 3`` would
    silently become class 3; such ids are out of range for any vocabulary, so say so.
    """
    if isinstance(labels, jax.Array | jax.core.Tracer) or labels is None:
        return
    try:
        arr = np.asarray(labels)
    except (TypeError, ValueError, OverflowError):
        return
    if arr.dtype.kind not in "iu" or arr.size == 0:
        return
    target = np.dtype(jax.dtypes.canonicalize_dtype(arr.dtype))
    info = np.iinfo(target)
    bad = (arr < info.min) | (arr > info.max)
    if bad.any():
        pos = np.argwhere(bad)[:8]
        shown = ", ".join(f"{name}[{', '.join(map(str, p))}]={arr[tuple(p)]}" for p in pos)
        raise ValueError(
            f"`{name}` must be class indices; got value(s) outside {target} (JAX's integer "
            f"dtype here, jax_enable_x64 is off), which no vocabulary holds: {shown}")


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
    """Per-class weights ``[C]`` (constants: no gradient flows into them); the losses cast
    them to their accumulation dtype."""
    if weight is None:
        return None
    arr = float_array(weight, name)
    if arr.ndim != 1 or arr.shape[0] != num_classes:
        raise ValueError(
            f"`{name}` must be a 1-D array of length {num_classes} (one weight per class), "
            f"got {_describe(arr)}"
        )
    return jax.lax.stop_gradient(arr)


def static_float(value, name: str) -> float:
    """A concrete Python float from a static option, else ``TypeError``."""
    try:
        out = float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise TypeError(
            f"`{name}` must be a concrete Python number (it is static configuration), got "
            f"{type(value).__name__}; pass it as a Python float, not a traced array"
        ) from None
    if math.isnan(out):
        raise ValueError(f"`{name}` must not be nan")
    return out


def one_of(value, allowed: tuple, name: str) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is one of ``allowed``.

    >>> one_of("k3", ("k1", "k2", "k3"), "estimator")
    """
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}")


def positive_float(value, name: str, *, below: float | None = None) -> float:
    """A static float in ``(0, inf)`` (or ``(0, below)``), else ``ValueError`` naming ``name``.

    >>> positive_float(0.2, "clip_eps", below=1.0)
    0.2
    """
    out = static_float(value, name)
    if not (out > 0 and math.isfinite(out)) or (below is not None and out >= below):
        bound = f"in (0, {below})" if below is not None else "positive and finite"
        raise ValueError(f"`{name}` must be {bound}, got {value!r}")
    return out


def nonnegative_float(value, name: str) -> float:
    """A static finite float ``>= 0``, else ``ValueError`` naming ``name``."""
    out = static_float(value, name)
    if not (out >= 0 and math.isfinite(out)):
        raise ValueError(f"`{name}` must be >= 0 and finite, got {value!r}")
    return out


def optional_float_like(x: ArrayLike | None, shape: Sequence[int], name: str,
                        what: str) -> jax.Array | None:
    """None, or ``x`` as a float array of ``shape`` (``what`` says which shape)."""
    if x is None:
        return None
    arr = float_array(x, name)
    expect_shape(arr, shape, name, what)
    return arr


def options(
    *,
    reduction: str,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    temperature: float = 1.0,
    logit_softcap: float | None = None,
    residual: str = "auto",
    ignore_index: int = -100,
) -> Options:
    """Validate the static options; return the one :class:`~jaxent._options.Options`."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    if residual not in RESIDUALS:
        raise ValueError(f"`residual` must be one of {RESIDUALS}, got {residual!r}")
    eps = static_float(label_smoothing, "label_smoothing")
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"`label_smoothing` must be in [0, 1], got {eps}")
    zl = static_float(z_loss, "z_loss")
    if not (zl >= 0.0 and math.isfinite(zl)):
        raise ValueError(f"`z_loss` must be a finite number >= 0, got {zl}")
    temp = _static_temperature(temperature)
    cap = None
    if logit_softcap is not None:
        cap = static_float(logit_softcap, "logit_softcap")
        if not (cap >= _TINY and math.isfinite(cap)):
            raise ValueError(
                f"`logit_softcap` must be None or a finite number > 0 (at least {_TINY}), "
                f"got {cap}")
    return Options(eps, zl, temp, cap, residual, reduction,  # type: ignore[arg-type]
                   check_ignore_index(ignore_index))


def check_ignore_index(ignore_index) -> int:
    """``ignore_index`` as a Python int in the int32 range (class ids are 32-bit)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int | np.integer):
        raise TypeError(f"`ignore_index` must be a Python int, got {ignore_index!r}")
    if not -(2**31) <= int(ignore_index) < 2**31:
        raise ValueError(
            f"`ignore_index` must fit in int32 ([-2**31, 2**31)), got {int(ignore_index)}")
    return int(ignore_index)


def head_shape(h: jax.Array, k: jax.Array, layout: str, hn: str = "hidden",
               kn: str = "kernel") -> tuple[int, int]:
    """``(D, V)`` of a head ``h [..., D] @ k`` (``[D, V]`` or ``[V, D]`` by ``layout``),
    else ``ValueError`` naming ``hn``/``kn``, with a hint when ``k`` looks transposed."""
    if h.ndim < 1:
        raise ValueError(f"`{hn}` must have shape [..., D] (at least one dimension), got a "
                         "scalar")
    if k.ndim != 2:
        raise ValueError(f"`{kn}` must be 2-D, [D, V] for kernel_layout='dv' or [V, D] for "
                         f"'vd', got shape {tuple(k.shape)}")
    d = h.shape[-1]
    kd, v = (k.shape[0], k.shape[1]) if layout == "dv" else (k.shape[1], k.shape[0])
    if kd != d:
        other = "vd" if layout == "dv" else "dv"
        swapped = k.shape[1] if layout == "dv" else k.shape[0]
        hint = f"; it looks transposed, pass kernel_layout={other!r}" if swapped == d else ""
        raise ValueError(
            f"`{kn}` must have shape {'[D, V]' if layout == 'dv' else '[V, D]'} with D = "
            f"{hn}.shape[-1] = {d} (kernel_layout={layout!r}), got shape "
            f"{tuple(k.shape)}{hint}")
    if isinstance(v, int) and v < 1:
        raise ValueError(f"`{kn}` must have at least one vocabulary column (V >= 1), got "
                         f"shape {tuple(k.shape)} (kernel_layout={layout!r})")
    return d, v


def kernel_layout(value: str) -> str:
    """``"dv"`` or ``"vd"``."""
    if value not in LAYOUTS:
        raise ValueError(f"`kernel_layout` must be one of {LAYOUTS}, got {value!r}")
    return value


def _is_concrete(*xs) -> bool:
    """Whether every ``x`` can be read on this host: not traced, and not a global array with
    shards on other processes' devices (under ``jax.distributed`` only part of it is here)."""
    return not any(isinstance(x, jax.core.Tracer)
                   or (isinstance(x, jax.Array) and not x.is_fully_addressable) for x in xs)


def label_values(
    labels: jax.Array,
    num_classes: int,
    ignore_index: int,
    where: jax.Array | None = None,
    name: str = "labels",
) -> jax.Array:
    """Labels must lie in ``[0, num_classes)`` unless ignored or masked out by ``where``.

    Concrete labels: ``ValueError`` naming the bad values and their positions. Traced labels:
    returned through :data:`label_check_p` (reported when the caller uses
    ``checkify.checkify``). Returns ``labels``.
    """
    check_ignore_index(ignore_index)
    if _is_concrete(labels, where):
        y = np.asarray(labels).astype(np.int64)
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
        return labels
    bad = ~_rowmath.in_range(labels, num_classes) & ~_rowmath.equals(labels, ignore_index)
    if where is not None:
        bad = bad & where
    message = (f"`{name}` has values outside [0, {num_classes}) that are not ignore_index="
               f"{ignore_index}; their losses are nan")
    return label_check_p.bind(labels, bad, message=message)


# ------------------------------------------------------- checkify without an effect


label_check_p = jex_core.Primitive("jaxent_label_check")
"""``label_check_p.bind(labels, bad, message=...)`` is ``labels``; under ``checkify`` it
also raises ``message`` where ``any(bad)``."""


def _label_check_abstract(labels, bad, *, message):
    del bad, message
    return labels


def _label_check_batch(args, dims, *, message):
    labels, bad = args
    return label_check_p.bind(labels, bad, message=message), dims[0]


label_check_p.def_abstract_eval(_label_check_abstract)
label_check_p.def_impl(lambda labels, bad, *, message: labels)
mlir.register_lowering(label_check_p, lambda ctx, labels, bad, *, message: [labels])
batching.primitive_batchers[label_check_p] = _label_check_batch


def _register_checkify_rule() -> None:
    """Teach ``checkify`` the label check (its rule table is not public API: if it moves,
    traced labels are still ``nan``, only the checkify report is lost)."""
    try:
        from jax._src import checkify as _ck  # noqa: PLC0415
        table, failed = _ck.error_checks, _ck.FailedCheckError
    except (ImportError, AttributeError):  # pragma: no cover
        return

    def check(error, enabled_errors, labels, bad, message, *ctx):
        if failed not in enabled_errors:
            return error, labels
        err = failed(_ck.get_traceback(), message)
        return _ck.assert_func(*ctx, error, jnp.any(bad), err), labels

    # jax >= 0.12 passes its CheckifyContext first to every rule and to assert_func.
    if hasattr(_ck, "CheckifyContext"):
        table[label_check_p] = lambda ctx, error, enabled, labels, bad, *, message: check(
            error, enabled, labels, bad, message, ctx)
    else:
        table[label_check_p] = lambda error, enabled, labels, bad, *, message: check(
            error, enabled, labels, bad, message)


_register_checkify_rule()


def temperature_array(
    temperature, shape: Sequence[int], dtype
) -> tuple[float, jax.Array | None]:
    """A temperature that is either static or one value per row.

    A Python number (or NumPy scalar) is static configuration: returns ``(T, None)`` after
    the checks of :func:`options`. An array (NumPy or JAX, any rank) must be broadcastable
    to the labels' ``shape``: returns ``(1.0, temp)`` with ``temp`` broadcast to ``shape``,
    cast to ``dtype`` and under ``stop_gradient`` (a constant). Concrete arrays must be
    finite and ``> 0`` (else ``ValueError`` naming ``temperature``); traced ones that are
    not become ``nan`` there, so the rows they divide get ``nan`` losses, never a silently
    wrong finite number. A wrong shape raises ``ValueError`` naming ``temperature``.
    """
    is_array = isinstance(temperature, jax.Array) or (
        isinstance(temperature, np.ndarray) and temperature.ndim > 0)
    if not is_array:
        return _static_temperature(temperature), None
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
    arr = arr.astype(dtype)
    if _is_concrete(arr):
        a = np.asarray(arr, np.float64)
        bad = ~(np.isfinite(a) & (a >= _TINY))
        if np.any(bad):
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"`temperature` must be finite and > 0 (at least {_TINY}) everywhere, got "
                f"{a[where]} at index {where}")
    else:
        arr = jnp.where(jnp.isfinite(arr) & (arr >= _TINY), arr, jnp.nan)
    return 1.0, jax.lax.stop_gradient(jnp.broadcast_to(arr, tuple(shape)))


def _static_temperature(temperature) -> float:
    temp = static_float(temperature, "temperature")
    if not (temp >= _TINY and math.isfinite(temp)):
        raise ValueError(
            f"`temperature` must be a finite number > 0 (at least {_TINY}), got {temp}")
    return temp


def token_values(tokens: jax.Array, num_classes: int, where: jax.Array | None = None,
                 name: str = "tokens") -> jax.Array:
    """Token ids must lie in ``[0, num_classes)`` where ``where`` is True (no ignore value).

    Concrete ids: ``ValueError`` naming the bad values and positions. Traced ids: returned
    through :data:`label_check_p` (``checkify`` reports them; their outputs are ``nan``).
    """
    if _is_concrete(tokens, where):
        y = np.asarray(tokens).astype(np.int64)
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
        return tokens
    bad_ids = ~_rowmath.in_range(tokens, num_classes)
    if where is not None:
        bad_ids = bad_ids & where
    return label_check_p.bind(tokens, bad_ids, message=f"`{name}` has values outside "
                              f"[0, {num_classes}); their outputs are nan")


def distinct_ids(ids: jax.Array, where: jax.Array | None = None,
                 name: str = "ids") -> jax.Array:
    """``[...]`` True on the rows of ``ids [..., k]`` that repeat an id (where ``where`` is
    True). Concrete ids: such a row raises ``ValueError`` naming ``name`` and the row."""
    if _is_concrete(ids, where):
        srt = np.sort(np.asarray(ids), axis=-1)
        bad = np.any(srt[..., 1:] == srt[..., :-1], axis=-1)
        if where is not None:
            bad &= np.asarray(where)
        if bad.any():
            row = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"`{name}` must hold distinct ids in each row; row {row} "
                             f"repeats one: {np.asarray(ids)[row].tolist()}")
        return jnp.asarray(bad)
    ordered = jnp.sort(ids, axis=-1)
    dup = jnp.any(ordered[..., 1:] == ordered[..., :-1], axis=-1)
    return dup if where is None else dup & where


def _axis_names(names) -> tuple:
    if names is None:
        return ()
    return tuple(names) if isinstance(names, tuple | list) else (names,)


def disjoint_axes(vocab_axis, token_axis, vocab_name: str = "axis_name",
                  token_name: str = "token_axis_name") -> None:
    """The vocabulary and token mesh axes must not share an axis (``ValueError``): one
    axis cannot split both the classes and the tokens, and the sums over it would count
    the other dimension's shards as well."""
    shared = set(_axis_names(vocab_axis)) & set(_axis_names(token_axis))
    if shared:
        raise ValueError(
            f"`{token_name}` ({token_axis!r}) must not share a mesh axis with `{vocab_name}` "
            f"({vocab_axis!r}): {sorted(map(str, shared))} would split both the vocabulary "
            "and the tokens")
