r"""Pallas kernels built from any row statistic (:mod:`jaxent.impl.stats`): ``impl="pallas"``
for the RL and distillation heads.

A statistic's ``fold`` and ``block_grad`` are written with ``jnp`` ops that lower in Pallas
(max, exp, where, sums over the tile's columns, iota compares), so the kernels take the
statistic itself and call it on each tile; this module holds what both backends share (the
``jax.custom_vjp``, the padding, the tile math, the flat operand list) and each backend
(:mod:`jaxent.impl.pallas_stats_gpu`, Triton; :mod:`jaxent.impl.pallas_stats_tpu`, Mosaic)
launches three kernels:

* forward: per token tile, walking the vocabulary tiles, the logits tile of each stream
  ``x = h_tile W_tile (+ b_tile)`` (float32 accumulation) folded with ``stat.fold``; the
  carry (a tuple of per-row ``[block_n]`` vectors) is written out and ``stat.finish`` runs
  on the ``[N]`` rows outside the kernel. On GPUs the vocabulary may be split into
  ``v_split`` ranges, one program each, whose carries ``stat.merge`` combines over an array
  axis (:func:`merge_splits`). A second pass (``stat.then``, JSD) is the same
  kernel with the first pass's residual rows as inputs, its statistic built per tile.
* ``d hidden``: ``dx`` from ``stat.block_grad`` (0 on padding columns) contracted with
  the kernel, ``dh = dx W^T``: on TPUs per token tile, walking the vocabulary tiles, in
  float32; on GPUs streamed (``dx`` written by chunks of tokens, contracted by XLA's matmul).
* ``d kernel`` (+ ``d bias``): ``dW = h^T dx``, ``db = sum_rows dx``: on TPUs per
  vocabulary tile, walking the token tiles, in float32; on GPUs streamed by vocabulary
  chunks.
* the gradients of the per-row inputs (``stat.diff_cols``: soft targets), one tile per
  program, a call of its own that XLA drops when they are not asked for.

Each writes its output in the operand's dtype. Operands are padded to whole tiles (tokens
with rows that are not counted, the vocabulary with columns masked by ``column < V``: the
lowest finite logit and a zero gradient, as :func:`jaxent._rowmath.mask_columns`). Only the
first stream (the student) gets gradients; a teacher is a constant.

Served: every statistic whose carry is per-row vectors or ``[rows, 2**j]`` blocks, with one
optional second pass (:class:`~jaxent.impl.stats.LogProbs` with or without entropy,
:class:`~jaxent.impl.stats.SoftTargets`, :class:`~jaxent.impl.stats.Distill` ``"kl"``,
``"reverse_kl"`` and ``"jsd"``; :class:`~jaxent.impl.topk.TopK` and
:class:`~jaxent.impl.topk.SparseTeacher` through their ``tiled()`` forms, whose ids come
as ``[rows, 2**j]`` blocks), linear-head streams, per-row temperatures and padding
columns; not a vocabulary split over a mesh axis (no merge across shards).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxent import _rowmath as rm
from jaxent._options import Options
from jaxent.impl import _blocks as B
from jaxent.impl import pallas_common as common
from jaxent.impl.stats import Rows, Statistic


@dataclasses.dataclass(frozen=True)
class Spec:
    """Static description of one call (a ``nondiff_argnums`` argument).

    ``launch`` is the backend module (its ``forward``, ``dhidden`` and ``dkernel``),
    ``config`` its block ``Config``; ``tile`` the ``(block_n, block_v, D alignment)`` the
    operands are padded to; ``masked``: the padded vocabulary holds columns that are not
    classes."""

    stat: Any
    launch: Any
    opts: Options
    num_classes: int
    layout: str
    config: Any
    interpret: bool
    tile: tuple[int, int, int]
    masked: bool


class Operands(NamedTuple):
    """Padded operands of the kernels.

    ``streams``: per stream ``(h [Np, Dp], W [Dp, Vp] or [Vp, Dp], b [Vp] or None)``;
    ``y`` int32 ``[Np]`` (-1 on padding rows) or None; ``counted`` int32 ``[Np]``; ``temp``
    ``[Np]`` or None; ``extra`` more per-row ``[Np]`` vectors (residuals, cotangents);
    ``cols`` per-class inputs: ``[Np, Vp]`` (per row) or ``[Vp]``, or None.
    """

    streams: tuple
    y: jax.Array | None
    counted: jax.Array
    temp: jax.Array | None
    extra: tuple
    cols: dict


def vocab_size(op: Operands, layout: str) -> int:
    """``Vp``, the padded vocabulary."""
    return op.streams[0][1].shape[1 if layout == "dv" else 0]


def flat(op: Operands) -> tuple[tuple, list]:
    """``(tags, arrays)``: the operands that are present, each with a tag naming it
    (``("h", s)``, ``("w", s)``, ``("b", s)``, ``("y",)``, ``("counted",)``, ``("temp",)``,
    ``("extra", i)``, ``("row_col", name)`` for ``[Np, Vp]``, ``("col", name)`` for
    ``[Vp]``); a kernel's refs come in this order."""
    tags: list = []
    arrays: list = []

    def add(tag, a):
        if a is not None:
            tags.append(tag)
            arrays.append(a)

    for s, (h, w, b) in enumerate(op.streams):
        add(("h", s), h)
        add(("w", s), w)
        add(("b", s), b)
    add(("y",), op.y)
    add(("counted",), op.counted)
    add(("temp",), op.temp)
    for i, e in enumerate(op.extra):
        add(("extra", i), e)
    for name, c in op.cols.items():
        add(("row_col" if c is not None and c.ndim == 2 else "col", name), c)
    return tuple(tags), arrays


