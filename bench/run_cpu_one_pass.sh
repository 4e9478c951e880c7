#!/usr/bin/env bash
# Issue 12's CPU comparison: a 4-layer TinyLlama-shaped model, RTN 3 bit g128, 16 x 128 thresholds
# tokens: decdec_setup.py against the three separate commands that make the same folder. Cold cache each.
# Usage: [ROUNDS="1 2 ..."] bash bench/run_cpu_one_pass.sh [work dir] [log dir]      (2 rounds by default)
DEFAULT_WORK=/tmp/decdec-cpu-bench . "$(dirname "$0")/common.sh" "$@"
model tinyllama "$W/original" --layers 4
corpus_files
T="--dataset $W/calibration.txt --sampling concat --seq_len 128 --num_examples 16 --device cpu --quiet"
for round in ${ROUNDS:-1 2}; do
  rm -rf "$W/fq" "$W/sep" "$W/one"
  $M --label "cpu-separate-conv_awq-$round" -- $PY conv_awq.py --model_path "$W/original" --w_bit 3 \
      --q_group_size 128 --fakequant_output "$W/fq" --real_output "$W/sep" --device cpu --quiet
  $M --label "cpu-separate-cheatsheet-$round" -- $PY cheatsheet.py --original_model "$W/original" \
      --quantized_model "$W/fq" --save_path "$W/sep" --add_fused --device cpu --quiet
  $M --label "cpu-separate-thresholds-$round" -- $PY thresholds.py --model_path "$W/original" --save_path "$W/sep" $T
  $M --label "cpu-one-pass-$round" -- $PY decdec_setup.py --model "$W/original" --output "$W/one" --method rtn \
      --w_bit 3 --q_group_size 128 $T
done
