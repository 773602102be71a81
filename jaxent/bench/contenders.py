"""The implementations the benchmark times, each prepared for one case as a :class:`Runner`.

A :class:`Contender` is a name and a ``build(case, inputs)`` that returns a :class:`Runner`
(or ``None`` when it does not apply to the case). jaxent is reached through its public API
only (``jaxent.cross_entropy``, ``jaxent.linear_cross_entropy(..., impl=...)``, and the
functions that newer versions add, listed when they exist). Every other package is
optional: a contender whose package is missing is left out with one note saying why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxent.bench import deps
from jaxent.bench.cases import CE, DISTILL, FWD, FWD_BWD, LINEAR, Case, Kind

Family = Literal["jax", "torch"]
Inputs = dict[str, np.ndarray]


@dataclasses.dataclass
class Runner:
    """A contender prepared for one case.

    Attributes:
      call: runs once, blocks until the result is ready, returns ``(loss, grads or None)``.
      prepare: untimed set-up before each call (e.g. a fresh buffer for a donated input).
      temp_bytes: compiled temporary memory (JAX), when known.
      peak_bytes: device memory a call takes beyond its inputs, when known: JAX's compiled
        temporaries plus outputs (less what aliases a donated input); PyTorch's
        ``torch.cuda.max_memory_allocated`` during the call less what was allocated before.
      grad_fix: maps the call's gradients to the layout of :func:`make_inputs`.
    """

    call: Callable[[], tuple[Any, Any]]
    prepare: Callable[[], None] | None = None
    temp_bytes: int | None = None
    peak_bytes: int | None = None
    grad_fix: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None

    def grads(self, out: tuple[Any, Any]) -> list[np.ndarray] | None:
        """The gradients of a call's output as float32 numpy arrays, in the order and layout
        of :func:`make_inputs` (hidden ``[n, d]``, kernel ``[d, c]``)."""
        if out[1] is None:
            return None
        gs = [_to_numpy(g) for g in out[1]]
        return self.grad_fix(gs) if self.grad_fix else gs


@dataclasses.dataclass(frozen=True)
class Contender:
    """A loss implementation: a name and a function building a :class:`Runner` for a case.

    ``build`` returns ``None`` when the contender does not apply to the case;
    ``baseline_for`` lists the case kinds whose ratios are taken against this contender.
    """

    name: str
    build: Callable[[Case, Inputs], Runner | None]
    family: Family = "jax"
    baseline_for: tuple[Kind, ...] = ()


def _to_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # torch
        return a.detach().float().cpu().numpy()
    return np.asarray(jnp.asarray(a).astype(jnp.float32))


def _kernel_transposed(gs: list[np.ndarray]) -> list[np.ndarray]:
    """Grads of (hidden, kernel [c, d]) back to (hidden, kernel [d, c])."""
    return [gs[0], gs[1].T]


def _vd_inputs(inputs: Inputs) -> Inputs:
    """The inputs with the kernel as ``[c, d]`` (torch's ``nn.Linear`` layout); the transposed
    copy is made once, untimed."""
    return {"hidden": inputs["hidden"], "kernel": np.ascontiguousarray(inputs["kernel"].T),
            "labels": inputs["labels"]}


# ---------------------------------------------------------------------------------------- JAX
def _jax_array(a: np.ndarray, dtype: str) -> jax.Array:
    return jnp.asarray(a).astype(dtype) if a.dtype.kind == "f" else jnp.asarray(a)


def compile_with_memory(fn: Any, *args: Any) -> tuple[Callable, int | None, int | None]:
    """Compile once: ``(executable, temp_bytes, peak_bytes)`` from ``memory_analysis()``.

    ``peak_bytes`` is temporaries plus outputs less the bytes aliased to donated inputs.
    Memory analysis is backend dependent; where it is missing both are ``None``.
    """
    compiled = fn.lower(*args).compile()
    try:
        ma = compiled.memory_analysis()
        temp = int(ma.temp_size_in_bytes)
        peak = temp + int(ma.output_size_in_bytes) - int(ma.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - memory analysis is best effort (backend dependent)
        temp = peak = None  # type: ignore[assignment]
    return compiled, temp, peak


def jax_runner(loss_fn: Callable, case: Case, inputs: Inputs, donate: bool = False) -> Runner:
    """Runner for a JAX loss ``loss_fn(*float_inputs, labels) -> scalar``.

    ``fwd+bwd`` differentiates with respect to the case's first ``n_diff`` float inputs (all
    of them but a distillation teacher's). With ``donate`` the first float input is donated to
    the call, and a fresh copy is made (untimed) before each call.
    """
    names = [k for k in inputs if k != "labels"]
    args = [_jax_array(inputs[k], case.dtype) for k in names]
    labels = jnp.asarray(inputs["labels"])
    argnums = tuple(range(case.n_diff))
    fn: Callable[..., Any]
    if case.mode == FWD:
        fn = jax.jit(loss_fn)
    else:
        fn = jax.jit(jax.value_and_grad(loss_fn, argnums=argnums),
                     donate_argnums=(0,) if donate else ())
    fn, temp, peak = compile_with_memory(fn, *args, labels)
    state = {"args": args}

    def prepare() -> None:
        fresh = jnp.copy(args[0])
        fresh.block_until_ready()
        state["args"] = [fresh, *args[1:]]

    def call() -> tuple[Any, Any]:
        out = jax.block_until_ready(fn(*state["args"], labels))
        return (out, None) if case.mode == FWD else (out[0], list(out[1]))

    return Runner(call, prepare if donate else None, temp, peak)


def optax_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """optax's integer-label softmax cross-entropy, mean over rows (the plain-CE baseline)."""
    optax = deps.require("optax", "the plain cross-entropy baseline")
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def naive_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Autodiff of ``log_softmax`` + take: what people write by hand."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, labels[:, None], axis=-1).mean()


def naive_linear(hidden: jax.Array, kernel: jax.Array, labels: jax.Array) -> jax.Array:
    """The materialized path: full ``[n, c]`` logits, then cross-entropy."""
    logits = jnp.dot(hidden, kernel, preferred_element_type=jnp.float32)
    return naive_ce(logits, labels)


def naive_distill(h: jax.Array, w: jax.Array, th: jax.Array, tw: jax.Array,
                  labels: jax.Array) -> jax.Array:
    """The materialized distillation path: both models' full ``[n, c]`` logits, then the mean
    over tokens of KL(teacher || student) (``labels`` unused)."""
    del labels
    logp = jax.nn.log_softmax(jnp.dot(h, w, preferred_element_type=jnp.float32), axis=-1)
    logq = jax.nn.log_softmax(jnp.dot(th, tw, preferred_element_type=jnp.float32), axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(logq) * (logq - logp), axis=-1))


