#!/usr/bin/env bash
# Where a server's CPU time goes: `perf record` on tofy serve or llama-server during an
# 8-stream run of scripts/bench-server.py, then the top symbols and the share of each thread.
# usage: scripts/profile-server.sh tofy|llama-server [chat|same-tokens]   (default same-tokens)
# Needs perf (linux-perf) and what scripts/bench-server.sh builds (release tofy, the peers).
set -euo pipefail
cd "$(dirname "$0")/.."

server=${1:?usage: scripts/profile-server.sh tofy|llama-server [chat|same-tokens]}
command -v perf >/dev/null || { echo "perf not found: apt-get install linux-perf" >&2; exit 1; }
mode=${2:-same-tokens}
threads=$(lscpu -p=CORE,SOCKET | grep -v '^#' | sort -u | wc -l)
model=${TOFY_BENCH_GGUF:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
port=18481
data=target/profile-$server.data
# The same conditioning-like system message as scripts/bench-server.sh.
system="You are Tofy, a helpful assistant. A world model read the user's message and predicted a latent condition for your reply. Use the latent condition to guide the tone, depth and focus of your reply; never mention it or its numbers. Latent condition: chunks=[0.188,0.054,0.099,-0.045,0.000,-0.096,0.031,0.049]"
raw=()
if [ "$mode" = same-tokens ]; then raw=(--raw-system "$system"); fi

case $server in
    tofy)
        JEPA_DECODER_MODEL=$model JEPA_DECODER_NGL=0 JEPA_DECODER_THREADS=$threads \
            target/release/tofy serve "127.0.0.1:$port" --parallel 8 --ctx 4096 2>/dev/null &
        ;;
    llama-server)
        target/peers/bin/llama-server -m "$model" -c 32768 -np 8 -t "$threads" -tb "$threads" \
            -ngl 0 --host 127.0.0.1 --port "$port" >/dev/null 2>&1 &
        ;;
    *) echo "unknown server $server (tofy or llama-server)" >&2; exit 2 ;;
esac
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$port/health" >/dev/null || { echo "$server did not become ready" >&2; exit 1; }

bench() {
    python3 scripts/bench-server.py --base-url "http://127.0.0.1:$port" --concurrency 8 \
        --requests-per-stream 2 --max-tokens 128 "${raw[@]}" "$@"
}
bench --requests-per-stream 1 --max-tokens 8 --no-warmup >/dev/null   # warm every slot
perf record -F 499 -g -p "$pid" -o "$data" &
perf_pid=$!
sleep 1
bench --no-warmup | tail -n 1
kill -INT "$perf_pid"
wait "$perf_pid" 2>/dev/null || true
echo "top symbols ($server, $mode):"
# awk, not head: head would leave perf report on a broken pipe (pipefail).
perf report -i "$data" --no-children --sort sym -g none 2>/dev/null | awk '/%/ && ++n <= 15'
echo "threads:"
perf report -i "$data" --no-children --sort comm -g none 2>/dev/null | awk '/%/ && ++n <= 6'
