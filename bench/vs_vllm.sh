#!/bin/bash
# remp or vLLM's CPU build (the peer, ../shared/peers/vllm-cpu/README.md) served on port 8765 and measured by one
# client for both, `remp bench serve` (vLLM's own client dies with SIGILL on AVX2-only CPUs): 64 random prompts
# of 128 tokens, 64 output tokens, all at once. Prints startup (launch -> /health 200) and the client's summary;
# saves bench/results/serve_TAG.json.
#   bench/vs_vllm.sh TAG remp [remp serve flags...]      e.g. bench/vs_vllm.sh remp-tp1 remp
#   bench/vs_vllm.sh TAG vllm [vllm serve flags...]      e.g. bench/vs_vllm.sh vllm-tp1 vllm --dtype float32
#   CLIENT="--max-concurrency 1 --num-prompts 8" bench/vs_vllm.sh remp-single remp     (single stream)
set -u
TAG=$1; SERVER_KIND=$2; shift 2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS=$ROOT/../shared/peers/vllm-cpu
PEER_DIR=${PEER_DIR:-${TMPDIR:-/tmp}/vllm-peer}
LOG=${TMPDIR:-/tmp}/$TAG.server.log
mkdir -p "$ROOT/bench/results"
t0=$(date +%s.%N)
case $SERVER_KIND in
  remp) "$ROOT/.venv/bin/python" -m remp serve --served-model-name smollm2 --port 8765 "$@" > "$LOG" 2>&1 & ;;
  vllm) ( . "$PEERS/env.sh" && cd "$PEER_DIR" && mkdir -p logs && rm -f "STOP_$TAG" && \
          VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-1} python "$PEERS/run_server.py" "$TAG" 8765 -- \
          --model "$PEER_DIR/smollm2-hf" --served-model-name smollm2 "$@" ) > "$LOG" 2>&1 & ;;
  *) echo "server must be remp or vllm, got $SERVER_KIND"; exit 2 ;;
esac
SERVER=$!
stop() {
  if [ "$SERVER_KIND" = vllm ]; then touch "$PEER_DIR/STOP_$TAG"; else kill -INT $SERVER 2>/dev/null; fi
  wait $SERVER
}
trap stop EXIT
until curl -sf http://127.0.0.1:8765/health > /dev/null; do
  sleep 0.5; kill -0 $SERVER 2>/dev/null || { echo "server exited; see $LOG"; tail -5 "$LOG"; exit 1; }
done
echo "startup_s $(echo "$(date +%s.%N) - $t0" | bc)"
TOKENIZER=()
[ -d "$PEER_DIR/smollm2-hf" ] && TOKENIZER=(--tokenizer "$PEER_DIR/smollm2-hf")  # the same prompts for both servers
# shellcheck disable=SC2086
"$ROOT/.venv/bin/remp" bench serve --base-url http://127.0.0.1:8765 --model smollm2 "${TOKENIZER[@]}" \
  --dataset-name random --random-input-len 128 --random-output-len 64 --num-prompts 64 --request-rate inf \
  --ignore-eos --seed 0 --save-result --result-dir "$ROOT/bench/results" --result-filename "serve_$TAG.json" \
  --disable-tqdm ${CLIENT:-} 2>&1 | grep -E "Successful|Failed|Request throughput|Output token throughput|TTFT|TPOT"