def for_kind(kind: Kind, loss_fn: Callable, donate: bool = False
             ) -> Callable[[Case, Inputs], Runner | None]:
    """A contender's ``build`` for a JAX loss: a :func:`jax_runner` on the cases of ``kind``
    (with ``donate``, only those with a backward)."""

    def build(case: Case, inputs: Inputs) -> Runner | None:
        if case.kind != kind or (donate and case.mode == FWD):
            return None
        return jax_runner(loss_fn, case, inputs, donate=donate)

    return build


def _jaxent() -> Any:
    import jaxent

    return jaxent


def jaxent_linear(**kwargs: Any) -> Callable:
    """``jaxent.linear_cross_entropy(h, w, y, **kwargs)`` (e.g. ``impl="vocab"``)."""
    return lambda h, w, y: _jaxent().linear_cross_entropy(h, w, y, **kwargs)


def _linear_log_probs_loss(h: jax.Array, w: jax.Array, y: jax.Array) -> jax.Array:
    """``-mean(jaxent.linear_log_probs(...))``: the same number as the mean cross-entropy."""
    return -jnp.mean(_jaxent().linear_log_probs(h, w, y))


def _linear_distillation_loss(h: jax.Array, w: jax.Array, th: jax.Array, tw: jax.Array,
                              labels: jax.Array) -> jax.Array:
    """``jaxent.linear_distillation_loss`` with its defaults: mean KL(teacher || student)."""
    del labels
    return _jaxent().linear_distillation_loss(h, w, th, tw)


def accepts(fn: Callable, case: Case) -> str:
    """``""`` when ``fn(hidden, kernel, labels)`` lowers for the default device at ``case``'s
    shapes (abstract inputs, no compile), else the error in one line: how optional ``impl``
    values are probed (a kernel that this platform cannot run fails to lower)."""
    args = (jax.ShapeDtypeStruct((case.n, case.d), case.dtype),
            jax.ShapeDtypeStruct((case.d, case.c), case.dtype),
            jax.ShapeDtypeStruct((case.n,), jnp.int32))
    try:
        jax.jit(fn).lower(*args)
    except Exception as e:  # noqa: BLE001 - any failure means "not available here"
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return ""


