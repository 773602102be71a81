"""The static plan of a fused walk: options, vocabulary, layout and block sizes.

One rule sizes every block (:func:`auto_block_sizes`), from the platform's heuristics
(:mod:`jaxent._platform`); a vocabulary-parallel device gets ``1/k`` of the single-device
budget for its ``V/k`` classes, so per-device memory shrinks with ``k``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable

from jaxent import _platform
from jaxent._options import Options


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static configuration of one device's fused walk (a ``nondiff_argnums`` argument).

    Attributes:
      opts: the loss options.
      num_classes: the global vocabulary ``V``.
      local_classes: the classes this device walks (``V / k`` when vocabulary-parallel).
      layout: ``"dv"`` or ``"vd"``.
      block_v: vocabulary block of the vocabulary walk.
      block_n: token block of the token walk.
      block_dw: vocabulary slice of the token walk's kernel-gradient update.
      aux: whether the argmax is tracked (``return_aux``).
      vocab_axis: the mesh axis (or axes) the vocabulary is split over, or None.
      interpret: run Pallas kernels in interpret mode (on the CPU).
      padding: how many of the kernel's columns (counted over all shards, from
        ``num_classes`` on) are padding, masked out of the statistics and the gradients.
      row_groups: how many row groups the vocabulary walk's backward takes (0: by
        :func:`row_groups`' budget).
    """

    opts: Options
    num_classes: int
    local_classes: int
    layout: str
    block_v: int
    block_n: int
    block_dw: int
    aux: bool
    vocab_axis: Hashable | None = None
    interpret: bool = False
    padding: int = 0
    row_groups: int = 0

    @property
    def padded(self) -> bool:
        """Whether the kernel holds padding columns."""
        return self.padding > 0


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1.0)))))


def auto_block_sizes(n: int, d: int, v: int) -> tuple[int, int, int]:
    """Default ``(block_size, token_block_size, dkernel_block)`` for ``n`` tokens, width
    ``d`` and vocabulary ``v``.

    With ``E`` the platform's ``block_elems`` (8M float32 elements on every platform now):
    the vocabulary walk's ``[n, block_size]`` logits hold about ``E / 2`` elements, the
    token walk's one ``[token_block_size, v]`` buffer about ``2 E`` (capped at
    ``max_token_block`` tokens) and its ``[d, dkernel_block]`` kernel-gradient slices about
    ``E / 4``. A symbolic ``n`` (export) counts as large.

    Example:
      >>> from jaxent.impl.plan import auto_block_sizes
      >>> auto_block_sizes(8192, 2048, 128256)
      (512, 128, 1024)
    """
    h = _platform.heuristics()
    n = _platform.static_size(n)
    bv = min(v, max(256, _pow2_floor(h.block_elems / 2 / max(n, 1))))
    bn = min(max(n, 1), h.max_token_block, max(16, _pow2_floor(2 * h.block_elems / v)))
    bw = min(v, max(256, _pow2_floor(h.block_elems / 4 / max(d, 1))))
    return bv, bn, bw


def row_groups(n, d: int, forced: int = 0) -> int:
    """How many groups of rows the vocabulary walk's backward takes for ``n`` tokens of
    width ``d`` with a 16-bit ``d hidden`` (:func:`jaxent.impl.stream.grads`; a float32 one
    is its own carry: one group): ``forced`` when given (at most ``n``),
    else the smallest power of two ``G`` whose group's float32 ``d hidden``
    ``[ceil(n / G), d]`` holds at most the platform's ``dhidden_elems``; then as few as give
    groups of that many rows. A symbolic ``n`` (export) takes one group.

    Example:
      >>> from jaxent.impl.plan import row_groups
      >>> row_groups(16384, 4096), row_groups(4096, 1024), row_groups(10, 4, forced=3)
      (8, 1, 3)
    """
    if not isinstance(n, int) or n <= 1:
        return 1
    g = forced
    if not g:
        budget, g = _platform.heuristics().dhidden_elems, 1
        while -(-n // g) * d > budget and g < n:
            g *= 2
    rows = -(-n // min(g, n))
    return -(-n // rows)


def positive_int(value, name: str) -> int:
    """A positive Python int, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive Python int or None, got {value!r}")
    return value


def make_plan(opts: Options, num_classes: int, local: int, n_local, d: int, layout: str,
              aux: bool, *, shards: int = 1, vocab_axis=None, block_size=None,
              token_block_size=None, interpret: bool = False) -> Plan:
    """The plan of one device walking ``n_local`` tokens and ``local`` of the
    ``num_classes`` classes (``shards`` devices along the vocabulary; the kernel's columns
    beyond ``num_classes`` over all shards are padding); given block sizes are kept,
    clipped to what there is."""
    n_static = _platform.static_size(n_local)
    bv, bn, bw = auto_block_sizes(n_static * shards, d, local)
    if block_size is not None:
        bv = bw = min(block_size, local)
    if token_block_size is not None:
        bn = min(token_block_size, max(n_static, 1))
    return Plan(opts, num_classes, local, layout, bv, bn, bw, aux, vocab_axis, interpret,
                local * shards - num_classes)


def stream_plan(opts: Options, num_classes: int, local: int, n, *, layout: str = "dv",
                block_size: int | None = None, vocab_axis=None, shards: int = 1,
                streams: int = 1) -> Plan:
    """The plan of a streaming head (:mod:`jaxent.impl.stream`) walking ``local`` of the
    ``num_classes`` classes (``shards`` devices along ``vocab_axis``; the columns beyond
    ``num_classes`` over all shards are padding) for ``n`` tokens and ``streams`` logit
    streams at once; ``block_size`` (columns per block) is kept, clipped to ``local``.

    Example:
      >>> from jaxent._options import Options
      >>> from jaxent.impl.plan import stream_plan
      >>> stream_plan(Options(), 50, 50, 6, block_size=16).block_v
      16
    """
    if block_size is None:  # a symbolic n counts as large
        block_size = auto_block_sizes(_platform.static_size(n) * streams, 1, local)[0]
    return Plan(opts, num_classes, local, layout, min(block_size, local), 0, 0, False,
                vocab_axis, False, local * shards - num_classes)
