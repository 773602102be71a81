"""Side-by-side benchmark of cross-entropy losses: ``python -m jaxent.bench`` (``--help``).

Every contender runs in the same process on the same inputs, timed interleaved after a
warm-up whose loss is checked against the baseline's; each row reports min, median and max,
the ratio to the baseline (optax for plain CE, the naive materialized path for the fused
linear CE), bandwidth or FLOP/s against ceilings measured in the same run, and memory.

Modules: :mod:`~jaxent.bench.cases` (problems), :mod:`~jaxent.bench.contenders`
(implementations), :mod:`~jaxent.bench.measure` (timing, ceilings, trust),
:mod:`~jaxent.bench.report` (Markdown, JSON, plots), :mod:`~jaxent.bench.suites` (the named
suites), :mod:`~jaxent.bench.cli` (the command line), :mod:`~jaxent.bench.deps` (optional
packages), :mod:`~jaxent.bench.formulations` (candidate CE formulations).
"""

from jaxent.bench.cases import CE as CE
from jaxent.bench.cases import DISTILL as DISTILL
from jaxent.bench.cases import FWD as FWD
from jaxent.bench.cases import FWD_BWD as FWD_BWD
from jaxent.bench.cases import LINEAR as LINEAR
from jaxent.bench.cases import Case as Case
from jaxent.bench.cases import default_cases as default_cases
from jaxent.bench.cases import gpu_cases as gpu_cases
from jaxent.bench.cases import linear_flops as linear_flops
from jaxent.bench.cases import make_inputs as make_inputs
from jaxent.bench.cases import matmul_flops as matmul_flops
from jaxent.bench.cases import tpu_cases as tpu_cases
from jaxent.bench.cli import main as main
from jaxent.bench.contenders import Contender as Contender
from jaxent.bench.contenders import Runner as Runner
from jaxent.bench.contenders import default_contenders as default_contenders
from jaxent.bench.contenders import load_extra as load_extra
from jaxent.bench.deps import BENCH_EXTRA as BENCH_EXTRA
from jaxent.bench.deps import MissingExtra as MissingExtra
from jaxent.bench.measure import Result as Result
from jaxent.bench.measure import busy_warnings as busy_warnings
from jaxent.bench.measure import check_agreement as check_agreement
from jaxent.bench.measure import run_case as run_case
from jaxent.bench.measure import run_suite as run_suite
from jaxent.bench.report import load_json as load_json
from jaxent.bench.report import plot as plot
from jaxent.bench.report import results_markdown as results_markdown
from jaxent.bench.report import to_json as to_json
from jaxent.bench.report import to_markdown as to_markdown

__all__ = [
    "BENCH_EXTRA",
    "CE",
    "DISTILL",
    "FWD",
    "FWD_BWD",
    "LINEAR",
    "Case",
    "Contender",
    "MissingExtra",
    "Result",
    "Runner",
    "busy_warnings",
    "check_agreement",
    "default_cases",
    "default_contenders",
    "gpu_cases",
    "tpu_cases",
    "linear_flops",
    "load_extra",
    "load_json",
    "main",
    "make_inputs",
    "matmul_flops",
    "plot",
    "results_markdown",
    "run_case",
    "run_suite",
    "to_json",
    "to_markdown",
]
