r"""Per-row temperatures on top of :mod:`jaxent._rowmath`.

:mod:`jaxent._rowmath` reads a static temperature from :class:`~jaxent._options.Options`.
A temperature may also be an array, one value per row (e.g. per prompt in RL sampling):
``temp`` below is then an array broadcastable against the logits it divides (``[N, 1]``
against a ``[N, B]`` block, ``[N]`` against ``[N]``), and ``opts.temperature`` is 1. With
``temp=None`` every function is exactly its :mod:`jaxent._rowmath` namesake.

With a row temperature :math:`T_n` the transform is
:math:`z = \mathrm{cap}\tanh(x / (T_n\,\mathrm{cap}))` and, as in :mod:`jaxent._rowmath`,
the row max stays in the raw domain: without a cap the shift is ``(x - m_raw) / T_n``
(exactly 0 at the max), with a cap ``transform(x) - transform(m_raw)``.
"""

from __future__ import annotations

import dataclasses

import jax

from jaxent import _rowmath
from jaxent._options import Options


def _unit(opts: Options) -> Options:
    return opts if opts.temperature == 1.0 else dataclasses.replace(opts, temperature=1.0)


def transform(x: jax.Array, opts: Options, temp: jax.Array | None = None) -> jax.Array:
    """``cap * tanh((x / T) / cap)`` with ``T`` from ``opts`` or the row array ``temp``."""
    if temp is None:
        return _rowmath.transform(x, opts)
    z = x.astype(_rowmath.compute_dtype(x.dtype)) / temp
    return _rowmath.transform(z, _unit(opts))


def shift(x: jax.Array, m_raw: jax.Array, opts: Options,
          temp: jax.Array | None = None) -> jax.Array:
    """``transform(x) - transform(m_raw)`` (see :func:`jaxent._rowmath.shift`)."""
    if temp is None:
        return _rowmath.shift(x, m_raw, opts)
    unit = _unit(opts)
    if opts.logit_softcap is None:
        return _rowmath.shift(x, m_raw, unit) / temp
    acc = _rowmath.compute_dtype(x.dtype)
    return _rowmath.shift(x.astype(acc) / temp, m_raw.astype(acc) / temp, unit)


def transform_vjp(dz: jax.Array, x: jax.Array, opts: Options,
                  temp: jax.Array | None = None) -> jax.Array:
    """Chain ``d/dz`` back to ``d/dx`` (see :func:`jaxent._rowmath.transform_vjp`)."""
    if temp is None:
        return _rowmath.transform_vjp(dz, x, opts)
    acc = _rowmath.compute_dtype(x.dtype)
    return _rowmath.transform_vjp(dz, x.astype(acc) / temp, _unit(opts)) / temp
