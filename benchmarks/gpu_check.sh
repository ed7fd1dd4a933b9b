#!/usr/bin/env bash
# One-shot check of the CUDA side on a bare GPU machine: python3, torch, nvcc, ninja, pybind11,
# pytest (pytest-benchmark and hypothesis optional), no network. Writes at most 4 files to
# ${OUT:-benchmarks/results/latest}:
#   summary.txt      one line per step, the test verdicts, the benchmark table
#   bench_cuda.json  benchmarks/bench_cuda.py (every CUDA path vs eager and torch.compile)
#   logs.tar.gz      every step's full log (env, install, build, tests, bench, sanitizers, distill)
# Steps, in order: environment; nvidia-mathdx from a carried wheel (wheels/*.whl, pip
# --no-index); the build (all cores, CUDA + cuFFTDx); the self-check of every CUDA path against the
# float64 reference (sgs-dgdd self-check: its verdicts head the summary); the CUDA tests;
# the benchmark right after them, so its large shapes are never cut; compute-sanitizer
# memcheck/racecheck on tiny cases, then racecheck/synccheck of the dx kernel with the grid capped
# (SGS_DX_MAX_CLUSTERS=2) so that each CTA loops over several plane groups; a short distillation if
# Fashion-MNIST is on disk. A failing step never stops the later ones; each
# gets at most what is left of GPU_CHECK_BUDGET seconds (default 560), and a step that would
# start with less than 20 s left is skipped. Nothing is downloaded. Without a GPU (a dry run)
# the GPU steps are skipped and the summary is still written.
#
#   bash benchmarks/gpu_check.sh            # or: OUT=/some/dir bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOGS=$(mktemp -d)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-560}
T0=$(date +%s)
DEADLINE=$((T0 + BUDGET))
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export SGS_CACHE_DIR=${SGS_CACHE_DIR:-/tmp/sgs_gpu_check_cache}   # extension + data cache, not in OUT
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export SGS_BUILD_CUDA=1
SUMMARY=()

# run_step NAME CAP_SECONDS command...   (output to $LOGS/NAME.log and stdout)
run_step() {
  local name=$1 cap=$2
  shift 2
  local log="$LOGS/$name.log" left t rc start verdict
  left=$((DEADLINE - $(date +%s)))
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
  verdict="ok"
  [ "$rc" -ne 0 ] && verdict="FAILED rc=$rc"
  [ "$rc" -eq 124 ] && verdict="TIMED OUT after ${t}s"
  SUMMARY+=("$(printf '%-10s %-26s %4ss' "$name" "$verdict" "$(($(date +%s) - start))")")
  return 0
}

skip_step() {
  SUMMARY+=("$(printf '%-10s SKIPPED (%s)' "$1" "$2")")
  echo "== $1: skipped: $2" | tee "$LOGS/$1.log"
}

# ---------------------------------------------------------------- 1. environment
{
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)  cores: $(nproc)"
  (command -v git >/dev/null && git -C "$ROOT" rev-parse HEAD 2>/dev/null) || true
  nvidia-smi 2>&1 || echo "nvidia-smi not available"
  (command -v nvcc >/dev/null && nvcc --version) || /usr/local/cuda/bin/nvcc --version 2>&1 || echo "nvcc not found"
  "$PY" - <<'EOF' 2>&1
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "capability", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "memory GiB", round(p.total_memory / 2**30, 1))
for m in ("pytest", "pytest_benchmark", "hypothesis", "ninja", "pybind11", "numpy", "triton", "yaml"):
    try:
        print(f"{m:18s} {getattr(importlib.import_module(m), '__version__', 'present')}")
    except Exception as exc:
        print(f"{m:18s} MISSING ({type(exc).__name__})")
EOF
} > "$LOGS/env.log" 2>&1
cat "$LOGS/env.log"
SUMMARY+=("$(printf '%-10s %-26s %4ss' env ok "$(($(date +%s) - T0))")")
CUDA_OK=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

# ---------------------------------------------------------------- 2. nvidia-mathdx (cuFFTDx headers)
if "$PY" -c "import sys, pathlib; sys.exit(0 if any((pathlib.Path(p)/'nvidia/mathdx/include/cufftdx.hpp').is_file() for p in sys.path) else 1)"; then
  skip_step mathdx "already installed"
elif ls "$ROOT"/wheels/nvidia_mathdx-*.whl >/dev/null 2>&1; then
  run_step mathdx 120 "$PY" -m pip install --no-index --no-deps "$ROOT"/wheels/nvidia_mathdx-*.whl
else
  skip_step mathdx "no wheels/nvidia_mathdx-*.whl carried: the build has no cuFFTDx kernel"
fi

if [ "$CUDA_OK" != "1" ]; then
  for s in build selfcheck tests bench memcheck racecheck racegroups syncgroups distill; do
    skip_step "$s" "no CUDA device"
  done
else
  # -------------------------------------------------------------- 3. build (all cores)
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    export TORCH_CUDA_ARCH_LIST
  fi
  run_step build 300 "$PY" -c "