# ---------------------------------------------------------------------------- tile math


def tile_rows(get: dict) -> Rows:
    """The :class:`~jaxent.impl.stats.Rows` of a tile from its row vectors (``get`` maps
    ``"y"``, ``"counted"`` (int32), ``"temp"`` to ``[bn]`` vectors or None)."""
    return Rows(get.get("y"), get["counted"], get.get("temp"))


def logits(h, w, b, layout: str) -> jax.Array:
    """Raw logits of a tile, ``h [bn, d] . w (+ b)``, float32 accumulation."""
    x = common.dot(h, w, (1, 0) if layout == "dv" else (1, 1))
    return x if b is None else x + b.astype(x.dtype)[None, :]


def _masked(spec: Spec, xs, start):
    if not spec.masked:
        return xs, None
    valid = common.column_mask(xs[0].shape, start, spec.num_classes)
    return tuple(rm.mask_columns(x, valid) for x in xs), valid


def fold_tile(spec: Spec, stat, carry, xs, rows: Rows, cols: dict, start):
    """``stat.fold`` of the logits tiles ``xs`` (one per stream) at vocabulary ``start``,
    padding columns masked."""
    xs, valid = _masked(spec, xs, start)
    return stat.fold(rm.row_options(spec.opts, rows.temp), carry, xs, rows, cols, start,
                     valid)


def grad_tile(spec: Spec, res, xs, rows: Rows, cols: dict, start, cts):
    """``(dx [bn, bv], {name: d cols[name] tile})`` of a tile: ``stat.block_grad``, 0 on
    padding columns."""
    xs, valid = _masked(spec, xs, start)
    dx, dcols = spec.stat.block_grad(rm.row_options(spec.opts, rows.temp), res, xs, rows,
                                     cols, start, cts)
    if valid is not None:
        dx = jnp.where(valid, dx, 0.0)
    return dx, {k: dcols[k] for k in spec.stat.diff_cols}


def pass_stat(spec: Spec, prev):
    """The statistic of a pass: ``spec.stat``, or ``spec.stat.then(prev)`` for a later
    pass (``prev`` the residuals of the pass before, of a tile or of all rows; a statistic
    with three passes, :class:`~jaxent.impl.support.Sampler`, tells them by their type)."""
    if prev is None:
        return spec.stat
    nxt = spec.stat.then(prev)
    assert nxt is not None
    return nxt


def carry_leaves(stat, bn: int, acc) -> tuple[Any, list[tuple[tuple[int, ...], Any]]]:
    """``(treedef, (trailing shape, dtype) of each leaf)`` of ``stat``'s carry (dtype ``acc``,
    or e.g. int32 for an argmax); each leaf must be ``[bn]`` (trailing ``()``) or ``[bn, c]``
    with ``c`` a power of two."""
    shapes = jax.eval_shape(lambda: stat.init(bn, acc))
    leaves, tree = jax.tree.flatten(shapes)
    if any(leaf.shape[:1] != (bn,) or leaf.ndim > 2 or (
            leaf.ndim == 2 and leaf.shape[1] != _pow2(leaf.shape[1])) for leaf in leaves):
        raise NotImplementedError(
            f"impl='pallas' serves statistics whose carry is per-row vectors or [rows, 2**j] "
            f"blocks; {type(stat).__name__}'s is {[leaf.shape for leaf in leaves]}")
    return tree, [(tuple(leaf.shape[1:]), leaf.dtype) for leaf in leaves]


def _pow2(c: int) -> int:
    return 1 << max(c - 1, 0).bit_length()


def for_kernels(stat):
    """``stat`` in the form the kernels take (``stat.tiled()`` where it has one: a
    statistic whose ``fold`` uses ops Pallas does not lower gives an equivalent one)."""
    tiled = getattr(stat, "tiled", None)
    return stat if tiled is None else tiled()


