r"""Pallas kernels for NVIDIA GPUs (Triton lowering), targeting Hopper (H100/H200).

**Why Triton.** ``jax.experimental.pallas`` lowers to GPUs two ways: Triton
(``pl.pallas_call`` + ``plgpu.CompilerParams``; ``jax.experimental.pallas.triton``) and
Mosaic GPU (``jax.experimental.pallas.mosaic_gpu``). Triton is the mature path for
softmax/CE reductions with ``tl.dot`` (Liger-Kernel, ml-cross-entropy and tokamax's GPU
kernels use it); its lowering takes the row reductions, ``argmax``, ``where`` and the
``fori_loop``\ s these kernels need, and it exports from a CPU host: ``jax.export`` with
``platforms=["cuda"]`` gives a ``__gpu$xla.gpu.triton`` custom call. Mosaic GPU offers
warpgroup MMA on Hopper but is lower level and more fragile: in jax 0.10.2 a kernel as plain
as a row max already fails to lower (``NotImplementedError: No support for axes yet``), so
it would need a hand-written WGMMA pipeline per kernel.

Exporting: the Triton custom call has no compatibility guarantee, so ``jax.export`` needs
``disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_TARGET)]``
(:data:`EXPORT_CHECKS`). The exported program is tied to the jaxlib it came from.

Kernels: plain cross-entropy of materialized logits ``x [N, C]``. The forward, grid
``(Np / block_n,)``, walks class tiles folding :func:`jaxent._rowmath.update_stats`; the
backward, grid ``(Np / block_n, Cp / block_v)``, writes one ``dx`` tile each. The logits are
read and ``dx`` written in place with masked loads/stores (no padded copy of ``[N, C]``).
The fused heads' kernels (:func:`jaxent.linear_cross_entropy` and the RL and distillation
heads) are built from their row statistics in :mod:`jaxent.impl.pallas_stats_gpu`.

No atomics: each output element has one writer, so results are deterministic.
Performance on a GPU has not been measured yet: the configs below are starting points.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxent import _rowmath
from jaxent._options import Options
from jaxent.impl import pallas_common as common
from jaxent.impl import pallas_gpu_blocks as blocks
from jaxent.impl.pallas_gpu_blocks import Config as Config
from jaxent.impl.pallas_gpu_blocks import candidates as candidates
from jaxent.impl.pallas_gpu_blocks import ce_config as ce_config
from jaxent.impl.pallas_gpu_blocks import default_config as default_config

TRITON_TARGET = "__gpu$xla.gpu.triton"
EXPORT_CHECKS = (jax.export.DisabledSafetyCheck.custom_call(TRITON_TARGET),)


# ------------------------------------------------------------------- per-row statistics


def _stats_out(spec) -> list[str]:
    return ["m", "s", "zy"] + (["wz"] if spec.opts.smoothing else [])


def _write_stats(st: _rowmath.Stats, outs, names):
    for name, ref in zip(names, outs, strict=True):
        ref[...] = getattr(st, name)


def _read_stats(outs, names) -> _rowmath.Stats:
    got = dict(zip(names, outs, strict=True))
    return _rowmath.Stats(got["m"], got["s"], got["zy"], got.get("wz"), None, got.get("arg"))


def _stat_shapes(names, n: int, acc):
    return [jax.ShapeDtypeStruct((n,), jnp.int32 if k == "arg" else acc) for k in names]


# ----------------------------------------------------------------------------- plain CE


def _x_tile(x_ref, r0, start, bn: int, bv: int):
    """The ``[bn, bv]`` logits tile at ``(r0, start)`` of the unpadded ``x [N, C]``: a masked
    load, 0 outside (those columns are masked again by the statistics and gradient)."""
    n, c = x_ref.shape
    shape = (bn, bv)
    inside = ((r0 + lax.broadcasted_iota(jnp.int32, shape, 0) < n)
              & (start + lax.broadcasted_iota(jnp.int32, shape, 1) < c))
    tile = plgpu.load(x_ref.at[pl.ds(r0, bn), pl.ds(start, bv)], mask=inside, other=0)
    return tile, inside


def _ce_fwd_kernel(*refs, spec, has_w, cp):
    x_ref, *rest = refs
    wt_ref = rest.pop(0) if has_w else None
    y_ref, *outs = rest
    bn, bv = spec.config.block_n, spec.config.block_v
    r0 = pl.multiple_of(pl.program_id(0) * bn, bn)
    y = y_ref[...]
    acc = _rowmath.compute_dtype(x_ref.dtype)

    def body(j, st):
        start = pl.multiple_of(j * bv, bv)
        x = _x_tile(x_ref, r0, start, bn, bv)[0].astype(acc)
        return common.fold_tile(st, x, y, blocks.vslice(wt_ref, start, bv), start, spec.opts,
                                spec.num_classes)

    st = lax.fori_loop(0, cp // bv, body, common.init_stats(bn, acc, spec.opts))
    _write_stats(st, outs, _stats_out(spec))


def _ce_fwd(spec, x, y, wt):
    cfg = spec.config
    np_ = y.shape[0]
    cp = common.round_up(x.shape[1], cfg.block_v)
    x = common.guard_platform(x, spec.interpret)
    names = _stats_out(spec)
    row = pl.BlockSpec((cfg.block_n,), lambda i: (i,))
    ins = [x] + ([wt] if wt is not None else []) + [y]
    specs = [pl.no_block_spec] + ([pl.no_block_spec] if wt is not None else []) + [row]
    outs = common.pallas_call(
        functools.partial(_ce_fwd_kernel, spec=spec, has_w=wt is not None, cp=cp),
        grid=(np_ // cfg.block_n,), in_specs=specs, out_specs=[row] * len(names),
        out_shape=_stat_shapes(names, np_, _rowmath.compute_dtype(x.dtype)),
        compiler_params=blocks.params(cfg), interpret=spec.interpret, name="jaxent_ce_fwd",
        cost_estimate=common.cost(np_, 0, cp, 0, matmuls=0,
                                  extra_bytes=x.size * x.dtype.itemsize + 16 * np_),
    )(*ins)
    return _read_stats(outs, names)


def _ce_bwd_kernel(*refs, spec, has_w):
    x_ref, *rest = refs
    row_refs, rest = rest[:common.NUM_ROWS], rest[common.NUM_ROWS:]
    wt_ref = rest.pop(0) if has_w else None
    (dx_ref,) = rest
    bn, bv = spec.config.block_n, spec.config.block_v
    r0 = pl.multiple_of(pl.program_id(0) * bn, bn)
    start = pl.multiple_of(pl.program_id(1) * bv, bv)
    x, inside = _x_tile(x_ref, r0, start, bn, bv)
    rows = tuple(r[...] for r in row_refs)
    dz = common.grad_tile(x.astype(_rowmath.compute_dtype(x.dtype)), rows, start,
                          None if wt_ref is None else wt_ref[...], spec.opts, spec.num_classes)
    plgpu.store(dx_ref.at[pl.ds(r0, bn), pl.ds(start, bv)], dz.astype(dx_ref.dtype),
                mask=inside)


def _ce_bwd(spec, x, rows, wt):
    cfg = spec.config
    np_ = rows[0].shape[0]
    bn, bv = cfg.block_n, cfg.block_v
    rows = (common.guard_platform(rows[0], spec.interpret),) + tuple(rows[1:])
    row = pl.BlockSpec((bn,), lambda i, j: (i,))
    ins = [x] + list(rows) + ([wt] if wt is not None else [])
    specs = [pl.no_block_spec] + [row] * len(rows) + (
        [pl.BlockSpec((bv,), lambda i, j: (j,))] if wt is not None else [])
    return common.pallas_call(
        functools.partial(_ce_bwd_kernel, spec=spec, has_w=wt is not None),
        grid=(np_ // bn, common.round_up(x.shape[1], bv) // bv), in_specs=specs,
        out_specs=pl.no_block_spec, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        compiler_params=blocks.params(cfg), interpret=spec.interpret, name="jaxent_ce_bwd",
        cost_estimate=common.cost(np_, 0, x.shape[1], 0, matmuls=0, elementwise=12,
                                  extra_bytes=2 * x.size * x.dtype.itemsize
                                  + 4 * common.NUM_ROWS * np_),
    )(*ins)


LAUNCHERS = common.Launchers(_ce_fwd, _ce_bwd)


# ------------------------------------------------------------------------- entry points


def ce_rows(x, labels, row_w, counted, weight, *, opts: Options, config: Config | None = None,
            interpret: bool = False):
    """Per-row cross-entropy of logits ``x [N, C]`` on an NVIDIA GPU (Triton), a
    ``jax.custom_vjp`` differentiable w.r.t. ``x`` (gradient in ``x``'s dtype).

    Args:
      x: float ``[N, C]`` logits (f32 or bf16/f16; accumulated in float32).
      labels: int ``[N]``; rows not ``counted`` may hold anything (e.g. ``ignore_index``).
      row_w: ``[N]`` float32, ``weight[y]`` for counted rows, 0 otherwise.
      counted: bool ``[N]``.
      weight: ``[C]`` float32 class weights or None (label smoothing uses them).
      opts: the loss options (smoothing, z-loss, soft-cap, temperature).
      config: :class:`Config`; default :func:`ce_config`.
      interpret: run Pallas's interpreter (any platform, e.g. the CPU).

    Returns:
      ``loss [N]`` float32 (nan for counted rows with labels outside ``[0, C)``, 0 for rows
      not counted).
    """
    config = config or ce_config(x.shape[0], x.shape[1], x.dtype)
    return common.ce_rows(LAUNCHERS, x, labels, row_w, counted, weight, opts=opts,
                          config=config, interpret=interpret)
