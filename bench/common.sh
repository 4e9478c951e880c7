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
