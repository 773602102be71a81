r"""Pallas Mosaic kernels for TPUs.

Same math and padding as :mod:`jaxent.impl.pallas_gpu` (see
:mod:`jaxent.impl.pallas_common`), in Mosaic's style: the reduction runs along the *last grid
axis* (``"arbitrary"``), Pallas pipelines the tiles HBM -> VMEM, and the running per-row
statistics stay in the (revisited) output blocks or in VMEM scratch between grid steps.
Each tile spans all of ``D`` (blocks ``[block_n, D]`` and ``[D, block_v]``/``[block_v, D]``
equal to the full width, so ``D`` needs no padding), which is what keeps the backward free
of recompute: one logits tile per (token tile, vocabulary tile) in each kernel.

Kernels:

* forward, grid ``(Np / block_n, Vp / block_v)``: logits tile on the MXU (float32
  accumulation), folded into the per-row statistics (:func:`jaxent._rowmath.update_stats`)
  held in the output blocks of the token tile.
* ``d hidden``, grid ``(Np / block_n, Vp / block_v)``: recompute the tile, ``dz``
  (:func:`jaxent._rowmath.block_grad`), ``acc += dz @ W_tile^T`` in a ``[block_n, D]``
  float32 VMEM accumulator, written once at the last vocabulary tile.
* ``d kernel`` (+ ``d bias``), grid ``(Vp / block_v, Np / block_n)``: the same tile,
  ``acc += h^T @ dz`` in a ``[D, block_v]`` (or ``[block_v, D]``) float32 accumulator.
* plain CE: forward grid ``(Np / block_n, Cp / block_c)``; backward one ``dx`` tile per step.
  The logits are not padded: edge tiles are partial blocks (unspecified values past the
  array, which the column mask and the dropped out-of-bounds writes keep out).

``jax.export(..., platforms=["tpu"])`` gives ``tpu_custom_call``\ s (Mosaic has a stable
custom call; no safety check to disable), from any host: every per-row or per-class vector
travels as a ``[1, n]`` array in ``(1, block)`` blocks, since Mosaic would ask the default
device (a CPU on such a host) how to tile 1-D blocks. Every kernel states its cost
(:func:`jaxent.impl.pallas_common.cost`). VMEM use per step is about
``2 (block_n D + D block_v) itemsize`` (double-buffered inputs) plus the float32
accumulator and the ``[block_n, block_v]`` float32 tile; ``vmem_limit_bytes`` raises
Mosaic's scoped limit when a large ``D`` needs it. Unmeasured on a TPU.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

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
    smooth = ["wz", "wseen"] if spec.opts.smoothing else []
    return ["m", "s", "zy"] + smooth + (["arg"] if spec.aux else [])


def _unpack(refs, has_b: bool, has_w: bool):
    h, w, *rest = refs
    b = rest.pop(0) if has_b else None
    wt = rest.pop(0) if has_w else None
    return h, w, b, wt, rest


def _lanes(x):
    """A vector ``[n]`` as ``[1, n]``: Mosaic lays 1-D blocks out by asking the default
    device for its tiling, which a CPU host exporting for tpu cannot answer; ``(1, b)``
    blocks of ``[1, n]`` need no such query (and keep the vector lane-dense)."""
    return None if x is None else x.reshape(1, -1)


def _row(bn: int, order: str = "nv") -> pl.BlockSpec:
    """The ``(1, bn)`` block of a token vector (:func:`_lanes`); ``order`` names the grid
    axes (``"nv"``: token tile first)."""
    return pl.BlockSpec((1, bn), (lambda i, j: (0, i)) if order == "nv" else (
        lambda j, i: (0, i)))


def _col(bv: int, order: str = "nv") -> pl.BlockSpec:
    """The ``(1, bv)`` block of a vocabulary vector (bias, class weights)."""
    return pl.BlockSpec((1, bv), (lambda i, j: (0, j)) if order == "nv" else (
        lambda j, i: (0, j)))


def _read(ref):
    """A ``(1, b)`` vector block as ``[b]``."""
    return None if ref is None else ref[...].reshape(-1)


def _w_spec(spec, d: int, order: str):
    """The kernel's tile: ``[D, bv]`` (``"dv"``) or ``[bv, D]``; ``order`` names the grid
    axes (``"nv"``: token tile first)."""
    bv = spec.config.block_v
    idx: Callable[..., tuple]
    if order == "nv":
        idx = (lambda i, j: (0, j)) if spec.layout == "dv" else (lambda i, j: (j, 0))
    else:
        idx = (lambda j, i: (0, j)) if spec.layout == "dv" else (lambda j, i: (j, 0))
    return pl.BlockSpec((d, bv) if spec.layout == "dv" else (bv, d), idx)


def _stats_kernel(*refs, spec, has_b, has_w, plain):
    """Forward step (token tile ``i``, vocabulary tile ``j``), linear or plain (``x``)."""
    if plain:
        x_ref, *rest = refs
        wt_ref = rest.pop(0) if has_w else None
        b_ref = None
    else:
        h_ref, w_ref, b_ref, wt_ref, rest = _unpack(refs, has_b, has_w)
    y_ref, *outs = rest
    names = _names(spec)
    bn, bv = spec.config.block_n, spec.config.block_v
    j = pl.program_id(1)
    start = j * bv
    acc = _rowmath.compute_dtype((x_ref if plain else h_ref).dtype)

    @pl.when(j == 0)
    def _():
        init = common.init_stats(bn, acc, spec.opts, spec.aux)
        for name, ref in zip(names, outs, strict=True):
            ref[...] = getattr(init, name).reshape(ref.shape)

    got = dict(zip(names, (_read(r) for r in outs), strict=True))
    st = _rowmath.Stats(got["m"], got["s"], got["zy"], got.get("wz"), got.get("wseen"),
                        got.get("arg"))
    if plain:
        x = x_ref[...].astype(acc)
    else:
        x = common.logits_tile(lambda k: h_ref[...], lambda k: w_ref[...], 1, spec.layout,
                               _read(b_ref))
    st = common.fold_tile(st, x, _read(y_ref), _read(wt_ref), start, spec.opts,
                          spec.num_classes)
    for name, ref in zip(names, outs, strict=True):
        ref[...] = getattr(st, name).reshape(ref.shape)


def _stats_call(spec, ins, in_specs, np_, vp, acc, plain, has_b, has_w, name, cost):
    cfg = spec.config
    names = _names(spec)
    row = _row(cfg.block_n)
    outs = common.pallas_call(
        functools.partial(_stats_kernel, spec=spec, has_b=has_b, has_w=has_w, plain=plain),
        grid=(np_ // cfg.block_n, vp // cfg.block_v), in_specs=in_specs + [row],
        out_specs=[row] * len(names),
        out_shape=[jax.ShapeDtypeStruct((1, np_), jnp.int32 if k == "arg" else acc)
                   for k in names],
        compiler_params=_params(cfg), interpret=spec.interpret, name=name,
        cost_estimate=cost,
    )(*[_lanes(a) if a.ndim == 1 else a for a in ins])
    got = dict(zip(names, (o.reshape(-1) for o in outs), strict=True))
    return _rowmath.Stats(got["m"], got["s"], got["zy"], got.get("wz"), None, got.get("arg"))


def _f32_bias(b, h):
    """The bias in the accumulation dtype (its blocks are read as float32 like the logits)."""
    return None if b is None else b.astype(_rowmath.compute_dtype(h.dtype))


def _fwd(spec, h, w, b, y, wt):
    cfg = spec.config
    b = _f32_bias(b, h)
    np_, d = h.shape
    vp = w.shape[1] if spec.layout == "dv" else w.shape[0]
    h = common.guard_platform(h, spec.interpret)
    vec = _col(cfg.block_v)
    ins = [h, w] + [a for a in (b, wt) if a is not None] + [y]
    specs = [pl.BlockSpec((cfg.block_n, d), lambda i, j: (i, 0)), _w_spec(spec, d, "nv")] + [
        vec for a in (b, wt) if a is not None]
    cost = common.cost(np_, d, vp, h.dtype.itemsize, matmuls=1, w_reads=np_ // cfg.block_n,
                       extra_bytes=4 * np_ * len(_names(spec)))
    return _stats_call(spec, ins, specs, np_, vp, _rowmath.compute_dtype(h.dtype), False,
                       b is not None, wt is not None, "jaxent_lce_fwd", cost)


def _dhidden_kernel(*refs, spec, has_b, has_w):
    h_ref, w_ref, b_ref, wt_ref, rest = _unpack(refs, has_b, has_w)
    *row_refs, dh_ref, acc_ref = rest
    j, nv = pl.program_id(1), pl.num_programs(1)
    start = j * spec.config.block_v

    @pl.when(j == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

    x = common.logits_tile(lambda k: h_ref[...], lambda k: w_ref[...], 1, spec.layout,
                           _read(b_ref))
    rows = tuple(_read(r) for r in row_refs)
    dz = common.grad_tile(x, rows, start, _read(wt_ref), spec.opts, spec.num_classes)
    acc_ref[...] += common.dhidden_part(dz, w_ref[...], spec.layout)

    @pl.when(j == nv - 1)
    def _():
        dh_ref[...] = acc_ref[...].astype(dh_ref.dtype)


def _dhidden(spec, h, w, b, rows, wt):
    cfg = spec.config
    b = _f32_bias(b, h)
    np_, d = h.shape
    vp = w.shape[1] if spec.layout == "dv" else w.shape[0]
    rows = (common.guard_platform(rows[0], spec.interpret),) + tuple(rows[1:])
    row, vec = _row(cfg.block_n), _col(cfg.block_v)
    ins = [h, w] + [_lanes(a) for a in (b, wt) if a is not None] + [_lanes(r) for r in rows]
    specs = [pl.BlockSpec((cfg.block_n, d), lambda i, j: (i, 0)), _w_spec(spec, d, "nv")] + [
        vec for a in (b, wt) if a is not None] + [row] * len(rows)
    return common.pallas_call(
        functools.partial(_dhidden_kernel, spec=spec, has_b=b is not None,
                          has_w=wt is not None),
        grid=(np_ // cfg.block_n, vp // cfg.block_v), in_specs=specs,
        out_specs=pl.BlockSpec((cfg.block_n, d), lambda i, j: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((np_, d), h.dtype),
        scratch_shapes=[pltpu.VMEM((cfg.block_n, d), _rowmath.compute_dtype(h.dtype))],
        compiler_params=_params(cfg), interpret=spec.interpret, name="jaxent_lce_dhidden",
        cost_estimate=common.cost(np_, d, vp, h.dtype.itemsize, matmuls=2, h_reads=2,
                                  w_reads=np_ // cfg.block_n, elementwise=12,
                                  extra_bytes=4 * common.NUM_ROWS * np_),
    )(*ins)


def _dkernel_kernel(*refs, spec, has_b, has_w):
    h_ref, w_ref, b_ref, wt_ref, rest = _unpack(refs, has_b, has_w)
    row_refs, rest = rest[:common.NUM_ROWS], rest[common.NUM_ROWS:]
    if has_b:
        dw_ref, db_ref, acc_ref, dbacc_ref = rest
    else:
        (dw_ref, acc_ref), db_ref, dbacc_ref = rest, None, None
    j, i, ni = pl.program_id(0), pl.program_id(1), pl.num_programs(1)
    start = j * spec.config.block_v

    @pl.when(i == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)
        if dbacc_ref is not None:
            dbacc_ref[...] = jnp.zeros(dbacc_ref.shape, dbacc_ref.dtype)

    x = common.logits_tile(lambda k: h_ref[...], lambda k: w_ref[...], 1, spec.layout,
                           _read(b_ref))
    rows = tuple(_read(r) for r in row_refs)
    dz = common.grad_tile(x, rows, start, _read(wt_ref), spec.opts, spec.num_classes)
    acc_ref[...] += common.dkernel_part(h_ref[...], dz, spec.layout)
    if dbacc_ref is not None:
        dbacc_ref[...] += jnp.sum(dz, axis=0, keepdims=True)

    @pl.when(i == ni - 1)
    def _():
        dw_ref[...] = acc_ref[...].astype(dw_ref.dtype)
        if db_ref is not None:
            db_ref[...] = dbacc_ref[...].astype(db_ref.dtype)


def _dkernel(spec, h, w, b, rows, wt):
    cfg = spec.config
    b = _f32_bias(b, h)
    np_, d = h.shape
    vp = w.shape[1] if spec.layout == "dv" else w.shape[0]
    rows = (common.guard_platform(rows[0], spec.interpret),) + tuple(rows[1:])
    row, vec = _row(cfg.block_n, "vn"), _col(cfg.block_v, "vn")
    ins = [h, w] + [_lanes(a) for a in (b, wt) if a is not None] + [_lanes(r) for r in rows]
    specs = [pl.BlockSpec((cfg.block_n, d), lambda j, i: (i, 0)), _w_spec(spec, d, "vn")] + [
        vec for a in (b, wt) if a is not None] + [row] * len(rows)
    acc_t = _rowmath.compute_dtype(h.dtype)
    tile = (d, cfg.block_v) if spec.layout == "dv" else (cfg.block_v, d)
    out_specs, out_shape = [_w_spec(spec, d, "vn")], [jax.ShapeDtypeStruct(w.shape, w.dtype)]
    scratch = [pltpu.VMEM(tile, acc_t)]
    if b is not None:
        out_specs.append(vec)
        out_shape.append(jax.ShapeDtypeStruct((1, vp), b.dtype))
        scratch.append(pltpu.VMEM((1, cfg.block_v), acc_t))
    outs = common.pallas_call(
        functools.partial(_dkernel_kernel, spec=spec, has_b=b is not None,
                          has_w=wt is not None),
        grid=(vp // cfg.block_v, np_ // cfg.block_n), in_specs=specs, out_specs=out_specs,
        out_shape=out_shape, scratch_shapes=scratch, compiler_params=_params(cfg),
        interpret=spec.interpret, name="jaxent_lce_dkernel",
        cost_estimate=common.cost(np_, d, vp, h.dtype.itemsize, matmuls=2, w_reads=2,
                                  h_reads=vp // cfg.block_v, elementwise=12,
                                  extra_bytes=4 * common.NUM_ROWS * np_ * (vp // cfg.block_v)),
    )(*ins)
    return outs[0], (outs[1].reshape(-1) if b is not None else None)


def _ce_fwd(spec, x, y, wt):
    """Plain CE statistics; ``x [N, C]`` unpadded (the edge tiles are partial blocks)."""
    cfg = spec.config
    np_, cp = y.shape[0], common.round_up(x.shape[1], cfg.block_v)
    x = common.guard_platform(x, spec.interpret)
    ins = [x] + ([wt] if wt is not None else []) + [y]
    specs = [pl.BlockSpec((cfg.block_n, cfg.block_v), lambda i, j: (i, j))] + (
        [_col(cfg.block_v)] if wt is not None else [])
    cost = common.cost(np_, 0, cp, 0, matmuls=0,
                       extra_bytes=x.size * x.dtype.itemsize + 4 * np_ * len(_names(spec)))
    return _stats_call(spec, ins, specs, np_, cp, _rowmath.compute_dtype(x.dtype), True,
                       False, wt is not None, "jaxent_ce_fwd", cost)


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


LAUNCHERS = common.Launchers(_fwd, _dhidden, _dkernel, _ce_fwd, _ce_bwd)


def linear_ce_rows(h, kernel, bias, labels, row_w, counted, weight, *, opts: Options,
                   num_classes: int, layout: str = "dv", config: Config | None = None,
                   interpret: bool = False, aux: bool = False):
    """Per-token fused linear cross-entropy on a TPU (Mosaic), a ``jax.custom_vjp``.

    Arguments and results as :func:`jaxent.impl.pallas_gpu.linear_ce_rows`, with
    ``config`` a :class:`Config` (default :func:`default_config`).
    """
    config = config or default_config(h.shape[0], h.shape[1], num_classes, h.dtype)
    return common.linear_ce_rows(LAUNCHERS, h, kernel, bias, labels, row_w, counted, weight,
                                 opts=opts, num_classes=num_classes, layout=layout,
                                 config=config, interpret=interpret, aux=aux)


def ce_rows(x, labels, row_w, counted, weight, *, opts: Options, config: Config | None = None,
            interpret: bool = False):
    """Per-row cross-entropy of logits ``x [N, C]`` on a TPU (Mosaic); see
    :func:`jaxent.impl.pallas_gpu.ce_rows`."""
    config = config or default_config(x.shape[0], 128, x.shape[1], x.dtype)
    return common.ce_rows(LAUNCHERS, x, labels, row_w, counted, weight, opts=opts,
                          config=config, interpret=interpret)
