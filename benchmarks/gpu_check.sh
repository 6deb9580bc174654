#!/usr/bin/env bash
# Every CUDA check in one run of at most 8 minutes on one GPU: the tests in tests/train/test_gpu.py
# (the `gpu` ones run for real) and benchmark part 3 (benchmarks/gpu.py). Every figure and
# the test outcome land in $OUT/gpu_figures.md; the full logs beside it.
#
# On the GPU machine, from the repository root, with .whl/ carried along (the Python 3.12
# wheels its image lacks: optuna, fastai, hydra, sqlalchemy, wandb...; fill it beforehand
# with `bash ../shared/device/wheelhouse.sh`):
#   bash benchmarks/gpu_check.sh
# Here, on a CPU, to know the script works (tiny sizes on the CPU; the gpu tests skip):
#   bash benchmarks/gpu_check.sh --dry-run
#
# Each step has its own time limit (wheels 60 s, tests 170 s, benchmark 250 s, which stops
# measuring after 225 s: 480 s in all); a step that fails or runs out is reported and the
# next one still runs. Exit status 0 only when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
[[ "${1:-}" == "--dry-run" ]] && dry=1
OUT=${OUT:-$PWD/test-artifacts/gpu_check} # the device tool sets OUT: what is there comes back
mkdir -p "$OUT"
figures=$OUT/gpu_figures.md
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled WANDB_SILENT=true
failed=()

step() { # step NAME SECONDS LOG COMMAND...: run it under `timeout`, log it, note a failure
  local name=$1 limit=$2 log=$3 start=$SECONDS rc
  shift 3
  echo "=== $name (at most ${limit} s)" | tee -a "$log"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
  if [[ $rc -ne 0 ]]; then
    [[ $rc -eq 124 || $rc -eq 137 ]] && failed+=("$name: time limit") || failed+=("$name: exit $rc")
  fi
}

rev=$(git rev-parse --short HEAD 2>/dev/null) || rev="? (no git here)"
git diff --quiet 2>/dev/null || [[ $rev == \?* ]] || rev+=" + uncommitted changes"
{
  echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')$([[ $dry == 1 ]] && echo ' (--dry-run: CPU, tiny sizes)')"
  echo
  echo "commit $rev; $(nvidia-smi -L 2>/dev/null | head -1 || echo 'no nvidia-smi')"
} >"$figures"

# 1. What the GPU image lacks, from the carried wheels (its torch and torchvision stay).
if ! python3 -c "import optuna, fastai, hydra, sqlalchemy" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    step "wheels" 60 "$OUT/benchmark.log" python3 -m pip install -q --no-index --no-deps \
      --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  else
    failed+=("wheels: no .whl/ (run ../shared/device/wheelhouse.sh and carry .whl)")
  fi
fi
if [[ $dry == 0 ]] && ! python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  echo "no CUDA device here: on a CPU run bash benchmarks/gpu_check.sh --dry-run" | tee -a "$figures"
  exit 2 # the gpu tests would only skip, and every figure would be the CPU's
fi

# 2. The tests: on a GPU the `gpu` ones run (and may not skip: see the summary line below).
tests_limit=170 bench_limit=250 bench_args=(--budget-s 225)
[[ $dry == 1 ]] && tests_limit=400 bench_limit=900 bench_args=(--tiny --budget-s 800)
step "tests/train/test_gpu.py" $tests_limit "$OUT/gpu_tests.log" python3 -m pytest -q -rs \
  -p no:cacheprovider tests/train/test_gpu.py --junitxml "$OUT/gpu_tests.xml"
{
  echo
  echo "## tests/train/test_gpu.py"
  echo
  grep -E "^(SKIPPED|FAILED|ERROR)|(passed|failed|error|skipped)( in |,)" "$OUT/gpu_tests.log" | sed 's/^/    /'
} >>"$figures"
if [[ $dry == 0 ]] && grep -q "^SKIPPED.*test_gpu" "$OUT/gpu_tests.log"; then
  failed+=("tests: gpu tests skipped on a GPU machine")
fi

# 3. Benchmark part 3: appends its tables to the figures file as it measures them.
step "benchmark part 3" $bench_limit "$OUT/benchmark.log" python3 benchmarks/gpu.py \
  --out "$figures" "${bench_args[@]}"

{
  echo
  echo "## Steps"
  echo
  if [[ ${#failed[@]} -eq 0 ]]; then echo "all passed, $SECONDS s"; else printf -- '- %s\n' "${failed[@]}"; fi
} >>"$figures"
echo "figures: $figures ($SECONDS s)"
[[ ${#failed[@]} -eq 0 ]]
