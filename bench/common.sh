# Sourced by the bench/run_*.sh scripts: work and log folders, the measuring wrapper, headings.
# Arguments: [work dir] [log dir]; DEFAULT_WORK may set the work dir's default.
set -uo pipefail
W=${1:-${DEFAULT_WORK:-/tmp/decdec-bench}}
LOG=${2:-$W}
mkdir -p "$W" "$LOG"
PY=${PYTHON:-python3}
M="$PY bench/measure.py --log $LOG/bench.jsonl"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
info() { echo "== $*"; date -u; }
machine() {  # the GPU, the cores, the memory and the library versions, for the log
  info "machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; free -g | head -2
  $PY -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
}
bytecode() {  # compile the Python libraries' bytecode, as `pip install` does when it installs them
  # The GPU image ships its site-packages without __pycache__ and sets PYTHONDONTWRITEBYTECODE=1, so every
  # process there compiles the ~3,200 modules of torch + transformers from source (~5 s per process); a pip
  # install has the bytecode. BYTECODE=0 keeps the image as it is.
  [ "${BYTECODE:-1}" = 0 ] && { info "bytecode: the image as it is (none compiled)"; return; }
  info "bytecode: compiling the site-packages, as pip install does"
  $PY -c 'import sysconfig; print(*sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")}))' |
    xargs $PY -m compileall -q -j 0 > /dev/null 2>&1
  $PY -c 'import os, sysconfig; p = sysconfig.get_paths()["purelib"]
print(p, "has bytecode:", os.path.isdir(os.path.join(p, "transformers", "__pycache__")))'
}
corpus_files() {  # $W/calibration.txt (thresholds) and $W/calib.jsonl (the AWQ search: 460 passages, ~80k tokens)
  $PY -c "
import json, sys; sys.path.insert(0, '.')
from common.tiny_models import local_corpus
open('$W/calibration.txt', 'w').write('\n\n'.join(local_corpus()))
open('$W/calib.jsonl', 'w').write('\n'.join(json.dumps({'text': t}) for t in local_corpus() * 4))"
}
model() {  # model SHAPE DIR [synthetic.py flags]: a seeded synthetic model, kept if already there
  local shape=$1 dir=$2; shift 2
  [ -f "$dir/config.json" ] || $PY bench/synthetic.py --shape "$shape" --out "$dir" "$@"
}
original_8b() {  # the 8B-shaped model, the calibration files and the read floor of the model, cold
  model 8b "$W/original"
  corpus_files
  $M --label io-floor-read-one-8b -- $PY bench/read_floor.py "$W/original"
}
one_pass() {  # one_pass NAME [decdec_setup.py flags]: decdec_setup.py on the 8B model with the caller's
  local name=$1; shift  # $THRESHOLDS, measured as decdec_setup-NAME-8b; its report shown, its folder removed
  $M --label "decdec_setup-$name-8b" -- $PY decdec_setup.py --model "$W/original" --output "$W/$name" "$@" \
      $THRESHOLDS --quiet 2> "$LOG/$name.err"
  cat "$LOG/$name.err"; du -sh "$W/$name"; rm -rf "$W/$name"
}
sqllm_folder() {  # the 8B model's synthetic 3-bit SqueezeLLM folder, and the read floor of both inputs, cold
  $PY bench/make_sqllm_folder.py --model "$W/original" --bits 3 --out "$W/sqllm3"
  $M --label io-floor-sqllm-inputs -- $PY bench/read_floor.py "$W/original" "$W/sqllm3"
}
rtn_and_sqllm_one_pass() {  # decdec_setup.py rtn (3 bit g128), then sqllm (3 bit) on a synthetic folder left in $W/sqllm3
  info "rtn, 3 bit g128"
  one_pass rtn --method rtn --w_bit 3 --q_group_size 128
  info "sqllm, 3 bit"
  sqllm_folder
  one_pass sqllm --method sqllm --quantized_path "$W/sqllm3"
}
awq_search_one_pass() {  # decdec_setup.py --method awq with the search on ~80k calibration tokens, 3 bit g128
  one_pass awq-search --method awq --calib_data "$W/calib.jsonl" --n_samples 460 --seqlen 512 --w_bit 3 \
      --q_group_size 128
}
conv_awq_all() {  # conv_awq.py's whole AWQ path in one cold command: search + every output (left in $W)
  $M --label conv_awq-search-all-outputs-8b -- $PY conv_awq.py --model_path "$W/original" --run_awq \
      --calib_data "$W/calib.jsonl" --n_samples 460 --seqlen 512 --w_bit 3 --q_group_size 128 \
      --dump_awq "$W/awq.pt" --scaled_output "$W/scaled" --fakequant_output "$W/fq" --real_output "$W/real" \
      --quiet 2> "$LOG/conv_awq.err"
  cat "$LOG/conv_awq.err"
}
