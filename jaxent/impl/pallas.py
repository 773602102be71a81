"""The Pallas kernels' entry points: per-platform dispatch and block configs.

:func:`dispatch_linear_ce_rows` and :func:`dispatch_ce_rows` pick, when the program is
lowered, the Triton kernels (:mod:`jaxent.impl.pallas_gpu`) on NVIDIA GPUs or the Mosaic
ones (:mod:`jaxent.impl.pallas_tpu`) on TPUs, each with its block ``Config`` from the
autotune cache (:mod:`jaxent._autotune`) or the backend's heuristics.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from jax import lax

from jaxent import _autotune
from jaxent._options import Options
from jaxent.impl import pallas_gpu, pallas_tpu


def backend(platform: str):
    """The kernel module for ``platform``: :mod:`~jaxent.impl.pallas_tpu` for ``"tpu"``,
    :mod:`~jaxent.impl.pallas_gpu` (Triton) for ``"cuda"``/``"gpu"`` and for ``"cpu"``
    (where only ``interpret=True`` runs)."""
    if platform == "tpu":
        return pallas_tpu
    if platform in ("cuda", "gpu", "cpu"):
        return pallas_gpu
    raise ValueError(f"impl='pallas' has kernels for cuda and tpu, not {platform!r}")


def default_config(n: int, d: int, v: int, dtype, platform: str, impl: str = "pallas-linear"):
    """The heuristic block ``Config`` of ``platform``'s kernels for ``[n, d] x [d, v]``
    (plain CE, ``impl="pallas-ce"``: the backend's ``ce_config`` where it has one)."""
    mod = backend(platform)
    if impl == "pallas-ce" and hasattr(mod, "ce_config"):
        return mod.ce_config(n, v, dtype)
    return mod.default_config(n, d, v, dtype)


def config_for(n: int, d: int, v: int, dtype, platform: str, impl: str = "pallas-linear"):
    """The autotuned ``Config`` cached for this device and shape class, else the default.

    The cache (:mod:`jaxent._autotune`) is keyed by ``impl``, ``dtype`` and the shape class
    of ``(n, d, v)``; fill it with :func:`jaxent.autotune` and the backend's candidates.
    """
    heuristic = default_config(n, d, v, dtype, platform, impl)
    choice = _autotune.lookup(_autotune.autotune_key(impl, dtype, n=n, d=d, v=v))
    if choice is None:
        return heuristic
    config = _autotune.decode(choice, type(heuristic), _CONFIG_BOUNDS)
    return heuristic if config is None else config


# The range a cached block ``Config`` field may take (inclusive); the Configs check the rest.
_CONFIG_BOUNDS = {"block_n": (1, 1 << 16), "block_v": (1, 1 << 16), "block_k": (1, 1 << 12),
                  "block_d": (1, 1 << 12), "num_warps": (1, 32), "num_stages": (1, 8),
                  "d_split": (1, 64), "v_split": (1, 64), "vmem_limit_bytes": (1, 1 << 31)}


def _per_platform(run: Callable, operands, interpret: bool):
    """``run(module, *operands)`` for the platform the program is lowered for.

    With ``interpret`` the Triton-style kernels run in Pallas's interpreter (any platform).
    Otherwise ``lax.platform_dependent`` picks, *when lowering*, the Mosaic kernels on
    ``tpu`` and the Triton kernels elsewhere (``cuda``); lowered for the CPU it raises the
    :func:`check_platform` hint. One platform per lowering: a multi-platform
    ``jax.export(..., platforms=["cuda", "tpu"])`` fails, because Pallas lowers every
    branch for every platform and the Triton branch has no TPU lowering.
    """
    if interpret:
        return run(pallas_gpu, *operands)
    return lax.platform_dependent(
        *operands, tpu=functools.partial(run, pallas_tpu),
        default=functools.partial(run, pallas_gpu))


def dispatch_linear_ce_rows(h, kernel, bias, labels, row_w, counted, weight, *, opts: Options,
                            num_classes: int, layout: str, interpret: bool, aux: bool = False):
    """:func:`jaxent.impl.pallas_gpu.linear_ce_rows` or the TPU one, chosen per platform
    (:func:`_per_platform`), each with :func:`config_for` its platform's blocks."""
    n, d = h.shape
    platform = {"pallas_gpu": "cuda", "pallas_tpu": "tpu"}

    def run(mod, h, kernel, bias, labels, row_w, counted, weight):
        cfg = config_for(n, d, num_classes, h.dtype, platform[mod.__name__.rsplit(".", 1)[1]])
        return mod.linear_ce_rows(h, kernel, bias, labels, row_w, counted, weight, opts=opts,
                                  num_classes=num_classes, layout=layout, config=cfg,
                                  interpret=interpret, aux=aux)

    return _per_platform(run, (h, kernel, bias, labels, row_w, counted, weight), interpret)


def dispatch_ce_rows(x, labels, row_w, counted, weight, *, opts: Options, interpret: bool):
    """:func:`jaxent.impl.pallas_gpu.ce_rows` or the TPU one, chosen per platform."""
    n, c = x.shape
    platform = {"pallas_gpu": "cuda", "pallas_tpu": "tpu"}

    def run(mod, x, labels, row_w, counted, weight):
        cfg = config_for(n, 128, c, x.dtype, platform[mod.__name__.rsplit(".", 1)[1]],
                         impl="pallas-ce")
        return mod.ce_rows(x, labels, row_w, counted, weight, opts=opts, config=cfg,
                           interpret=interpret)

    return _per_platform(run, (x, labels, row_w, counted, weight), interpret)


def dispatch_stat(stat, plan, streams, rows, cols):
    """The statistic kernels (:mod:`jaxent.impl.pallas_stats`) for ``stat`` over linear-head
    ``streams``: Triton on NVIDIA GPUs, Mosaic on TPUs (:func:`_per_platform`), each with its
    backend's default blocks; ``plan.interpret`` runs the Triton ones in the interpreter."""
    from jaxent.impl import pallas_stats, pallas_stats_gpu, pallas_stats_tpu  # noqa: PLC0415

    n, d = streams[0][0].shape
    kernels = {pallas_gpu: pallas_stats_gpu, pallas_tpu: pallas_stats_tpu}

    # A statistic that keeps more [block_n, block_v] arrays live than one logits tile per
    # stream says how many (extra_tiles): the GPU's token tiles shrink as for a stream.
    weight = len(streams) + getattr(pallas_stats.for_kernels(stat), "extra_tiles", 0)

    def run(mod, streams, rows, cols):
        backend = kernels[mod]
        cfg = backend.default_config(n, d, plan.num_classes, streams[0][0].dtype, weight)
        return pallas_stats.run_on(backend, cfg, stat, plan.opts, plan.num_classes,
                                   plan.layout, streams, rows, cols, interpret=plan.interpret)

    return _per_platform(run, (streams, rows, cols), plan.interpret)
