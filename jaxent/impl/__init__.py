"""The implementations, and the registry that picks one for a call: the one dispatch table.

The registry's entries are the implementations themselves (:class:`Implementation`): a
name, what it can serve, where ``"auto"`` prefers it (per platform: its rank and the largest
vocabulary it is picked for), and for the fused head the per-device function that runs it
(``run(plan, h, kernel, bias, labels, weight) -> (losses or their sum, (lse, argmax))``),
which every placement calls, and its version split by the partitioner on Auto meshes
(``auto_run``, registered by :mod:`jaxent.placement.auto`). An ``impl`` asked for
explicitly that cannot serve a call raises a ``ValueError`` naming ``impl``, why, and which
implementations can; ``"auto"`` (and ``"xla"``, the XLA walks alone) picks, among the
entries that can serve the call, the one of lowest rank on the platform the program is
lowered for (:func:`choices` tells the lowering which platforms differ). Adding an
implementation is one module and one :func:`register` call (``docs/extending.md``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax.numpy as jnp

from jaxent import _platform
from jaxent import _rowmath as rm


@dataclasses.dataclass(frozen=True)
class Request:
    """What a call needs from an implementation.

    Attributes:
      kind: ``"ce"`` (logits), ``"linear"`` (the fused head) or ``"stat"`` (a row
        statistic over linear heads: the RL and distillation heads).
      dtype: the inputs' dtype.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      vocab_parallel: the vocabulary is split over a mesh axis.
      static_tokens: the number of tokens is a concrete int (not symbolic, as in export).
      padded: the kernel holds padding columns beyond the vocabulary (``vocab_size``).
      num_classes: the vocabulary ``V`` (``"auto"`` may prefer a walk by it).
      row_temperature: the temperature is one value per row (an array), not static.
      auto_mesh: the call is split by the partitioner on a mesh with Auto axes.
    """

    kind: str
    dtype: jnp.dtype
    reduction: str
    vocab_parallel: bool = False
    static_tokens: bool = True
    padded: bool = False
    num_classes: int = 0
    row_temperature: bool = False
    auto_mesh: bool = False


PLATFORMS = ("cpu", "gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class Preference:
    """Where ``"auto"`` takes an implementation on one platform: ``rank`` (lower is tried
    first) and ``max_classes`` (it is passed over for larger vocabularies; None: any)."""

    rank: int
    max_classes: int | None = None


@dataclasses.dataclass(frozen=True)
class Implementation:
    """A registered implementation.

    Attributes:
      name: what ``impl=`` calls it.
      kind: ``"ce"`` (logits), ``"linear"`` (the fused CE head) or ``"stat"`` (any row
        statistic's head, :mod:`jaxent.impl.stats`).
      xla: whether it is an XLA walk (``impl="xla"`` picks among those only).
      refuses: why it cannot serve a :class:`Request` (None when it can).
      run: for ``"linear"``, the per-device function every placement calls.
      auto_run: ``run`` split by the partitioner on a mesh with Auto axes: for
        ``"linear"`` ``auto_run(spec, plan, h, kernel, bias, labels, weight)`` (``spec``
        the call's static options), for ``"stat"`` ``run``'s signature;
        :mod:`jaxent.placement.auto` registers it, a layer above this one. None: ``run``
        itself, whole on each device (partitioned by XLA as it sees fit).
      per_row: ``run`` returns per-token losses (else their sum).
      prefer: ``{platform: Preference}`` (``"cpu"``, ``"gpu"``, ``"tpu"``); ``"auto"`` never
        picks it on a platform not listed.
    """

    name: str
    kind: str
    xla: bool
    refuses: Callable[[Request], str | None]
    run: Callable | None = None
    per_row: bool = True
    prefer: Mapping[str, Preference] = dataclasses.field(default_factory=dict)
    auto_run: Callable | None = None


def _token_refuses(req: Request) -> str | None:
    if jnp.promote_types(req.dtype, jnp.float32) != req.dtype:
        return f"it makes the gradient in the forward in float32 and not for {req.dtype} inputs"
    if req.reduction == "none":
        return "it sums the losses in the forward and cannot give reduction='none'"
    if req.vocab_parallel:
        return "it needs whole vocabulary rows and the vocabulary is split over a mesh axis"
    if not req.static_tokens:
        return "it walks token blocks and the number of tokens is symbolic"
    if req.padded:
        return "it does not mask padding columns of the kernel"
    return None


def _pallas_refuses(req: Request) -> str | None:
    if jnp.dtype(req.dtype) == jnp.float64:
        return "its kernels take float32, bfloat16 or float16 inputs"
    if req.vocab_parallel:
        return "its kernels do not merge row statistics across vocabulary shards"
    if not req.static_tokens:
        return "its kernels pad the tokens to whole blocks of a static size"
    if req.padded:
        return "its kernels do not mask padding columns of the kernel"
    if req.row_temperature:
        return "its kernels take one static temperature, not one per row"
    if req.auto_mesh:
        return ("its kernels are not split by the partitioner on a mesh with Auto axes "
                "(on an Explicit mesh or inside jax.shard_map they serve token-parallel "
                "splits)")
    return None


def _stat_token_refuses(req: Request) -> str | None:
    if req.vocab_parallel:
        return "it needs whole vocabulary rows and the vocabulary is split over a mesh axis"
    if not req.static_tokens:
        return "it walks token blocks and the number of tokens is symbolic"
    return None


def _stat_pallas_refuses(req: Request) -> str | None:
    # The statistic kernels mask padding columns and take one temperature per row.
    return _pallas_refuses(dataclasses.replace(req, padded=False, row_temperature=False))


def _pallas_stat(stat, plan, streams, rows, cols):
    """The statistic kernels (:func:`jaxent.impl.pallas.dispatch_stat`)."""
    from jaxent.impl import pallas  # noqa: PLC0415

    return pallas.dispatch_stat(stat, plan, streams, rows, cols)


REGISTRY: dict[tuple[str, str], Implementation] = {}


def register(impl: Implementation) -> None:
    """Add an implementation to the registry (kernels register themselves on import)."""
    REGISTRY[impl.kind, impl.name] = impl


def _pallas_linear_rows(plan, h, kernel, bias, lab: rm.Labels, weight):
    """The fused cross-entropy on the statistic kernels (:func:`_pallas_stat` of
    :class:`~jaxent.impl.stats.CrossEntropy`): per-token losses and ``(lse, argmax)``."""
    from jaxent.impl import linear_ce  # noqa: PLC0415

    stat, streams, cols = linear_ce.statistic(plan, h, kernel, bias, weight)
    losses, lse, arg = _pallas_stat(stat, plan, streams, lab, cols)
    return losses, (lse, arg)


def _everywhere(rank: int, max_classes: int | None = None) -> dict[str, Preference]:
    return dict.fromkeys(PLATFORMS, Preference(rank, max_classes))


def _register_builtin() -> None:
    # The walks import this package's submodules: they are registered once it is defined.
    from jaxent.impl import linear_ce, token  # noqa: PLC0415

    register(Implementation("xla", "ce", True, lambda req: None, prefer=_everywhere(0)))
    # Measured on 2-core CPUs (benchmarks/RESULTS.md, benchmarks/linear_notes.md): the token
    # walk up to V = 64K, the vocabulary walk above it. GPU and TPU, not measured yet: the
    # vocabulary walk keeps the fewest temporaries. "auto" does not pick Pallas yet.
    register(Implementation("vocab", "linear", True, lambda req: None, linear_ce.rows,
                            prefer={"cpu": Preference(1), "gpu": Preference(0),
                                    "tpu": Preference(0)}))
    register(Implementation("token", "linear", True, _token_refuses, token.token_sum,
                            per_row=False,
                            prefer={"cpu": Preference(0, 65536), "gpu": Preference(1, 65536),
                                    "tpu": Preference(1, 65536)}))
    register(Implementation("pallas", "linear", False, _stat_pallas_refuses,
                            _pallas_linear_rows))
    register(Implementation("pallas", "ce", False, _pallas_refuses))
    # The RL and distillation heads ("stat": a row statistic over linear-head streams).
    from jaxent.impl import stream, stream_token  # noqa: PLC0415

    register(Implementation("vocab", "stat", True, lambda req: None, stream.run,
                            prefer=_everywhere(0)))
    register(Implementation("token", "stat", True, _stat_token_refuses, stream_token.run))
    register(Implementation("pallas", "stat", False, _stat_pallas_refuses, _pallas_stat))


def register_auto_run(kind: str, name: str, auto_run: Callable) -> None:
    """Give the registered implementation ``name`` of ``kind`` its Auto-mesh version
    (:attr:`Implementation.auto_run`)."""
    REGISTRY[kind, name] = dataclasses.replace(REGISTRY[kind, name], auto_run=auto_run)


def implementation(kind: str, name: str) -> Implementation:
    """The registered implementation ``name`` of ``kind``."""
    return REGISTRY[kind, name]


def _ranked(kind: str, platform: str) -> list[Implementation]:
    """The entries of ``kind`` that ``"auto"`` may pick on ``platform``, best first (a
    platform none lists chooses as the CPU)."""
    if not any(platform in e.prefer for e in REGISTRY.values()):
        platform = "cpu"
    entries = [e for (k, _), e in REGISTRY.items() if k == kind and platform in e.prefer]
    return sorted(entries, key=lambda e: e.prefer[platform].rank)


def choices(kind: str) -> Callable[[str], tuple]:
    """``platform -> what "auto" may pick there`` (equal for platforms that choose alike:
    the lowering traces one branch per distinct answer, :func:`jaxent._platform.by_platform`)."""
    return lambda platform: tuple((e.name, e.prefer[platform]) for e in _ranked(kind, platform))


def select(impl: str, req: Request) -> str:
    """The implementation that serves ``req``: ``impl`` itself if it can (else
    ``ValueError``), or for ``"auto"``/``"xla"`` the first of the platform's ranking
    (:attr:`Implementation.prefer`) that can."""
    platform = _platform.platform()
    platform = platform if platform in PLATFORMS else "cpu"
    ranked = _ranked(req.kind, platform)
    names = [e.name for e in ranked] + [n for (k, n) in REGISTRY
                                        if k == req.kind and n not in {e.name for e in ranked}]
    able = [n for n in names if REGISTRY[req.kind, n].refuses(req) is None]
    if impl in ("auto", "xla"):
        for choice in ranked:
            limit = choice.prefer[platform].max_classes
            if choice.name not in able or (limit is not None and req.num_classes > limit):
                continue
            if choice.xla or impl == "auto":
                return choice.name
    entry = REGISTRY.get((req.kind, impl))
    if entry is None:
        known = tuple(dict.fromkeys(("auto", "xla", *names)))
        raise ValueError(f"`impl` must be one of {known}, got {impl!r}")
    why = entry.refuses(req)
    if why is not None:
        raise ValueError(f"`impl`={impl!r} cannot serve this call: {why}; implementations "
                         f"that can: {('auto', *able)}")
    return impl


_register_builtin()
