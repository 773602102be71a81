"""Where a test suite's time went between two runs: per-test times from two JUnit XML files.

Run the suite twice with ``--junitxml`` (e.g. an old commit's clone and this checkout, one
after the other on the same quiet host), then
``python benchmarks/suite_times.py OLD.xml NEW.xml [K]``. It prints the summed test times of
the tests both runs hold (matched by node id), of those only one holds, a table per test
module sorted by the change, and, with ``K``, the K common tests that grew the most.
Summed times are CPU-side per-test durations: under ``pytest -n 2`` the wall time is about
half of them plus collection and scheduling.
"""

from __future__ import annotations

import collections
import sys
import xml.etree.ElementTree as ET


def load(path: str) -> dict[str, float]:
    """``{node id: seconds}`` of the tests that ran (skipped ones left out)."""
    return {f"{t.get('classname')}::{t.get('name')}": float(t.get("time") or 0.0)
            for t in ET.parse(path).getroot().iter("testcase") if t.find("skipped") is None}


def report(old: dict[str, float], new: dict[str, float], top: int = 0) -> str:
    both = old.keys() & new.keys()

    def total(times: dict[str, float], keys) -> float:
        return sum(times[k] for k in keys)

    lines = [
        f"old: {len(old)} tests, {total(old, old):.0f} s summed; "
        f"new: {len(new)} tests, {total(new, new):.0f} s summed",
        f"in both: {len(both)} tests, old {total(old, both):.0f} s, new {total(new, both):.0f} s",
        f"only old: {len(old.keys() - both)} tests, {total(old, old.keys() - both):.0f} s; "
        f"only new: {len(new.keys() - both)} tests, {total(new, new.keys() - both):.0f} s",
        "", "| module | old tests | old s | new tests | new s | change s |",
        "|---|---:|---:|---:|---:|---:|"]
    rows: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0, 0.0])
    for col, times in ((0, old), (2, new)):
        for key, sec in times.items():
            row = rows[key.split("::")[0]]
            row[col] += 1
            row[col + 1] += sec
    for name, (n0, t0, n1, t1) in sorted(rows.items(), key=lambda r: r[1][1] - r[1][3]):
        lines.append(f"| {name} | {n0:.0f} | {t0:.0f} | {n1:.0f} | {t1:.0f} | {t1 - t0:+.0f} |")
    if top:
        lines += ["", "common tests that grew the most (old s, new s):"]
        lines += [f"{old[k]:7.2f} {new[k]:7.2f} {k}"
                  for k in sorted(both, key=lambda k: new[k] - old[k])[-top:]]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(load(sys.argv[1]), load(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3
                 else 0))