# Shapes an optional implementation is probed at (abstractly): float32 for the CPU suite,
# bf16 with every dimension a multiple of 128 for the GPU suite.
PROBE = Case(LINEAR, FWD_BWD, "float32", 16, 256, 128)
GPU_PROBE = Case(LINEAR, FWD_BWD, "bfloat16", 256, 1024, 256)


def jaxent_contenders(gpu: bool = False) -> tuple[list[Contender], list[str]]:
    """jaxent's contenders through its public API; notes on the ones this version lacks.

    Plain CE: ``jaxent.cross_entropy`` (and with the logits donated). Fused: the default
    ``impl``; on the GPU suite also ``impl="vocab"``, ``impl="token"`` and, when this jaxent
    and platform accept it, ``impl="pallas"``; ``jaxent.linear_log_probs`` and, for the
    distillation cases, ``jaxent.linear_distillation_loss`` when they exist.
    """
    jx = _jaxent()
    out = [
        Contender("jaxent", for_kind(CE, lambda x, y: jx.cross_entropy(x, y))),
        Contender("jaxent (donated logits)",
                  for_kind(CE, lambda x, y: jx.cross_entropy(x, y), donate=True)),
        Contender("jaxent", for_kind(LINEAR, jaxent_linear())),
    ]
    notes: list[str] = []
    impls = ["vocab", "token", "pallas"] if gpu else []
    for impl in impls:
        why = accepts(jaxent_linear(impl=impl), GPU_PROBE if gpu else PROBE)
        if why:
            notes.append(f'jaxent impl="{impl}": skipped ({why})')
        else:
            out.append(Contender(f'jaxent impl="{impl}"',
                                 for_kind(LINEAR, jaxent_linear(impl=impl))))
    for name, kind, loss in (("linear_log_probs", LINEAR, _linear_log_probs_loss),
                             ("linear_distillation_loss", DISTILL, _linear_distillation_loss)):
        if hasattr(jx, name):
            out.append(Contender(f"jaxent {name}", for_kind(kind, loss)))
        else:
            notes.append(f"jaxent.{name}: skipped (not in this jaxent)")
    return out, notes


def _tokamax_loss(tokamax: Any, implementation: str) -> Callable:
    def loss(h: jax.Array, w: jax.Array, y: jax.Array) -> jax.Array:
        return tokamax.linear_softmax_cross_entropy_loss(
            h, y, w, reduction="mean", implementation=implementation)

    return loss


def tokamax_contenders() -> tuple[list[Contender], list[str]]:
    """tokamax's ``linear_softmax_cross_entropy_loss`` with ``implementation="xla"``
    (materializes the logits) and ``"chunked_xla"`` (newer releases), when accepted."""
    tokamax, why = deps.optional("tokamax")
    if tokamax is None:
        return [], [f"tokamax: skipped ({why})"]
    out, notes = [], []
    for impl in ("xla", "chunked_xla"):
        loss = _tokamax_loss(tokamax, impl)
        why = accepts(loss, GPU_PROBE)
        if why:
            notes.append(f'tokamax implementation="{impl}": skipped ({why})')
        else:
            out.append(Contender(f"tokamax {impl}", for_kind(LINEAR, loss)))
    return out, notes


def build_jax_cce(case: Case, inputs: Inputs) -> Runner | None:
    """jax-cce's ``linear_cross_entropy`` on the fused cases."""
    if case.kind != LINEAR:
        return None
    import jax_cce

    # jax-cce takes the classifier as [c, d].
    runner = jax_runner(lambda h, w, y: jax_cce.linear_cross_entropy(h, w, y), case,
                        _vd_inputs(inputs))
    runner.grad_fix = _kernel_transposed
    return runner


