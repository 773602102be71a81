"""Block configs of the Triton kernels (:mod:`jaxent.impl.pallas_gpu`) and the tile helpers
their forward and backward share.

:func:`default_config` sizes the blocks for Hopper (H100/H200: 132 SMs) and splits the work
(``v_split``, ``d_split``) until the grids fill the chip; :func:`ce_config` does the same for
plain cross-entropy; :func:`candidates` lists configs for the autotuner.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxent.impl import pallas_common as common

Backward = Literal["stream", "accumulate", "recompute"]


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
      backward: ``"stream"`` (default): the logits gradient in chunks of at most ``chunk``
        elements, written in the input's dtype, each chunk contracted by XLA's matmuls
        (:mod:`jaxent.impl.pallas_gpu_stream`): nothing float32 of the gradients' size.
        ``"accumulate"``: one program per token tile (``d hidden``) or vocabulary
        tile (``d kernel``) forms each logits tile once and adds its ``block_d``-wide
        pieces into its own float32 output rows/columns in global memory (read-modify-write,
        no atomics: each output element has one writer). ``"recompute"``: one program per
        (tile, ``block_d`` slice) with a register accumulator, forming each logits tile
        ``Dp / block_d`` times.
      chunk: ``"stream"`` (and the statistic kernels' backward,
        :mod:`jaxent.impl.pallas_stats_gpu`, which always streams): the most logits whose
        gradient is held at once (a chunk of the vocabulary for ``d kernel``, of the tokens
        for ``d hidden``; 32 M elements, 64 MB of bf16, by default).
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
    backward: Backward = "stream"
    chunk: int = 1 << 25
    d_split: int = 1
    v_split: int = 1

    def __post_init__(self):
        if self.d_split < 1 or self.v_split < 1:
            raise ValueError(f"`d_split` and `v_split` must be >= 1, got {self.d_split} and "
                             f"{self.v_split}")
        if self.backward not in ("stream", "accumulate", "recompute"):
            raise ValueError(f"`backward` must be 'stream', 'accumulate' or 'recompute', got "
                             f"{self.backward!r}")
        if self.chunk < 1:
            raise ValueError(f"`chunk` must be >= 1, got {self.chunk}")
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


def ce_config(n: int, c: int, dtype) -> Config:
    """Plain CE blocks: :func:`default_config`'s, with token tiles of 64 rows halved (down
    to 16) until there are two programs per SM: the forward's grid is one program per token
    tile, each walking the whole row, so few large tiles would leave SMs idle."""
    bn = 64
    while bn > 16 and common.round_up(n, bn) // bn < 2 * _SMS:
        bn //= 2
    return dataclasses.replace(default_config(n, 16, c, dtype), block_n=bn, d_split=1,
                               v_split=1)


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
            out.append(dataclasses.replace(base, backward="accumulate", d_split=split))
    return list(dict.fromkeys(out))


# ------------------------------------------------------------------------------ helpers


def params(cfg: Config):
    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def vslice(ref, start, size):
    return None if ref is None else ref[pl.ds(start, size)]


def logits(spec, h_at, w_ref, b_ref, start, dp: int):
    """Raw logits of the tile at vocabulary ``start``; ``h_at(k)`` gives ``[bn, bk]``."""
    bk, bv = spec.config.block_k, spec.config.block_v
    if spec.layout == "dv":
        w_at = lambda k: w_ref[pl.ds(k * bk, bk), pl.ds(start, bv)]  # noqa: E731
    else:
        w_at = lambda k: w_ref[pl.ds(start, bv), pl.ds(k * bk, bk)]  # noqa: E731
    return common.logits_tile(h_at, w_at, dp // bk, spec.layout, vslice(b_ref, start, bv))


def unpack(refs, has_b: bool, has_w: bool):
    """``(h, w, b or None, weight or None, rest)`` from a kernel's refs."""
    h, w, *rest = refs
    b = rest.pop(0) if has_b else None
    wt = rest.pop(0) if has_w else None
    return h, w, b, wt, rest