def cost(spec: Spec, op: Operands, matmuls: float, re_reads: int, elementwise: int = 8,
         h_reads: int = 1, out_bytes: int = 0):
    """:func:`jaxent.impl.pallas_common.cost` of a kernel over the padded operands:
    ``matmuls`` logits-sized products (each over the streams' widths together), the weights
    read ``re_reads`` times, the hidden states ``h_reads`` times, ``out_bytes`` written."""
    np_ = op.counted.shape[0]
    vp = vocab_size(op, spec.layout)
    d = sum(s[0].shape[1] for s in op.streams)
    rows = 4 * np_ * (3 + len(op.extra))
    cols = sum(c.size * c.dtype.itemsize for c in op.cols.values() if c is not None)
    return common.cost(np_, d, vp, op.streams[0][0].dtype.itemsize, matmuls=matmuls,
                       h_reads=h_reads, w_reads=re_reads, extra_bytes=rows + cols + out_bytes,
                       elementwise=elementwise)


def vocab_splits(stat) -> bool:
    """Whether the kernels may split ``stat``'s vocabulary walk into ranges merged by its
    ``merge`` (a class attribute ``vocab_splits``, True unless the statistic says not:
    :class:`~jaxent.impl.stats.Statistic`)."""
    return getattr(stat, "vocab_splits", True)


def merge_splits(spec: Spec, stat, tree, leaves: list, splits: int, temp) -> list:
    """The carry leaves ``[Np, ...]`` of the whole vocabulary from those of ``splits``
    vocabulary ranges, each ``[splits * Np, ...]`` (range-major): ``stat.merge`` over the
    ranges' array axis (:class:`jaxent._rowmath.ArrayAxis`), then its first index (the same
    on every index). ``tree``: the carry's structure; ``temp``: the padded per-row
    temperatures ``[Np]`` or None."""
    np_ = leaves[0].shape[0] // splits
    carry = jax.tree.unflatten(tree, [a.reshape(splits, np_, *a.shape[1:]) for a in leaves])
    temp = None if temp is None else jnp.broadcast_to(temp, (splits, np_))
    merged = stat.merge(rm.row_options(spec.opts, temp), carry, rm.ArrayAxis(0))
    return [a[0] for a in jax.tree.leaves(merged)]


# ------------------------------------------------------------------------ the custom_vjp

def _kernel(launch, spec: Spec, op: Operands, static):
    """``launch(spec, op, static)`` (``static``: a pytree structure or other static value)
    with :func:`jaxent.impl.pallas_common.first_order`'s clear error when differentiated."""
    return common.first_order(lambda spec, op: launch(spec, op, static), spec, op)


def _pad_rows(a, np_: int, value=0):
    return common.pad_to(a, 0, np_, value)


def _row_block(e: jax.Array, np_: int, value=0) -> jax.Array:
    """A per-row operand padded to ``np_`` rows and, ``[N, c]``, to ``2**j`` columns (with
    ``value``; Triton's tiles are powers of two)."""
    out = _pad_rows(e, np_, value)
    if out is not None and out.ndim == 2:
        out = common.pad_to(out, 1, _pow2(out.shape[1]), value)
    assert out is not None
    return out


def _operands(spec: Spec, streams, rows: Rows, cols: dict, extra=()) -> Operands:
    n = streams[0][0].shape[0]
    bn, bv, dk = spec.tile
    np_ = common.round_up(n, bn)
    vp = common.round_up(streams[0][1].shape[1 if spec.layout == "dv" else 0], bv)
    vax, dax = (1, 0) if spec.layout == "dv" else (0, 1)
    padded = []
    for h, w, b in streams:
        dp = common.round_up(h.shape[1], dk) if dk > 1 else h.shape[1]
        acc = rm.compute_dtype(h.dtype)
        padded.append((common.pad_to(_pad_rows(h, np_), 1, dp),
                       common.pad_to(common.pad_to(w, vax, vp), dax, dp),
                       None if b is None else common.pad_to(b.astype(acc), 0, vp)))
    y = None if rows.y is None else _row_block(rows.y.astype(jnp.int32), np_, -1)
    temp = None if rows.temp is None else _pad_rows(rows.temp, np_, 1)
    pcols: dict = {}
    for k, c in cols.items():
        pcols[k] = None if c is None else common.pad_to(c, c.ndim - 1, vp)
        if c is not None and c.ndim == 2:
            pcols[k] = _pad_rows(pcols[k], np_)
    return Operands(tuple(padded), y, _pad_rows(rows.counted.astype(jnp.int32), np_), temp,
                    tuple(_row_block(e, np_) for e in extra), pcols)


def _check_streams(streams) -> None:
    if any(len(ops) != 3 for ops in streams):
        raise NotImplementedError("impl='pallas' walks linear heads (hidden, kernel, bias), "
                                  "not materialized logits")


