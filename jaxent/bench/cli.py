"""The command line: ``python -m jaxent.bench [--suite NAME] [ARGS...] [options]``.

Examples::

    python -m jaxent.bench --quick                      # the CPU suite, small shapes
    python -m jaxent.bench --only "^CE " --rounds 5 --json > ce.json
    python -m jaxent.bench --from-json ce.json --write --plot benchmarks/results.png
    python -m jaxent.bench --gpu --quick                # the GPU suite (needs a GPU)
    python -m jaxent.bench --suite gpu --tiny           # its code path, tiny, on any device
    python -m jaxent.bench --tpu --rounds 3             # the TPU suite (needs a TPU)
    python -m jaxent.bench --suite tpu --tiny           # its code path, tiny, on any device
    python -m jaxent.bench --suite linear-memory 8192 2048 128256
    python -m jaxent.bench --suite rl-memory 8192 2048 128256
    python -m jaxent.bench --suite linear-speed 4096 1024 32000 --rounds 6 \\
        --contenders naive,ours,ours:impl=vocab,cce,torch
    python -m jaxent.bench --suite matmul 2048 2048 128256 128 1024
    python -m jaxent.bench --suite ab 6831924 --rounds 5      # this checkout vs a commit
    python -m jaxent.bench --suite hlo 4096 32000             # plain CE's compiled passes
    python -m jaxent.bench --suite compaction 8192 512 32000 25 --rounds 5  # capacity=
    python -m jaxent.bench --suite explore-ce 4096 32000 float32 optax grad_fwd lse_only
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from typing import get_args

from jaxent.bench.cases import DType
from jaxent.bench.deps import MissingExtra

SUITE_NAMES = ("main", "gpu", "tpu", "linear-memory", "rl-memory", "linear-speed", "matmul",
               "explore-ce", "ab", "hlo", "compaction")
# The packages the ``--contenders`` of ``linear-speed`` need beyond jaxent and JAX.
CONTENDER_PACKAGES = {"cce": "jax_cce", "torch": "torch"}


def positive_int(text: str) -> int:
    """argparse type of ``--rounds``: an integer of at least 1.

    >>> positive_int("3")
    3
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def regex(text: str) -> str:
    """argparse type of ``--only``: a regular expression that compiles.

    >>> regex("^CE ")
    '^CE '
    """
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"not a regular expression: {text!r} ({e})") from None
    return text


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jaxent.bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Side-by-side benchmark of cross-entropy losses: time per step (min / "
                    "median / max, interleaved), ratio to a baseline, bandwidth, FLOP/s and "
                    "memory.", epilog=__doc__.split("Examples::", 1)[1])
    p.add_argument("args", nargs="*", metavar="ARG",
                   help="the suite's positional arguments (shapes, formulation names)")
    p.add_argument("--suite", choices=SUITE_NAMES, default=None,
                   help="which suite (default main; --gpu means gpu, --tpu tpu)")
    p.add_argument("--quick", action="store_true", help="small shapes, a run under 2 minutes")
    p.add_argument("--tiny", action="store_true",
                   help="gpu and tpu suites: tiny shapes, to check their code path on a CPU")
    p.add_argument("--rounds", type=positive_int, default=None,
                   help="timed rounds per case, at least 1 (default: 5, or 3 with --quick)")
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    p.add_argument("--plot", metavar="FILE.png", help="plot time ratio and memory per shape")
    p.add_argument("--write", nargs="?", const="benchmarks/RESULTS.md", metavar="PATH",
                   help="write RESULTS.md (default benchmarks/RESULTS.md)")
    p.add_argument("--gpu", action="store_true",
                   help="the GPU suite on the GPU (tokamax, Liger, Apple CCE when installed)")
    p.add_argument("--tpu", action="store_true",
                   help="the TPU suite on the TPU (every fused head x impl, naive XLA, tokamax)")
    p.add_argument("--list", action="store_true",
                   help="list the suite's cases and contenders (and those skipped), run nothing")
    p.add_argument("--only", type=regex, default="",
                   help="regular expression searched in case names")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=TARGET:FUNC",
                   help="add a CE loss f(logits, labels) from a file.py or module (repeatable)")
    p.add_argument("--contenders", default="naive,ours,cce,torch",
                   help="linear-speed: comma-separated naive, ours[:KEY=VALUE...], cce, torch")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="linear-speed: the inputs' dtype")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--from-json", nargs="+", metavar="FILE.json",
                   help="report (table, --plot, --write) saved --json runs instead of running")
    args = p.parse_args(argv)
    for flag in ("gpu", "tpu"):
        if getattr(args, flag) and args.suite not in (None, flag):
            p.error(f"--{flag} runs the {flag} suite, not --suite {args.suite}")
    if args.gpu and args.tpu:
        p.error("--gpu and --tpu: choose one")
    args.suite = "gpu" if args.gpu else "tpu" if args.tpu else (args.suite or "main")
    if args.args and args.suite in ("main", "gpu", "tpu"):
        p.error(f"the {args.suite} suite takes no positional arguments, got {args.args}")
    dtypes = get_args(DType)
    if args.suite == "explore-ce" and len(args.args) >= 3 and args.args[2] not in dtypes:
        p.error(f"--suite explore-ce: DTYPE (the third argument) must be one of "
                f"{', '.join(dtypes)}, got {args.args[2]!r}")
    return args


