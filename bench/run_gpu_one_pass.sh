#!/usr/bin/env bash
# Issue 12's GPU benchmark: decdec_setup.py on the 8B shape, cold, for rtn, sqllm and awq (with search),
# with the read floor of the inputs measured in the same run.
# Usage: [CONV_SQLLM=1] bash bench/run_gpu_one_pass.sh [work dir] [log dir]      (about 40 GB of disk)
. "$(dirname "$0")/common.sh" "$@"
THRESHOLDS="--dataset $W/calibration.txt --sampling concat --seq_len 512 --num_examples 100"

machine
model 8b "$W/original"
corpus_files
$M --label io-floor-read-one-8b -- $PY bench/read_floor.py "$W/original"

info "rtn, 3 bit g128"
$M --label decdec_setup-rtn-8b -- $PY decdec_setup.py --model "$W/original" --output "$W/rtn" --method rtn \
    --w_bit 3 --q_group_size 128 $THRESHOLDS --quiet 2> "$LOG/rtn.err"
cat "$LOG/rtn.err"; du -sh "$W/rtn"; rm -rf "$W/rtn"

info "sqllm, 3 bit"
$PY bench/make_sqllm_folder.py --model "$W/original" --bits 3 --out "$W/sqllm3"
$M --label io-floor-sqllm-inputs -- $PY bench/read_floor.py "$W/original" "$W/sqllm3"
$M --label decdec_setup-sqllm-8b -- $PY decdec_setup.py --model "$W/original" --output "$W/sq" --method sqllm \
    --quantized_path "$W/sqllm3" $THRESHOLDS --quiet 2> "$LOG/sqllm.err"
cat "$LOG/sqllm.err"; rm -rf "$W/sq"
if [ -n "${CONV_SQLLM:-}" ]; then  # the separate converter too (its tables are read the same way)
  $M --label conv_sqllm-8b -- $PY conv_sqllm.py --original_model_path "$W/original" --quantized_path "$W/sqllm3" \
      --output_path "$W/sqfq" --quiet
fi
rm -rf "$W/sqfq" "$W/sqllm3"

info "awq with the search (80k calibration tokens), 3 bit g128"
$M --label decdec_setup-awq-search-8b -- $PY decdec_setup.py --model "$W/original" --output "$W/awq" --method awq \
    --calib_data "$W/calib.jsonl" --n_samples 460 --seqlen 512 --w_bit 3 --q_group_size 128 $THRESHOLDS \
    --quiet 2> "$LOG/awq.err"
cat "$LOG/awq.err"; rm -rf "$W/awq"
info "done"
