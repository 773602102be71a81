"""Candidate XLA formulations of cross-entropy value_and_grad (the record behind
``benchmarks/FINDINGS.md``), timed side by side by ``python -m jaxent.bench --suite
explore-ce N C DTYPE [NAMES...]``.

Every formulation computes ``mean(lse - z_y)`` with integer labels; :data:`FORMS` maps its
name to the loss. A name prefixed ``fwd:`` times the forward only; suffixed ``_donate``, the
logits are donated to the gradient. The per-row cotangent path (``reduction="none"``) is
checked by :func:`check_per_row`. :func:`findings_cross_entropy` is the formulation
FINDINGS.md recommends, usable beside the main suite's contenders as
``--extra proposed=jaxent.bench.formulations:findings_cross_entropy``. These are experiments,
not jaxent's implementation.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
SPLIT = 32768  # longest row XLA CPU reduces at full speed


# ----------------------------------------------------------------------------------- helpers
def _onehot(y: jax.Array, c: int) -> jax.Array:
    return jax.lax.broadcasted_iota(jnp.int32, (y.shape[0], c), 1) == y[:, None]


def _pick(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x, y[:, None], axis=-1)[:, 0].astype(F32)


def _split_factor(c: int, piece: int = SPLIT) -> int:
    """Smallest k dividing c with c / k <= piece (1 when c is short)."""
    if c <= piece:
        return 1
    for k in range(-(-c // piece), c + 1):
        if c % k == 0 and c // k >= 128:
            return k
    return 1


def row_reduce(v: jax.Array, op: str) -> jax.Array:
    """Row max/sum over the last axis, computed on a [n*k, c/k] view when the row is long.

    XLA CPU reduces rows longer than ~32K several times slower; the 2-D view (a bitcast) keeps
    every reduced row short. (A 3-D reshape [n, k, c/k] is simplified back into one long
    reduction by XLA, so it does not help.) When k does not divide c, the row is cut into a
    divisible head plus a short tail.
    """
    n, c = v.shape
    red = jnp.max if op == "max" else jnp.sum
    if c <= SPLIT:
        return red(v, axis=-1)
    k = _split_factor(c)
    if k > 1:
        return red(red(v.reshape(n * k, c // k), axis=-1).reshape(n, k), axis=-1)
    k = c // SPLIT
    head = red(v[:, : k * SPLIT].reshape(n * k, SPLIT), axis=-1).reshape(n, k)
    tail = red(v[:, k * SPLIT :], axis=-1)[:, None]
    return red(jnp.concatenate([head, tail], 1), axis=-1)


def row_sumexp(x: jax.Array, m: jax.Array) -> jax.Array:
    """sum(exp(x - m[:, None])) over rows, computed on the [n*k, c/k] view for long rows, with
    the subtraction and exp in that view too (fused into the reduction; no [n, c] buffer)."""
    n, c = x.shape
    k = _split_factor(c)
    if c <= SPLIT or k == 1:
        return jnp.sum(jnp.exp(x - m[:, None]), axis=-1)
    xr = x.reshape(n * k, c // k)
    return jnp.sum(jnp.exp(xr - jnp.repeat(m, k)[:, None]), axis=-1).reshape(n, k).sum(-1)


def rowmax(x: jax.Array, split: bool) -> jax.Array:
    return row_reduce(x, "max") if split else jnp.max(x, axis=-1)


def rowsum(x: jax.Array, split: bool) -> jax.Array:
    return row_reduce(x, "sum") if split else jnp.sum(x, axis=-1)


# ------------------------------------------------------------------------ (a) optax, (a2) naive
def optax_loss(x, y):
    import optax

    return optax.losses.softmax_cross_entropy_with_integer_labels(x, y).mean()


def naive_loss(x, y):
    return -_pick(jax.nn.log_softmax(x.astype(F32)), y).mean()


# ----------------------------------------------- (b) custom_vjp, residual = lse, bwd recomputes
def make_lse_only(split: bool) -> Callable:
    @jax.custom_vjp
    def per_row(x, y):
        return fwd(x, y)[0]

    def fwd(x, y):
        xf = x.astype(F32)
        m = jax.lax.stop_gradient(rowmax(xf, split))
        lse = m + jnp.log(row_sumexp(xf, m) if split else rowsum(jnp.exp(xf - m[:, None]), False))
        return lse - _pick(x, y), (x, y, lse)

    def bwd(res, g):
        x, y, lse = res
        p = jnp.exp(x.astype(F32) - lse[:, None])
        dz = g[:, None] * (p - _onehot(y, x.shape[1]))
        return dz.astype(x.dtype), None

    per_row.defvjp(fwd, bwd)
    return per_row


# ------------------------------------------- (c) custom_vjp, gradient computed in the forward
def rowsum_f32(e: jax.Array, how: str, split: bool) -> jax.Array:
    """Row sum accumulated in float32 without materializing a float32 copy of ``e``."""
    if how == "dot":  # matrix-vector product, bf16 in, f32 accumulate
        ones = jnp.ones((e.shape[1],), e.dtype)
        return jax.lax.dot_general(e, ones, (((1,), (0,)), ((), ())),
                                   preferred_element_type=F32)
    if how == "vsum":  # variadic reduce: not claimed by the YNN fusion, convert stays fused
        z = jnp.zeros((), F32)
        ef = e.astype(F32)
        return jax.lax.reduce((ef, ef), (z, z), lambda a, b: (a[0] + b[0], a[1]), (1,))[0]
    if how == "vsum2":  # (sum, max) variadic reduce; max(e) == 1 exactly, keeps both outputs live
        z, ninf = jnp.zeros((), F32), jnp.array(-jnp.inf, F32)
        ef = e.astype(F32)
        s, mx = jax.lax.reduce((ef, ef), (z, ninf),
                               lambda a, b: (a[0] + b[0], jnp.maximum(a[1], b[1])), (1,))
        return s * mx
    return rowsum(e.astype(F32), split)


def make_grad_in_fwd(split: bool, save: str = "grad", order: bool = False,
                     how: str = "sum") -> Callable:
    """One exp per element. save="grad": residual is dz = e/s - onehot (logits dtype);
    save="e": residual is e = exp(x-m) (f32) and 1/s, the bwd forms (e*r - onehot)*g."""

    @jax.custom_vjp
    def per_row(x, y):
        return fwd(x, y)[0]

    def fwd(x, y):
        xf = x.astype(F32)
        m = rowmax(x, split).astype(F32)  # max is exact in the logits dtype
        zy = _pick(x, y)
        if order:  # data dependence: the pick reads x before exp may overwrite it in place
            m = jnp.maximum(m, zy)
        e = jnp.exp(xf - m[:, None])
        if save == "grad16":  # e stored in the logits dtype: lives in the output buffer
            e = e.astype(x.dtype)
            save_ = "grad"
        else:
            save_ = save
        s = rowsum_f32(e, how, split)
        lse = m + jnp.log(s)
        loss = lse - zy
        r = 1.0 / s
        if save_ == "grad":
            dz = (e.astype(F32) * r[:, None] - _onehot(y, x.shape[1])).astype(x.dtype)
            return loss, (dz,)
        return loss, (e.astype(x.dtype) if save == "e16" else e, r, y, jnp.zeros((0,), x.dtype))

    def bwd(res, g):
        if save in ("grad", "grad16"):
            (dz,) = res
            return (dz.astype(F32) * g[:, None]).astype(dz.dtype), None
        e, r, y, dt = res
        dz = (e.astype(F32) * r[:, None] - _onehot(y, e.shape[1])) * g[:, None]
        return dz.astype(dt.dtype), None

    per_row.defvjp(fwd, bwd)
    return per_row


# ------------------------------------ (g) gradient in fwd, lse from log-softmax style: x - lse
def make_grad_logsoftmax(split: bool) -> Callable:
    """Residual = dz computed as exp(x - lse) - onehot (two exps but e never materialized)."""

    @jax.custom_vjp
    def per_row(x, y):
        return fwd(x, y)[0]

    def fwd(x, y):
        xf = x.astype(F32)
        m = rowmax(xf, split)
        lse = m + jnp.log(rowsum(jnp.exp(xf - m[:, None]), split))
        dz = (jnp.exp(xf - lse[:, None]) - _onehot(y, x.shape[1])).astype(x.dtype)
        return lse - _pick(x, y), (dz,)

    def bwd(res, g):
        (dz,) = res
        return (dz.astype(F32) * g[:, None]).astype(dz.dtype), None

    per_row.defvjp(fwd, bwd)
    return per_row


# ------------------------- (h) the label's logit as the shift: no row-max pass (issue 26)
CAP = 64.0  # a row with a logit this far above its label's is redone with its row max


def _label_shift_sum(x: jax.Array, zy: jax.Array, split: bool, keep: bool):
    """``(e, s)`` with ``e = exp(min(x - z_y, CAP))`` (materialized when ``keep``, else
    fused into the row sum, on the ``[n*k, c/k]`` view for long rows when ``split``)."""
    n, c = x.shape
    k = _split_factor(c) if split and not keep else 1
    if k == 1:
        e = jnp.exp(jnp.minimum(x.astype(F32) - zy[:, None], CAP))
        return e, jnp.sum(e, axis=-1)
    xr = x.reshape(n * k, c // k).astype(F32)
    e = jnp.exp(jnp.minimum(xr - jnp.repeat(zy, k)[:, None], CAP))
    return None, jnp.sum(e, axis=-1).reshape(n, k).sum(-1)


def _unsafe_rows_redone(x, bad, m, s, e=None):
    """``(m, s, e)`` with the rows ``bad`` recomputed from their row max, in a loop that runs
    once when any row is bad and never otherwise (it reads the logits only then)."""
    def redo(carry):
        _, m, s, e = carry
        mt = jnp.max(x, axis=-1).astype(F32)
        m = jnp.where(bad, jnp.where(jnp.isfinite(mt), mt, 0.0), m)
        et = jnp.exp(x.astype(F32) - m[:, None])
        if e is not None:
            et = jnp.where(bad[:, None], et, e)
        return jnp.int32(1), m, jnp.where(bad, jnp.sum(et, axis=-1), s), et if e is not None else e

    start = 1 - bad.any().astype(jnp.int32)
    _, m, s, e = jax.lax.while_loop(lambda c: c[0] < 1, redo, (start, m, s, e))
    return m, s, e


def make_label_shift(residual: str, split: bool = False) -> Callable:
    """The shift is the label's logit ``z_y`` instead of the row max: ``s = sum exp(min(x -
    z_y, CAP))`` needs no max pass, and ``s < e^CAP`` proves that no logit was capped (each
    term is at most ``s``); other rows (a logit ``CAP`` above the label's, or ``inf``/``nan``)
    are redone with the row max. residual="grad": ``e`` is written once and turned into the
    gradient in place (3 passes, 1 exp; the logits stay alive past ``e``, so ``e`` cannot take
    their buffer); residual="lse": fused ``sum(exp)``, the backward forms ``p`` again (2
    passes, 2 exps)."""

    @jax.custom_vjp
    def per_row(x, y):
        return fwd(x, y)[0]

    def fwd(x, y):
        zy = _pick(x, y)
        keep = residual == "grad"
        e, s = _label_shift_sum(x, zy, split, keep)
        bad = ~(s < np.exp(np.float32(CAP)))
        m, s, e = _unsafe_rows_redone(x, bad, zy, s, e if keep else None)
        loss = m + jnp.log(s) - zy
        if keep:
            dz = (e * (1.0 / s)[:, None] - _onehot(y, x.shape[1])).astype(x.dtype)
            return loss, (dz, y, zy, jnp.zeros((0,), x.dtype))
        return loss, (x, y, m + jnp.log(s), jnp.zeros((0,), x.dtype))

    def bwd(res, g):
        a, y, lse, dt = res
        if residual == "grad":
            return (a.astype(F32) * g[:, None]).astype(dt.dtype), None
        p = jnp.exp(a.astype(F32) - lse[:, None])
        return (g[:, None] * (p - _onehot(y, a.shape[1]))).astype(dt.dtype), None

    per_row.defvjp(fwd, bwd)
    return per_row


def mean_of(per_row: Callable) -> Callable:
    return lambda x, y: per_row(x, y).mean()


FORMS: dict[str, Callable] = {
    "optax": optax_loss,
    "naive": naive_loss,
    "lse_only": mean_of(make_lse_only(False)),
    "lse_only_split": mean_of(make_lse_only(True)),
    "grad_fwd": mean_of(make_grad_in_fwd(False)),
    "grad_fwd_split": mean_of(make_grad_in_fwd(True)),
    "grad_fwd_ord": mean_of(make_grad_in_fwd(False, order=True)),
    "grad_fwd_ord_split": mean_of(make_grad_in_fwd(True, order=True)),
    "grad16_ord": mean_of(make_grad_in_fwd(False, "grad16", order=True)),
    "grad16_ord_split": mean_of(make_grad_in_fwd(True, "grad16", order=True)),
    "grad16_dot": mean_of(make_grad_in_fwd(False, "grad16", order=True, how="dot")),
    "grad16_vsum": mean_of(make_grad_in_fwd(False, "grad16", order=True, how="vsum")),
    "grad_dot": mean_of(make_grad_in_fwd(False, "grad", order=True, how="dot")),
    "grad_vsum": mean_of(make_grad_in_fwd(False, "grad", order=True, how="vsum")),
    "grad16_vsum2": mean_of(make_grad_in_fwd(False, "grad16", order=True, how="vsum2")),
    "grad_vsum2": mean_of(make_grad_in_fwd(False, "grad", order=True, how="vsum2")),
    "save_e": mean_of(make_grad_in_fwd(False, "e")),
    "save_e_split": mean_of(make_grad_in_fwd(True, "e")),
    "save_e16_split": mean_of(make_grad_in_fwd(True, "e16")),
    "grad_lsm_split": mean_of(make_grad_logsoftmax(True)),
    "label_shift": mean_of(make_label_shift("grad")),
    "label_shift_lse": mean_of(make_label_shift("lse")),
    "label_shift_lse_split": mean_of(make_label_shift("lse", split=True)),
}


def check_per_row(n: int = 64, c: int = 1000) -> None:
    """Every custom_vjp formulation handles a per-row cotangent (reduction='none')."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (n, c)) * 3
    y = jax.random.randint(k2, (n,), 0, c)
    # Rows the label shift must redo: a logit 300 above the rest, a label 80 below its row.
    x = x.at[0, (y[0] + 1) % c].add(300.0).at[1].add(30.0).at[1, y[1]].set(-50.0)
    w = jax.random.uniform(k3, (n,))
    import optax

    ce = optax.losses.softmax_cross_entropy_with_integer_labels
    ref = jax.grad(lambda x: (ce(x, y) * w).sum())(x)
    makers = [make_lse_only, make_grad_in_fwd, make_grad_logsoftmax,
              lambda split: make_label_shift("grad", split),
              lambda split: make_label_shift("lse", split)]
    for mk in makers:
        for split in (False, True):
            f = mk(split)
            got = jax.jit(jax.grad(lambda x, f=f: (f(x, y) * w).sum()))(x)
            np.testing.assert_allclose(got, ref, atol=1e-6, rtol=1e-5)


# ------------------------------------------- the formulation recommended in FINDINGS.md
def _row_sum_f32(e: jax.Array) -> jax.Array:
    """Row sum of ``e`` accumulated in f32; for 16-bit ``e`` the convert stays fused."""
    if e.dtype == F32:
        return jnp.sum(e, axis=-1)
    ef = e.astype(F32)
    s, mx = jax.lax.reduce((ef, ef), (jnp.float32(0), jnp.float32(-jnp.inf)),
                           lambda a, b: (a[0] + b[0], jnp.maximum(a[1], b[1])), (1,))
    return s * mx  # mx == 1 exactly; keeps the variadic reduce (and its fused convert)


def _findings_fwd(x: jax.Array, y: jax.Array):
    m = jnp.max(x, axis=-1).astype(F32)
    z_y = jnp.take_along_axis(x, y[:, None], axis=-1)[:, 0].astype(F32)
    m = jnp.maximum(m, z_y)  # == m; orders the pick before exp may overwrite x in place
    e = jnp.exp(x.astype(F32) - m[:, None]).astype(x.dtype)
    s = _row_sum_f32(e)
    lse = m + jnp.log(s)
    dz = (e.astype(F32) * (1.0 / s)[:, None] - _onehot(y, x.shape[1])).astype(x.dtype)
    return lse - z_y, (dz,)


def _findings_bwd(res, g):
    (dz,) = res
    return (dz.astype(F32) * g[:, None]).astype(dz.dtype), None


@jax.custom_vjp
def findings_rows(x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-row CE, gradient computed in the forward with one exp per element (FINDINGS.md)."""
    return _findings_fwd(x, y)[0]


findings_rows.defvjp(_findings_fwd, _findings_bwd)


def findings_cross_entropy(x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean CE with the FINDINGS.md formulation (for ``python -m jaxent.bench --extra``)."""
    return findings_rows(x, y).mean()
