#!/usr/bin/env bash
# One lent-GPU session's checks for issue #7, in one go (the device is lent for minutes, so nothing is rerun):
#   1. the CUDA tests (pytest -m cuda; NCCL in a one-process group), 2. the real training loop at the published
#   size and its projected 30k-iteration time (bench_train_loop.py), 3. one UG-MCL step per optimisation on CUDA
#   (bench_train.py), 4. sliding-window inference on CUDA (bench_infer.py).
# Each step has its own time limit and log; a failing step does not stop the others, but the script then exits 1.
# Logs go to $OUT (or gpu_out/, git-ignored).
# STEPS picks and orders the steps (default "tests bench_loop bench_train bench_infer"); SETTINGS the loop's settings;
# TEST_K a pytest -k filter for the CUDA tests.
# Optional: UGMCL_SHARED=<copy of ../shared> for the golden-value tests; .whl/ with wheels of missing packages.
set -u
FAILED=""
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, print the log's tail
    local name=$1 limit=$2 start rc
    shift 2
    echo "=== $name (limit ${limit} s)"
    start=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "--- $name: exit $rc after $(($(date +%s) - start)) s"
    [ "$rc" -eq 0 ] || FAILED="$FAILED $name"
    tail -n "${TAIL:-30}" "$OUT/$name.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv; nproc;
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"; } 2>&1

run_step() {
    case $1 in
    tests) step tests "${T_TESTS:-120}" $PY -m pytest -m cuda -q -p no:cacheprovider ${TEST_K:+-k "$TEST_K"} \
        tests/test_cuda.py tests/utils/test_sliding_window.py tests/engine/test_distributed.py ;;
    bench_loop) step bench_loop "${T_LOOP:-330}" $PY bench/bench_train_loop.py --device cuda --patch "${PATCH:-96}" \
        --iters "${LOOP_ITERS:-40}" --skip "${LOOP_SKIP:-10}" --num_workers 6 \
        --settings ${SETTINGS:-released fast+amp gpu_max gpu_max+compile} ;;
    bench_train) step bench_train "${T_STEP:-150}" $PY bench/bench_train.py --device cuda --patch "${PATCH:-96}" \
        --batch 4 --T 8 --iters 5 --warmup 2 --configs baseline +low_memory +fused_norm +channels_last \
        +cudnn_benchmark --amp ;;
    bench_infer) step bench_infer "${T_INFER:-90}" $PY bench/bench_infer.py --device cuda --amp --repeats 3 ;;
    *) echo "unknown step $1"; FAILED="$FAILED $1" ;;
    esac
}
for name in ${STEPS:-tests bench_loop bench_train bench_infer}; do
    run_step "$name"
done
if [ -n "$FAILED" ]; then
    echo "=== done; failed:$FAILED"
    exit 1
fi
echo "=== done"
