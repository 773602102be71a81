#!/usr/bin/env bash
# The TPU check, twin of benchmarks/gpu/run.sh: on a TPU machine whose Python has jax[tpu]
# and optax (no network needed), time every fused head x impl at Llama-3-8B's head
# (16384x4096x128256, bf16, value_and_grad) against naive XLA (logits materialized) and
# tokamax (when importable, or installed from wheels/), with peak memory (the compiled
# program's) and the fraction of the roofline floor (jaxent/bench/targets.py), then plain CE
# at 8192x128256 and the fused distillation head if time is left. Writes JSON and Markdown
# under $OUT, in under 8 minutes. DEVELOPERS.md says how to run it.
#
#   bash benchmarks/tpu/run.sh            # on the TPU machine
#   bash benchmarks/tpu/run.sh --dry-run  # its CPU part, anywhere: the suite's --list, the
#                                         # suite on tiny shapes, the JSON and Markdown checks
set -uo pipefail
cd "$(dirname "$0")/../.."

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/tpu/run.sh [--dry-run]" >&2; exit 2 ;;
esac
WHEELS="${WHEELS:-wheels}"
SITE="${SITE:-/tmp/jaxent-tpu-site}"
OUT="${OUT:-$(mktemp -d)}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
step() { echo; echo "== $* ($(date -u +%H:%M:%S))"; }

# One benchmark run: NAME.json (results and one note per skipped contender) and NAME.log
# (stderr) under $OUT; the JSON is checked (benchmarks/tpu/check.py) and its table printed.
bench() {  # NAME TIMEOUT ARGS...
  local name=$1 limit=$2; shift 2
  step "python -m jaxent.bench $* (at most ${limit} s)"
  timeout "$limit" "$PY" -m jaxent.bench "$@" --no-progress --json \
    >"$OUT/$name.json" 2>"$OUT/$name.log"
  local rc=$?
  tail -n 20 "$OUT/$name.log"
  if (( rc != 0 )); then
    echo "benchmark $name FAILED (rc $rc; 124 is the timeout)"; status=1; return
  fi
  "$PY" benchmarks/tpu/check.py "$OUT/$name.json" $(( DRY ? 0 : 1 )) || status=1
  "$PY" -m jaxent.bench --from-json "$OUT/$name.json" 2>/dev/null | tee "$OUT/$name.md"
}

if (( DRY )); then
  step "dry run: the TPU suite's cases and contenders"
  "$PY" -m jaxent.bench --suite tpu --list || status=1
  step "dry run: the TPU suite on tiny shapes, on $("$PY" -c 'import jax; print(jax.default_backend())')"
  bench tpu-tiny 300 --suite tpu --tiny --rounds 1
  (( status == 0 )) && echo "dry run: ok" || echo "dry run: FAILED"
  exit "$status"
fi

# --- the TPU machine: 8 minutes in all (give the device call a timeout of 480 s)
budget_end=$((SECONDS + 460))
left() { echo $((budget_end - SECONDS)); }
step "device"
"$PY" - <<'PY' 2>&1 | tee "$OUT/device.txt"
import jax, jaxlib
devs = jax.devices()
print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "backend", jax.default_backend())
print(devs, "kind:", devs[0].device_kind)
print("memory_stats:", devs[0].memory_stats() if hasattr(devs[0], "memory_stats") else None)
PY
if [[ "$("$PY" -c 'import jax; print(jax.default_backend())' 2>/dev/null)" != tpu ]]; then
  echo "JAX sees no TPU here (device.txt); bash benchmarks/tpu/run.sh --dry-run checks the CPU part"
  exit 1
fi

# tokamax (and its pure-Python needs) from wheels/ when it is not importable already:
# benchmarks/gpu/fetch_wheels.sh fetches them (pass PY_VERSION for another Python).
if ! "$PY" -c 'import tokamax' 2>/dev/null && compgen -G "$WHEELS/*.whl" >/dev/null; then
  step "install the wheels offline into $SITE"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl >>"$OUT/device.txt" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:$SITE"; echo "installed $(ls "$WHEELS"/*.whl | wc -l) wheels"
  else
    echo "pip install failed (device.txt has its output); going on without them"
  fi
fi

# Llama-3-8B's head first, every fused contender (the reason for this script), then the rest.
bench tpu-llama "$(( $(left) < 330 ? $(left) : 330 ))" --tpu --only "^linear CE" --rounds 3
if (( $(left) > 60 )); then
  bench tpu-rest "$(( $(left) - 10 ))" --tpu --only "^(CE|linear KL) " --rounds 3
else
  echo "no time left for plain CE and the distillation head ($(left) s)"
fi
step "all runs, one table"
"$PY" -m jaxent.bench --from-json "$OUT"/tpu-*.json 2>/dev/null | tee "$OUT/tpu.md"
step "done, status $status; results in $OUT"
exit "$status"