def _pass(spec: Spec, streams, rows: Rows, cols: dict, prev=None):
    n = streams[0][0].shape[0]
    leaves = () if prev is None else tuple(jax.tree.leaves(prev))
    op = _operands(spec, streams, rows, cols, leaves)
    prev_tree = None if prev is None else jax.tree.structure(prev)
    outs = _kernel(spec.launch.forward, spec, op, prev_tree)
    stat = pass_stat(spec, prev)
    tree, _ = carry_leaves(stat, spec.tile[0], rm.compute_dtype(streams[0][0].dtype))
    carry = jax.tree.unflatten(tree, [o[:n] for o in outs])
    return stat.finish(rm.row_options(spec.opts, rows.temp), carry, rows)


# A later pass runs while the pass before's ``then`` gives one; the kernels build it as
# ``spec.stat.then(prev)`` of that pass's residuals ``prev`` (the same statistic).
_MAX_PASSES = 3


def _fwd(spec: Spec, streams, rows: Rows, cols: dict):
    _check_streams(streams)
    out, res = _pass(spec, streams, rows, cols)
    stat = spec.stat
    for done in range(1, _MAX_PASSES + 1):
        if stat.then(res) is None:
            break
        if done == _MAX_PASSES:
            raise NotImplementedError(f"impl='pallas' runs at most {_MAX_PASSES} passes")
        stat = pass_stat(spec, res)
        out, res = _pass(spec, streams, rows, cols, res)
    return out, (streams, rows, cols, res)


def _bwd(spec: Spec, saved, cts):
    streams, rows, cols, res = saved
    n, d = streams[0][0].shape
    # Integer outputs (an argmax, top-k ids) have float0 cotangents: the kernels take none.
    cts = jax.tree.map(lambda c: None if c.dtype == jax.dtypes.float0 else c, cts)
    res_leaves, cts_leaves = jax.tree.leaves(res), jax.tree.leaves(cts)
    acc = rm.compute_dtype(streams[0][0].dtype)
    cts_leaves = [c.astype(acc) for c in cts_leaves]
    op = _operands(spec, streams, rows, cols, tuple(res_leaves) + tuple(cts_leaves))
    trees = (jax.tree.structure(res), jax.tree.structure(cts), len(res_leaves))
    dh = _kernel(spec.launch.dhidden, spec, op, trees)
    dk, db = _kernel(spec.launch.dkernel, spec, op, trees)
    diff = tuple(k for k in spec.stat.diff_cols if cols.get(k) is not None)
    dcols = {}
    if diff:
        dcols = dict(zip(diff, _kernel(
            lambda spec, op, trees: spec.launch.dcols(spec, op, trees, diff), spec, op, trees),
            strict=True))
    h, k, b = streams[0]
    dh = dh[:n, :d].astype(h.dtype)
    dk = dk[:k.shape[0], :k.shape[1]].astype(k.dtype)
    db = None if b is None else db[:b.shape[0]].astype(b.dtype)
    dcols = {name: dc[:n, :cols[name].shape[1]].astype(cols[name].dtype)
             for name, dc in dcols.items()}
    none = lambda tree: jax.tree.map(lambda _: None, tree)  # noqa: E731
    # Inside shard_map, the partial gradients of inputs the same on every device are summed.
    dh, dk, db = (B.psum_to_type(g, p) for g, p in zip((dh, dk, db), (h, k, b), strict=True))
    dstreams = ((dh, dk, db),) + tuple(none(s) for s in streams[1:])
    return dstreams, none(rows), {name: B.psum_to_type(dcols.get(name), cols[name])
                                  for name in cols}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _call(spec: Spec, streams, rows: Rows, cols: dict):
    return _fwd(spec, streams, rows, cols)[0]


_call.defvjp(_fwd, _bwd)


def run_on(launch, config, stat: Statistic, opts: Options, num_classes: int, layout: str,
           streams, rows: Rows, cols: dict, *, interpret: bool = False):
    """The per-row outputs of ``stat`` over linear-head ``streams`` on one backend
    (``launch``: :mod:`~jaxent.impl.pallas_stats_gpu` or :mod:`~jaxent.impl.pallas_stats_tpu`,
    with its block ``config``); the contract of :func:`jaxent.impl.stream.run` on one
    device, ``cols`` padded to the kernel's columns."""
    stat = for_kernels(stat)
    if not vocab_splits(stat) and getattr(config, "v_split", 1) > 1:
        config = dataclasses.replace(config, v_split=1)
    tile = launch.tile(config)
    columns = streams[0][1].shape[1 if layout == "dv" else 0]
    spec = Spec(stat, launch, opts, num_classes, layout, config, interpret, tile,
                num_classes < common.round_up(columns, tile[1]))
    return _call(spec, streams, rows, cols)
