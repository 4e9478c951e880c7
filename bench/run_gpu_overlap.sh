#!/usr/bin/env bash
# The set-up overlap round (2026-11-29, second session): what the SqueezeLLM tables' loading costs the
# main thread (bench/sqllm_tables.py), then decdec_setup.py rtn and conv_awq.py's whole AWQ path on the
# 8B shape, cold, with the calibration set-up beside the first layers.
# Usage: bash bench/run_gpu_overlap.sh [work dir] [log dir]     (about 55 GB of disk)
. "$(dirname "$0")/common.sh" "$@"
THRESHOLDS="--dataset $W/calibration.txt --sampling concat --seq_len 512 --num_examples 100"
machine

info "SqueezeLLM tables: thread vs child process"
$PY bench/sqllm_tables.py "$W/tables"; rm -rf "$W/tables"

info "8B-shaped model, calibration text"
original_8b

info "decdec_setup.py rtn, 3 bit g128"
one_pass rtn --method rtn --w_bit 3 --q_group_size 128

info "conv_awq.py: search + every output, one command, cold"
conv_awq_all; rm -rf "$W/scaled" "$W/fq" "$W/real" "$W/awq.pt"
info "done"
