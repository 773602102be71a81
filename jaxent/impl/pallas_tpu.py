r"""Pallas Mosaic kernels for TPUs: plain cross-entropy of materialized logits, and the
block ``Config`` every TPU kernel takes.

In Mosaic's style, the reduction runs along the *last grid axis* (``"arbitrary"``), Pallas
pipelines the tiles HBM -> VMEM, and the running per-row statistics stay in the (revisited)
output blocks between grid steps. Plain CE: forward grid ``(Np / block_n, Cp / block_c)``
folding :func:`jaxent._rowmath.update_stats`; backward one ``dx`` tile per step. The logits
are not padded: edge tiles are partial blocks (unspecified values past the array, which
the column mask and the dropped out-of-bounds writes keep out). The fused heads' kernels
are built from their row statistics in :mod:`jaxent.impl.pallas_stats_tpu`.

``jax.export(..., platforms=["tpu"])`` gives ``tpu_custom_call``\ s (Mosaic has a stable
custom call; no safety check to disable), from any host: every per-row or per-class vector
travels as a ``[1, n]`` array in ``(1, block)`` blocks, since Mosaic would ask the default
device (a CPU on such a host) how to tile 1-D blocks. Every kernel states its cost
(:func:`jaxent.impl.pallas_common.cost`); ``vmem_limit_bytes`` raises Mosaic's scoped limit
when a large ``D`` needs it. Unmeasured on a TPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxent import _rowmath
from jaxent._options import Options
from jaxent.impl import pallas_common as common

MOSAIC_TARGET = "tpu_custom_call"
EXPORT_CHECKS = ()


@dataclasses.dataclass(frozen=True)
class Config:
    """Block sizes of the Mosaic kernels.

    Attributes:
      block_n: tokens per tile: a power of two >= 128 or a multiple of 1024 (the per-row
        vectors are ``(1, block_n)`` blocks: whole lanes).
      block_v: vocabulary (or class) columns per tile (a multiple of 128).
      vmem_limit_bytes: Mosaic's scoped VMEM limit (None: its default).
    """

    block_n: int = 256
    block_v: int = 512
    vmem_limit_bytes: int | None = None

    def __post_init__(self):
        bn, bv = self.block_n, self.block_v
        if not (bn >= 128 and (bn & (bn - 1) == 0 or bn % 1024 == 0)):
            raise ValueError(
                f"`block_n` must be a power of two >= 128 or a multiple of 1024 (TPU), got {bn}")
        if bv <= 0 or bv % 128:
            raise ValueError(f"`block_v` must be a positive multiple of 128 (TPU), got {bv}")

    def padded(self, n: int, d: int, v: int) -> tuple[int, int, int]:
        """``(Np, D, Vp)``: tokens and vocabulary padded to whole blocks, ``D`` as is."""
        return common.round_up(n, self.block_n), d, common.round_up(v, self.block_v)


def default_config(n: int, d: int, v: int, dtype) -> Config:
    """Blocks that keep one step's tiles within ~12 MB of VMEM: ``block_v = 512``
    (``256`` past ``D = 4096``, and the largest of 512, 256, 128 that divides ``V`` when
    one does: a vocabulary padded to whole blocks costs a padded copy of the kernel and of
    its gradient), ``block_n = 256`` (128 for few tokens), and a 64 MB scoped limit when
    the tiles need more than Mosaic's default 16 MB."""
    item = jnp.dtype(dtype).itemsize
    bn = 128 if n <= 128 else 256
    bv = 512 if d <= 4096 else 256
    bv = next((b for b in (bv, 256, 128) if b <= bv and v % b == 0), bv)
    need = 2 * (bn * d + d * bv) * item + 4 * (bn * d + d * bv + 2 * bn * bv)
    return Config(block_n=bn, block_v=bv,
                  vmem_limit_bytes=None if need < 12 * 2**20 else 64 * 2**20)


def candidates(n: int, d: int, v: int, dtype) -> list[Config]:
    """Configs worth timing (:func:`jaxent.autotune`): the default first, then token tiles
    of 128-512 x vocabulary tiles of 256-1024 (with the default's VMEM limit)."""
    base = default_config(n, d, v, dtype)
    out = [base]
    for bn in (128, 256, 512):
        for bv in (256, 512, 1024):
            if bn <= max(128, n) * 2 and bv <= max(128, v) * 2:
                out.append(dataclasses.replace(base, block_n=bn, block_v=bv))
    return list(dict.fromkeys(out))


def _params(cfg: Config):
    return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                vmem_limit_bytes=cfg.vmem_limit_bytes)


def _names(spec) -> list[str]:
    return ["m", "s", "zy"] + (["wz", "wseen"] if spec.opts.smoothing else [])


def _lanes(x):
    """A vector ``[n]`` as ``[1, n]``: Mosaic lays 1-D blocks out by asking the default
    device for its tiling, which a CPU host exporting for tpu cannot answer; ``(1, b)``
    blocks of ``[1, n]`` need no such query (and keep the vector lane-dense)."""
    return None if x is None else x.reshape(1, -1)


