#!/usr/bin/env bash
# The GPU check, sized to a short GPU window: at most 8 minutes on one H100 by default.
#
#   bash benchmarks/gpu_check.sh            # THERE: a GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run  # HERE or in CI, on the CPU: every command of every part
#                                           # resolves, every import works, the carry fits in 64 MiB
#
# Parts, in this order, each under its own time limit (seconds, GPU_CHECK_T_<PART> to change): a
# part that reaches its limit is stopped (SIGTERM to its process group, SIGKILL 2 s later), "timed
# out" is logged, and the next part starts. GPU_CHECK_PARTS picks parts (default: all five).
#   setup    20  the carried wheels (.whl/, from benchmarks/gpu_wheels.sh) into /tmp/site; versions
#   tests    80  the kernel tests on CUDA, compiled for real: tests/ops, then the tests of
#                tests/models and tests/memory marked `kernels` (pytest-xdist, GPU_CHECK_WORKERS=8
#                workers, where installed: the GPU image has it)
#   zero2    40  one DeepSpeed ZeRO-2 run of configs/tiny.yaml, 50 steps; the loss must fall
#   step    195  benchmarks/step.py, ViT-B rows 3, 1, 2 (diffusion first: the one that matters most
#                if time runs out), ivfast's way and the release's, at batch 16, 16 frames, mask
#                0.8: 1 warm-up + 2 timed + 2 split steps a row (GPU_CHECK_STEP_STEPS, _WARMUP)
#   memory   65  ivfast-memory report --measure for row 3 (configs/stage1_b_diffusion.yaml)
#   bench    40  the kernel microbenchmarks at the paper shapes (IVFAST_BENCH_SHAPES=paper), without
#                the torch.compile rows (GPU_CHECK_BENCH_K="not compile"), attention last
# The budgets sum to 440 s; GPU_CHECK_TOTAL (480 s) caps the whole: a part gets at most what is
# left of it, 10 s kept for the report.
#
# Results: benchmarks/results/ via benchmarks/harness.py (device, date, commit, versions, config):
# step-gpu-<date> (or step_partial-gpu-<date>, the rows done, when the part timed out), the
# kernel benchmarks' files, memory-gpu-<date>/ and memory_measure-gpu-<date>, and
# gpu_check-gpu-<date>.{json,md} (every part: status, seconds, limit, what it reported). Logs
# and JUnit files: runs/gpu_check/. With $OUT set (the device tool), copies go there:
# gpu_check.log, gpu_check-gpu-<date>.{json,md} and results.tgz (the new results, logs, metrics).
# Ends with a summary table of the parts (ok / failed / timed out / skipped, seconds).
#
# With the device tool: `bash benchmarks/gpu_wheels.sh` here first (once; fills .whl/), then
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
case "${1:-}" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    "") ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
PARTS=${GPU_CHECK_PARTS:-tests zero2 step memory bench}
T_SETUP=${GPU_CHECK_T_SETUP:-20}
T_TESTS=${GPU_CHECK_T_TESTS:-80}
T_ZERO2=${GPU_CHECK_T_ZERO2:-40}
T_STEP=${GPU_CHECK_T_STEP:-195}
T_MEMORY=${GPU_CHECK_T_MEMORY:-65}
T_BENCH=${GPU_CHECK_T_BENCH:-40}
TOTAL=${GPU_CHECK_TOTAL:-480}
RESERVE=10
WORKERS=${GPU_CHECK_WORKERS:-8}
SITE=${GPU_CHECK_SITE:-/tmp/site}
STEP_CONFIGS=${GPU_CHECK_STEP_CONFIGS:-configs/stage1_b_diffusion.yaml configs/stage1_b_align.yaml configs/stage1_b_linear.yaml}
STEP_STEPS=${GPU_CHECK_STEP_STEPS:-2}
STEP_WARMUP=${GPU_CHECK_STEP_WARMUP:-1}
BENCH_K=${GPU_CHECK_BENCH_K-not compile}
BENCH_FILES="benchmarks/bench_diffusion_noise.py benchmarks/bench_adaln.py benchmarks/bench_token_gather.py
 benchmarks/bench_rmsnorm.py benchmarks/bench_sincos.py benchmarks/bench_attention.py"
