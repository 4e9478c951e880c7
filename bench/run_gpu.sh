#!/usr/bin/env bash
# The GPU benchmarks of BENCHMARKS.md, in one go (about 6 minutes on one H200, 64 GB of disk).
# Usage: bash bench/run_gpu.sh [work dir] [log dir]   (SKIP_GPU_VS_CPU=1 / SKIP_70B=1 leave those parts out)
. "$(dirname "$0")/common.sh" "$@"

machine

info "8B-shaped model and its 3-bit RTN g128 twin"
model 8b "$W/original"
corpus_files
$M --label conv_awq-rtn-8b -- $PY conv_awq.py --model_path "$W/original" --w_bit 3 --q_group_size 128 \
    --fakequant_output "$W/fakequant" --quiet
$M --label io-floor-read-both-8b -- $PY bench/read_floor.py "$W/original" "$W/fakequant"
$M --label io-floor-read-one-8b -- $PY bench/read_floor.py "$W/original"

info "cheatsheet.py"
$M --label cheatsheet-8b -- $PY cheatsheet.py --original_model "$W/original" --quantized_model "$W/fakequant" \
    --save_path "$W/artifacts" --quiet
$PY -X importtime -c "import cheatsheet" 2> "$LOG/cheatsheet-imports.txt"
$PY -c "import sys, cheatsheet; print('transformers imported by cheatsheet.py:', 'transformers' in sys.modules, '| datasets:', 'datasets' in sys.modules)"

info "GPU vs CPU bytes (2 layers of the TinyLlama shape)"
[ -n "${SKIP_GPU_VS_CPU:-}" ] || {
model tinyllama "$W/small" --layers 2
$PY conv_awq.py --model_path "$W/small" --w_bit 3 --q_group_size 128 --fakequant_output "$W/small-fq" --quiet
$PY bench/gpu_vs_cpu.py "$W/small" "$W/small-fq"
rm -rf "$W/small" "$W/small-fq"
}

info "thresholds.py"
$M --label thresholds-8b -- $PY thresholds.py --model_path "$W/original" --save_path "$W/artifacts" \
    --dataset "$W/calibration.txt" --sampling concat --seq_len 512 --num_examples 100 2> "$LOG/thresholds-8b.err"
grep "layers," "$LOG/thresholds-8b.err"
rm -rf "$W/artifacts" "$W/fakequant"

info "conv_sqllm.py"
$PY bench/make_sqllm_folder.py --model "$W/original" --bits 3 --out "$W/sqllm3"
$M --label conv_sqllm-8b -- $PY conv_sqllm.py --original_model_path "$W/original" --quantized_path "$W/sqllm3" \
    --output_path "$W/sqllm3-fq" --quiet
$M --label io-floor-sqllm-inputs-outputs -- $PY bench/read_floor.py "$W/original" "$W/sqllm3-fq"
rm -rf "$W/sqllm3" "$W/sqllm3-fq" "$W/original"

info "70B-shaped layers: thresholds.py GPU memory"
[ -n "${SKIP_70B:-}" ] || {
model 70b "$W/70b" --layers 4
$M --label thresholds-70b-4layers -- $PY thresholds.py --model_path "$W/70b" --save_path "$W/artifacts70" \
    --dataset "$W/calibration.txt" --sampling concat --seq_len 512 --num_examples 100 2> "$LOG/thresholds-70b.err"
grep "layers," "$LOG/thresholds-70b.err"
rm -rf "$W/70b" "$W/artifacts70"
}
info "done"
