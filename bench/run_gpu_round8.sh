#!/usr/bin/env bash
# Round 8 (2026-12-04): the one pass's sqllm path (and rtn) on the 8B shape, cold, bytecode compiled, for the
# code in this tree and, on the same instance, for other trees of the code named in VARIANTS
# ("label=dir ...", e.g. the previous commit's files, or a patched copy), so that instances' different
# disks do not decide a comparison. Each run's sqllm inputs' read floor is in the same log.
# FLOOR_BLOCKS_MB="8 ..." measures the inputs' read floor in those read sizes too.
# RTN="label ..." also runs rtn (3 bit g128) with those trees' code.
# Usage: [VARIANTS="old=/tmp/old ..."] [RTN="this old"] bash bench/run_gpu_round8.sh [work dir] [log dir]   (~45 GB of disk)
. "$(dirname "$0")/common.sh" "$@"
THRESHOLDS="--dataset $W/calibration.txt --sampling concat --seq_len 512 --num_examples 100"
HERE=$PWD
M="$PY $HERE/bench/measure.py --log $LOG/bench.jsonl"  # this tree's, whichever tree's code runs

machine
original_8b
bytecode
info "sqllm, 3 bit: inputs"
sqllm_folder
for mb in ${FLOOR_BLOCKS_MB:-}; do  # the floor again in the read-ahead's block sizes
  BLOCK_MB=$mb $M --label "io-floor-sqllm-inputs-${mb}mb" -- $PY bench/read_floor.py "$W/original" "$W/sqllm3"
done
for variant in "this=$HERE" ${VARIANTS:-}; do
  label=${variant%%=*}; dir=${variant#*=}
  cd "$dir" || exit 1
  info "sqllm, 3 bit, code: $label ($dir)"
  one_pass "sqllm-$label" --method sqllm --quantized_path "$W/sqllm3"
  if [[ " ${RTN:-} " == *" $label "* ]]; then
    info "rtn, 3 bit g128, code: $label"
    one_pass "rtn-$label" --method rtn --w_bit 3 --q_group_size 128
  fi
  cd "$HERE"
done
info "done"
