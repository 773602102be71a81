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
* ``d hidden`` and ``d kernel`` (+ ``d bias``), two kernels, in one of two ways
  (``Config.backward``):

  - ``"accumulate"`` (default): ``d hidden`` has grid ``(Np / block_n,)``; each program
    walks the vocabulary, recomputing each logits tile and ``dz``
    (:func:`jaxent._rowmath.block_grad`) once, and adds ``dz @ W[d-slice, tile]^T`` for each
    ``block_d`` slice into its own ``[block_n, Dp]`` float32 output rows (global memory,
    read-modify-write, a CTA barrier between passes). ``d kernel`` has grid
    ``(Vp / block_v,)`` and walks the tokens the same way, adding ``h[:, d-slice]^T @ dz``
    into its own float32 output columns. Each logits tile is formed once per kernel (five
    matmul passes in all; CCE's atomic backward makes four); the outputs are float32.
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

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxent import _rowmath
from jaxent._options import Options
from jaxent.impl import pallas_common as common

TRITON_TARGET = "__gpu$xla.gpu.triton"
EXPORT_CHECKS = (jax.export.DisabledSafetyCheck.custom_call(TRITON_TARGET),)


@dataclasses.dataclass(frozen=True)
class Config:
    """Block sizes of the Triton kernels (all powers of two, ``>= 16`` for ``tl.dot``).

    Attributes:
      block_n: tokens per tile.
      block_v: vocabulary (or class) columns per tile.
      block_k: contraction slice of ``D`` in the logits matmul.
      block_d: width of the ``d hidden`` / ``d kernel`` tiles (a multiple of ``block_k``
        or a divisor of it; ``D`` is padded to a multiple of both).
      num_warps, num_stages: Triton's launch parameters.
      backward: ``"accumulate"``: one program per token tile (``d hidden``) or vocabulary
        tile (``d kernel``) forms each logits tile once and adds its ``block_d``-wide
        pieces into its own float32 output rows/columns in global memory (read-modify-write,
        no atomics: each output element has one writer). ``"recompute"``: one program per
        (tile, ``block_d`` slice) with a register accumulator, forming each logits tile
        ``Dp / block_d`` times.
      d_split: ``"accumulate"`` only: split ``D`` into this many chunks, one program each
        (grids ``(Np / block_n, d_split)`` and ``(Vp / block_v, d_split)``): more programs
        for few tokens, each logits tile formed ``d_split`` times.
      v_split: the forward splits the vocabulary into this many ranges, one program each
        (grid ``(Np / block_n, v_split)``), and merges their statistics with
        :func:`jaxent._rowmath.merge_stats`: more programs for few tokens.
    """

    block_n: int = 64
    block_v: int = 128
    block_k: int = 64
    block_d: int = 128
    num_warps: int = 4
    num_stages: int = 2
    backward: str = "accumulate"
    d_split: int = 1
    v_split: int = 1

    def __post_init__(self):
        if self.d_split < 1 or self.v_split < 1:
            raise ValueError(f"`d_split` and `v_split` must be >= 1, got {self.d_split} and "
                             f"{self.v_split}")
        if self.backward not in ("accumulate", "recompute"):
            raise ValueError(f"`backward` must be 'accumulate' or 'recompute', got "
                             f"{self.backward!r}")
        for f in ("block_n", "block_v", "block_k", "block_d"):
            b = getattr(self, f)
            if b < 16 or b & (b - 1):
                raise ValueError(f"`{f}` must be a power of two >= 16 (Triton), got {b}")

    def padded(self, n: int, d: int, v: int) -> tuple[int, int, int]:
        """``(Np, Dp, Vp)``: the padded token, width and vocabulary sizes."""
        dk = math.lcm(self.block_k, self.block_d * self.d_split)
        return (common.round_up(n, self.block_n), common.round_up(d, dk),
                common.round_up(v, self.block_v * self.v_split))


def _pow2_at_most(x: int, cap: int, floor: int = 16) -> int:
    p = floor
    while p * 2 <= min(x, cap):
        p *= 2
    return p


_SMS = 132  # streaming multiprocessors of an H100/H200 SXM


def _split_for(programs: int, target: int, cap: int, fill: bool) -> int:
    """A power of two ``s <= cap``: with ``fill``, the smallest with ``programs * s >=
    target``; without, the largest with ``programs * s <= target`` (at least 1)."""
    s = 1
    while s * 2 <= cap and (programs * s < target if fill else programs * s * 2 <= target):
        s *= 2
    return s


def default_config(n: int, d: int, v: int, dtype) -> Config:
    """Starting blocks for Hopper: 64 x 128 logits tiles (fewer rows for tiny token counts),
    64-wide ``D`` slices for ``tl.dot``, ``d hidden``/``d kernel`` slices up to 128 wide;
    8 warps for 16-bit inputs (bigger MMA tiles), 4 for float32. With fewer token tiles than
    the GPU has SMs, the forward splits the vocabulary (``v_split``, up to 16, until there
    are two waves of programs: merging costs little) and the gradients split ``D``
    (``d_split``, up to 4, while the programs still fit one wave: each split forms the
    logits again). Unmeasured on a device: starting points for :func:`candidates` and the
    autotuner."""
    sixteen = jnp.dtype(dtype).itemsize <= 2
    bn, bv, bd = _pow2_at_most(n, 64), 128, _pow2_at_most(d, 128)
    tiles = common.round_up(n, bn) // bn
    return Config(
        block_n=bn, block_v=bv, block_k=_pow2_at_most(d, 64), block_d=bd,
        num_warps=8 if sixteen else 4, num_stages=2,
        d_split=_split_for(tiles, _SMS, min(4, max(1, d // bd)), fill=False),
        v_split=_split_for(tiles, 2 * _SMS, min(16, max(1, v // bv)), fill=True))


def candidates(n: int, d: int, v: int, dtype) -> list[Config]:
    """Configs worth timing (:func:`jaxent.autotune`): the default first, then token tiles
    of 32-128 x vocabulary tiles of 64-256, and the ``"recompute"`` backward for ``D <= 1024``.
    """
    base = default_config(n, d, v, dtype)
    out = [base]
    for bn in (32, 64, 128):
        for bv in (64, 128, 256):
            out.append(dataclasses.replace(base, block_n=_pow2_at_most(n, bn), block_v=bv))
    if d <= 1024:
        out.append(dataclasses.replace(base, backward="recompute", block_d=_pow2_at_most(d, 512)))
    for split in (1, 2, 4):
        if d >= split * base.block_d:
            out.append(dataclasses.replace(base, d_split=split))
    return list(dict.fromkeys(out))


# ------------------------------------------------------------------------------ helpers


def _params(cfg: Config):
    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _vslice(ref, start, size):
    return None if ref is None else ref[pl.ds(start, size)]


def _logits(spec, h_at, w_ref, b_ref, start, dp: int):
    """Raw logits of the tile at vocabulary ``start``; ``h_at(k)`` gives ``[bn, bk]``."""
    bk, bv = spec.config.block_k, spec.config.block_v
    if spec.layout == "dv":
        w_at = lambda k: w_ref[pl.ds(k * bk, bk), pl.ds(start, bv)]  # noqa: E731
    else:
        w_at = lambda k: w_ref[pl.ds(start, bv), pl.ds(k * bk, bk)]  # noqa: E731
    return common.logits_tile(h_at, w_at, dp // bk, spec.layout, _vslice(b_ref, start, bv))


def _unpack(refs, has_b: bool, has_w: bool):
    """``(h, w, b or None, weight or None, rest)`` from a kernel's refs."""
    h, w, *rest = refs
    b = rest.pop(0) if has_b else None
    wt = rest.pop(0) if has_w else None
    return h, w, b, wt, rest


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
    h_ref, w_ref, b_ref, wt_ref, (y_ref, *outs) = _unpack(refs, has_b, has_w)
    cfg = spec.config
    bk, bv = cfg.block_k, cfg.block_v
    per_split = vp // bv // cfg.v_split
    first = pl.program_id(1) * per_split
    y = y_ref[...]

    def body(j, st):
        start = pl.multiple_of((first + j) * bv, bv)
        x = _logits(spec, lambda k: h_ref[:, pl.ds(k * bk, bk)], w_ref, b_ref, start, dp)
        return common.fold_tile(st, x, y, _vslice(wt_ref, start, bv), start, spec.opts,
                                spec.num_classes)

    acc = _rowmath.compute_dtype(h_ref.dtype)
    st = lax.fori_loop(0, per_split, body, common.init_stats(cfg.block_n, acc, spec.opts,
                                                              spec.aux))
    for name, ref in zip(_fwd_names(spec), outs, strict=True):
        ref[...] = getattr(st, name)


def _merge_splits(spec, outs, names, np_):
    """One row of statistics from ``v_split`` vocabulary ranges, each ``[v_split * Np]``:
    :func:`jaxent._rowmath.merge_stats` over a vmapped axis (its collectives run as
    reductions over the splits; the argmax ids are global already, offset 0)."""
    got = {k: a.reshape(spec.config.v_split, np_) for k, a in zip(names, outs, strict=True)}
    st = _rowmath.Stats(got["m"], got["s"], got["zy"], got.get("wz"), got.get("wseen"),
                        got.get("arg"))
    merged = jax.vmap(lambda st: _rowmath.merge_stats(st, "split", 0, spec.opts),
                      axis_name="split")(st)
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
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, spec=spec, has_b=b is not None, has_w=wt is not None,
                          dp=dp, vp=vp),
        grid=(nn, cfg.v_split), in_specs=specs, out_specs=[out] * len(names),
        out_shape=_stat_shapes(names, np_ * cfg.v_split, _rowmath.compute_dtype(h.dtype)),
        compiler_params=_params(cfg), interpret=spec.interpret, name="jaxent_lce_fwd",
    )(*ins)
    if cfg.v_split == 1:
        return _read_stats(outs, names)
    return _merge_splits(spec, outs, names, np_)


# ----------------------------------------------------------------------------- backward


def _dhidden_kernel(*refs, spec, has_b, has_w, dp, vp):
    h_ref, w_ref, b_ref, wt_ref, rest = _unpack(refs, has_b, has_w)
    *row_refs, dh_ref = rest
    cfg = spec.config
    bk, bv, bd = cfg.block_k, cfg.block_v, cfg.block_d
    dstart = pl.multiple_of(pl.program_id(1) * bd, bd)
    rows = tuple(r[...] for r in row_refs)

    def body(j, acc):
        start = pl.multiple_of(j * bv, bv)
        x = _logits(spec, lambda k: h_ref[:, pl.ds(k * bk, bk)], w_ref, b_ref, start, dp)
        dz = common.grad_tile(x, rows, start, _vslice(wt_ref, start, bv), spec.opts,
                              spec.num_classes)
        if spec.layout == "dv":
            wd = w_ref[pl.ds(dstart, bd), pl.ds(start, bv)]
        else:
            wd = w_ref[pl.ds(start, bv), pl.ds(dstart, bd)]
        return acc + common.dhidden_part(dz, wd, spec.layout)

    acc = jnp.zeros((cfg.block_n, bd), _rowmath.compute_dtype(h_ref.dtype))
    dh_ref[...] = lax.fori_loop(0, vp // bv, body, acc).astype(dh_ref.dtype)


def _dhidden(spec, h, w, b, rows, wt):
    cfg = spec.config
    np_, dp = h.shape
    vp = w.shape[1] if spec.layout == "dv" else w.shape[0]
    rows = (common.guard_platform(rows[0], spec.interpret),) + tuple(rows[1:])
    row = pl.BlockSpec((cfg.block_n,), lambda i, k: (i,))
    ins = [h, w] + [a for a in (b, wt) if a is not None] + list(rows)
    specs = [pl.BlockSpec((cfg.block_n, dp), lambda i, k: (i, 0)), pl.no_block_spec] + [
        pl.no_block_spec for a in (b, wt) if a is not None] + [row] * len(rows)
    return pl.pallas_call(
        functools.partial(_dhidden_kernel, spec=spec, has_b=b is not None,
                          has_w=wt is not None, dp=dp, vp=vp),
        grid=(np_ // cfg.block_n, dp // cfg.block_d), in_specs=specs,
        out_specs=pl.BlockSpec((cfg.block_n, cfg.block_d), lambda i, k: (i, k)),
        out_shape=jax.ShapeDtypeStruct((np_, dp), h.dtype),
        compiler_params=_params(cfg), interpret=spec.interpret, name="jaxent_lce_dhidden",
    )(*ins)


def _dkernel_kernel(*refs, spec, has_b, has_w, dp, np_):
    h_ref, w_ref, b_ref, wt_ref, rest = _unpack(refs, has_b, has_w)
    row_refs, (dw_ref, *db_ref) = rest[:common.NUM_ROWS], rest[common.NUM_ROWS:]
    cfg = spec.config
    bn, bk, bv, bd = cfg.block_n, cfg.block_k, cfg.block_v, cfg.block_d
    start = pl.multiple_of(pl.program_id(0) * bv, bv)
    dstart = pl.multiple_of(pl.program_id(1) * bd, bd)
    w_blk = _vslice(wt_ref, start, bv)
    acc_t = _rowmath.compute_dtype(h_ref.dtype)

    def body(i, carry):
        acc, dbacc = carry
        r0 = pl.multiple_of(i * bn, bn)
        rs = pl.ds(r0, bn)
        x = _logits(spec, lambda k: h_ref[rs, pl.ds(k * bk, bk)], w_ref, b_ref, start, dp)
        rows = tuple(r[rs] for r in row_refs)
        dz = common.grad_tile(x, rows, start, w_blk, spec.opts, spec.num_classes)
        acc = acc + common.dkernel_part(h_ref[rs, pl.ds(dstart, bd)], dz, spec.layout)
        if dbacc is not None:
            dbacc = dbacc + jnp.sum(dz, axis=0)
        return acc, dbacc

    shape = (bd, bv) if spec.layout == "dv" else (bv, bd)
    init = (jnp.zeros(shape, acc_t), jnp.zeros((bv,), acc_t) if has_b else None)
    acc, dbacc = lax.fori_loop(0, np_ // bn, body, init)
    dw_ref[...] = acc.astype(dw_ref.dtype)
    if has_b:
        @pl.when(pl.program_id(1) == 0)
        def _():
            db_ref[0][...] = dbacc.astype(db_ref[0].dtype)


def _dkernel(spec, h, w, b, rows, wt):
    cfg = spec.config
    np_, dp = h.shape
    vp = w.shape[1] if spec.layout == "dv" else w.shape[0]
    rows = (common.guard_platform(rows[0], spec.interpret),) + tuple(rows[1:])
    ins = [h, w] + [a for a in (b, wt) if a is not None] + list(rows)
    specs = [pl.no_block_spec] * len(ins)
    if spec.layout == "dv":
        dw_spec = pl.BlockSpec((cfg.block_d, cfg.block_v), lambda j, k: (k, j))
    else:
        dw_spec = pl.BlockSpec((cfg.block_v, cfg.block_d), lambda j, k: (j, k))
    out_specs = [dw_spec]
    out_shape = [jax.ShapeDtypeStruct(w.shape, w.dtype)]
    if b is not None:
        out_specs.append(pl.BlockSpec((cfg.block_v,), lambda j, k: (j,)))
        out_shape.append(jax.ShapeDtypeStruct((vp,), b.dtype))
    outs = pl.pallas_call(
        functools.partial(_dkernel_kernel, spec=spec, has_b=b is not None,
                          has_w=wt is not None, dp=dp, np_=np_),
        grid=(vp // cfg.block_v, dp // cfg.block_d), in_specs=specs, out_specs=out_specs,
        out_shape=out_shape, compiler_params=_params(cfg), interpret=spec.interpret,
        name="jaxent_lce_dkernel",
    )(*ins)
    return outs[0], (outs[1] if b is not None else None)


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
        return common.fold_tile(st, x, y, _vslice(wt_ref, start, bv), start, spec.opts,
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
    outs = pl.pallas_call(
        functools.partial(_ce_fwd_kernel, spec=spec, has_w=wt is not None, cp=cp),
        grid=(np_ // cfg.block_n,), in_specs=specs, out_specs=[row] * len(names),
        out_shape=_stat_shapes(names, np_, _rowmath.compute_dtype(x.dtype)),
        compiler_params=_params(cfg), interpret=spec.interpret, name="jaxent_ce_fwd",
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
    return pl.pallas_call(
        functools.partial(_ce_bwd_kernel, spec=spec, has_w=wt is not None),
        grid=(np_ // bn, common.round_up(x.shape[1], bv) // bv), in_specs=specs,
        out_specs=pl.no_block_spec, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        compiler_params=_params(cfg), interpret=spec.interpret, name="jaxent_ce_bwd",
    )(*ins)


# ------------------------------------------------ backward, accumulating in global memory


def _sync(spec):
    """A CTA barrier between a program's store of an accumulator tile and its next load of
    it (the two may map elements to different threads); Pallas's interpreter needs none."""
    if not spec.interpret:
        plgpu.debug_barrier()


def _zero(ref, nd: int, bd: int, axis: int):
    """Zero ``ref`` in ``nd`` slices of ``bd`` along ``axis`` (a register-sized tile each)."""
    shape = list(ref.shape)
    shape[axis] = bd

    def step(k, _):
        sl = pl.ds(pl.multiple_of(k * bd, bd), bd)
        idx = (slice(None), sl) if axis == 1 else (sl, slice(None))
        ref[idx] = jnp.zeros(shape, ref.dtype)
        return 0

    lax.fori_loop(0, nd, step, 0)


def _dhidden_acc_kernel(*refs, spec, has_b, has_w, dp, vp):
    h_ref, w_ref, b_ref, wt_ref, rest = _unpack(refs, has_b, has_w)
    *row_refs, dh_ref = rest
    cfg = spec.config
    bk, bv, bd = cfg.block_k, cfg.block_v, cfg.block_d
    nd = dp // bd // cfg.d_split  # slices of this program's D chunk
    d0 = pl.program_id(1) * nd
    rows = tuple(r[...] for r in row_refs)
    _zero(dh_ref, nd, bd, 1)
    _sync(spec)

    def body(j, carry):
        start = pl.multiple_of(j * bv, bv)
        x = _logits(spec, lambda k: h_ref[:, pl.ds(k * bk, bk)], w_ref, b_ref, start, dp)
        dz = common.grad_tile(x, rows, start, _vslice(wt_ref, start, bv), spec.opts,
                              spec.num_classes)

        def piece(k, c):
            ds = pl.ds(pl.multiple_of((d0 + k) * bd, bd), bd)  # in W
            local = pl.ds(pl.multiple_of(k * bd, bd), bd)  # in this program's block
            wd = w_ref[ds, pl.ds(start, bv)] if spec.layout == "dv" else w_ref[
                pl.ds(start, bv), ds]
            dh_ref[:, local] = dh_ref[:, local] + common.dhidden_part(dz, wd, spec.layout)
            return c

        lax.fori_loop(0, nd, piece, 0)
        _sync(spec)
        return carry

    lax.fori_loop(0, vp // bv, body, 0)


def _dhidden_acc(spec, h, w, b, rows, wt):
    cfg = spec.config
    np_, dp = h.shape
    vp = w.shape[1] if spec.layout == "dv" else w.shape[0]
    rows = (common.guard_platform(rows[0], spec.interpret),) + tuple(rows[1:])
    row = pl.BlockSpec((cfg.block_n,), lambda i, c: (i,))
    ins = [h, w] + [a for a in (b, wt) if a is not None] + list(rows)
    specs = [pl.BlockSpec((cfg.block_n, dp), lambda i, c: (i, 0)), pl.no_block_spec] + [
        pl.no_block_spec for a in (b, wt) if a is not None] + [row] * len(rows)
    out = pl.BlockSpec((cfg.block_n, dp // cfg.d_split), lambda i, c: (i, c))
    return pl.pallas_call(
        functools.partial(_dhidden_acc_kernel, spec=spec, has_b=b is not None,
                          has_w=wt is not None, dp=dp, vp=vp),
        grid=(np_ // cfg.block_n, cfg.d_split), in_specs=specs, out_specs=out,
        out_shape=jax.ShapeDtypeStruct((np_, dp), _rowmath.compute_dtype(h.dtype)),
        compiler_params=_params(cfg), interpret=spec.interpret, name="jaxent_lce_dhidden",
    )(*ins)


def _dkernel_acc_kernel(*refs, spec, has_b, has_w, dp, np_):
    h_ref, w_ref, b_ref, wt_ref, rest = _unpack(refs, has_b, has_w)
    row_refs, (dw_ref, *db_ref) = rest[:common.NUM_ROWS], rest[common.NUM_ROWS:]
    cfg = spec.config
    bn, bk, bv, bd = cfg.block_n, cfg.block_k, cfg.block_v, cfg.block_d
    start = pl.multiple_of(pl.program_id(0) * bv, bv)
    nd = dp // bd // cfg.d_split  # slices of this program's D chunk
    d0 = pl.program_id(1) * nd
    w_blk = _vslice(wt_ref, start, bv)
    daxis = 0 if spec.layout == "dv" else 1
    _zero(dw_ref, nd, bd, daxis)
    _sync(spec)

    def body(i, dbacc):
        rs = pl.ds(pl.multiple_of(i * bn, bn), bn)
        x = _logits(spec, lambda k: h_ref[rs, pl.ds(k * bk, bk)], w_ref, b_ref, start, dp)
        rows = tuple(r[rs] for r in row_refs)
        dz = common.grad_tile(x, rows, start, w_blk, spec.opts, spec.num_classes)

        def piece(k, c):
            ds = pl.ds(pl.multiple_of((d0 + k) * bd, bd), bd)  # in h
            local = pl.ds(pl.multiple_of(k * bd, bd), bd)  # in this program's block
            idx = (local, slice(None)) if daxis == 0 else (slice(None), local)
            dw_ref[idx] = dw_ref[idx] + common.dkernel_part(h_ref[rs, ds], dz, spec.layout)
            return c

        lax.fori_loop(0, nd, piece, 0)
        _sync(spec)
        return None if dbacc is None else dbacc + jnp.sum(dz, axis=0)

    acc_t = _rowmath.compute_dtype(h_ref.dtype)
    dbacc = lax.fori_loop(0, np_ // bn, body, jnp.zeros((bv,), acc_t) if has_b else None)
    if has_b:
        @pl.when(pl.program_id(1) == 0)
        def _():
            db_ref[0][...] = dbacc.astype(db_ref[0].dtype)


def _dkernel_acc(spec, h, w, b, rows, wt):
    cfg = spec.config
    np_, dp = h.shape
    vp = w.shape[1] if spec.layout == "dv" else w.shape[0]
    rows = (common.guard_platform(rows[0], spec.interpret),) + tuple(rows[1:])
    ins = [h, w] + [a for a in (b, wt) if a is not None] + list(rows)
    dc = dp // cfg.d_split
    if spec.layout == "dv":
        dw_spec = pl.BlockSpec((dc, cfg.block_v), lambda j, c: (c, j))
    else:
        dw_spec = pl.BlockSpec((cfg.block_v, dc), lambda j, c: (j, c))
    out_specs = [dw_spec]
    out_shape = [jax.ShapeDtypeStruct(w.shape, _rowmath.compute_dtype(w.dtype))]
    if b is not None:
        out_specs.append(pl.BlockSpec((cfg.block_v,), lambda j, c: (j,)))
        out_shape.append(jax.ShapeDtypeStruct((vp,), b.dtype))
    outs = pl.pallas_call(
        functools.partial(_dkernel_acc_kernel, spec=spec, has_b=b is not None,
                          has_w=wt is not None, dp=dp, np_=np_),
        grid=(vp // cfg.block_v, cfg.d_split), in_specs=[pl.no_block_spec] * len(ins),
        out_specs=out_specs, out_shape=out_shape, compiler_params=_params(cfg),
        interpret=spec.interpret, name="jaxent_lce_dkernel",
    )(*ins)
    return outs[0], (outs[1] if b is not None else None)


def _dhidden_any(spec, *args):
    fn = _dhidden_acc if spec.config.backward == "accumulate" else _dhidden
    return fn(spec, *args)


def _dkernel_any(spec, *args):
    fn = _dkernel_acc if spec.config.backward == "accumulate" else _dkernel
    return fn(spec, *args)


LAUNCHERS = common.Launchers(_fwd, _dhidden_any, _dkernel_any, _ce_fwd, _ce_bwd)


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
    config = config or default_config(x.shape[0], 16, x.shape[1], x.dtype)
    return common.ce_rows(LAUNCHERS, x, labels, row_w, counted, weight, opts=opts,
                          config=config, interpret=interpret)
