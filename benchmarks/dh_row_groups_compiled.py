"""Temporaries of the vocabulary walk's value-and-gradient at the Llama-3-8B head, compiled
deviceless (``benchmarks/FINDINGS.md``, "the vocabulary walk's backward in row groups").

    PYTHONPATH=$PWD .ci/compile-venv/bin/python benchmarks/dh_row_groups_compiled.py \
        [--targets h100 v5e] [--heads ...] [--no-naive]

Prints one Markdown row per target x head: temporaries of ``impl="vocab"`` (GB), of the
naive program, and their ratio (the compile check's bound is 3 %). Run it with the
environment of ``.ci/compile/run``.
"""

from __future__ import annotations

import argparse

from jaxent.bench import compiled

HEADS = ("linear_cross_entropy", "linear_log_probs", "linear_soft_cross_entropy",
         "linear_distillation_loss")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--targets", nargs="+", default=["h100", "v5e"])
    p.add_argument("--heads", nargs="+", default=list(HEADS))
    p.add_argument("--no-naive", action="store_true", help="the walk's temporaries only")
    a = p.parse_args()
    compiled.configure()
    print("| target | head | walk temp GB | naive temp GB | / naive |\n|---|---|---:|---:|---:|")
    for t in a.targets:
        for h in a.heads:
            key = compiled.Key(t, h, "vocab", "grad", "llama")
            if a.no_naive:
                head = compiled.HEADS[h]
                chip = compiled.targets.CHIPS[t]
                rec = compiled.compile_one(chip, compiled.targets.device(chip), head, "vocab",
                                           "grad", compiled.SHAPES["llama"])
            else:
                rec = compiled.get(key)
            if rec.error:
                print(f"| {t} | {h} | error: {rec.error[:80]} | | |", flush=True)
                continue
            naive = rec.naive_temp_bytes
            frac = "" if not naive else f"{100 * rec.temp_bytes / naive:.2f} %"
            nv = "" if not naive else f"{naive / 1e9:.4f}"
            print(f"| {t} | {h} | {rec.temp_bytes / 1e9:.4f} | {nv} | {frac} |", flush=True)


if __name__ == "__main__":
    main()
