"""Benchmark problems: what is computed, at which shape, and what it must cost at least.

A :class:`Case` names one problem (plain or fused linear cross-entropy, or fused linear
distillation, forward or forward and backward, a dtype and a shape). Its
:meth:`Case.min_bytes` and :meth:`Case.flops` give the floors the report compares the
measured times with: the fewest bytes any implementation must move, and the matmul work of
the fused loss.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np

Kind = Literal["ce", "linear", "distill"]
Mode = Literal["fwd", "fwd+bwd"]
DType = Literal["float32", "bfloat16"]

CE: Kind = "ce"
LINEAR: Kind = "linear"
DISTILL: Kind = "distill"
FWD: Mode = "fwd"
FWD_BWD: Mode = "fwd+bwd"


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark problem.

    Attributes:
      kind: ``"ce"`` (logits ``[n, c]``), ``"linear"`` (hidden ``[n, d]``, kernel ``[d, c]``)
        or ``"distill"`` (a student's hidden and kernel, and a teacher's, all shaped so; the
        KL divergence of the teacher's softmax from the student's).
      mode: ``"fwd"`` (loss only) or ``"fwd+bwd"`` (loss and gradient).
      dtype: ``"float32"`` or ``"bfloat16"``.
      n: rows (tokens).
      c: classes (vocabulary).
      d: hidden size (linear cases only).
    """

    kind: Kind
    mode: Mode
    dtype: DType
    n: int
    c: int
    d: int = 0

    @property
    def shape(self) -> str:
        """``"NxC"`` or ``"NxDxC"``."""
        return f"{self.n}x{self.c}" if self.kind == CE else f"{self.n}x{self.d}x{self.c}"

    @property
    def name(self) -> str:
        dt = "bf16" if self.dtype == "bfloat16" else "f32"
        label = {"ce": "CE", "linear": "linear CE", "distill": "linear KL"}[self.kind]
        return f"{label} {self.mode} {dt} {self.shape}"

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "bfloat16" else 4

    def min_bytes(self) -> int:
        """Bytes any implementation must move: read the inputs once, write the gradients once."""
        return min_bytes(self.kind, self.mode, self.n, self.c, self.d, self.itemsize)

    @property
    def n_diff(self) -> int:
        """How many leading float inputs the backward differentiates (the student's two in a
        distillation case, every one otherwise)."""
        return {"ce": 1, "linear": 2, "distill": 2}[self.kind]

    def flops(self) -> int:
        """Matmul flops of the fused cases (0 for plain cross-entropy)."""
        if self.kind == CE:
            return 0
        flops = linear_flops(self.n, self.d, self.c, self.mode)
        return flops + matmul_flops(self.n, self.d, self.c) * (self.kind == DISTILL)


def min_bytes(kind: Kind, mode: Mode, n: int, c: int, d: int, itemsize: int) -> int:
    """Read every float input once (and, with the backward, write the differentiated ones'
    gradients once), plus the ``[n]`` int32 labels. A distillation case reads a student's and
    a teacher's hidden and kernel and writes the student's gradients.

    >>> min_bytes("ce", "fwd+bwd", 8192, 128256, 0, 2)   # bf16 logits in, bf16 grad out
    4202725376
    """
    size = (n * c if kind == CE else n * d + d * c) * itemsize
    reads = 2 if kind == DISTILL else 1
    return size * (reads + (mode == FWD_BWD)) + n * 4


def matmul_flops(n: int, d: int, c: int) -> int:
    """Flops of one ``[n, d] @ [d, c]`` product (a multiply and an add per term).

    >>> matmul_flops(4096, 4096, 32000) / 1e12
    1.073741824
    """
    return 2 * n * d * c


def linear_flops(n: int, d: int, c: int, mode: Mode) -> int:
    """Matmul flops of the fused loss, counted as the materialized path does them: the
    logits ``h @ W`` (one product), and for the backward ``dz @ W^T`` and ``h^T @ dz`` (two
    more). A schedule that recomputes the logits does more work than this count credits.
    (A distillation case adds one product, the teacher's logits.)

    >>> linear_flops(16384, 4096, 128256, "fwd+bwd") == 3 * matmul_flops(16384, 4096, 128256)
    True
    """
    return matmul_flops(n, d, c) * (3 if mode == FWD_BWD else 1)


CE_SHAPES = ((8192, 1000), (4096, 32000), (2048, 128256), (65536, 10))
LINEAR_SHAPES = ((4096, 1024, 32000), (2048, 2048, 128256))
QUICK_CE_SHAPES = ((2048, 1000), (512, 32000), (128, 128256), (16384, 10))
QUICK_LINEAR_SHAPES = ((256, 256, 32000),)

