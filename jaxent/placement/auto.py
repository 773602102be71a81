"""Placement on a mesh with Auto axes: the split made by the partitioner, when compiling.

Under ``AxisType.Auto`` axes the shardings of traced values are unknown at trace time: XLA's
partitioner (Shardy) picks them when compiling. ``jax.experimental.custom_partitioning``
defers the split to that moment: the fused walks (the fused CE's vocabulary walk, forward
and backward, and its token walk; the statistic walk of the RL and distillation heads,
forward and backward, for any statistic) are one custom call each, whose partition rule
receives the operands' shardings and lowers, per device, the same walks with ``vocab_axis``
set (over the kernel's vocabulary axes) or on each token shard. Unpartitioned, under ``jax.vmap``
and eagerly, each custom call is the single-device walk itself.

It applies only when an input is typed over a mesh with more than one device and Auto
axes, or such a mesh is in context (``jax.set_mesh``), outside ``shard_map``: an unplaced
call on a many-device host is the one-device program, and differentiates to any order.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxent import _platform
from jaxent import _rowmath as rm
from jaxent.impl import linear_ce as _ce
from jaxent.impl import register_auto_run
from jaxent.impl import stream as _stream
from jaxent.impl import token as _token
from jaxent.impl._blocks import varies as _varies
from jaxent.impl._blocks import vocab_axis as _vocab_axis
from jaxent.impl.plan import Plan, make_plan
from jaxent.impl.stats import Rows
from jaxent.placement.explicit import axes_of, entry_of
from jaxent.placement.local import FusedSpec


def _auto_mesh(mesh) -> bool:
    return (mesh is not None and math.prod(mesh.shape.values()) > 1
            and all(t == AxisType.Auto for t in mesh.axis_types))


def applies(*xs) -> bool:
    """Whether the partitioner should split the call: an input typed over (or a mesh in
    context that is) a mesh of several devices with Auto axes, outside ``shard_map``."""
    context = jax.sharding.get_abstract_mesh()
    if context.manual_axes:
        return False
    if _auto_mesh(context if context.axis_names else None):
        return True
    for x in xs:
        if x is None:
            continue
        mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
        if mesh is not None and mesh.axis_names and _auto_mesh(mesh):
            return True
    return False


@dataclasses.dataclass(frozen=True)
class AutoPlan:
    """Static configuration of the auto-partitioned walks (a nondiff argument)."""

    spec: FusedSpec
    plan: Plan  # the single-device plan (global vocabulary and token count)
    has_bias: bool
    has_weight: bool
    has_temp: bool = False

    @property
    def layout(self) -> str:
        return self.spec.layout


def _device_plan(ap: AutoPlan, vocab: tuple, h, k) -> Plan:
    """One device's plan: its ``v_local`` classes of the vocabulary axes ``vocab`` and its
    tokens (block sizes picked from the shapes are re-picked per device)."""
    s = ap.spec
    local = k.shape[_vocab_axis(s.layout)]
    shards = lax.axis_size(entry_of(vocab)) if vocab else 1
    return make_plan(s.opts, s.num_classes, local, h.shape[0], h.shape[1], s.layout, s.aux,
                     shards=shards, vocab_axis=entry_of(vocab) if vocab else None,
                     block_size=s.block_size, token_block_size=s.token_block_size)


def _psum_over(x, axes: tuple):
    return x if x is None or not axes else lax.psum(x, entry_of(axes))


def _labels(y, valid, counted, row_w, temp) -> rm.Labels:
    return rm.Labels(y, valid, counted, row_w, temp)


# The three custom calls: the single-device function (what runs unpartitioned) and its
# per-device version for token axes ``tok`` and vocabulary axes ``vocab``.


def _rows_forward(ap: AutoPlan, h, k, b, y, valid, counted, row_w, temp, w):
    losses, lse, arg, res = _ce.forward(ap.plan, h, k, b, _labels(y, valid, counted, row_w,
                                                                   temp), w)
    return losses, lse, arg, *res


def _rows_forward_shard(ap, tok, vocab, h, k, b, y, valid, counted, row_w, temp, w):
    plan = _device_plan(ap, vocab, h, k)
    losses, lse, arg, res = _ce.forward(plan, h, k, b, _labels(y, valid, counted, row_w,
                                                                temp), w)
    return losses, lse, arg, *res


def _rows_backward(ap: AutoPlan, h, k, b, y, valid, counted, row_w, temp, w, *res_g):
    lab = _labels(y, valid, counted, row_w, temp)
    return _ce.grads(ap.plan, h, k, b, lab, w, res_g[:-1], res_g[-1])


def _rows_backward_shard(ap, tok, vocab, h, k, b, y, valid, counted, row_w, temp, w,
                         *res_g):
    lab = _labels(y, valid, counted, row_w, temp)
    dh, dk, db = _ce.grads(_device_plan(ap, vocab, h, k), h, k, b, lab, w, res_g[:-1],
                           res_g[-1])
    return dh, _psum_over(dk, tok), _psum_over(db, tok)


def _token_walk(plan: Plan, h, k, b, lab, w):
    return _platform.per_platform(functools.partial(_token.walk, plan), h, k, b, lab, w)


def _token_forward(ap: AutoPlan, h, k, b, y, valid, counted, row_w, temp, w):
    total, (lse, arg), (dh, dk, db) = _token_walk(
        ap.plan, h, k, b, _labels(y, valid, counted, row_w, temp), w)
    return total, lse, arg, dh, dk, db


def _token_forward_shard(ap, tok, vocab, h, k, b, y, valid, counted, row_w, temp, w):
    lab = _labels(y, valid, counted, row_w, temp)
    plan = _device_plan(ap, vocab, h, k)
    if vocab:  # whole rows exist on no device: the vocabulary walk, forward and backward
        losses, lse, arg, res = _ce.forward(plan, h, k, b, lab, w)
        dh, dk, db = _ce.grads(plan, h, k, b, lab, w, res, jnp.ones_like(losses))
        total = jnp.sum(losses)
    else:
        total, (lse, arg), (dh, dk, db) = _token_walk(plan, h, k, b, lab, w)
    return _psum_over(total, tok), lse, arg, dh, _psum_over(dk, tok), _psum_over(db, tok)


def _auto_split(ap, h_sharding, k_sharding, n: int, v: int) -> tuple[tuple, tuple]:
    """``(token axes, vocabulary axes)`` from the shardings the partitioner proposes: the
    kernel's vocabulary axis and ``hidden``'s token axis, each kept only if it divides the
    global size (an axis on both goes to the vocabulary)."""
    mesh = k_sharding.mesh

    def axes(sharding, dim):
        spec = tuple(sharding.spec)
        return axes_of(spec[dim]) if dim < len(spec) else ()

    def fits(axes, size):
        return axes if axes and size % math.prod(mesh.shape[a] for a in axes) == 0 else ()

    vocab = fits(axes(k_sharding, _vocab_axis(ap.layout)), v)
    tok = fits(tuple(a for a in axes(h_sharding, 0) if a not in vocab), n)
    return tok, vocab


def _matmul_factors(layout: str, stream: str = "") -> tuple[str, str]:
    """Shardy factors of a stream's ``hidden`` and kernel: ``n`` tokens, ``v`` vocabulary,
    ``d`` hidden's width, ``w`` the kernel's width.

    The two widths are distinct factors, though of one size, so that the sharding of one is
    never proposed for the other: each device contracts them whole (the partition rules
    replicate both). With one factor, an FSDP kernel's width axis (also ``hidden``'s token
    axis) would be proposed for the width of ``hidden``'s gradient, which would leave the op
    sharded along its width and be resharded to ``hidden``'s layout (an all-to-all, or a
    gather of the whole ``[N, D]``)."""
    return f"n d{stream}", f"w{stream} v" if layout == "dv" else f"v w{stream}"


def _rule_operands(ap: AutoPlan, extra: int) -> str:
    ops = (list(_matmul_factors(ap.spec.layout)) + ["v"] * ap.has_bias
           + ["n"] * (4 + ap.has_temp) + ["c"] * ap.has_weight)
    return ", ".join(ops + ["n"] * extra)


def _grads_rule(ap: AutoPlan) -> str:
    return ", ".join(list(_matmul_factors(ap.spec.layout)) + ["v"] * ap.has_bias)


_RULES = {  # Shardy sharding rules (factors: _matmul_factors's, c the class weight)
    "rows_forward": lambda ap: (f"{_rule_operands(ap, 0)} -> n, n" + ", n" * ap.spec.aux
                                + ", n" * _ce.RESIDUALS),
    "rows_backward": lambda ap: (f"{_rule_operands(ap, _ce.RESIDUALS + 1)} -> "
                                 f"{_grads_rule(ap)}"),
    "token_forward": lambda ap: (f"{_rule_operands(ap, 0)} -> , n" + ", n" * ap.spec.aux
                                 + f", {_grads_rule(ap)}"),
}


def _auto_specs(ap, arg_shapes) -> tuple:
    """``(mesh, token axes, vocabulary axes, {layout kind: PartitionSpec})`` for operands
    sharded as ``arg_shapes`` say (``hidden`` and ``kernel`` first; ``ap.layout`` the
    kernel's)."""
    h, k = arg_shapes[0], arg_shapes[1]
    if isinstance(h.sharding, NamedSharding) and isinstance(k.sharding, NamedSharding):
        mesh = k.sharding.mesh
        tok, vocab = _auto_split(ap, h.sharding, k.sharding, h.shape[0],
                                 k.shape[_vocab_axis(ap.layout)])
    else:  # shardings not over mesh axes (no mesh known): everything replicated
        # devices_indices_map lists the devices in the sharding's order
        devices = list(h.sharding.devices_indices_map(tuple(h.shape)))
        mesh = Mesh(np.asarray(devices), ("jaxent_devices",))
        tok, vocab = (), ()
    t, v = entry_of(tok), entry_of(vocab)
    specs = {"row": P(t), "hidden": P(t, None), "bias": P(v), "replicated": P(),
             "kernel": P(None, v) if ap.layout == "dv" else P(v, None), "targets": P(t, v)}
    return mesh, tok, vocab, specs


_CE_OPERANDS = ("hidden", "kernel", "bias", "row", "row", "row", "row", "row", "replicated")


def _ce_kinds(out_kinds: tuple):
    """The fused CE ops' layout kinds: its operands (then residual and cotangent rows) and
    ``out_kinds``."""
    return lambda ap, n_args: (_CE_OPERANDS + ("row",) * (n_args - len(_CE_OPERANDS)),
                               out_kinds)


def _custom_partitioned(fun, per_shard, kinds, rule):
    """``fun(ap, *args)`` as a ``custom_partitioning`` op lowered per device by ``per_shard``;
    ``kinds(ap, number of args)`` names the layout of each operand and each output
    (``"row"``, ``"hidden"``, ``"kernel"``, ``"bias"``, ``"targets"``, ``"replicated"``; a
    ``":i"`` suffix is a stream's index, for ``rule``), ``rule(ap)`` is the Shardy rule."""
    from jax.experimental.custom_partitioning import custom_partitioning  # noqa: PLC0415

    op = custom_partitioning(fun, static_argnums=(0,))

    def shardings(mesh, specs, shapes, kinds):
        return tuple(None if r is None else NamedSharding(mesh, specs[kind.split(":")[0]])
                     for r, kind in zip(shapes, kinds, strict=True))

    def partition(ap, mesh, arg_shapes, result_shape):
        mesh, tok, vocab, specs = _auto_specs(ap, arg_shapes)
        in_kinds, out_kinds = kinds(ap, len(arg_shapes))
        in_shardings = shardings(mesh, specs, arg_shapes, in_kinds)

        def lower(*args):
            return per_shard(ap, tok, vocab, *args)

        return (mesh, lower, shardings(mesh, specs, result_shape, out_kinds),
                in_shardings)

    def infer(ap, mesh, arg_shapes, result_shape):  # GSPMD (Shardy off) only
        mesh, _, _, specs = _auto_specs(ap, arg_shapes)
        return shardings(mesh, specs, result_shape, kinds(ap, len(arg_shapes))[1])

    op.def_partition(partition, infer_sharding_from_operands=infer,
                     sharding_rule=lambda ap, mesh, ins, outs: rule(ap))

    def call(ap: AutoPlan, *args):
        # custom_partitioning has no batching rule: under vmap, the single-device function.
        @jax.custom_batching.custom_vmap
        def run(*args):
            return op(ap, *args)

        @run.def_vmap
        def _vmapped(axis_size, in_batched, *args):
            del axis_size
            out = jax.vmap(functools.partial(fun, ap), in_axes=tuple(
                0 if batched else None for batched in in_batched))(*args)
            return out, jax.tree.map(lambda _: True, out)

        @jax.custom_jvp
        def first_order_only(*args):
            return run(*args)

        @first_order_only.defjvp
        def _no_jvp(primals, tangents):
            del primals, tangents
            raise NotImplementedError(_SECOND_ORDER)

        return first_order_only(*args)

    return call


_SECOND_ORDER = (
    "second-order derivatives (differentiating a gradient) of the fused losses on a mesh "
    "with AxisType.Auto axes are not supported: jax.experimental.custom_partitioning has no "
    "differentiation rule. Use a mesh with AxisType.Explicit axes, or jax.shard_map with "
    "the functions of jaxent.sharded (e.g. jaxent.sharded.linear_cross_entropy, "
    "linear_log_probs): both support it")


_rows_forward_op = _custom_partitioned(
    _rows_forward, _rows_forward_shard, _ce_kinds(("row",) * (3 + _ce.RESIDUALS)),
    _RULES["rows_forward"])
_rows_backward_op = _custom_partitioned(
    _rows_backward, _rows_backward_shard, _ce_kinds(("hidden", "kernel", "bias")),
    _RULES["rows_backward"])
_token_forward_op = _custom_partitioned(
    _token_forward, _token_forward_shard,
    _ce_kinds(("replicated", "row", "row", "hidden", "kernel", "bias")),
    _RULES["token_forward"])


def _auto_plan(plan: Plan, spec: FusedSpec, bias, weight) -> AutoPlan:
    return AutoPlan(spec, plan, bias is not None, weight is not None, spec.row_temperature)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _auto_rows(ap: AutoPlan, h, kernel, bias, lab, weight):
    loss, lse, arg, *_ = _rows_forward_op(ap, h, kernel, bias, *lab, weight)
    return loss, (lse, arg)


def _auto_rows_fwd(ap: AutoPlan, h, kernel, bias, lab, weight):
    loss, lse, arg, *rest = _rows_forward_op(ap, h, kernel, bias, *lab, weight)
    return (loss, (lse, arg)), (h, kernel, bias, lab, weight, tuple(rest))


def _auto_rows_bwd(ap: AutoPlan, res, cts):
    h, kernel, bias, lab, weight, rest = res
    dh, dk, db = _rows_backward_op(ap, h, kernel, bias, *lab, weight, *rest, cts[0])
    return dh, dk, db, None, None if weight is None else jnp.zeros_like(weight)


_auto_rows.defvjp(_auto_rows_fwd, _auto_rows_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _auto_token_sum(ap: AutoPlan, h, kernel, bias, lab, weight):
    loss, lse, arg, *_ = _rows_forward_op(ap, h, kernel, bias, *lab, weight)
    return loss.sum(), (lse, arg)


def _auto_token_fwd(ap: AutoPlan, h, kernel, bias, lab, weight):
    total, lse, arg, dh, dk, db = _token_forward_op(ap, h, kernel, bias, *lab, weight)
    return (total, (lse, arg)), (dh, dk, db, weight)


def _auto_token_bwd(ap: AutoPlan, res, cts):
    dh, dk, db, weight = res
    g = cts[0]
    scale = lambda a: None if a is None else a * g.astype(a.dtype)  # noqa: E731
    return scale(dh), scale(dk), scale(db), None, None if weight is None else jnp.zeros_like(
        weight)


_auto_token_sum.defvjp(_auto_token_fwd, _auto_token_bwd)


def _rows_auto(spec: FusedSpec, plan: Plan, h, k, b, lab, w):
    """The vocabulary walk's ``run`` split by the partitioner."""
    return _auto_rows(_auto_plan(plan, spec, b, w), h, k, b, lab, w)


def _token_sum_auto(spec: FusedSpec, plan: Plan, h, k, b, lab, w):
    """The token walk's ``run`` split by the partitioner."""
    return _auto_token_sum(_auto_plan(plan, spec, b, w), h, k, b, lab, w)


# ----------------------------------------- the statistic walk (RL and distillation heads)


@dataclasses.dataclass(frozen=True)
class StatCall:
    """Static part of a row statistic's auto-partitioned walk (a nondiff argument).

    ``tree`` is the structure of ``(streams, rows, cols)`` whose leaves are the operands,
    ``kinds`` their layouts; the backward's operands go on with the ``n_res`` residuals
    (``res_tree``) and the ``n_cts`` outputs' cotangents (``cts_tree``, None for integer
    outputs); ``outs`` the number of forward outputs (outputs and residuals), ``grads`` the
    backward's layouts.
    """

    stat: Any
    plan: Plan  # the single-device plan
    tree: Any
    kinds: tuple[str, ...]
    outs: int = 0
    res_tree: Any = None
    cts_tree: Any = None
    n_res: int = 0
    n_cts: int = 0
    grads: tuple[str, ...] = ()

    @property
    def layout(self) -> str:
        return self.plan.layout


def _stat_kinds(streams, rows, cols) -> tuple[str, ...]:
    """The layout kind of each operand leaf of ``(streams, rows, cols)``."""
    kind = lambda a, k: None if a is None else k  # noqa: E731
    tree = (tuple((f"hidden:{i}", f"kernel:{i}", kind(b, "bias"))
                  for i, (_, _, b) in enumerate(streams)),
            (kind(rows.y, "row"), "row", kind(rows.temp, "row")),  # Rows' fields
            {n: None if a is None else ("targets" if a.ndim == 2 else "bias")
             for n, a in cols.items()})
    return tuple(jax.tree.leaves(tree))


def _stat_rule(sc: StatCall) -> str:
    """Shardy's rule (factors: :func:`_matmul_factors`'s, numbered by stream)."""
    def factors(kind):
        base, _, i = kind.partition(":")
        hidden, kernel = _matmul_factors(sc.layout, i)
        return {"hidden": hidden, "kernel": kernel, "bias": "v", "row": "n",
                "targets": "n v"}[base]

    ins = [factors(k) for k in sc.kinds]
    if sc.res_tree is None:
        return f"{', '.join(ins)} -> {', '.join(['n'] * sc.outs)}"
    extra = sc.n_res + sc.n_cts
    return f"{', '.join(ins + ['n'] * extra)} -> {', '.join(factors(k) for k in sc.grads)}"


def _stat_operands(sc: StatCall, args):
    """``(streams, rows, cols, the rest of args)``."""
    streams, rows, cols = jax.tree.unflatten(sc.tree, args[:len(sc.kinds)])
    return streams, rows, cols, args[len(sc.kinds):]


def _stat_device_plan(sc: StatCall, vocab: tuple, streams) -> Plan:
    """One device's plan: its columns of the vocabulary axes ``vocab`` (its tokens need
    nothing: the statistic walk's blocks are vocabulary blocks)."""
    local = streams[0][1].shape[_vocab_axis(sc.layout)]
    shards = lax.axis_size(entry_of(vocab)) if vocab else 1
    plan = sc.plan
    return dataclasses.replace(plan, local_classes=local, block_v=min(plan.block_v, local),
                               vocab_axis=entry_of(vocab) if vocab else None,
                               padding=local * shards - plan.num_classes)


def _stat_forward(sc: StatCall, *args):
    streams, rows, cols, _ = _stat_operands(sc, args)
    return tuple(jax.tree.leaves(_stream.forward(sc.stat, sc.plan, streams, rows, cols)))


def _stat_forward_shard(sc: StatCall, tok, vocab, *args):
    del tok
    streams, rows, cols, _ = _stat_operands(sc, args)
    plan = _stat_device_plan(sc, vocab, streams)
    return tuple(jax.tree.leaves(_stream.forward(sc.stat, plan, streams, rows, cols)))


def _stat_grads(sc: StatCall, plan: Plan, args):
    streams, rows, cols, rest = _stat_operands(sc, args)
    res = jax.tree.unflatten(sc.res_tree, rest[:sc.n_res])
    cts = jax.tree.unflatten(sc.cts_tree, rest[sc.n_res:])
    (dh, dk, db), dcols = _stream.grads(sc.stat, plan, streams, rows, cols, res, cts)
    return dh, dk, db, [dcols[n] for n in sc.stat.diff_cols]


def _stat_backward(sc: StatCall, *args):
    dh, dk, db, dcols = _stat_grads(sc, sc.plan, args)
    return tuple(a for a in (dh, dk, db, *dcols) if a is not None)


def _stat_backward_shard(sc: StatCall, tok, vocab, *args):
    plan = _stat_device_plan(sc, vocab, _stat_operands(sc, args)[0])
    dh, dk, db, dcols = _stat_grads(sc, plan, args)
    if vocab and not _varies(dh, plan.vocab_axis):  # each shard holds its classes' share
        dh = lax.psum(dh, plan.vocab_axis)
    return tuple(a for a in (dh, _psum_over(dk, tok), _psum_over(db, tok), *dcols)
                 if a is not None)


def _stat_kinds_of(sc: StatCall, n_args: int) -> tuple[tuple, tuple]:
    if sc.res_tree is None:
        return sc.kinds, ("row",) * sc.outs
    return sc.kinds + ("row",) * (n_args - len(sc.kinds)), sc.grads


_stat_forward_op = _custom_partitioned(_stat_forward, _stat_forward_shard, _stat_kinds_of,
                                       _stat_rule)
_stat_backward_op = _custom_partitioned(_stat_backward, _stat_backward_shard,
                                        _stat_kinds_of, _stat_rule)


def _forward_shapes(stat, plan: Plan, streams, rows, cols):
    """The leaves and structure of the walk's ``(outputs, residuals)``."""
    return jax.tree.flatten(
        jax.eval_shape(lambda: _stream.forward(stat, plan, streams, rows, cols)))


def _stat_call(stat, plan: Plan, streams, rows, cols):
    """``(StatCall, operand leaves, the forward's (outputs, residuals) structure)``."""
    leaves, tree = jax.tree.flatten((streams, rows, cols))
    shapes, out_tree = _forward_shapes(stat, plan, streams, rows, cols)
    sc = StatCall(stat, plan, tree, _stat_kinds(streams, rows, cols), len(shapes))
    return sc, leaves, out_tree


def stat_run(stat, plan: Plan, streams: tuple, rows: Rows, cols: dict):
    """:func:`jaxent.impl.stream.run` split by the partitioner on a mesh with Auto axes
    (:func:`split_stat_run`) when each of its outputs and residuals is a per-row vector
    ``[N]``; a statistic with wider ones (the top-k's ``[N, k]`` candidates) runs whole, placed
    by the partitioner like any program."""
    n = streams[0][0].shape[0]
    shapes, _ = _forward_shapes(stat, plan, streams, rows, cols)
    if any(s.shape != (n,) for s in shapes):
        return _stream.run(stat, plan, streams, rows, cols)
    return split_stat_run(stat, plan, streams, rows, cols)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def split_stat_run(stat, plan: Plan, streams: tuple, rows: Rows, cols: dict):
    """:func:`jaxent.impl.stream.run` split by the partitioner on a mesh with Auto axes:
    vocabulary-parallel over the student kernel's vocabulary axes (the teacher's and the
    per-class inputs follow), token-parallel over ``hidden``'s first axis; the same outputs
    and gradients. Each per-row output and residual is ``[N]``, split with the tokens."""
    return _stat_fwd(stat, plan, streams, rows, cols)[0]


def _stat_fwd(stat, plan: Plan, streams, rows: Rows, cols: dict):
    sc, leaves, out_tree = _stat_call(stat, plan, streams, rows, cols)
    out, res = jax.tree.unflatten(out_tree, _stat_forward_op(sc, *leaves))
    return out, (streams, rows, cols, res)


def _stat_bwd(stat, plan: Plan, saved, cts):
    streams, rows, cols, res = saved
    # Integer outputs (an argmax) have float0 cotangents: the walk takes none for them.
    cts = jax.tree.map(lambda c: None if c.dtype == jax.dtypes.float0 else c, cts)
    leaves, tree = jax.tree.flatten((streams, rows, cols))
    res_leaves, res_tree = jax.tree.flatten(res)
    cts_leaves, cts_tree = jax.tree.flatten(cts)
    has_bias = streams[0][2] is not None
    grads = ("hidden:0", "kernel:0") + ("bias",) * has_bias + ("targets",) * len(
        stat.diff_cols)
    sc = StatCall(stat, plan, tree, _stat_kinds(streams, rows, cols), 0, res_tree, cts_tree,
                  len(res_leaves), len(cts_leaves), grads)
    out = list(_stat_backward_op(sc, *leaves, *res_leaves, *cts_leaves))
    dh, dk = out[0], out[1]
    db = out[2] if has_bias else None
    dcols = dict(zip(stat.diff_cols, out[2 + has_bias:], strict=True))
    none = lambda tree: jax.tree.map(lambda _: None, tree)  # noqa: E731
    dstreams = ((dh, dk, db),) + tuple(none(s) for s in streams[1:])
    return dstreams, none(rows), {n: dcols.get(n) for n in cols}


split_stat_run.defvjp(_stat_fwd, _stat_bwd)


# The Auto-mesh versions of the registered implementations (the registry's ``auto_run``).
register_auto_run("linear", "vocab", _rows_auto)
register_auto_run("linear", "token", _token_sum_auto)
register_auto_run("stat", "vocab", stat_run)
