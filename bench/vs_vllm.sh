#!/bin/bash
# remp under the exact `vllm bench serve` command the vLLM peer uses (../shared/peers/vllm-cpu/bench_one.sh):
# usage: bench/vs_vllm.sh TAG [remp serve flags...]      e.g. bench/vs_vllm.sh remp-tp1 ; bench/vs_vllm.sh remp-pp2 -pp 2
# Needs the peer installed (PEER_DIR, default /tmp/vllm-peer) for its bench client and the HF tokenizer copy.
set -u
TAG=$1; shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEER_DIR=${PEER_DIR:-${TMPDIR:-/tmp}/vllm-peer}
mkdir -p "$ROOT/bench/results"
t0=$(date +%s.%N)
"$ROOT/.venv/bin/python" -m remp serve --served-model-name smollm2 --dtype bfloat16 --port 8765 "$@" \
  > "${TMPDIR:-/tmp}/$TAG.server.log" 2>&1 &
SERVER=$!
until curl -sf http://127.0.0.1:8765/health > /dev/null; do sleep 0.5; kill -0 $SERVER 2>/dev/null || exit 1; done
echo "startup_s $(echo "$(date +%s.%N) - $t0" | bc)"
( . "$PEER_DIR/venv/bin/activate" && cd "$PEER_DIR" && HF_HUB_OFFLINE=1 python "$ROOT/../shared/peers/vllm-cpu/vllm_cli.py" \
  bench serve --backend vllm --host 127.0.0.1 --port 8765 --model smollm2 --tokenizer "$PEER_DIR/smollm2-hf" \
  --dataset-name random --random-input-len 128 --random-output-len 64 --num-prompts 64 --request-rate inf \
  --ignore-eos --seed 0 --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99 \
  --save-result --result-dir "$ROOT/bench/results" --result-filename "bench_$TAG.json" --disable-tqdm ) \
  > "$ROOT/bench/results/bench_$TAG.log" 2>&1
sed -n '/Serving Benchmark Result/,/P99 TPOT/p' "$ROOT/bench/results/bench_$TAG.log" | \
  grep -E "Failed|Request throughput|Output token throughput|Mean TTFT|P99 TTFT|Mean TPOT|P99 TPOT"
kill -INT $SERVER; wait $SERVER
