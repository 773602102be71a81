#!/usr/bin/env bash
# Download the wheels of benchmarks/gpu/wheels.txt into wheels/ (git-ignored), for the GPU
# machine's Python 3.12 on x86-64 (the device README's `pip download` line). Run it where pip
# reaches PyPI, from anywhere in the checkout; run.sh then installs them offline.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p wheels
grep -v '^#' benchmarks/gpu/wheels.txt | grep . | xargs python3 -m pip download \
  --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d wheels
ls -l wheels
