"""Placement on a mesh with explicit axes: the split read from the inputs' types.

On a mesh with ``AxisType.Explicit`` axes the types of traced values carry their shardings,
so plain ``jax.jit`` of :func:`jaxent.linear_cross_entropy` can read the split when
tracing: a kernel sharded along its vocabulary axis runs the vocabulary-parallel walk in a
``jax.shard_map`` over that axis (tokens split over the mesh axes of ``hidden``'s leading
axes); a kernel not sharded along the vocabulary runs the per-device program on each
device's tokens. No ``[N, V]`` array or whole kernel is gathered.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxent import _checks, _rowmath
from jaxent.impl._blocks import vocab_axis as _vocab_axis
from jaxent.placement.local import FusedSpec, fused_call


@dataclasses.dataclass(frozen=True)
class ExplicitLayout:
    """How explicitly sharded inputs split the fused loss."""

    mesh: jax.sharding.AbstractMesh
    vocab: object  # mesh axis (or axes) of the kernel's vocabulary axis, or None
    batch: tuple  # PartitionSpec entries of the token axes of ``hidden`` and ``labels``


def axes_of(entry) -> tuple:
    """A PartitionSpec entry as a tuple of mesh axis names."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def entry_of(axes: tuple):
    """Inverse of :func:`axes_of`."""
    return None if not axes else axes[0] if len(axes) == 1 else axes


