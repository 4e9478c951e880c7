#!/usr/bin/env bash
# Issue 22, item 6: evaluate.py given decdec_setup.py's folder (its LUT-GEMM weights decoded a Linear at a
# time) against the same run given the fake-quantized model and the artifacts; --check, then a simulation.
# Each command from a cold page cache. GPU: SHAPE=8b (the default); CPU: SHAPE=tinyllama LAYERS=4 DEVICE=cpu.
# OLD=DIR also runs DIR/evaluate.py (an older checkout) on the folder; PHASES="check simulate" by default.
# Usage: [SHAPE=..] [LAYERS=..] [DEVICE=..] [WINDOWS=8] [SEQ=2048] bash bench/run_evaluate_folder.sh [work] [logs]
DEFAULT_WORK=/tmp/decdec-eval-bench . "$(dirname "$0")/common.sh" "$@"
SHAPE=${SHAPE:-8b}; DEVICE=${DEVICE:-cuda}; WINDOWS=${WINDOWS:-8}; SEQ=${SEQ:-2048}
[ "$DEVICE" = cpu ] || machine
model "$SHAPE" "$W/original" ${LAYERS:+--layers $LAYERS}
corpus_files
[ -f "$W/one/cheatsheet.pt" ] || $PY decdec_setup.py --model "$W/original" --output "$W/one" --method rtn --w_bit 3 \
    --q_group_size 128 --dataset "$W/calibration.txt" --sampling concat --seq_len 128 --num_examples 16 \
    --fakequant_output "$W/fq" --device "$DEVICE" --quiet
E="--original_model $W/original --artifacts $W/one --device $DEVICE --quiet"
S="--dataset $W/calibration.txt --seq_len $SEQ --max_chunks $WINDOWS --k_chunks 0 32"
for round in ${ROUNDS:-1}; do
  for phase in ${PHASES:-check simulate}; do
    flags=$([ "$phase" = check ] && echo --check || echo "$S")
    $M --label "evaluate-$phase-fakequant-$SHAPE-$round" -- $PY evaluate.py --quantized_model "$W/fq" $E $flags
    $M --label "evaluate-$phase-folder-$SHAPE-$round" -- $PY evaluate.py --quantized_model "$W/one" $E $flags
    [ -z "${OLD:-}" ] || $M --label "evaluate-$phase-folder-old-$SHAPE-$round" -- \
        $PY "$OLD/evaluate.py" --quantized_model "$W/one" $E $flags
  done
done
