#!/usr/bin/env bash
# One-shot check of the CUDA side on a bare GPU machine (torch, nvcc, ninja; no internet; maybe
# no pytest-benchmark/hypothesis). Everything goes to ${OUT:-benchmarks/results/latest}:
#   env.log        nvidia-smi, versions, which optional packages exist
#   build.log      the CUDA build of the extension (TORCH_CUDA_ARCH_LIST = the detected capability)
#   tests.log      python -m pytest tests -k cuda (tests/test_cuda_build.py runs the CUDA op
#                  against the float64 reference on the fused, cluster and fallback paths)
#   bench.log, bench_cuda.json   benchmarks/bench_cuda.py (fused vs eager vs torch.compile)
#   memcheck.log, racecheck.log  compute-sanitizer on tiny cases, if compute-sanitizer exists
#   distill.log, distill/        a short DM + DM+SGS run through sgs_cuda.cli, if it exists and
#                                Fashion-MNIST is found (set SGS_FASHION_MNIST to its folder)
#   summary.txt    one line per step, the benchmark table, the test and sanitizer verdicts
# A failing step never stops the later ones. The whole script keeps to GPU_CHECK_BUDGET seconds
# (default 290): each step gets at most what is left, and a step that would start with less
# than 20 s left is skipped.
#
#   bash benchmarks/gpu_check.sh            # or: OUT=/some/dir bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python}
BUDGET=${GPU_CHECK_BUDGET:-290}
T0=$(date +%s)
DEADLINE=$((T0 + BUDGET))
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export SGS_CACHE_DIR=${SGS_CACHE_DIR:-/tmp/sgs_gpu_check_cache}   # extension + data cache, not in OUT
export PYTHONUNBUFFERED=1
SUMMARY=()

# run_step NAME CAP_SECONDS LOGFILE command...   (the command's output goes to the log and stdout)
run_step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local now left t rc start
  now=$(date +%s)
  left=$((DEADLINE - now))
  if [ "$left" -lt 20 ]; then
    SUMMARY+=("$(printf '%-10s SKIPPED (time budget spent)' "$name")")
    echo "== $name: skipped, time budget spent" | tee "$log"
    return 0
  fi
  t=$cap
  [ "$left" -lt "$t" ] && t=$left
  echo "== $name (limit ${t}s): $*" | tee "$log"
  start=$(date +%s)
  timeout --kill-after=10 "$t" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  local verdict="ok"
  [ "$rc" -ne 0 ] && verdict="FAILED rc=$rc"
  [ "$rc" -eq 124 ] && verdict="TIMED OUT after ${t}s"
  SUMMARY+=("$(printf '%-10s %-28s %4ss  %s' "$name" "$verdict" "$(($(date +%s) - start))" "$(basename "$log")")")
  return 0
}

skip_step() {
  SUMMARY+=("$(printf '%-10s SKIPPED (%s)' "$1" "$2")")
  echo "== $1: skipped: $2"
}

# ---------------------------------------------------------------- 1. environment
{
  echo "date: $(date -u +%FT%TZ)"
  echo "host: $(hostname)"
  (command -v git >/dev/null && git -C "$ROOT" rev-parse HEAD 2>/dev/null && git -C "$ROOT" status --short 2>/dev/null) || true
  nvidia-smi 2>&1 || echo "nvidia-smi not available"
  echo "--- nvcc"
  (command -v nvcc && nvcc --version) 2>&1 || (/usr/local/cuda/bin/nvcc --version 2>&1 || echo "nvcc not found")
  echo "--- python packages"
  "$PY" - <<'EOF' 2>&1
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "capability", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "memory GiB", round(p.total_memory / 2**30, 1))
for m in ("pytest", "pytest_benchmark", "hypothesis", "ninja", "pybind11", "numpy", "triton", "yaml",
          "torchvision", "matplotlib"):
    try:
        mod = importlib.import_module(m)
        print(f"{m:18s} {getattr(mod, '__version__', 'present')}")
    except Exception as exc:
        print(f"{m:18s} MISSING ({type(exc).__name__})")
EOF
} > "$OUT/env.log" 2>&1
cat "$OUT/env.log"
SUMMARY+=("$(printf '%-10s %-28s %4ss  %s' env ok "$(($(date +%s) - T0))" env.log)")

have() { "$PY" -c "import $1" >/dev/null 2>&1; }
CUDA_OK=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$CUDA_OK" != "1" ]; then
  echo "WARNING: torch sees no CUDA device; the GPU steps will fail or skip"
fi

# ---------------------------------------------------------------- 2. build
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && [ "$CUDA_OK" = "1" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST
fi
echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<unset>}" | tee -a "$OUT/env.log"
run_step build 200 "$OUT/build.log" "$PY" -c "
import time, torch
from sgs_cuda import _build
t0 = time.time()
d = _build.build_extension(with_cuda=True, verbose=True)
print('BUILD_DIR', d)
print(f'built/loaded in {time.time() - t0:.0f} s; cuda_enabled =', torch.ops.sgs.cuda_enabled())
"
BUILD_DIR=$(grep '^BUILD_DIR ' "$OUT/build.log" | tail -1 | cut -d' ' -f2-)
[ -n "$BUILD_DIR" ] && export SGS_CUDA_TEST_BUILD_DIR="$BUILD_DIR"   # the build test reuses it

# ---------------------------------------------------------------- 3. CUDA tests
if have pytest; then
  PYTEST_ARGS=(-q -rs -p no:cacheprovider -k cuda)
  have hypothesis || PYTEST_ARGS+=(--continue-on-collection-errors)
  run_step tests 120 "$OUT/tests.log" "$PY" -m pytest tests "${PYTEST_ARGS[@]}"
