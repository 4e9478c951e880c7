#!/usr/bin/env bash
# Issue 23's quality table: the demo's trained model at 3 bit, SqueezeLLM (built in) next to RTN per row and
# RTN group 128, each in one pass, then evaluate.py on the held-out text: perplexity and KL without DecDEC
# (k_chunk 0) and with it. CPU is enough (a few minutes on 2 cores).
# Usage: bash bench/run_sqllm_quality.sh [work dir] [log dir]
DEFAULT_WORK=/tmp/decdec-quality . "$(dirname "$0")/common.sh" "$@"
[ -f "$W/demo/original/config.json" ] || $PY demo.py --output "$W/demo" --quiet --overwrite > /dev/null
D="$W/demo"; T="--dataset $D/calibration.txt --sampling concat --seq_len 256 --num_examples 64"
for run in "sqllm3:sqllm --w_bit 3" "rtn3-row:rtn --w_bit 3 --q_group_size -1" "rtn3-g128:rtn --w_bit 3 --q_group_size 128"; do
  name=${run%%:*}; method=${run#*:}
  info "$name"
  [ -f "$W/$name/cheatsheet.pt" ] || $PY decdec_setup.py --model "$D/original" --output "$W/$name" --method $method $T \
      --quiet --overwrite 2>&1 | tail -1
  $PY evaluate.py --quantized_model "$W/$name" --original_model "$D/original" --dataset "$D/evaluation.txt" \
      --seq_len 256 --max_chunks 40 --k_chunks 0 16 64 128 256 --output "$LOG/$name.json" --quiet --overwrite
done
