"""Check a saved ``python -m jaxent.bench --suite tpu --json`` run (benchmarks/tpu/run.sh).

``python benchmarks/tpu/check.py RUN.json [ON_DEVICE]``: every case was timed against its
baseline (naive XLA for the fused heads, optax for plain CE); every fused linear case has
jaxent's default and each explicit ``impl`` either timed or skipped with a note; every JAX
row has a positive time and a peak memory; with ``ON_DEVICE=1`` (a real TPU) every row has
its roofline fraction too (a chip of jaxent/bench/targets.py: v5e, v6e, v5p). Exits 1 with
one line per problem.
"""

from __future__ import annotations

import json
import sys

IMPLS = ('jaxent impl="vocab"', 'jaxent impl="token"', 'jaxent impl="pallas"')
BASELINE = {"linear": "naive (materialized logits)", "ce": "optax",
            "distill": "naive KL (materialized logits)"}


def problems(data: dict, on_device: bool) -> list[str]:
    out = []
    rows = data["results"]
    if not rows:
        return ["no results"]
    notes = " ".join(data.get("notes", []))
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == case]
        names = {r["contender"] for r in mine}
        kind = mine[0]["kind"]
        if BASELINE[kind] not in names:
            out.append(f"{case}: no {BASELINE[kind]} baseline")
        if kind == "linear":
            out += [f"{case}: {impl} neither timed nor skipped with a note"
                    for impl in ("jaxent", *IMPLS) if impl not in names and impl not in notes]
        for r in mine:
            where = f"{case} / {r['contender']}"
            if not (r["median_s"] and r["median_s"] > 0):
                out.append(f"{where}: no time")
            if r["peak_bytes"] is None:
                out.append(f"{where}: no peak memory")
            if on_device and r["roofline_fraction"] is None:
                out.append(f"{where}: no roofline fraction")
    return out


def main(argv: list[str]) -> int:
    with open(argv[0]) as f:
        data = json.load(f)
    found = problems(data, on_device=len(argv) > 1 and argv[1] == "1")
    for p in found:
        print(f"check {argv[0]}: {p}")
    if not found:
        print(f"check {argv[0]}: ok ({len(data['results'])} rows)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
