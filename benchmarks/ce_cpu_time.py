"""Interleaved wall and process-CPU times of plain-CE ``value_and_grad`` programs (issue 26).

    PYTHONPATH=$PWD python3 benchmarks/ce_cpu_time.py 4096 32000 --rounds 9 \\
        floor optax jaxent label_shift label_shift_lse

Each NAME is ``floor`` (``jnp.exp(x)`` into a new buffer: the fresh-write floor), ``optax``,
``jaxent``, ``jaxent_lse`` (``residual="lse"``) or a name of
``jaxent.bench.formulations.FORMS``; each is jitted as ``jax.value_and_grad`` (the floor as
is) and called in turn, round after round (``jaxent.bench.ab.time_case``). Printed per
program: min and median wall ms, min process-CPU ms (user + system: on a shared host it moves
much less than wall time, as long as this process is not starved), and the ratios of the
minima to optax's and to the floor's, with the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np


def programs(names: list[str]) -> dict:
    import jaxent
    from jaxent.bench import formulations

    known = {
        "optax": formulations.optax_loss,
        "jaxent": jaxent.cross_entropy,
        "jaxent_lse": lambda x, y: jaxent.cross_entropy(x, y, residual="lse"),
        **formulations.FORMS,
    }
    out = {}
    for name in names:
        if name == "floor":
            out[name] = jax.jit(lambda x, y: jnp.exp(x))
        elif name in known:
            out[name] = jax.jit(jax.value_and_grad(known[name]))
        else:
            raise SystemExit(f"unknown program {name!r}: floor or one of {sorted(known)}")
    return out


def inputs(n: int, c: int, dtype: str) -> tuple:
    """Normal logits ``[n, c]`` and uniform int32 labels (seed 0, as the ab suite's)."""
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.normal(size=(n, c)), dtype),
            jnp.asarray(rng.integers(0, c, n), jnp.int32))


def main() -> None:
    from jaxent.bench import ab

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("n", type=int)
    p.add_argument("c", type=int)
    p.add_argument("names", nargs="+")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--dtype", default="float32")
    a = p.parse_args()
    progs = programs(a.names)
    load0 = os.getloadavg()
    cpu: dict[str, list] = {}
    wall = ab.time_case(progs, inputs(a.n, a.c, a.dtype), a.rounds, cpu)
    print(f"{a.n}x{a.c} {a.dtype}, {a.rounds} rounds; load {load0} -> {os.getloadavg()}")
    print("| program | wall min ms | wall median ms | CPU min ms | wall min / optax | "
          "wall min / floor | CPU min / optax | CPU min / floor |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")

    def ratio(d: dict, name: str, ref: str) -> str:
        return f"{min(d[name]) / min(d[ref]):.2f}" if ref in d else "-"

    for name in progs:
        print(f"| {name} | {min(wall[name]) * 1e3:.0f} | {statistics.median(wall[name]) * 1e3:.0f}"
              f" | {min(cpu[name]) * 1e3:.0f} | {ratio(wall, name, 'optax')} | "
              f"{ratio(wall, name, 'floor')} | {ratio(cpu, name, 'optax')} | "
              f"{ratio(cpu, name, 'floor')} |")


if __name__ == "__main__":
    main()
