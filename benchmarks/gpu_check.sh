#!/usr/bin/env bash
# Run THERE (a GPU machine, from the repository root): every GPU check of ivfast in one command.
#   1. the kernel and attention tests on CUDA (compiled Triton, not the interpreter),
#   2. DeepSpeed ZeRO-1 and ZeRO-2 runs of 50 steps on one GPU (loss must fall),
#   3. benchmarks/step.py: the Stage-1 step, release's way vs ivfast vs compiled, B and L,
#   4. the kernel microbenchmarks (make bench) and the memory report with --measure.
# Results land in benchmarks/results/ (and in $OUT when set, for the device tool).
# With the device tool: run `bash benchmarks/gpu_wheels.sh` here first, then
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"])
# Steps can be chosen: STEPS="tests zero step bench memory" (default: all).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
STEPS=${STEPS:-tests zero step bench memory}
LOG=${OUT:-benchmarks/results}/gpu_check.log
mkdir -p "$(dirname "$LOG")" benchmarks/results
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$LOG"
status=0
run() {  # run NAME CMD...: log, keep going, remember a failure
    echo "== $1" | tee -a "$LOG"; shift
    "$@" 2>&1 | tee -a "$LOG"; rc=${PIPESTATUS[0]}
    echo "== exit $rc" | tee -a "$LOG"; [ "$rc" -eq 0 ] || status=1
}
for step in $STEPS; do
    case $step in
    tests)
        run "kernel tests on CUDA" $PY -m pytest -q -p no:cacheprovider tests/ops tests/models/test_diffloss.py \
            tests/models/test_encoder.py tests/models/test_modules_run_their_ops.py tests/data/test_data_dali.py ;;
    zero)
        for z in 1 2; do
            run "ZeRO-$z, 50 steps" $PY ivfast/train.py --config configs/tiny.yaml output_dir=runs/gpu_zero$z \
                deepspeed.zero_stage=$z train.max_steps=50 train.save_every=50 train.progress=false train.resume=never
            $PY - "runs/gpu_zero$z/metrics.jsonl" <<'PYEOF' 2>&1 | tee -a "$LOG" || status=1
import json, sys
losses = [json.loads(l)["loss"] for l in open(sys.argv[1])]
first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
print(f"{sys.argv[1]}: {len(losses)} steps, mean loss of the first 5 {first:.4f}, of the last 5 {last:.4f}")
sys.exit(0 if len(losses) == 50 and last < first else 1)
PYEOF
        done ;;
    step)
        run "Stage-1 step benchmark" $PY benchmarks/step.py ;;
    bench)
        run "kernel microbenchmarks" $PY -m pytest benchmarks -q -p no:cacheprovider -o python_files='bench_*.py' \
            --benchmark-enable ;;
    memory)
        run "memory report, measured" $PY -m ivfast.memory.cli report --measure --out benchmarks/results ;;
    *) echo "unknown step $step"; status=1 ;;
    esac
done
if [ -n "${OUT:-}" ]; then  # hand the new results back to the device tool (flat, at most 8 files)
    tar czf "$OUT/results.tgz" benchmarks/results runs/gpu_zero*/metrics.jsonl 2>/dev/null
fi
echo "gpu_check: $([ $status -eq 0 ] && echo all passed || echo SOME FAILED; true)" | tee -a "$LOG"
exit $status