# -------------------------------------------------------------------------------------- torch
def torch_runner(loss_fn: Callable, case: Case, inputs: Inputs, gpu: bool = False,
                 overwrites: bool = False) -> Runner:
    """Runner for a PyTorch loss ``loss_fn(*float_tensors, labels) -> scalar``.

    ``overwrites``: the loss writes into its first input (Liger's CE stores the gradient in
    the logits), so a fresh copy is made, untimed, before each call. On CUDA every call
    records the peak memory it allocated beyond what was allocated before it
    (``runner.peak_bytes``, the largest over the calls so far).
    """
    import torch

    dev = "cuda" if gpu else "cpu"
    tdt = torch.bfloat16 if case.dtype == "bfloat16" else torch.float32
    names = [k for k in inputs if k != "labels"]
    tensors = [torch.from_numpy(inputs[k]).to(device=dev, dtype=tdt) for k in names]
    labels = torch.from_numpy(inputs["labels"]).to(device=dev, dtype=torch.long)
    bwd = case.mode == FWD_BWD
    for t in tensors:
        t.requires_grad_(bwd)

    def run() -> tuple[Any, Any]:
        if not bwd:
            with torch.no_grad():
                return loss_fn(*tensors, labels), None
        for t in tensors:
            t.grad = None
        loss = loss_fn(*tensors, labels)
        loss.backward()
        return loss, [t.grad for t in tensors]

    def call() -> tuple[Any, Any]:
        if gpu:
            for t in tensors:
                t.grad = None
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        loss, grads = run()
        if gpu:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
            runner.peak_bytes = max(peak, runner.peak_bytes or 0)
        return loss.detach().float().cpu().numpy(), grads

    def prepare() -> None:
        fresh = first.detach().clone().requires_grad_(bwd)
        tensors[0] = fresh
        if gpu:
            torch.cuda.synchronize()

    first = tensors[0]
    runner = Runner(call, prepare if overwrites else None)
    return runner


def _torch_ce(case: Case, inputs: Inputs, gpu: bool) -> Runner | None:
    import torch.nn.functional as F  # noqa: N812

    if case.kind != CE:
        return None
    return torch_runner(lambda x, y: F.cross_entropy(x, y), case, inputs, gpu)


def build_torch_linear(case: Case, inputs: Inputs, gpu: bool) -> Runner | None:
    """torch's ``F.linear_cross_entropy`` on the fused cases (where this torch has it)."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    if case.kind != LINEAR or not hasattr(F, "linear_cross_entropy"):
        return None
    # The chunked path (options=LinearCrossEntropyOptions()) is ~10x slower than the reference
    # path on CPU (22 s vs 2.1 s at 512x256x32000, torch 2.13), so the CPU run uses the
    # reference path (which materializes the logits); the GPU run uses the chunked one.
    opts_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    opts = opts_cls() if (opts_cls and gpu) else None
    runner = torch_runner(lambda h, w, y: F.linear_cross_entropy(h, w, y, options=opts),
                          case, _vd_inputs(inputs), gpu)
    runner.grad_fix = _kernel_transposed
    return runner


def torch_contenders(gpu: bool = False) -> tuple[list[Contender], list[str]]:
    """PyTorch's ``F.cross_entropy`` and, where this torch has it, ``F.linear_cross_entropy``."""
    torch, why = deps.optional("torch")
    if torch is None:
        return [], [f"torch: skipped ({why}; {deps.BENCH_EXTRA})"]
    label = "torch (cuda)" if gpu else "torch (cpu)"
    out = [Contender(label, lambda c, i: _torch_ce(c, i, gpu), family="torch")]
    notes = []
    if hasattr(torch.nn.functional, "linear_cross_entropy"):
        out.append(Contender(label, lambda c, i: build_torch_linear(c, i, gpu), family="torch"))
    else:
        notes.append(f"torch {torch.__version__} F.linear_cross_entropy: skipped "
                     "(not in this torch)")
    return out, notes


def _liger_ce(case: Case, inputs: Inputs) -> Runner | None:
    from liger_kernel.transformers.functional import liger_cross_entropy

    if case.kind != CE:
        return None
    return torch_runner(lambda x, y: liger_cross_entropy(x, y), case, inputs, gpu=True,
                        overwrites=True)


def _liger_linear(case: Case, inputs: Inputs) -> Runner | None:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    if case.kind != LINEAR:
        return None
    runner = torch_runner(lambda h, w, y: liger_fused_linear_cross_entropy(h, w, y), case,
                          _vd_inputs(inputs), gpu=True)
    runner.grad_fix = _kernel_transposed
    return runner


