#!/usr/bin/env bash
# Issue 23: decdec_setup.py --method sqllm quantizing here (SqueezeLLM, SPEC §9, 3 bit) from the original 8B-shaped
# model to the folder DecDEC's runtime loads: the sensitivity on the thresholds' 100 x 512 samples with each layer's
# k-means beside it, then the one pass. Each run from a cold page cache; the first with numba's cache empty (the
# k-means kernel compiles, as on a fresh install's first run). SHAPE70=1 then runs four layers of the 70B shape.
# flash1dkmeans must be installed (the GPU image lacks it: BENCHMARKS.md says how its wheel was carried).
# Usage: [RUNS="first again" | "warm again" | ""] [SHAPE70=1] bash bench/run_gpu_sqllm.sh [work dir] [log dir]   (~40 GB of disk)
DEFAULT_WORK=/tmp/decdec-sqllm-bench . "$(dirname "$0")/common.sh" "$@"
THRESHOLDS="--dataset $W/calibration.txt --sampling concat --seq_len 512 --num_examples 100"
machine
original_8b
bytecode
$PY -c 'import numba, flash1dkmeans; print("numba", numba.__version__, "threads", numba.config.NUMBA_NUM_THREADS)'
for run in ${RUNS-first again}; do  # "warm": numba compiles first, unmeasured; RUNS="": none
  if [ "$run" = first ]; then
    find common -name '*.nbi' -delete -o -name '*.nbc' -delete  # numba's cache of the kernel, gone
  elif [ "$run" = warm ]; then
    $PY -c 'import time; t = time.time(); from common.quant.seed_luts import warm_up; warm_up()
print(f"numba: the k-means kernel compiled in {time.time() - t:.1f} s")'; continue
  fi
  info "sqllm quantized here, 3 bit: $run run"
  one_pass "sqllm-w3-$run" --method sqllm --w_bit 3
done
if [ "${SHAPE70:-0}" = 1 ]; then
  info "sqllm quantized here, 3 bit, four layers of the 70B shape"
  model 70b "$W/original70" --layers 4
  $M --label decdec_setup-sqllm-w3-70b-4layers -- $PY decdec_setup.py --model "$W/original70" --output "$W/s70" \
      --method sqllm --w_bit 3 $THRESHOLDS --quiet 2> "$LOG/s70.err"
  cat "$LOG/s70.err"; du -sh "$W/s70"; rm -rf "$W/s70"
fi
info "done"