else
  # no pytest: at least the GPU checks of the build test (same code, run directly)
  run_step tests 120 "$OUT/tests.log" "$PY" -c "
import sys, types
sys.modules.setdefault('pytest', types.SimpleNamespace(mark=types.SimpleNamespace(skipif=lambda *a, **k: (lambda f: f), parametrize=lambda *a, **k: (lambda f: f)), fixture=lambda *a, **k: (lambda f: f), skip=None))
import tempfile, pathlib
sys.path.insert(0, 'tests')
import test_cuda_build as t
t.test_cuda_extension_builds_and_imports(pathlib.Path(tempfile.mkdtemp()))
print('test_cuda_extension_builds_and_imports passed')
"
fi

# ---------------------------------------------------------------- 4. benchmark
run_step bench 170 "$OUT/bench.log" env SGS_BACKEND=ext "$PY" benchmarks/bench_cuda.py --out "$OUT/bench_cuda.json"

# ---------------------------------------------------------------- 5. compute-sanitizer
SAN=$(command -v compute-sanitizer || true)
[ -z "$SAN" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && SAN=/usr/local/cuda/bin/compute-sanitizer
TINY=$(cat <<'EOF'
import os, sys, torch
from sgs_cuda import _build
assert _build.use_extension(torch.device("cuda")), _build.backend_info("cuda")
cases = [("fused", (3, 2, 3, 32, 32)), ("fused", (3, 1, 2, 28, 28)), ("fused", (3, 1, 1, 128, 128)),
         ("fallback", (3, 2, 2, 32, 31))]
if len(sys.argv) > 1 and sys.argv[1] == "fused-only":
    cases = [c for c in cases if c[0] == "fused"]
for path, shape in cases:
    os.environ["SGS_CUDA_PATH"] = path
    g = torch.randn(shape, device="cuda")
    a = torch.randint(0, shape[0], (shape[1],), device="cuda")
    torch.ops.sgs.surgery_parts(g, a, 1.0, 0.25, 1.0, 0.25, "hard")
    torch.ops.sgs.surgery(g.half(), a, 1.0, 0.25, 1.0, 0.25, "soft")
    torch.ops.sgs.surgery(g.double(), a, 1.0, 0.25, 1.0, 0.25, "hard")
    torch.cuda.synchronize()
    print("ran", path, shape)
print("tiny cases done")
EOF
)
if [ -n "$SAN" ]; then
  run_step memcheck 60 "$OUT/memcheck.log" env SGS_BACKEND=ext "$SAN" --tool memcheck --error-exitcode 3 "$PY" -c "$TINY"
  run_step racecheck 60 "$OUT/racecheck.log" env SGS_BACKEND=ext "$SAN" --tool racecheck --racecheck-report hazard --error-exitcode 3 \
    "$PY" -c "$TINY" fused-only
else
  skip_step memcheck "compute-sanitizer not found"
  skip_step racecheck "compute-sanitizer not found"
fi

# ---------------------------------------------------------------- 6. short distillation
if "$PY" -c "import sgs_cuda.cli" >/dev/null 2>&1; then
  if timeout 60 "$PY" -c "from sgs_cuda.data.fmnist_styles import find_fashion_mnist; print(find_fashion_mnist())" \
      > "$OUT/distill_data.log" 2>&1; then
    HELP=$("$PY" -m sgs_cuda.cli run --help 2>&1 || true)
    echo "$HELP" > "$OUT/distill_help.log"
    flag() { grep -q -- "$1" <<<"$HELP"; }
    if [ "$CUDA_OK" != "1" ]; then
      skip_step distill "no CUDA device"
    elif flag "--preset" && flag "--device" && flag "--run-dir"; then
      DARGS=(run --preset quick --device cuda --run-dir "$OUT/distill")
      flag "--iterations" && DARGS+=(--iterations 100)
      flag "--eval-epochs" && DARGS+=(--eval-epochs 100)
      flag "--num-eval" && DARGS+=(--num-eval 1)
      flag "--no-progress" && DARGS+=(--no-progress)
      rm -rf "$OUT/distill"
      run_step distill 120 "$OUT/distill.log" "$PY" -m sgs_cuda.cli "${DARGS[@]}"
    else
      skip_step distill "sgs_cuda.cli run lacks --preset/--device/--run-dir; see distill_help.log"
    fi
  else
    skip_step distill "Fashion-MNIST not found (set SGS_FASHION_MNIST); see distill_data.log"
  fi
else
  skip_step distill "sgs_cuda.cli not importable"
fi

# ---------------------------------------------------------------- summary
{
  echo "gpu_check summary ($(date -u +%FT%TZ), $(($(date +%s) - T0)) s of ${BUDGET} s)"
  grep -m1 '^gpu ' "$OUT/env.log" || true
  for line in "${SUMMARY[@]}"; do echo "  $line"; done
  echo
  echo "tests:     $(grep -E '(passed|failed|error|skipped)' "$OUT/tests.log" 2>/dev/null | tail -1)"
  for s in memcheck racecheck; do
    [ -f "$OUT/$s.log" ] && echo "$s: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|hazard' "$OUT/$s.log" | tail -1)"
  done
  if [ -f "$OUT/bench.log" ]; then
    echo
    grep -E '^(# |\||all targets met)' "$OUT/bench.log" || true
  fi
  [ -f "$OUT/distill.log" ] && { echo; echo "distill (last lines):"; tail -n 15 "$OUT/distill.log"; }
} > "$OUT/summary.txt" 2>&1
echo
cat "$OUT/summary.txt"
exit 0