MEMORY_CONFIG=configs/stage1_b_diffusion.yaml
RES=benchmarks/results
DATE=$(date -u +%F)
if [ "$DRY" = 1 ]; then
    LOGDIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_dry.XXXXXX")
    trap 'rm -rf "$LOGDIR"' EXIT
else
    LOGDIR=runs/gpu_check
    rm -rf "$LOGDIR"
    mkdir -p "$LOGDIR" "$RES"
fi
LOG=$LOGDIR/gpu_check.log
CMDS=$LOGDIR/commands.tsv
STATUS=$LOGDIR/parts.tsv
: > "$CMDS"
: > "$STATUS"
if [ "$DRY" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
    export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH} PATH=$SITE/bin:$PATH
else
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
# The commit, for the results: git here, else the one gpu_wheels.sh recorded beside the wheels.
if [ -z "${IVFAST_COMMIT:-}" ] && ! git rev-parse HEAD >/dev/null 2>&1 && [ -f .whl/commit.txt ]; then
    IVFAST_COMMIT="$(cat .whl/commit.txt) (recorded by gpu_wheels.sh)"
fi
XDIST_ARGS=""
if "$PY" -c "import xdist" >/dev/null 2>&1; then XDIST_ARGS="-n $WORKERS"; fi
export PYTHONUNBUFFERED=1 IVFAST_COMMIT="${IVFAST_COMMIT:-}" PY DRY SITE LOGDIR CMDS RES DATE XDIST_ARGS \
    STEP_CONFIGS STEP_STEPS STEP_WARMUP BENCH_K BENCH_FILES MEMORY_CONFIG

# ----------------------------------------------------------------------------- small programs
ENV_PY='
import importlib, json, os, sys
import torch
from benchmarks.harness import environment
info = environment()  # date, commit, device, torch, python, triton, cuda: what every result records
for name in ("deepspeed", "av", "pydantic", "flash_attn", "nvidia.dali", "xdist", "pytest_benchmark"):
    try:
        info[name] = getattr(importlib.import_module(name), "__version__", "installed")
    except Exception as e:
        info[name] = f"not importable ({type(e).__name__})"
print("environment:", json.dumps(info))
sys.exit(0 if torch.cuda.is_available() or os.environ.get("GPU_CHECK_ALLOW_CPU") == "1"
         else "no CUDA device visible: on a CPU, run --dry-run (or GPU_CHECK_ALLOW_CPU=1 to try the plumbing)")
'
LOSS_PY='
import json, sys
path, want = sys.argv[1], int(sys.argv[2])
losses = [r["loss"] for r in map(json.loads, open(path)) if "loss" in r]
first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
print(f"loss: {len(losses)} steps, mean of the first 5 {first:.4f}, of the last 5 {last:.4f}")
sys.exit(0 if len(losses) == want and last < first else f"loss check failed: want {want} steps and a falling loss")
'

