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
