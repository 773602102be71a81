"""The Pallas kernels' entry points: per-platform dispatch and block configs.

:func:`dispatch_stat` (every fused head: the kernels built from its row statistic,
:mod:`jaxent.impl.pallas_stats`) and :func:`dispatch_ce_rows` (plain cross-entropy of
materialized logits) pick, when the program is lowered, the Triton kernels on NVIDIA GPUs
or the Mosaic ones on TPUs, each with its block ``Config`` from the autotune cache
(:mod:`jaxent._autotune`) or the backend's heuristics.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from jax import lax

from jaxent import _autotune
from jaxent._options import Options
from jaxent.impl import (
    pallas_gpu,
    pallas_stats,
    pallas_stats_gpu,
    pallas_stats_tpu,
    pallas_tpu,
    stats,
)

# Per platform: the plain-CE kernels and the statistic kernels.
_BACKENDS = {"tpu": (pallas_tpu, pallas_stats_tpu), "cuda": (pallas_gpu, pallas_stats_gpu)}


def _backends(platform: str):
    """``(plain-CE module, statistic-kernel module)`` for ``platform``: Mosaic for
    ``"tpu"``, Triton for ``"cuda"``/``"gpu"`` and for ``"cpu"`` (where only
    ``interpret=True`` runs)."""
    if platform in ("cuda", "gpu", "cpu"):
        platform = "cuda"
    if platform not in _BACKENDS:
        raise ValueError(f"impl='pallas' has kernels for cuda and tpu, not {platform!r}")
    return _BACKENDS[platform]


def default_config(n: int, d: int, v: int, dtype, platform: str, impl: str = "pallas-linear",
                   streams: int = 1):
    """The heuristic block ``Config`` of ``platform``'s kernels for ``[n, d] x [d, v]``:
    the statistic kernels' over ``streams`` linear heads, or plain CE's for
    ``impl="pallas-ce"``."""
    ce, stat = _backends(platform)
    if impl == "pallas-ce":
        return ce.ce_config(n, v, dtype) if hasattr(ce, "ce_config") else ce.default_config(
            n, d, v, dtype)
    return stat.default_config(n, d, v, dtype, streams)


def config_for(n: int, d: int, v: int, dtype, platform: str, impl: str = "pallas-linear",
               streams: int = 1):
    """The autotuned ``Config`` cached for this device and shape class, else the default.

    The cache (:mod:`jaxent._autotune`) is keyed by ``impl`` (``"pallas-linear"`` for
    :func:`jaxent.linear_cross_entropy`, ``"pallas-<Statistic>"`` for the other fused heads,
    e.g. ``"pallas-LogProbs"``, ``"pallas-ce"`` for plain CE), ``dtype`` and the shape class
    of ``(n, d, v)``; fill it with :func:`jaxent.autotune` and the backend's candidates.
    """
    heuristic = default_config(n, d, v, dtype, platform, impl, streams)
    choice = _autotune.lookup(_autotune.autotune_key(impl, dtype, n=n, d=d, v=v))
    if choice is None:
        return heuristic
    config = _autotune.decode(choice, type(heuristic), _CONFIG_BOUNDS)
    return heuristic if config is None else config


# The range a cached block ``Config`` field may take (inclusive); the Configs check the rest.
_CONFIG_BOUNDS = {"block_n": (1, 1 << 16), "block_v": (1, 1 << 16), "block_k": (1, 1 << 12),
                  "num_warps": (1, 32), "num_stages": (1, 8), "v_split": (1, 64),
                  "chunk": (1, 1 << 31), "vmem_limit_bytes": (1, 1 << 31)}


def _per_platform(run: Callable, operands, interpret: bool):
    """``run(platform, *operands)`` for the platform the program is lowered for.

    With ``interpret`` the Triton-style kernels run in Pallas's interpreter (any platform).
    Otherwise ``lax.platform_dependent`` picks, *when lowering*, the Mosaic kernels on
    ``tpu`` and the Triton kernels elsewhere (``cuda``); lowered for the CPU it raises the
    :func:`check_platform` hint. One platform per lowering: a multi-platform
    ``jax.export(..., platforms=["cuda", "tpu"])`` fails, because Pallas lowers every
    branch for every platform and the Triton branch has no TPU lowering.
    """
    if interpret:
        return run("cuda", *operands)
    return lax.platform_dependent(
        *operands, tpu=functools.partial(run, "tpu"), default=functools.partial(run, "cuda"))


def dispatch_ce_rows(x, labels, row_w, counted, weight, *, opts: Options, interpret: bool):
    """:func:`jaxent.impl.pallas_gpu.ce_rows` or the TPU one, chosen per platform."""
    n, c = x.shape

    def run(platform, x, labels, row_w, counted, weight):
        cfg = config_for(n, 128, c, x.dtype, platform, impl="pallas-ce")
        return _backends(platform)[0].ce_rows(x, labels, row_w, counted, weight, opts=opts,
                                              config=cfg, interpret=interpret)

    return _per_platform(run, (x, labels, row_w, counted, weight), interpret)


def tune_name(stat) -> str:
    """The autotune cache's ``impl`` for the kernels of ``stat`` (:func:`config_for`)."""
    return "pallas-linear" if isinstance(stat, stats.CrossEntropy) else (
        f"pallas-{type(stat).__name__}")


def dispatch_stat(stat, plan, streams, rows, cols):
    """The statistic kernels (:mod:`jaxent.impl.pallas_stats`) for ``stat`` over linear-head
    ``streams``: Triton on NVIDIA GPUs, Mosaic on TPUs (:func:`_per_platform`), each with
    :func:`config_for` its blocks; ``plan.interpret`` runs the Triton ones in the
    interpreter."""
    n, d = streams[0][0].shape
    # A statistic that keeps more [block_n, block_v] arrays live than one logits tile per
    # stream says how many (extra_tiles): the GPU's token tiles shrink as for a stream.
    weight = len(streams) + getattr(pallas_stats.for_kernels(stat), "extra_tiles", 0)

    def run(platform, streams, rows, cols):
        cfg = config_for(n, d, plan.num_classes, streams[0][0].dtype, platform,
                         tune_name(stat), weight)
        return pallas_stats.run_on(_backends(platform)[1], cfg, stat, plan.opts,
                                   plan.num_classes, plan.layout, streams, rows, cols,
                                   interpret=plan.interpret)

    return _per_platform(run, (streams, rows, cols), plan.interpret)
