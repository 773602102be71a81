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

Kernels (all on operands padded to whole blocks by :mod:`jaxent.impl.pallas_common`):

* forward, grid ``(Np / block_n, v_split)``: each program holds a token tile and walks
  (its range of) the vocabulary in ``block_v`` tiles (``fori_loop``), each
  ``h_tile @ W_tile`` accumulated over ``block_k`` slices of ``D`` in float32, folding
  :func:`jaxent._rowmath.update_stats`; writes per-row ``m, s, z_y`` (and ``wz``,
  ``argmax``); with ``v_split > 1`` the ranges are merged by
  :func:`jaxent._rowmath.merge_stats`.
* ``d hidden`` and ``d kernel`` (+ ``d bias``), in one of three ways (``Config.backward``):

  - ``"stream"`` (default, :mod:`jaxent.impl.pallas_gpu_stream`): one kernel forms each
    logits tile and writes its gradient ``dz`` in the input's dtype, a chunk of at most
    ``Config.chunk`` logits at a time (grid ``(rows / block_n, columns / block_v)``);
    XLA's matmuls contract each chunk whole: ``dW[chunk] = h^T dz`` over the vocabulary
    chunks, ``dh[chunk] = dz W^T`` over the token chunks, written once in the output
    dtype. Nothing float32 of the gradients' size: the memory beyond the outputs is one
    ``dz`` chunk and one operand chunk.
  - ``"accumulate"``: ``d hidden`` has grid ``(Np / block_n,)``; each program
    walks the vocabulary, recomputing each logits tile and ``dz``
    (:func:`jaxent._rowmath.block_grad`) once, and adds ``dz @ W[d-slice, tile]^T`` for each
    ``block_d`` slice into its own ``[block_n, Dp]`` float32 output rows (global memory,
    read-modify-write, a CTA barrier between passes). ``d kernel`` has grid
    ``(Vp / block_v,)`` and walks the tokens the same way, adding ``h[:, d-slice]^T @ dz``
    into its own float32 output columns. Each logits tile is formed once per kernel; the
    outputs are float32 ``[N, D]`` and ``[V, D]`` (2.4 GB at the Llama-3-8B head).
    ``d_split > 1`` splits ``D`` over that many programs per tile (more parallelism for
    few tokens, each logits tile formed ``d_split`` times).
  - ``"recompute"``: grids ``(Np / block_n, Dp / block_d)`` and ``(Vp / block_v,
    Dp / block_d)``, a ``block_d``-wide register accumulator per program, written once in
    the input's dtype; each logits tile is formed ``Dp / block_d`` times. Less memory
    traffic, more flops: for small ``D`` or as an autotuning candidate.

* plain CE: forward grid ``(Np / block_n,)`` walking class tiles; backward grid
  ``(Np / block_n, Cp / block_v)``, one ``dx`` tile each. The logits are read and ``dx``
  written in place with masked loads/stores (no padded copy of ``[N, C]``).

No atomics: each output element has one writer, so results are deterministic (the
CCE/tokamax Triton backward adds tiles with ``atomic_add`` instead).
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
from jaxent.impl import pallas_gpu_backward as backward
from jaxent.impl import pallas_gpu_blocks as blocks
from jaxent.impl.pallas_gpu_blocks import Config as Config
from jaxent.impl.pallas_gpu_blocks import candidates as candidates
from jaxent.impl.pallas_gpu_blocks import ce_config as ce_config
from jaxent.impl.pallas_gpu_blocks import default_config as default_config

TRITON_TARGET = "__gpu$xla.gpu.triton"
EXPORT_CHECKS = (jax.export.DisabledSafetyCheck.custom_call(TRITON_TARGET),)


# ------------------------------------------------------------------- per-row statistics


def _stats_out(spec) -> list[str]:
    return ["m", "s", "zy"] + (["wz"] if spec.opts.smoothing else []) + (
        ["arg"] if spec.aux else [])


def _write_stats(st: _rowmath.Stats, outs, names):
    for name, ref in zip(names, outs, strict=True):
        ref[...] = getattr(st, name)


def _read_stats(outs, names) -> _rowmath.Stats:
    got = dict(zip(names, outs, strict=True))
    return _rowmath.Stats(got["m"], got["s"], got["zy"], got.get("wz"), None, got.get("arg"))


def _stat_shapes(names, n: int, acc):
    return [jax.ShapeDtypeStruct((n,), jnp.int32 if k == "arg" else acc) for k in names]


# ------------------------------------------------------------------------------ forward


def _fwd_names(spec) -> list[str]:
    """The forward's outputs: a split vocabulary also needs ``wseen`` to merge ``wz``."""
    names = _stats_out(spec)
    if spec.opts.smoothing and spec.config.v_split > 1:
        names.insert(names.index("wz") + 1, "wseen")
    return names


def _fwd_kernel(*refs, spec, has_b, has_w, dp, vp):
    h_ref, w_ref, b_ref, wt_ref, (y_ref, *outs) = blocks.unpack(refs, has_b, has_w)
    cfg = spec.config
    bk, bv = cfg.block_k, cfg.block_v
    per_split = vp // bv // cfg.v_split
    first = pl.program_id(1) * per_split
    y = y_ref[...]

    def body(j, st):
        start = pl.multiple_of((first + j) * bv, bv)
        x = blocks.logits(spec, lambda k: h_ref[:, pl.ds(k * bk, bk)], w_ref, b_ref, start, dp)
        return common.fold_tile(st, x, y, blocks.vslice(wt_ref, start, bv), start, spec.opts,
                                spec.num_classes)

    acc = _rowmath.compute_dtype(h_ref.dtype)
    st = lax.fori_loop(0, per_split, body, common.init_stats(cfg.block_n, acc, spec.opts,
                                                              spec.aux))
    for name, ref in zip(_fwd_names(spec), outs, strict=True):
        ref[...] = getattr(st, name)


