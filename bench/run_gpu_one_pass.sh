#!/usr/bin/env bash
# Issue 12's GPU benchmark: decdec_setup.py on the 8B shape, cold, for rtn, sqllm and awq (with search),
# with the read floor of the inputs measured in the same run.
# Usage: [CONV_SQLLM=1] bash bench/run_gpu_one_pass.sh [work dir] [log dir]      (about 40 GB of disk)
. "$(dirname "$0")/common.sh" "$@"
THRESHOLDS="--dataset $W/calibration.txt --sampling concat --seq_len 512 --num_examples 100"

machine
bytecode  # as a pip install leaves the libraries (BYTECODE=0: the image as it is)
original_8b

rtn_and_sqllm_one_pass
if [ -n "${CONV_SQLLM:-}" ]; then  # the separate converter too (its tables are read the same way)
  $M --label conv_sqllm-8b -- $PY conv_sqllm.py --original_model_path "$W/original" --quantized_path "$W/sqllm3" \
      --output_path "$W/sqfq" --quiet
fi
rm -rf "$W/sqfq" "$W/sqllm3"

info "awq with the search (80k calibration tokens), 3 bit g128"
awq_search_one_pass
info "done"
