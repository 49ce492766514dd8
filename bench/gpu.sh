#!/usr/bin/env bash
# GPU checks on a lent H200 (or H100), in one call of under 8 minutes, from the repo root:
#
#   bash bench/gpu.sh            # via the device tool: command "bash bench/gpu.sh", timeout_s 540
#
# The lent machine as it is (/work/.library/device/KINDS.md): Python 3.12 with a CUDA
# torch 2.11 (cu130), transformers 5.17, safetensors, pytest; no network, so nothing is
# installed and flash-attn is absent. Everything runs with the engine's torch (SDPA)
# attention and its decode CUDA graphs:
# 1. pytest -m gpu (tests/test_gpu.py, test_gpu_moe.py, test_mla_gpu.py; the other test
#    modules import the server's packages, which that image lacks): backends, MoE and
#    MLA on CUDA, decode graphs captured for every
#    bucket and their memory report, graphs on vs off (same greedy tokens in fp32;
#    close logits in bf16), every KV block freed. Capped at 150 s.
# 2. bench/gpu_bench.py, capped at 240 s: the load-memory probe (a 2 GB Llama-3.2-1B-
#    shaped checkpoint written to disk and loaded by the real loader: peak allocated
#    vs the bf16 weights, reserved vs allocated, free memory, KV blocks sized from it),
#    engine logits vs transformers (fp32 and bf16), copy bandwidth, and decode tok/s
#    at batch 1 and 64 on a Llama-3-8B-shaped model with graphs off and on, each
#    against the bandwidth floor (weight bytes / copy bandwidth) and transformers.
# 3. bench/gpu_async_scheduling.py, capped at 90 s: the same decode with graphs on and
#    async scheduling off, then on (tok/s, share of the floor, on / off).
# 4. bench/gpu_decode_profile.py, capped at 90 s: where a batch-1 decode step's time
#    goes (its wall, the same weights through bare matmuls in a graph, kernels by name).
# 5. The summaries: one table each (check | result | verdict), printed last.
#
# Tensor-parallel mode, on a machine with several GPUs:
#
#   bash bench/gpu.sh tensor-parallel [N]    # N GPUs (default: all of them)
#
# writes a Llama-3-8B-shaped random bf16 checkpoint (bench/make_bench_model.py, ~16 GB)
# and runs bench/tensor_parallel.py on it: W1 on one GPU against tensor_parallel_size N
# (NCCL, decode CUDA graphs per rank with the all-reduces inside), alternating, with
# tok/s, ms per step and the time rank 0 spends in collectives -> $OUT/tensor_parallel.txt.
# (Decode rates per step at tp=N against the bandwidth floor, by hand on the same
# checkpoint: python3 bench/gpu_tensor_parallel.py --model-dir build/bench_model_8b --tp N.)
#
# Everything lands in $OUT (the device tool brings that folder back), else build/gpu_out:
# machine.txt (nvidia-smi, versions), pytest_gpu.txt, gpu_bench.log, gpu_bench.json,
# gpu_bench.txt (its table), gpu_async_scheduling.json / .txt, decode_profile.json: the
# device tool brings back at most 8 files, so gpu_async_scheduling's log is appended to
# gpu_bench.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-build/gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/packages:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY="${PY:-python3}"
started=$(date +%s)
log() { echo "[gpu.sh +$(( $(date +%s) - started ))s] $*"; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
    > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if [ "${1:-}" = "tensor-parallel" ]; then
    gpus=$($PY -c "import torch; print(torch.cuda.device_count())")
    tp="${2:-$gpus}"
    if [ "$tp" -lt 2 ] || [ "$tp" -gt "$gpus" ]; then
        echo "tensor-parallel mode needs 2..$gpus GPUs, asked for $tp"; exit 2
    fi
    log "writing the llama3-8b-shaped checkpoint"
    $PY bench/make_bench_model.py --shape llama3-8b --device cuda --out build/bench_model_8b \
        > "$OUT/make_model.log" 2>&1 || { tail "$OUT/make_model.log"; exit 1; }
    log "bench/tensor_parallel.py: tp=1 vs tp=$tp"
    timeout 420 $PY bench/tensor_parallel.py --device cuda --tp "$tp" --dtype bfloat16 \
        --model build/bench_model_8b --rounds 3 2>&1 | tee "$OUT/tensor_parallel.log" \
        | grep -v -E "^INFO|^\[tp rank" > "$OUT/tensor_parallel.txt"
    cat "$OUT/tensor_parallel.txt"
    exit 0
fi
$PY - >> "$OUT/machine.txt" 2>&1 <<'EOF'
import importlib, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
for name in ("flash_attn", "transformers", "safetensors", "huggingface_hub", "pytest"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # missing here is reported, not fatal
        print(name, "missing:", type(exc).__name__)
EOF
tail -n +3 "$OUT/machine.txt"

log "pytest -m gpu"
timeout 150 $PY -m pytest -m gpu tests/test_gpu.py tests/test_gpu_moe.py tests/test_mla_gpu.py \
    -q -p no:cacheprovider -rs \
    > "$OUT/pytest_gpu.txt" 2>&1
tail -15 "$OUT/pytest_gpu.txt"

log "bench/gpu_bench.py"
# The table is rewritten after every section, so a run cut short still reports.
timeout 240 $PY bench/gpu_bench.py --out "$OUT" --attention torch \
    --pytest-log "$OUT/pytest_gpu.txt" 2>&1 \
    | grep --line-buffered -v -E "Loading weights|Writing model shards|it/s\]" \
    > "$OUT/gpu_bench.log"
status=$?
grep -E "^\[|Error|error" "$OUT/gpu_bench.log" | tail -20
log "gpu_bench exit $status"

log "bench/gpu_async_scheduling.py"
timeout 90 $PY bench/gpu_async_scheduling.py --out "$OUT" --attention torch \
    > "$OUT/async.log.tmp" 2>&1
async_status=$?
grep -E "^\[|Error|error" "$OUT/async.log.tmp" | tail -10
{ echo "== bench/gpu_async_scheduling.py"; cat "$OUT/async.log.tmp"; } >> "$OUT/gpu_bench.log"
rm -f "$OUT/async.log.tmp"
log "bench/gpu_decode_profile.py"
timeout 90 $PY bench/gpu_decode_profile.py --out "$OUT" --attention torch 2>&1 \
    | grep -v -E "Loading weights|it/s\]|USDT" | grep -A45 "^batch" | cut -c1-150
log "done (gpu_bench exit $status, gpu_async_scheduling exit $async_status)"
echo
cat "$OUT/gpu_bench.txt" 2>/dev/null || echo "no summary table: see $OUT/gpu_bench.log"
echo
cat "$OUT/gpu_async_scheduling.txt" 2>/dev/null \
    || echo "no async scheduling table: see $OUT/gpu_bench.log"
