#!/usr/bin/env bash
# Round 6 (2026-12-04): the one pass (rtn, sqllm, awq with search) and conv_awq.py's whole AWQ path on the
# 8B shape, cold, with the libraries' bytecode compiled as pip leaves it; rtn also before the compile, on
# the same instance, to show what the image's missing bytecode costs. PART=1 or PART=2 runs one half
# (each fits one 10-minute call on the GPU machine; the model stays in the work dir between them).
# ONE_PASS_ONLY=1 (round 7) leaves out the rtn run without bytecode and conv_awq.py.
# Usage: [PART=1|2] [ONE_PASS_ONLY=1] bash bench/run_gpu_round6.sh [work dir] [log dir]   (about 55 GB of disk)
. "$(dirname "$0")/common.sh" "$@"
THRESHOLDS="--dataset $W/calibration.txt --sampling concat --seq_len 512 --num_examples 100"
PART=${PART:-all}

if [ "$PART" != 2 ]; then
  machine
  original_8b
  if [ "${ONE_PASS_ONLY:-0}" != 1 ]; then
    info "rtn, 3 bit g128, the image as it is (no bytecode)"
    one_pass rtn-no-bytecode --method rtn --w_bit 3 --q_group_size 128
  fi
  bytecode
  rtn_and_sqllm_one_pass
  rm -rf "$W/sqllm3"
fi
if [ "$PART" != 1 ]; then
  [ "$PART" = 2 ] && { machine; original_8b; bytecode; }
  info "awq with the search (80k calibration tokens), 3 bit g128"
  awq_search_one_pass
  if [ "${ONE_PASS_ONLY:-0}" != 1 ]; then
    info "conv_awq.py: search + every output, one command"
    conv_awq_all; rm -rf "$W/scaled" "$W/fq" "$W/real" "$W/awq.pt"
  fi
fi
info "done"