def _load_saved(paths: Sequence[str]) -> tuple[dict, list[str]]:
    """:func:`jaxent.bench.report.load_json`, with a file that is missing or is not a saved
    ``--json`` run reported in one line naming it."""
    from jaxent.bench import report

    for path in paths:
        try:
            report.load_json([path])
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
            raise SystemExit(f"--from-json {path}: not a readable saved run of `python -m "
                             f"jaxent.bench --json` ({why})") from None
    return report.load_json(paths)


def _require_contenders(args: argparse.Namespace) -> None:
    """A contender asked for by name whose package is missing stops the run (exit 2) instead
    of being skipped with a note."""
    from jaxent.bench import deps

    if args.suite != "linear-speed":
        return
    for spec in args.contenders.split(","):
        if spec in CONTENDER_PACKAGES:
            deps.require(CONTENDER_PACKAGES[spec], f"--contenders {spec}")


def _configure_platform(args: argparse.Namespace) -> None:
    """Before any JAX backend starts: the CPU suite stays on the CPU; the GPU suite shares the
    GPU with PyTorch, so JAX allocates on demand instead of taking 75% of it up front."""
    import jax

    if args.suite == "main" and not args.from_json:
        jax.config.update("jax_platforms", "cpu")
    if args.suite == "gpu":
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        if args.gpu and not args.list and jax.default_backend() != "gpu":
            raise SystemExit("--gpu: JAX sees no GPU (install a CUDA jaxlib, or use "
                             "--suite gpu --tiny to check the suite on this device)")
    if args.tpu and not args.list and not args.from_json and jax.default_backend() != "tpu":
        raise SystemExit("--tpu: JAX sees no TPU (install jax[tpu], or use --suite tpu "
                         "--tiny to check the suite on this device)")


def _set_torch_threads(args: argparse.Namespace) -> None:
    """On the CPU, torch gets every core, as XLA does."""
    from jaxent.bench import deps

    torch, _ = deps.optional("torch") if args.suite not in ("gpu", "tpu") else (None, "")
    if torch is not None:
        torch.set_num_threads(os.cpu_count() or 1)


def run(argv: Sequence[str] | None = None) -> dict:
    """Parse, run the suite (or re-report saved runs), print, plot and write; returns the
    suite's data (the timing suite's dict for ``main``/``gpu``/``linear-speed``/``explore-ce``).
    """
    from jaxent.bench import deps, report, suites

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    deps.require_jaxent()
    _configure_platform(args)
    if args.from_json:
        suite, notes = _load_saved(args.from_json)
        out = suites.Report(report.to_markdown(suite), {}, suite, notes)
    elif args.list:
        out = suites.list_suite(args, args.suite)
    else:
        _require_contenders(args)
        _set_torch_threads(args)
        out = suites.SUITES[args.suite](args)
    for n in out.notes:
        print(f"note: {n}", file=sys.stderr)
    print(out.text(args.json))
    if (args.plot or args.write) and out.suite is None:
        raise SystemExit(f"--plot/--write take a timing suite, not {args.suite}")
    if args.plot:
        assert out.suite is not None
        report.plot(out.suite, args.plot)
    if args.write:
        assert out.suite is not None
        report.write_results(args.write, report.results_markdown(out.suite, argv, out.notes))
    return out.suite if out.suite is not None else out.data


def main(argv: Sequence[str] | None = None) -> dict:
    """:func:`run`, with a missing optional package reported in one line (no traceback)."""
    try:
        return run(argv)
    except MissingExtra as e:
        if argv is not None:  # called from Python (tests): let the caller see the exception
            raise
        print(e, file=sys.stderr)
        raise SystemExit(2) from None