# GPU suite (bf16): a 4K model at V = 32K, Llama-3-8B's head, a Gemma-3-like head.
GPU_LINEAR_SHAPES = ((4096, 4096, 32000), (16384, 4096, 128256), (16384, 2560, 262144))
GPU_QUICK_LINEAR_SHAPES = ((4096, 4096, 32000),)
GPU_CE_SHAPES = ((8192, 128256),)
# Tiny versions of the GPU suite, to check its code path on a CPU (--tiny).
TINY_LINEAR_SHAPES = ((64, 32, 512),)
TINY_CE_SHAPES = ((64, 512),)
# Fused distillation (student and teacher alike), run when jaxent has linear_distillation_loss.
DISTILL_SHAPES = ((2048, 1024, 32000),)
QUICK_DISTILL_SHAPES = ((256, 256, 32000),)
GPU_DISTILL_SHAPES = ((4096, 4096, 32000),)
# TPU suite (bf16): Llama-3-8B's head for every fused head, plain CE at 8192x128256.
TPU_LINEAR_SHAPES = ((16384, 4096, 128256),)


def default_cases(quick: bool = False, distill: bool = False) -> list[Case]:
    """The CPU suite: plain CE in both dtypes and modes, fused linear CE (``quick``: small
    shapes, float32 only for the fused case, no bf16 forward-only cases); with ``distill``,
    the fused distillation loss too (float32)."""
    ce_shapes = QUICK_CE_SHAPES if quick else CE_SHAPES
    lin_shapes = QUICK_LINEAR_SHAPES if quick else LINEAR_SHAPES
    cases = []
    for n, c in ce_shapes:
        for dtype in ("float32", "bfloat16"):
            for mode in (FWD, FWD_BWD):
                if quick and mode == FWD and dtype == "bfloat16":
                    continue
                cases.append(Case(CE, mode, dtype, n, c))  # type: ignore[arg-type]
    for n, d, c in lin_shapes:
        for dtype in ("float32", "bfloat16") if not quick else ("float32",):
            cases.append(Case(LINEAR, FWD_BWD, dtype, n, c, d))  # type: ignore[arg-type]
    if distill:
        cases += [Case(DISTILL, FWD_BWD, "float32", n, c, d)
                  for n, d, c in (QUICK_DISTILL_SHAPES if quick else DISTILL_SHAPES)]
    return cases


def gpu_cases(quick: bool = False, tiny: bool = False, distill: bool = False) -> list[Case]:
    """The GPU suite: bf16 value_and_grad of the fused loss at model-sized heads, and of plain
    CE at 8192x128256 (for HBM bandwidth); with ``distill``, the fused distillation loss at
    4096x4096x32000. ``quick`` keeps the smallest head, to fit the GPU script's time
    budget (``benchmarks/gpu/run.sh`` then runs the Llama head on its own); ``tiny`` swaps
    every shape for a tiny one (a CPU check of the suite's code path)."""
    lin: tuple[tuple[int, int, int], ...]
    if tiny:
        lin, ce, dist = TINY_LINEAR_SHAPES, TINY_CE_SHAPES, TINY_LINEAR_SHAPES
    else:
        lin = GPU_QUICK_LINEAR_SHAPES if quick else GPU_LINEAR_SHAPES
        ce, dist = GPU_CE_SHAPES, GPU_DISTILL_SHAPES
    return ([Case(LINEAR, FWD_BWD, "bfloat16", n, c, d) for n, d, c in lin]
            + [Case(CE, FWD_BWD, "bfloat16", n, c) for n, c in ce]
            + [Case(DISTILL, FWD_BWD, "bfloat16", n, c, d) for n, d, c in dist if distill])


def tpu_cases(tiny: bool = False, distill: bool = False) -> list[Case]:
    """The TPU suite (``benchmarks/tpu/run.sh``): bf16 value_and_grad of the fused loss at
    Llama-3-8B's head (16384x4096x128256), then plain CE at 8192x128256, then (with
    ``distill``) the fused distillation loss at the same head; ``tiny`` swaps every shape
    for a tiny one (a CPU check of the suite's code path).

    >>> [c.name for c in tpu_cases()][0]
    'linear CE fwd+bwd bf16 16384x4096x128256'
    """
    lin, ce = (TINY_LINEAR_SHAPES, TINY_CE_SHAPES) if tiny else (TPU_LINEAR_SHAPES, GPU_CE_SHAPES)
    return ([Case(LINEAR, FWD_BWD, "bfloat16", n, c, d) for n, d, c in lin]
            + [Case(CE, FWD_BWD, "bfloat16", n, c) for n, c in ce]
            + [Case(DISTILL, FWD_BWD, "bfloat16", n, c, d) for n, d, c in lin if distill])


def make_inputs(case: Case, seed: int = 0) -> dict[str, np.ndarray]:
    """Host (numpy, float32) inputs shared by every contender; labels are int32."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, case.c, size=(case.n,), dtype=np.int32)
    if case.kind == CE:
        logits = rng.standard_normal((case.n, case.c), dtype=np.float32) * 2.0
        return {"logits": logits, "labels": labels}
    hidden = rng.standard_normal((case.n, case.d), dtype=np.float32)
    kernel = rng.standard_normal((case.d, case.c), dtype=np.float32) / math.sqrt(case.d)
    if case.kind == LINEAR:
        return {"hidden": hidden, "kernel": kernel, "labels": labels}
    t_hidden = rng.standard_normal((case.n, case.d), dtype=np.float32)
    t_kernel = rng.standard_normal((case.d, case.c), dtype=np.float32) / math.sqrt(case.d)
    return {"hidden": hidden, "kernel": kernel, "teacher_hidden": t_hidden,
            "teacher_kernel": t_kernel, "labels": labels}
