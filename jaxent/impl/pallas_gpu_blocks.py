"""Block configs of the Triton kernels (the statistic kernels of
:mod:`jaxent.impl.pallas_stats_gpu` and plain CE's in :mod:`jaxent.impl.pallas_gpu`).

:func:`default_config` sizes the blocks for Hopper (H100/H200: 132 SMs) and splits the
vocabulary (``v_split``) until the forward's grid fills the chip; :func:`ce_config` does the
same for plain cross-entropy; :func:`candidates` lists configs for the autotuner.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxent.impl import pallas_common as common


@dataclasses.dataclass(frozen=True)
class Config:
    """Block sizes of the Triton kernels (all powers of two, ``>= 16`` for ``tl.dot``).

    Attributes:
      block_n: tokens per tile.
      block_v: vocabulary (or class) columns per tile.
      block_k: contraction slice of ``D`` in the logits matmul (``D`` is padded to a
        multiple of it).
      num_warps, num_stages: Triton's launch parameters.
      chunk: the most logits whose gradient the streamed backward holds at once (a chunk of
        the vocabulary for ``d kernel``, of the tokens for ``d hidden``;
        :mod:`jaxent.impl.pallas_gpu_stream`; 16 M elements, 32 MB of bf16, by default).
      v_split: the forward splits the vocabulary into this many ranges, one program each
        (grid ``(Np / block_n, v_split)``), and merges their statistics: more programs for
        few tokens.
    """

    block_n: int = 64
    block_v: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2
    chunk: int = 1 << 24
    v_split: int = 1

    def __post_init__(self):
        if self.v_split < 1:
            raise ValueError(f"`v_split` must be >= 1, got {self.v_split}")
        if self.chunk < 1:
            raise ValueError(f"`chunk` must be >= 1, got {self.chunk}")
        for f in ("block_n", "block_v", "block_k"):
            b = getattr(self, f)
            if b < 16 or b & (b - 1):
                raise ValueError(f"`{f}` must be a power of two >= 16 (Triton), got {b}")

    def padded(self, n: int, d: int, v: int) -> tuple[int, int, int]:
        """``(Np, Dp, Vp)``: the padded token, width and vocabulary sizes."""
        return (common.round_up(n, self.block_n), common.round_up(d, self.block_k),
                common.round_up(v, self.block_v))


def _pow2_at_most(x: int, cap: int, floor: int = 16) -> int:
    p = floor
    while p * 2 <= min(x, cap):
        p *= 2
    return p


_SMS = 132  # streaming multiprocessors of an H100/H200 SXM


def _split_for(programs: int, target: int, cap: int) -> int:
    """The smallest power of two ``s`` with ``programs * s >= target``, at most ``cap``."""
    s = 1
    while s * 2 <= cap and programs * s < target:
        s *= 2
    return s


def default_config(n: int, d: int, v: int, dtype) -> Config:
    """Starting blocks for Hopper: 64 x 128 logits tiles (fewer rows for tiny token counts),
    64-wide ``D`` slices for ``tl.dot``; 8 warps for 16-bit inputs (bigger MMA tiles), 4
    for float32. With fewer token tiles than the GPU has SMs, the forward splits the
    vocabulary (``v_split``, up to 16, until there are two waves of programs: merging costs
    little). Unmeasured on a device: starting points for :func:`candidates` and the
    autotuner."""
    sixteen = jnp.dtype(dtype).itemsize <= 2
    bn, bv = _pow2_at_most(n, 64), 128
    tiles = common.round_up(n, bn) // bn
    return Config(
        block_n=bn, block_v=bv, block_k=_pow2_at_most(d, 64),
        num_warps=8 if sixteen else 4, num_stages=2,
        v_split=_split_for(tiles, 2 * _SMS, min(16, max(1, v // bv))))


def ce_config(n: int, c: int, dtype) -> Config:
    """Plain CE blocks: :func:`default_config`'s, with token tiles of 64 rows halved (down
    to 16) until there are two programs per SM: the forward's grid is one program per token
    tile, each walking the whole row, so few large tiles would leave SMs idle."""
    bn = 64
    while bn > 16 and common.round_up(n, bn) // bn < 2 * _SMS:
        bn //= 2
    return dataclasses.replace(default_config(n, 16, c, dtype), block_n=bn, v_split=1)


def candidates(n: int, d: int, v: int, dtype) -> list[Config]:
    """Configs worth timing (:func:`jaxent.autotune`): the default first, then token tiles
    of 32-128 x vocabulary tiles of 64-256, and the forward's vocabulary split halved and
    doubled."""
    base = default_config(n, d, v, dtype)
    out = [base]
    for bn in (32, 64, 128):
        for bv in (64, 128, 256):
            out.append(dataclasses.replace(base, block_n=_pow2_at_most(n, bn), block_v=bv))
    for split in (max(1, base.v_split // 2), base.v_split * 2):
        out.append(dataclasses.replace(base, v_split=split))
    return list(dict.fromkeys(out))


def params(cfg: Config):
    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def vslice(ref, start, size):
    return None if ref is None else ref[pl.ds(start, size)]