def typed_sharding(x):
    """``(abstract mesh, spec entries as tuples of axis names)`` from ``x``'s type; the mesh
    is None when ``x`` carries none."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh, spec = getattr(sharding, "mesh", None), getattr(sharding, "spec", None)
    if mesh is None or spec is None or not mesh.axis_names:
        return None, ((),) * x.ndim
    entries = tuple(axes_of(e) for e in spec)
    return mesh, entries + ((),) * (x.ndim - len(entries))


def layout_of(hidden, kernel, bias, labels, weight, where,
              kernel_layout: str) -> ExplicitLayout | None:
    """The split the inputs' sharding types ask for, or None when no input is typed over a
    mesh with explicit axes (or inside ``shard_map``, where the caller chose the split).

    Inputs typed as replicated over an explicit mesh also get a layout (everything
    replicated): the walk cannot mix them with the mesh-less arrays it creates. An axis
    that does not divide the vocabulary or a token dimension is left out of the split.
    """
    return head_layout(hidden, kernel, kernel_layout, bias, labels, weight, where)


def head_layout(hidden, kernel, kernel_layout: str, *others) -> ExplicitLayout | None:
    """:func:`layout_of` of any head: ``hidden [..., D]`` and ``kernel`` give the split,
    every array (``others`` included; None and non-arrays are skipped) may carry the mesh."""
    typed = [typed_sharding(x)[0] for x in (hidden, kernel, *others)
             if isinstance(x, jax.Array)]
    meshes = {m for m in typed if m is not None and AxisType.Explicit in m.axis_types}
    if not meshes:
        return None
    if len(meshes) != 1:
        raise ValueError("the inputs of `linear_cross_entropy` are typed over different "
                         f"meshes: {sorted(map(str, meshes))}")
    mesh = meshes.pop()
    if AxisType.Manual in mesh.axis_types or jax.sharding.get_abstract_mesh().manual_axes:
        return None
    size = lambda axes: math.prod(mesh.shape[a] for a in axes)  # noqa: E731
    vax = _vocab_axis(kernel_layout)
    vocab = typed_sharding(kernel)[1][vax]
    if vocab and kernel.shape[vax] % size(vocab):
        vocab = ()  # uneven: the kernel is gathered (shard_map needs equal blocks)
    batch = []
    for dim, axes in zip(hidden.shape[:-1], typed_sharding(hidden)[1][:-1], strict=True):
        axes = tuple(a for a in axes if a not in vocab)
        batch.append(entry_of(axes if axes and dim % size(axes) == 0 else ()))
    return ExplicitLayout(mesh, entry_of(vocab), tuple(batch))


def checks_vma(impl, interpret: bool) -> bool:
    """Whether the placement's ``shard_map`` checks varying mesh axes: always, but for
    Pallas kernels in the interpreter, whose grid loop drops the operands' varying types
    (JAX 0.10-0.12: "Scan carry input and output got mismatched varying manual axes").
    Unchecked, ``shard_map`` sums the gradients of inputs the same on every device itself;
    those kernels serve only the placements that split the tokens alone."""
    return not (impl == "pallas" and interpret)


def place(mesh: Mesh | jax.sharding.AbstractMesh, specs, args):
    """Reshard ``args`` to ``specs`` on a mesh with explicit axes (auto axes need nothing:
    ``shard_map`` reshards its inputs itself)."""
    if not any(t == AxisType.Explicit for t in mesh.axis_types):
        return args
    return tuple(a if a is None else jax.reshard(a, NamedSharding(mesh, s))
                 for a, s in zip(args, specs, strict=True))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def shard_fused(spec: FusedSpec, mesh, vocab, batch: tuple, h, k, y, b, w, mask, temp=None):
    """``jax.shard_map`` of the per-device fused program: the vocabulary over ``vocab``
    (None: not split), the token axes of ``hidden``/``labels`` as the spec entries
    ``batch`` say."""
    tok = entry_of(tuple(a for e in batch for a in axes_of(e)))
    k, b = _pad_vocab(k, b, spec.layout, mesh, vocab)
    y_spec, h_spec = P(*batch), P(*batch, None)
    k_spec = P(None, vocab) if spec.layout == "dv" else P(vocab, None)
    specs = (h_spec, k_spec, y_spec, None if b is None else P(vocab),
             None if w is None else P(), None if mask is None else y_spec,
             None if temp is None else y_spec)
    out_spec: object = y_spec if spec.opts.reduction == "none" else P()
    if spec.aux:
        out_spec = (out_spec, {"lse": y_spec, "z_loss": y_spec, "argmax": y_spec,
                               "accuracy": P()})

    def body(h, k, y, b, w, mask, temp):
        return fused_call(spec, h, k, b, y, w, mask, temp=temp, vocab_axis=vocab,
                          token_axis=tok)

    args = place(mesh, specs, (h, k, y, b, w, mask, temp))
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=out_spec,
                         check_vma=checks_vma(spec.impl, spec.interpret))(*args)


# The layout kinds of a head's arguments: how each is split (``vocab``: the vocabulary axis
# entry, ``batch``: the entries of the token axes).
def kind_spec(kind: str, layout: str, vocab, batch: tuple) -> P:
    """The ``PartitionSpec`` of an argument of layout ``kind``: ``"hidden"`` (``[..., D]``),
    ``"kernel"``, ``"vocab"`` (``[V]``: bias, class weights), ``"row"`` (the tokens' shape),
    ``"targets"`` (``[..., V]``) or ``"replicated"`` (a scalar result)."""
    if kind == "kernel":
        return P(None, vocab) if layout == "dv" else P(vocab, None)
    return {"hidden": P(*batch, None), "vocab": P(vocab), "row": P(*batch),
            "targets": P(*batch, vocab), "replicated": P()}[kind]


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def shard_head(fn, static: tuple, layout: ExplicitLayout, kernel_layout: str, kinds: tuple,
               out_kinds, *arrays):
    """``fn(vocab_axis, token_axis, **static, **arrays)`` in a ``jax.shard_map`` split as
    ``layout`` says.

    ``static`` holds ``(name, value)`` pairs of hashable options, ``kinds`` one ``(name,
    layout kind)`` per array of ``arrays`` (None stays None), ``out_kinds`` the kind of each
    result, as nested tuples like the results (or one kind; see :func:`kind_spec`);
    ``fn`` gets the vocabulary axis (or None) and the token axes (or
    None) the split uses.
    """
    tok = entry_of(tuple(a for e in layout.batch for a in axes_of(e)))
    spec = lambda kind: kind_spec(kind, kernel_layout, layout.vocab, layout.batch)  # noqa: E731
    specs = tuple(None if a is None else spec(kind)
                  for a, (_, kind) in zip(arrays, kinds, strict=True))
    outs = jax.tree.map(spec, out_kinds)

    def body(*arrays):
        named = {name: a for a, (name, _) in zip(arrays, kinds, strict=True)}
        return fn(layout.vocab, tok, **dict(static), **named)

    args = place(layout.mesh, specs, arrays)
    check = checks_vma(dict(static).get("impl"), dict(static).get("interpret", False))
    return jax.shard_map(body, mesh=layout.mesh, in_specs=specs, out_specs=outs,
                         check_vma=check)(*args)


# How each array argument of a head is split on a mesh (kind_spec), by its name.
_KINDS = {"hidden": "hidden", "student_hidden": "hidden", "teacher_hidden": "hidden",
          "kernel": "kernel", "student_kernel": "kernel", "teacher_kernel": "kernel",
          "bias": "vocab", "student_bias": "vocab", "teacher_bias": "vocab",
          "weight": "vocab", "targets": "targets", "tokens": "row", "labels": "row",
          "where": "row", "temperature": "row", "teacher_ids": "row",
          "teacher_log_probs": "row", "teacher_tail": "row", "top_k": "row", "top_p": "row",
          "min_p": "row", "allowed_ids": "row"}


def run_head(shard_fn, arrays: dict, static: dict, temperature, out_kinds):
    """The head split as its inputs' types say when one is typed over a mesh with explicit
    axes (:func:`jaxent.placement.explicit.head_layout`), else None.

    The vocabulary-parallel walk runs in a ``jax.shard_map`` over the kernel's vocabulary
    axis, the tokens split over ``hidden``'s token axes: ``shard_fn(vocab, tok, **kw)``
    is the head's vocabulary-parallel version. Concrete token ids are checked first.
    """
    names = [n for n in arrays if n.endswith("hidden")]
    hidden = jnp.asarray(arrays[names[0]])
    kernel_name = names[0].replace("hidden", "kernel")
    layout = head_layout(hidden, arrays[kernel_name], static["kernel_layout"],
                                   *arrays.values(), temperature)
    if layout is None:
        return None
    batch_shape = hidden.shape[:-1]
    temp_s, temp = _checks.temperature_array(temperature, batch_shape,
                                             _rowmath.compute_dtype(hidden.dtype))
    if temp is not None:  # the array goes through the split; the checks ran above
        arrays = {**arrays, "temperature": temp}
    else:
        static = {**static, "temperature": temp_s}
    if "tokens" in arrays:  # the vocabulary is split inside: check concrete ids here
        y = _checks.int_labels(arrays["tokens"], batch_shape, "tokens")
        k = _checks.float_array(arrays["kernel"], "kernel")
        v = k.shape[1 if static["kernel_layout"] == "dv" else 0] if k.ndim == 2 else 0
        v = static["vocab_size"] or v
        _checks.token_values(y, v, _checks.where_mask(arrays["where"], batch_shape))
    arrays = {n: None if a is None else jnp.asarray(a) for n, a in arrays.items()}
    kinds = tuple((n, _KINDS[n]) for n in arrays)
    return shard_head(shard_fn, tuple(static.items()), layout,
                                static["kernel_layout"], kinds, out_kinds, *arrays.values())


def _pad_vocab(k, b, layout: str, mesh, vocab):
    """The kernel and bias with zero columns appended up to a multiple of the ``vocab``
    axes' size (their classes beyond the vocabulary are masked by the walk); inside the jit
    each device fills only its own block."""
    vax = _vocab_axis(layout)
    size = math.prod(mesh.shape[a] for a in axes_of(vocab))
    extra = -k.shape[vax] % size
    if not extra:
        return k, b
    pads = [(0, 0), (0, 0)]
    pads[vax] = (0, extra)
    return jnp.pad(k, pads), None if b is None else jnp.pad(b, (0, extra))


def run(spec: FusedSpec, layout: ExplicitLayout, h, k, b, y, w, mask, temp=None):
    """The fused loss split as ``layout`` says."""
    return shard_fused(spec, layout.mesh, layout.vocab, layout.batch, h, k, y, b, w, mask,
                       temp)