# ----------------------------------------------------------------------------- the parts
x() {  # x CMD...: one command of a part; with --dry-run, recorded for the resolver instead
    if [ "$DRY" = 1 ]; then
        { printf '%s\t' "$PART"; printf '%s\037' "$@"; printf '\036'; } >> "$CMDS"
        return 0
    fi
    local a shown=()
    for a in "$@"; do
        if [ ${#a} -gt 200 ] || [[ $a == *$'\n'* ]]; then shown+=("<code>"); else shown+=("$a"); fi
    done
    echo "+ ${shown[*]}"
    "$@" < /dev/null
}
part_setup() {
    local rc=0
    if [ "$DRY" = 1 ] || ls .whl/*.whl >/dev/null 2>&1; then
        x "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            .whl/*.whl || rc=1
    else
        echo "no .whl/ here: nothing to install (the machine must hold every package)"
    fi
    x "$PY" -c "$ENV_PY" || rc=1
    return $rc
}
part_tests() {
    local rc=0
    # shellcheck disable=SC2086
    x "$PY" -m pytest -q -p no:cacheprovider $XDIST_ARGS --junitxml="$LOGDIR/tests-ops.xml" tests/ops || rc=1
    # shellcheck disable=SC2086
    x "$PY" -m pytest -q -p no:cacheprovider $XDIST_ARGS -m kernels --junitxml="$LOGDIR/tests-models.xml" \
        tests/models tests/memory || rc=1
    return $rc
}
part_zero2() {
    rm -rf "$LOGDIR/zero2"
    x "$PY" ivfast/train.py --config configs/tiny.yaml output_dir="$LOGDIR/zero2" deepspeed.zero_stage=2 \
        train.max_steps=50 train.save_every=50 train.progress=false train.resume=never || return 1
    x "$PY" -c "$LOSS_PY" "$LOGDIR/zero2/metrics.jsonl" 50
}
part_step() {
    # shellcheck disable=SC2086
    x "$PY" benchmarks/step.py --configs $STEP_CONFIGS --ways ivfast release --steps "$STEP_STEPS" \
        --warmup "$STEP_WARMUP"
}
part_memory() {
    x "$PY" -m ivfast.memory.cli report --measure --config "$MEMORY_CONFIG" --out "$RES/memory-gpu-$DATE"
}
part_bench() {
    # shellcheck disable=SC2086
    x env IVFAST_BENCH_SHAPES=paper "$PY" -m pytest -q -p no:cacheprovider -o "python_files=bench_*.py" \
        --benchmark-enable --benchmark-max-time=0.1 --benchmark-min-rounds=3 --benchmark-warmup=off \
        ${BENCH_K:+-k "$BENCH_K"} $BENCH_FILES
}
export -f x part_setup part_tests part_zero2 part_step part_memory part_bench
export ENV_PY LOSS_PY

budget_of() {
    case $1 in
        setup) echo "$T_SETUP" ;; tests) echo "$T_TESTS" ;; zero2) echo "$T_ZERO2" ;;
        step) echo "$T_STEP" ;; memory) echo "$T_MEMORY" ;; bench) echo "$T_BENCH" ;; *) echo 0 ;;
    esac
}
for part in $PARTS; do
    if ! declare -F "part_$part" >/dev/null; then
        echo "gpu_check: unknown part '$part' (parts: tests zero2 step memory bench)" >&2
        exit 2
    fi
done
budget_sum=$T_SETUP
for part in $PARTS; do budget_sum=$((budget_sum + $(budget_of "$part"))); done

# ----------------------------------------------------------------------------- --dry-run
if [ "$DRY" = 1 ]; then
    echo "gpu_check --dry-run: python $PY, parts: setup $PARTS"
    missing=0
    for exe in bash timeout tar date find "$PY"; do
        if command -v "$exe" >/dev/null 2>&1; then echo "  executable $exe: $(command -v "$exe")"
        else echo "  executable $exe: MISSING"; missing=1; fi
    done
    for exe in git nvidia-smi; do
        command -v "$exe" >/dev/null 2>&1 && echo "  executable $exe: $(command -v "$exe")" \
            || echo "  executable $exe: not here (optional)"
    done
    [ -n "$XDIST_ARGS" ] && echo "  pytest-xdist: here, the tests part runs $XDIST_ARGS" \
        || echo "  pytest-xdist: not here (the GPU image has it: there the tests part adds -n $WORKERS)"
    for part in setup $PARTS; do PART=$part "part_$part"; done
    bash benchmarks/gpu_wheels.sh --list > "$LOGDIR/wheels.txt" || missing=1
    budgets="setup=$T_SETUP"
    for part in $PARTS; do budgets="$budgets $part=$(budget_of "$part")"; done
    "$PY" benchmarks/gpu_check.py resolve "$CMDS" "$LOGDIR/wheels.txt" "$budgets" "$budget_sum" "$TOTAL"
    rc=$?
    [ $missing -eq 0 ] || rc=1
    echo "gpu_check --dry-run: $([ $rc -eq 0 ] && echo 'all resolve' || echo FAILED)"
    exit $rc
fi

# ----------------------------------------------------------------------------- the run
START=$(date +%s)
touch "$LOGDIR/start.stamp"
echo "gpu_check: parts setup $PARTS; budgets sum to ${budget_sum}s, capped at ${TOTAL}s; $(date -u +%FT%TZ)" | tee "$LOG"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
    2>&1 | tee -a "$LOG"
run_part() {  # run_part NAME: the part under its time limit; one line to parts.tsv
    local name=$1 budget limit left t0 rc status secs
    budget=$(budget_of "$name")
    left=$((TOTAL - RESERVE - ($(date +%s) - START)))
    limit=$((budget < left ? budget : left))
    if [ "$limit" -lt 5 ]; then
        echo "== $name: skipped, no time left (${left}s of ${TOTAL}s)" | tee -a "$LOG"
        printf '%s\tskipped\t0\t0\t%s\n' "$name" "$budget" >> "$STATUS"
        return
    fi
    echo "== $name: limit ${limit}s" | tee -a "$LOG"
    t0=$(date +%s)
    PART=$name timeout -k 2 "$limit" bash -c "part_$name" 2>&1 | tee -a "$LOG" "$LOGDIR/$name.log"
    rc=${PIPESTATUS[0]}
    secs=$(($(date +%s) - t0))
    if [ "$rc" -eq 0 ]; then status=ok
    elif [ "$rc" -eq 124 ] || { [ "$rc" -eq 137 ] && [ "$secs" -ge "$limit" ]; }; then status="timed out"
    else status=failed; fi
    if [ "$status" = "timed out" ]; then
        echo "== $name: timed out at its limit of ${limit}s (stopped; the next part starts)" | tee -a "$LOG"
    else
        echo "== $name: $status (exit $rc) in ${secs}s" | tee -a "$LOG"
    fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$secs" "$limit" "$budget" >> "$STATUS"
}
run_part setup
if grep -q "no CUDA device visible" "$LOGDIR/setup.log" || ! grep -q '^environment: ' "$LOGDIR/setup.log"; then
    echo "gpu_check: no CUDA device, or no python with torch, here: stopping (--dry-run is the CPU check)" | tee -a "$LOG"
    PARTS=""
fi
for part in $PARTS; do run_part "$part"; done

# The report: gpu_check-<device>-<date>.{json,md} with every part, the memory figures and the step
# rows of a part that timed out, through benchmarks/harness.py (device, date, commit, versions).
timeout -k 5 60 "$PY" benchmarks/gpu_check.py report "$LOGDIR" "$START" "$TOTAL" 2>&1 | tee -a "$LOG"
echo "== summary" | tee -a "$LOG"
{
    printf '%-8s %-10s %8s %6s\n' part status seconds limit
    while IFS=$'\t' read -r name status secs limit budget; do
        printf '%-8s %-10s %8s %6s\n' "$name" "$status" "$secs" "$limit"
    done < "$STATUS"
    printf '%-8s %-10s %8s %6s\n' total "" "$(($(date +%s) - START))" "$TOTAL"
} | tee -a "$LOG"
bad=$(grep -vc $'\tok\t' "$STATUS")
verdict="all passed"
[ "$bad" -eq 0 ] || verdict="$bad of $(wc -l < "$STATUS") parts not ok"
if [ -n "${OUT:-}" ]; then  # copies for the device tool: flat, at most 8 files
    mapfile -t new < <(find "$RES" -type f -newer "$LOGDIR/start.stamp" 2>/dev/null)
    tar czf "$OUT/results.tgz" --exclude='*/checkpoints' "${new[@]}" "$LOGDIR" 2>/dev/null
    for f in "${new[@]}"; do case $f in */gpu_check-*) cp "$f" "$OUT/" ;; esac; done
fi
echo "gpu_check: $verdict" | tee -a "$LOG"
[ -n "${OUT:-}" ] && cp "$LOG" "$OUT/gpu_check.log"
[ "$bad" -eq 0 ]
