#!/usr/bin/env bash
# The GPU check (issue 13): on a bare NVIDIA H200 machine with no network (JAX 0.11 on
# CUDA 13, torch 2.11, triton 3.6, optax, flax, chex installed), install the wheels the image
# lacks from wheels/ (benchmarks/gpu/wheels.txt; fetch them with fetch_wheels.sh), run the GPU
# tests and `python -m jaxent.bench --gpu --quick`, and write the results under $OUT, in under
# 8 minutes. DEVELOPERS.md says how to run it through the device tool.
#
#   bash benchmarks/gpu/run.sh            # on the GPU machine
#   bash benchmarks/gpu/run.sh --dry-run  # its CPU part, anywhere: the wheels check, the GPU
#                                         # suite's --list, a --tiny run, the GPU tests (skipped)
set -uo pipefail
cd "$(dirname "$0")/../.."

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu/run.sh [--dry-run]" >&2; exit 2 ;;
esac
WHEELS="${WHEELS:-wheels}"
SITE="${SITE:-/tmp/jaxent-gpu-site}"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
step() { echo; echo "== $* ($(date -u +%H:%M:%S))"; }

# --- 1. wheels: exactly one wheel per pinned package; a missing one only costs its contenders
step "wheels in $WHEELS/ (benchmarks/gpu/wheels.txt)"
missing=()
while read -r spec; do
  name="${spec%%==*}"; version="${spec#*==}"
  norm="$(echo "$name" | tr 'A-Z-' 'a-z_')"
  found=("$WHEELS"/"$norm"-*.whl)
  if [[ ! -e "${found[0]}" ]]; then
    missing+=("$spec")
  elif (( ${#found[@]} > 1 )); then
    echo "ERROR: ${#found[@]} wheels of $name in $WHEELS/ (${found[*]}): keep one" >&2
    status=1
  elif [[ "${found[0]}" != "$WHEELS/$norm-$version-"* ]]; then
    echo "note: $name: $WHEELS/ has ${found[0]#"$WHEELS"/}, wheels.txt pins $version"
  fi
done < <(grep -v '^#' benchmarks/gpu/wheels.txt | grep .)
if (( ${#missing[@]} )); then
  echo "missing (run bash benchmarks/gpu/fetch_wheels.sh where PyPI is reachable;" \
       "their contenders will be skipped): ${missing[*]}"
else
  echo "all $(grep -v '^#' benchmarks/gpu/wheels.txt | grep -c .) wheels present"
fi
(( status == 0 )) || exit "$status"

if (( DRY )); then
  step "dry run: the GPU suite's cases and contenders"
  python3 -m jaxent.bench --gpu --list || status=1
  step "dry run: the GPU suite on tiny shapes, on $(python3 -c 'import jax; print(jax.default_backend())')"
  python3 -m jaxent.bench --suite gpu --tiny --rounds 1 --no-progress --json \
    >"$OUT/gpu-tiny.json" 2>"$OUT/gpu-tiny.err" || { cat "$OUT/gpu-tiny.err"; status=1; }
  python3 -m jaxent.bench --from-json "$OUT/gpu-tiny.json" | tail -n 6 || status=1
  step "dry run: the GPU tests (skipped without a GPU)"
  python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -n 3
  (( PIPESTATUS[0] == 0 )) || status=1
  (( status == 0 )) && echo "dry run: ok" || echo "dry run: FAILED"
  exit "$status"
fi

# --- 2. the GPU machine: 8 minutes in all (the device call's timeout is 480 s)
budget_end=$((SECONDS + 460))
left() { echo $((budget_end - SECONDS)); }
step "device"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c 'import jax, torch; print("jax", jax.__version__, jax.devices(), "| torch",
torch.__version__, torch.version.cuda, torch.cuda.is_available())'; } 2>&1 | tee "$OUT/device.txt"

step "install the wheels offline into $SITE"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl >>"$OUT/device.txt" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:$SITE"; echo "installed $(ls "$WHEELS"/*.whl | wc -l) wheels"
  else
    echo "pip install failed (device.txt has its output); going on without them"
  fi
fi

step "GPU tests (tests/test_gpu.py)"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py 2>&1 \
  | tee "$OUT/pytest-gpu.log" | tail -n 25
(( PIPESTATUS[0] == 0 )) || { echo "GPU tests FAILED"; status=1; }

# One benchmark run: JSON under $OUT (notes included), stderr beside it, the table printed.
bench() {  # NAME TIMEOUT ARGS...
  local name=$1 limit=$2; shift 2
  step "python -m jaxent.bench $* (at most ${limit} s)"
  timeout "$limit" python3 -m jaxent.bench "$@" --no-progress --json \
    >"$OUT/$name.json" 2>"$OUT/$name.log"
  local rc=$?
  tail -n 20 "$OUT/$name.log"
  if (( rc == 0 )); then
    python3 -m jaxent.bench --from-json "$OUT/$name.json" 2>/dev/null
  else
    echo "benchmark $name FAILED (rc $rc; 124 is the timeout)"; status=1
  fi
}
bench gpu-quick "$(( $(left) < 240 ? $(left) : 240 ))" --gpu --quick
if (( $(left) > 90 )); then
  bench gpu-llama "$(( $(left) - 10 ))" --gpu --only "x4096x128256" --rounds 3
else
  echo "no time left for the Llama-3-8B head ($(left) s)"
fi
step "done, status $status; results in $OUT"
exit "$status"
