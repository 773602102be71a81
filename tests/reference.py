"""Independent float64 references, written from the formulas with NumPy (and plain autodiff).

Nothing here imports jaxent. The benchmark imports the same references to check that every
contender it times computes the right numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _transform(x, temperature, logit_softcap, xp=np):
    z = x / temperature
    if logit_softcap is not None:
        z = logit_softcap * xp.tanh(z / logit_softcap)
    return z


def _log_softmax(z, axis, xp=np):
    m = xp.max(z, axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0.0)
    lse = m + xp.log(xp.sum(xp.exp(z - m), axis=axis, keepdims=True))
    return z - lse, xp.squeeze(lse, axis)


def _last(v, ndim):
    """A class vector ``[C]`` shaped to broadcast along the last of ``ndim`` axes."""
    return v.reshape((1,) * (ndim - 1) + (-1,))


def _reduce(losses, denom, reduction, xp=np):
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / xp.where(denom == 0, 1.0, denom)


def cross_entropy(logits, labels, *, axis=-1, weight=None, ignore_index=-100,
                  label_smoothing=0.0, reduction="mean", where=None, z_loss=0.0,
                  logit_softcap=None, temperature=1.0, xp=np):
    """Integer-label cross-entropy (PyTorch semantics, jaxent's extras), float64 by default.

    ``xp=jnp`` evaluates the same formula with jax.numpy so that autodiff gives reference
    gradients (use float64 inputs under ``jax.enable_x64``).
    """
    x = xp.moveaxis(xp.asarray(logits, dtype=np.float64) if xp is np else logits, axis, -1)
    y = xp.asarray(labels)
    c = x.shape[-1]
    logp, lse = _log_softmax(_transform(x, temperature, logit_softcap, xp), -1, xp)
    w = xp.ones((c,), x.dtype) if weight is None else xp.asarray(weight, x.dtype)
    counted = y != ignore_index
    if where is not None:
        counted = counted & xp.asarray(where)
    safe = xp.clip(y, 0, c - 1)
    onehot = (_last(xp.arange(c), x.ndim) == safe[..., None]).astype(x.dtype)
    w_y = xp.where(counted, w[safe], 0.0)
    picked = xp.sum(xp.where(onehot > 0, logp, 0.0), axis=-1)
    loss = -(1.0 - label_smoothing) * w_y * picked
    if label_smoothing > 0:
        loss = loss - (label_smoothing / c) * xp.sum(logp * _last(w, x.ndim), axis=-1)
    loss = loss + z_loss * lse**2
    loss = xp.where(counted, loss, 0.0)
    return _reduce(loss, w_y.sum(), reduction, xp)


def soft_cross_entropy(logits, targets, *, axis=-1, weight=None, label_smoothing=0.0,
                       reduction="mean", where=None, z_loss=0.0, logit_softcap=None,
                       temperature=1.0, xp=np):
    """Probability-target cross-entropy with 0 * log 0 = 0."""
    if xp is np:
        logits, targets = np.asarray(logits, np.float64), np.asarray(targets, np.float64)
    x, t = xp.moveaxis(logits, axis, -1), xp.moveaxis(targets, axis, -1)
    c = x.shape[-1]
    logp, lse = _log_softmax(_transform(x, temperature, logit_softcap, xp), -1, xp)
    t = (1.0 - label_smoothing) * t + label_smoothing / c
    if weight is not None:
        t = t * _last(xp.asarray(weight, x.dtype), x.ndim)
    with np.errstate(invalid="ignore"):  # 0 * -inf, selected away
        loss = -xp.sum(xp.where(t == 0, 0.0, t * logp), axis=-1) + z_loss * lse**2
    counted = xp.ones(loss.shape, bool) if where is None else xp.asarray(where)
    loss = xp.where(counted, loss, 0.0)
    return _reduce(loss, counted.sum(), reduction, xp)


def nll_loss(log_probs, labels, *, axis=-1, weight=None, ignore_index=-100, reduction="mean"):
    lp = np.moveaxis(np.asarray(log_probs, np.float64), axis, -1)
    y = np.asarray(labels)
    c = lp.shape[-1]
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    counted = y != ignore_index
    safe = np.clip(y, 0, c - 1)
    w_y = np.where(counted, w[safe], 0.0)
    picked = np.take_along_axis(lp, safe[..., None], -1)[..., 0]
    return _reduce(np.where(counted, -w_y * picked, 0.0), w_y.sum(), reduction)


def binary_cross_entropy(logits, targets, *, weight=None, pos_weight=None, reduction="mean"):
    """-w [p t log s(x) + (1 - t) log(1 - s(x))] straight from the definition, in float64."""
    x, t = np.asarray(logits, np.float64), np.asarray(targets, np.float64)
    log_sig = -np.logaddexp(0.0, -x)
    log_one_minus = -np.logaddexp(0.0, x)
    p = 1.0 if pos_weight is None else np.asarray(pos_weight, np.float64)
    loss = -(p * t * log_sig + (1.0 - t) * log_one_minus)
    if weight is not None:
        loss = loss * np.asarray(weight, np.float64)
    return _reduce(loss, loss.size, reduction)


def grad64(fn, *args, argnums=0):
    """Gradient of a jax.numpy reference evaluated in float64."""
    with jax.enable_x64(True):
        args64 = [jnp.asarray(np.asarray(a, np.float64)) if np.issubdtype(np.asarray(a).dtype,
                  np.floating) else jnp.asarray(a) for a in args]
        return jax.tree.map(np.asarray, jax.grad(fn, argnums=argnums)(*args64))


def token_log_probs(logits, tokens, *, temperature=1.0, logit_softcap=None, where=None,
                    xp=np):
    """``log softmax(z)[token]`` and the entropy ``-sum p log p`` per row (class axis last).

    ``temperature`` is a number or an array broadcastable to ``logits.shape`` (e.g. the
    tokens' shape plus a trailing 1). Rows outside ``where`` are 0.
    """
    x = xp.asarray(logits, np.float64) if xp is np else logits
    logp, _ = _log_softmax(_transform(x, temperature, logit_softcap, xp), -1, xp)
    c = x.shape[-1]
    y = xp.clip(xp.asarray(tokens), 0, c - 1)
    onehot = _last(xp.arange(c), x.ndim) == y[..., None]
    picked = xp.sum(xp.where(onehot, logp, 0.0), axis=-1)
    p = xp.exp(logp)
    ent = -xp.sum(xp.where(p > 0, p * logp, 0.0), axis=-1)
    if where is not None:
        picked, ent = xp.where(where, picked, 0.0), xp.where(where, ent, 0.0)
    return picked, ent


def distillation(student, teacher, *, divergence="kl", beta=0.5, temperature=1.0,
                 where=None, reduction="mean", xp=np):
    """KL(q || p) ("kl"), KL(p || q) ("reverse_kl") or Liger's generalized JSD
    ``beta KL(q || M) + (1 - beta) KL(p || M)``, ``M = beta q + (1 - beta) p`` ("jsd"; at
    beta 0 the forward KL, at beta 1 the reverse KL), student ``p``, teacher ``q``, class
    axis last; ``"mean"`` over the counted rows (0 when none)."""
    if xp is np:
        student, teacher = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    lp, _ = _log_softmax(student / temperature, -1, xp)
    lq, _ = _log_softmax(teacher / temperature, -1, xp)
    p, q = xp.exp(lp), xp.exp(lq)

    def kl(a, la, lb):
        return xp.sum(xp.where(a > 0, a * (la - lb), 0.0), axis=-1)

    if divergence == "kl" or (divergence == "jsd" and beta == 0.0):
        loss = kl(q, lq, lp)
    elif divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        loss = kl(p, lp, lq)
    else:
        lm = xp.log(beta * q + (1.0 - beta) * p)
        loss = beta * kl(q, lq, lm) + (1.0 - beta) * kl(p, lp, lm)
    counted = xp.ones(loss.shape, bool) if where is None else xp.asarray(where)
    loss = xp.where(counted, loss, 0.0)
    return _reduce(loss, counted.sum(), reduction, xp)
