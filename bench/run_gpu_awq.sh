#!/usr/bin/env bash
# Issue 11's GPU benchmark: conv_awq.py's whole AWQ path on the 8B shape in one cold command
# (search on ~80k calibration tokens + scaled + fake-quantized + LUT-GEMM outputs + results file).
# Usage: bash bench/run_gpu_awq.sh [work dir] [log dir]     (about 53 GB of disk)
. "$(dirname "$0")/common.sh" "$@"

machine
bytecode  # as a pip install leaves the libraries (BYTECODE=0: the image as it is)

info "8B-shaped model; calibration text: 460 passages give ~80k tokens (157 blocks of 512)"
model 8b "$W/original"
corpus_files
$M --label io-floor-read-one-8b -- $PY bench/read_floor.py "$W/original"

info "conv_awq.py: search + every output, one command, cold"
conv_awq_all
du -sh "$W/scaled" "$W/fq" "$W/real" "$W/awq.pt"

info "check: pytorch_model.bin decodes to the fake-quantized weights (layers 0 and 31, on the GPU)"
$PY - "$W" <<'PY'
import sys, torch
sys.path.insert(0, ".")
from pathlib import Path
from common.quant.lutgemm import decode
from common.io.model_files import Checkpoint
w = Path(sys.argv[1])
state = torch.load(w / "real" / "pytorch_model.bin", weights_only=True, mmap=True)
fq = Checkpoint(w / "fq")
results = torch.load(w / "awq.pt", weights_only=True)
print("results:", len(results["scale"]), "scale entries,", len(results["clip"]), "clip entries")
same = total = 0
for layer in (0, 31):
    for module in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"):
        base = f"model.layers.{layer}.{module}"
        got = decode(*(state[f"{base}.{k}"].cuda() for k in ("binary", "alpha", "q_bias"))).half().cpu()
        want = fq.read(f"{base}.weight")
        same += int((got == want).sum()); total += want.numel()
print(f"decoded == fake-quantized: {same}/{total} ({same / total:.6%})")
PY
rm -rf "$W/scaled" "$W/fq" "$W/real"

info "conv_awq.py: the search alone (results file only), cold"
$M --label conv_awq-search-only-8b -- $PY conv_awq.py --model_path "$W/original" --run_awq \
    --calib_data "$W/calib.jsonl" --n_samples 460 --seqlen 512 --w_bit 3 --q_group_size 128 \
    --dump_awq "$W/awq2.pt" --quiet 2> "$LOG/conv_awq-search.err"
cat "$LOG/conv_awq-search.err"
info "done"