def _row(bn: int) -> pl.BlockSpec:
    """The ``(1, bn)`` block of a token vector (:func:`_lanes`) on a ``(token tile, class
    tile)`` grid."""
    return pl.BlockSpec((1, bn), lambda i, j: (0, i))


def _col(bv: int) -> pl.BlockSpec:
    """The ``(1, bv)`` block of a class vector (the class weights)."""
    return pl.BlockSpec((1, bv), lambda i, j: (0, j))


def _read(ref):
    """A ``(1, b)`` vector block as ``[b]``."""
    return None if ref is None else ref[...].reshape(-1)


def _fwd_kernel(*refs, spec, has_w):
    """Forward step (token tile ``i``, class tile ``j``)."""
    x_ref, *rest = refs
    wt_ref = rest.pop(0) if has_w else None
    y_ref, *outs = rest
    names = _names(spec)
    bn, bv = spec.config.block_n, spec.config.block_v
    j = pl.program_id(1)
    acc = _rowmath.compute_dtype(x_ref.dtype)

    @pl.when(j == 0)
    def _():
        init = common.init_stats(bn, acc, spec.opts)
        for name, ref in zip(names, outs, strict=True):
            ref[...] = getattr(init, name).reshape(ref.shape)

    got = dict(zip(names, (_read(r) for r in outs), strict=True))
    st = _rowmath.Stats(got["m"], got["s"], got["zy"], got.get("wz"), got.get("wseen"), None)
    st = common.fold_tile(st, x_ref[...].astype(acc), _read(y_ref), _read(wt_ref), j * bv,
                          spec.opts, spec.num_classes)
    for name, ref in zip(names, outs, strict=True):
        ref[...] = getattr(st, name).reshape(ref.shape)


def _ce_fwd(spec, x, y, wt):
    """Plain CE statistics; ``x [N, C]`` unpadded (the edge tiles are partial blocks)."""
    cfg = spec.config
    np_, cp = y.shape[0], common.round_up(x.shape[1], cfg.block_v)
    acc = _rowmath.compute_dtype(x.dtype)
    names = _names(spec)
    row = _row(cfg.block_n)
    x = common.guard_platform(x, spec.interpret)
    ins = [x] + ([wt] if wt is not None else []) + [y]
    specs = [pl.BlockSpec((cfg.block_n, cfg.block_v), lambda i, j: (i, j))] + (
        [_col(cfg.block_v)] if wt is not None else []) + [row]
    outs = common.pallas_call(
        functools.partial(_fwd_kernel, spec=spec, has_w=wt is not None),
        grid=(np_ // cfg.block_n, cp // cfg.block_v), in_specs=specs,
        out_specs=[row] * len(names),
        out_shape=[jax.ShapeDtypeStruct((1, np_), acc) for _ in names],
        compiler_params=_params(cfg), interpret=spec.interpret, name="jaxent_ce_fwd",
        cost_estimate=common.cost(np_, 0, cp, 0, matmuls=0, extra_bytes=x.size
                                  * x.dtype.itemsize + 4 * np_ * len(names)),
    )(*[_lanes(a) if a.ndim == 1 else a for a in ins])
    got = dict(zip(names, (o.reshape(-1) for o in outs), strict=True))
    return _rowmath.Stats(got["m"], got["s"], got["zy"], got.get("wz"), None, None)


def _ce_bwd(spec, x, rows, wt):
    cfg = spec.config
    np_, cp = rows[0].shape[0], common.round_up(x.shape[1], cfg.block_v)
    bn, bv = cfg.block_n, cfg.block_v
    rows = (common.guard_platform(rows[0], spec.interpret),) + tuple(rows[1:])
    row = _row(bn)
    ins = [x] + [_lanes(r) for r in rows] + ([_lanes(wt)] if wt is not None else [])
    specs = [pl.BlockSpec((bn, bv), lambda i, j: (i, j))] + [row] * len(rows) + (
        [_col(bv)] if wt is not None else [])
    return common.pallas_call(
        functools.partial(common.ce_bwd_kernel, opts=spec.opts, num_classes=spec.num_classes,
                          block_c=bv, weighted=wt is not None),
        grid=(np_ // bn, cp // bv), in_specs=specs,
        out_specs=pl.BlockSpec((bn, bv), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"),
                                             vmem_limit_bytes=cfg.vmem_limit_bytes),
        interpret=spec.interpret, name="jaxent_ce_bwd",
        cost_estimate=common.cost(np_, 0, cp, 0, matmuls=0, elementwise=12,
                                  extra_bytes=2 * x.size * x.dtype.itemsize
                                  + 4 * common.NUM_ROWS * np_),
    )(*ins)


LAUNCHERS = common.Launchers(_ce_fwd, _ce_bwd)


def ce_rows(x, labels, row_w, counted, weight, *, opts: Options, config: Config | None = None,
            interpret: bool = False):
    """Per-row cross-entropy of logits ``x [N, C]`` on a TPU (Mosaic); see
    :func:`jaxent.impl.pallas_gpu.ce_rows`."""
    config = config or default_config(x.shape[0], 128, x.shape[1], x.dtype)
    return common.ce_rows(LAUNCHERS, x, labels, row_w, counted, weight, opts=opts,
                          config=config, interpret=interpret)