def _cut_ce(case: Case, inputs: Inputs) -> Runner | None:
    from cut_cross_entropy import linear_cross_entropy

    if case.kind != LINEAR:
        return None
    runner = torch_runner(lambda h, w, y: linear_cross_entropy(h, w, y), case,
                          _vd_inputs(inputs), gpu=True)
    runner.grad_fix = _kernel_transposed
    return runner


def cuda_contenders() -> tuple[list[Contender], list[str]]:
    """Liger-Kernel (plain CE and fused linear CE) and Apple's cut-cross-entropy (CUDA only)."""
    out, notes = [], []
    for module, name, builds in (
            ("liger_kernel.transformers.functional", "liger-kernel",
             (("liger CE", _liger_ce), ("liger fused linear CE", _liger_linear))),
            ("cut_cross_entropy", "cut-cross-entropy", (("Apple CCE", _cut_ce),))):
        mod, why = deps.optional(module)
        if mod is None:
            notes.append(f"{name}: skipped ({why})")
            continue
        out += [Contender(label, build, family="torch") for label, build in builds]
    return out, notes


def load_extra(spec: str) -> list[Contender]:
    """Contenders from ``NAME=TARGET:function``, a CE loss ``f(logits, labels)``, where
    ``TARGET`` is a file (``path/to/file.py``) or a module (``jaxent.bench.formulations``).

    Gives two contenders, ``NAME`` and ``NAME (donated logits)``: a way to measure a candidate
    formulation beside the others without touching the package.
    """
    import importlib
    import importlib.util

    name, _, target = spec.partition("=")
    where, _, attr = target.rpartition(":")
    if not (name and where and attr.isidentifier()):
        raise SystemExit(f"--extra {spec!r}: expected NAME=TARGET:function, TARGET a .py file "
                         "or a module")
    try:
        if where.endswith(".py"):
            mod_spec = importlib.util.spec_from_file_location(f"_bench_extra_{attr}", where)
            if mod_spec is None or mod_spec.loader is None:
                raise ImportError(f"cannot load {where!r}")
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except (ImportError, OSError, SyntaxError) as e:
        raise SystemExit(f"--extra {spec!r}: cannot load {where!r}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise SystemExit(f"--extra {spec!r}: {where!r} has no function {attr!r}")
    return [Contender(name, for_kind(CE, fn)),
            Contender(f"{name} (donated logits)", for_kind(CE, fn, donate=True))]


def default_contenders(gpu: bool = False, cuda: bool | None = None, torch: bool = True
                       ) -> tuple[list[Contender], list[str]]:
    """Every contender available here, and one note for each that is not (and why).

    The baselines come first: optax for plain CE, the naive materialized path for the fused
    linear CE. ``gpu`` selects the GPU suite's contenders: it adds jaxent's explicit walks,
    tokamax, and (with ``cuda``, which defaults to ``gpu``) Liger and Apple CCE, with the
    torch contenders on CUDA. ``gpu`` without ``cuda`` checks that suite on a CPU. The TPU
    suite is ``gpu`` without ``cuda`` and without ``torch`` (PyTorch would run on the host).
    """
    cuda = gpu if cuda is None else cuda
    out = [
        Contender("optax", for_kind(CE, optax_loss), baseline_for=(CE,)),
        Contender("naive (log_softmax+take)", for_kind(CE, naive_ce)),
        Contender("naive (materialized logits)", for_kind(LINEAR, naive_linear),
                  baseline_for=(LINEAR,)),
        Contender("naive KL (materialized logits)", for_kind(DISTILL, naive_distill),
                  baseline_for=(DISTILL,)),
    ]
    groups = [jaxent_contenders(gpu)]
    if gpu:
        groups.append(tokamax_contenders())
    jax_cce, why = deps.optional("jax_cce")
    groups.append(([Contender("jax-cce", build_jax_cce)], []) if jax_cce
                  else ([], [f"jax-cce: skipped ({why})"]))
    groups.append(torch_contenders(cuda) if torch
                  else ([], ["torch: skipped (its CPU path is not a contender on a TPU)"]))
    if gpu and cuda:
        groups.append(cuda_contenders())
    elif gpu:
        groups.append(([], ["liger-kernel, cut-cross-entropy: skipped (CUDA only)"]))
    notes: list[str] = []
    for cons, group_notes in groups:
        out += cons
        notes += group_notes
    return out, notes
