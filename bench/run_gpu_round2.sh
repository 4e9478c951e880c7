#!/usr/bin/env bash
# Re-measure thresholds.py (cold, and with warm Python libraries) and the converters' memory.
. "$(dirname "$0")/common.sh" "$@"
model 8b "$W/original"
corpus_files
T="$PY thresholds.py --model_path $W/original --dataset $W/calibration.txt --sampling concat --seq_len 512 --num_examples 100"
$M --label thresholds-8b -- $T --save_path "$W/a1" 2> "$LOG/t1.err"
sync; echo 3 > /proc/sys/vm/drop_caches; $PY -c "import torch, transformers.modeling_utils, tokenizers"
$M --warm --label thresholds-8b-cold-model-warm-libraries -- $T --save_path "$W/a2" 2> "$LOG/t2.err"
tr '\r' '\n' < "$LOG/t1.err" | grep "layers,"; tr '\r' '\n' < "$LOG/t2.err" | grep "layers,"
$M --label conv_awq-rtn-8b -- $PY conv_awq.py --model_path "$W/original" --w_bit 3 --q_group_size 128 \
    --fakequant_output "$W/fakequant" --quiet
rm -rf "$W/fakequant"
$PY bench/make_sqllm_folder.py --model "$W/original" --bits 3 --out "$W/sqllm3"
$M --label conv_sqllm-8b -- $PY conv_sqllm.py --original_model_path "$W/original" --quantized_path "$W/sqllm3" \
    --output_path "$W/sqllm3-fq" --quiet