import json, time, torch
from sgs_cuda import _build
t0 = time.time()
_build.build_extension(verbose=True)
print(f'built/loaded in {time.time() - t0:.0f} s')
print(json.dumps(_build.backend_info('cuda'), indent=1))
"
  # -------------------------------------------------------------- 4. self-check, CUDA tests, the benchmark
  run_step selfcheck 120 "$PY" -m sgs_cuda.cli self-check
  run_step tests 240 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda_paths.py tests/test_op_stats.py \
    tests/test_cuda_build.py::test_cuda_extension_builds_and_imports tests/test_ops.py tests/test_selfcheck.py \
    -k "cuda or path or self_check or assign"
  run_step bench 300 env SGS_BACKEND=ext "$PY" benchmarks/bench_cuda.py --out "$OUT/bench_cuda.json"
  # -------------------------------------------------------------- 5. compute-sanitizer
  SAN=$(command -v compute-sanitizer || true)
  [ -z "$SAN" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && SAN=/usr/local/cuda/bin/compute-sanitizer
  TINY='
import sys, torch
from sgs_cuda import _build
assert _build.use_extension(torch.device("cuda")), _build.backend_info("cuda")
for path in sys.argv[1].split(","):
    for shape in [(3, 3, 3, 32, 32), (3, 5, 2, 28, 28), (2, 1, 1, 64, 64), (3, 2, 1, 128, 128), (2, 1, 1, 64, 128),
                  (2, 1, 1, 128, 64), (3, 2, 2, 32, 31)]:
        _build.set_cuda_path(path)
        g = torch.randn(shape, device="cuda")
        a = torch.randint(0, shape[0], (shape[1],), device="cuda")
        try:
            torch.ops.sgs.surgery(g, a, 1.0, 0.25, 1.0, 0.25, "hard")
            torch.ops.sgs.surgery_stats(g.half(), a, 1.0, 0.25, 1.0, 0.25, "soft")
        except RuntimeError as exc:
            if "SGS_CUDA_PATH" not in str(exc): raise
            continue
        torch.cuda.synchronize()
        print("ran", path, shape)
print("tiny cases done")
'
  # The dx kernel's persistent loop with the grid capped at 2 clusters: every CTA does 2 plane
  # groups (28x28: 4 planes a group, 32x32: 2, 128x128: 1 on a 2-CTA cluster), D = 1 and 3, so the
  # sanitizers see the staging, exchange and column buffers reused across groups.
  GROUPS='
import torch
from sgs_cuda import _build
assert _build.use_extension(torch.device("cuda")), _build.backend_info("cuda")
_build.set_cuda_path("dx")
for D in (1, 3):
    for shape in [(D, 8, 2, 28, 28), (D, 4, 2, 32, 32), (D, 4, 1, 128, 128)]:
        g = torch.randn(shape, device="cuda")
        a = torch.arange(shape[1], device="cuda") % D
        torch.ops.sgs.surgery_stats(g, a, 1.0, 0.25, 1.0, 0.25, "hard")
        torch.cuda.synchronize()
        print("ran dx with 2 clusters", shape)
print("plane-group cases done")
'
  if [ -n "$SAN" ]; then
    run_step memcheck 90 env SGS_BACKEND=ext SGS_SELF_CHECK=0 "$SAN" --tool memcheck --error-exitcode 3 \
      "$PY" -c "$TINY" dx,portable,cufft
    run_step racecheck 90 env SGS_BACKEND=ext SGS_SELF_CHECK=0 "$SAN" --tool racecheck --racecheck-report hazard \
      --error-exitcode 3 "$PY" -c "$TINY" dx,portable
    run_step racegroups 90 env SGS_BACKEND=ext SGS_SELF_CHECK=0 SGS_DX_MAX_CLUSTERS=2 "$SAN" --tool racecheck \
      --racecheck-report hazard --error-exitcode 3 "$PY" -c "$GROUPS"
    run_step syncgroups 90 env SGS_BACKEND=ext SGS_SELF_CHECK=0 SGS_DX_MAX_CLUSTERS=2 "$SAN" --tool synccheck \
      --error-exitcode 3 "$PY" -c "$GROUPS"
  else
    for s in memcheck racecheck racegroups syncgroups; do skip_step "$s" "compute-sanitizer not found"; done
  fi
  # -------------------------------------------------------------- 6. short distillation (local data only)
  if "$PY" -c "from sgs_cuda.data.fmnist_styles import find_fashion_mnist; find_fashion_mnist()" >/dev/null 2>&1; then
    rm -rf "$LOGS/distill"
    run_step distill 90 "$PY" -m sgs_cuda.cli run --preset quick --device cuda --run-dir "$LOGS/distill"
  else
    skip_step distill "Fashion-MNIST not on disk (set SGS_FASHION_MNIST)"
  fi
fi

# ---------------------------------------------------------------- summary and the log archive
{
  echo "gpu_check summary ($(date -u +%FT%TZ), $(($(date +%s) - T0)) s of ${BUDGET} s)"
  grep -m1 '^gpu ' "$LOGS/env.log" || echo "no GPU seen by torch"
  if [ -f "$LOGS/selfcheck.log" ]; then  # which CUDA paths agree with the float64 reference, first
    echo "self-check (sgs-dgdd self-check):"
    grep -E '^(dx|portable|cufft) ' "$LOGS/selfcheck.log" | sed 's/^/  /' || echo "  no verdicts (see logs)"
  fi
  for line in "${SUMMARY[@]}"; do echo "  $line"; done
  echo
  [ -f "$LOGS/tests.log" ] && echo "tests: $(grep -E '(passed|failed|error)' "$LOGS/tests.log" | tail -1)"
  for s in memcheck racecheck racegroups syncgroups; do
    [ -f "$LOGS/$s.log" ] && echo "$s: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|skipped' "$LOGS/$s.log" | tail -1)"
  done
  if [ -f "$LOGS/bench.log" ]; then
    echo
    grep -E '^(# |\||all targets met)' "$LOGS/bench.log" || true
  fi
} > "$OUT/summary.txt" 2>&1
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
rm -rf "$LOGS"
echo
cat "$OUT/summary.txt"
exit 0