def _merge_splits(spec, outs, names, np_):
    """One row of statistics from ``v_split`` vocabulary ranges, each ``[v_split * Np]``:
    :func:`jaxent._rowmath.merge_stats` over the splits' array axis (the argmax ids are
    global already, offset 0)."""
    got = {k: a.reshape(spec.config.v_split, np_) for k, a in zip(names, outs, strict=True)}
    st = _rowmath.Stats(got["m"], got["s"], got["zy"], got.get("wz"), got.get("wseen"),
                        got.get("arg"))
    merged = _rowmath.merge_stats(st, _rowmath.ArrayAxis(0), 0, spec.opts)
    return jax.tree.map(lambda a: a[0], merged._replace(wseen=None))


def _fwd(spec, h, w, b, y, wt):
    cfg = spec.config
    np_, dp = h.shape
    vp = w.shape[1] if spec.layout == "dv" else w.shape[0]
    nn = np_ // cfg.block_n
    h = common.guard_platform(h, spec.interpret)
    names = _fwd_names(spec)
    row = pl.BlockSpec((cfg.block_n,), lambda i, s: (i,))
    ins = [h, w] + [a for a in (b, wt) if a is not None] + [y]
    specs = [pl.BlockSpec((cfg.block_n, dp), lambda i, s: (i, 0)), pl.no_block_spec] + [
        pl.no_block_spec for a in (b, wt) if a is not None] + [row]
    out = pl.BlockSpec((cfg.block_n,), lambda i, s: (s * nn + i,))
    outs = common.pallas_call(
        functools.partial(_fwd_kernel, spec=spec, has_b=b is not None, has_w=wt is not None,
                          dp=dp, vp=vp),
        grid=(nn, cfg.v_split), in_specs=specs, out_specs=[out] * len(names),
        out_shape=_stat_shapes(names, np_ * cfg.v_split, _rowmath.compute_dtype(h.dtype)),
        compiler_params=blocks.params(cfg), interpret=spec.interpret, name="jaxent_lce_fwd",
        cost_estimate=common.cost(np_, dp, vp, h.dtype.itemsize, matmuls=1, w_reads=nn,
                                  extra_bytes=4 * np_ * cfg.v_split * len(names)),
    )(*ins)
    if cfg.v_split == 1:
        return _read_stats(outs, names)
    return _merge_splits(spec, outs, names, np_)


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

    st = lax.fori_loop(0, cp // bv, body, common.init_stats(bn, acc, spec.opts, False))
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


LAUNCHERS = common.Launchers(_fwd, backward.dhidden, backward.dkernel, _ce_fwd, _ce_bwd)


# ------------------------------------------------------------------------- entry points


def linear_ce_rows(h, kernel, bias, labels, row_w, counted, weight, *, opts: Options,
                   num_classes: int, layout: str = "dv", config: Config | None = None,
                   interpret: bool = False, aux: bool = False):
    """Per-token fused linear cross-entropy on an NVIDIA GPU (Triton), a ``jax.custom_vjp``.

    Args:
      h: float ``[N, D]`` hidden states (f32 or bf16/f16; accumulated in float32).
      kernel: ``[D, V]`` (``layout="dv"``) or ``[V, D]`` (``"vd"``).
      bias: ``[V]`` or None.
      labels: int ``[N]``; rows not ``counted`` may hold anything (e.g. ``ignore_index``).
      row_w: ``[N]`` float32, ``weight[y]`` for counted rows, 0 otherwise.
      counted: bool ``[N]``.
      weight: ``[V]`` float32 class weights or None (label smoothing uses them).
      opts: the loss options (smoothing, z-loss, soft-cap, temperature).
      num_classes: ``V``.
      config: :class:`Config`; default :func:`default_config`.
      interpret: run Pallas's interpreter (any platform, e.g. the CPU).
      aux: also return the argmax.

    Returns:
      ``(loss [N], lse [N], argmax [N] int32 or None)``, float32 losses (nan for counted
      rows with labels outside ``[0, V)``, 0 for rows not counted). Differentiable w.r.t.
      ``h``, ``kernel`` and ``bias``; ``lse`` and ``argmax`` carry no gradient.
    """
    config = config or default_config(h.shape[0], h.shape[1], num_classes, h.dtype)
    return common.linear_ce_rows(LAUNCHERS, h, kernel, bias, labels, row_w, counted, weight,
                                 opts=opts, num_classes=num_classes, layout=layout,
                                 config=config, interpret=interpret, aux=aux)


def ce_rows(x, labels, row_w, counted, weight, *, opts: Options, config: Config | None = None,
            interpret: bool = False):
    """Per-row cross-entropy of logits ``x [N, C]`` on an NVIDIA GPU (Triton).

    Arguments as :func:`linear_ce_rows` (``weight [C]``); returns ``loss [N]`` float32, a
    ``jax.custom_vjp`` differentiable w.r.t. ``x`` (gradient in ``x``'s dtype).
    """
    config = config or ce_config(x.shape[0], x.shape[1], x.dtype)
    return common.ce_rows(LAUNCHERS, x, labels, row_w, counted, weight, opts=opts,
                          config=config, interpret=interpret)
