"""linear_cross_entropy(impl="pallas") compiled deviceless on its CE kernels and on the
statistic kernels, side by side (benchmarks/FINDINGS.md, "the fused CE on the statistic
kernels").

``impl="pallas"`` of the fused cross-entropy runs the CE kernels (``jaxent.impl.pallas``'s
``dispatch_linear_ce_rows``); ``stat`` swaps the registry's entry for the statistic kernels
(``jaxent.impl.pallas.dispatch_stat`` with ``stats.CrossEntropy``, from
``jaxent.impl.linear_ce.statistic``). Each program is compiled in a process of its own (XLA
reports a ptxas run once per process) with :mod:`jaxent.bench.compiled`: temporaries,
launches, grids, registers and spills, the kernels' cost estimates.

Run with the compile venv (``.ci/compile/run`` builds it), from the repository root::

    PYTHONPATH=$PWD .ci/compile-venv/bin/python benchmarks/ce_kernels_compiled.py \\
        --targets h100 v5e --shapes small llama

One line of JSON per program on stdout, the table last.
"""

from __future__ import annotations

import os

# ptxas's -v report reaches XLA's log only with these set before jax loads.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_libnvptxcompiler"
                           "=false --xla_gpu_enable_libnvjitlink=false "
                           "--xla_gpu_ptx_compiler_extra_flags=-v").strip()
os.environ.update(TF_CPP_MIN_LOG_LEVEL="0", TF_CPP_VMODULE="subprocess_compilation=3",
                  JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402


def stat_rows(plan, h, kernel, bias, lab, weight):
    """The fused CE's per-token losses and ``(lse, argmax)`` on the statistic kernels."""
    from jaxent.impl import linear_ce, pallas

    stat, streams, cols = linear_ce.statistic(plan, h, kernel, bias, weight)
    losses, lse, arg = pallas.dispatch_stat(stat, plan, streams, lab, cols)
    return losses, (lse, arg)


def one(kernels: str, target: str, shape: str) -> dict:
    """Compile value_and_grad of linear_cross_entropy (bf16, kernel_layout "vd")."""
    from jaxent import impl
    from jaxent.bench import compiled

    compiled.configure()
    if kernels == "stat":
        entry = impl.REGISTRY["linear", "pallas"]
        impl.REGISTRY["linear", "pallas"] = dataclasses.replace(entry, run=stat_rows)
    rec = compiled.get(compiled.Key(target, "linear_cross_entropy", "pallas", "grad", shape))
    return {"kernels": kernels, "target": target, "shape": shape, "error": rec.error,
            "temp_bytes": rec.temp_bytes, "launches": rec.launches,
            "programs": [[k.name, k.grid, k.registers, k.spill_bytes, k.cost_flops]
                         for k in rec.kernels]}


def table(rows: list[dict]) -> str:
    out = ["| target | shape | kernels | temp bytes | launches | kernel: grid, registers, "
           "spill B, cost flops |", "|---|---|---|---:|---:|---|"]
    for r in rows:
        ks = "; ".join(
            f"{n.removeprefix('jaxent_')} {'x'.join(map(str, g or ()))}"
            + ("" if reg is None else f" r{reg} s{sp}") + f" {fl:.3g}"
            for n, g, reg, sp, fl in r["programs"])
        out.append(f"| {r['target']} | {r['shape']} | {r['kernels']} | "
                   f"{r['temp_bytes']} | {r['launches']} | {r['error'] or ks} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", nargs="+", default=["h100", "v5e"])
    p.add_argument("--shapes", nargs="+", default=["small", "llama"])
    p.add_argument("--one", nargs=3, metavar=("KERNELS", "TARGET", "SHAPE"),
                   help="compile one program in this process")
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(*a.one)))
        return
    rows = []
    for shape in a.shapes:
        for target in a.targets:
            for kernels in ("ce", "stat"):
                got = subprocess.run([sys.executable, __file__, "--one", kernels, target, shape],
                                     capture_output=True, text=True, check=True)
                rows.append(json.loads(got.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
