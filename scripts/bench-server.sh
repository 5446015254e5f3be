#!/usr/bin/env bash
# Server benchmark: aggregate tok/s and p50/p99 time to first token at 1, 4 and 8 concurrent
# streams, `tofy serve --parallel N` vs `llama-server -np N`, same GGUF, same threads, same
# per-sequence context (4096), same run; the two servers take turns at each level.
# Each stream sends R streamed requests back to back (greedy, ignore_eos, max_tokens M), in
# two modes: "chat" (POST /v1/chat/completions, what users send: tofy adds its world-model
# conditioning message, llama-server does not) and "same tokens" (POST /v1/completions with one
# ChatML text holding a conditioning-like system message: both servers evaluate exactly the same
# tokens, which compares the serving engines). A third server, tofy --cond-mode prefix, runs the
# chat mode with its conditioning as K=4 embedding rows instead of ~50 digit tokens ("prefix
# chat", compared with llama-server's chat). scripts/bench-server.py does the requests and the
# statistics.
# Peers come from ../shared/peers/build-llama-tools.sh via scripts/bench-decoder.sh's build.
# usage: scripts/bench-server.sh [THREADS]   (default: physical cores)
#        env: BENCH_LEVELS (default "1 4 8"), BENCH_MAX_TOKENS (128), BENCH_REQUESTS (2),
#             BENCH_ROUNDS (3: each level is run this many times, the servers taking turns
#             first; the summary gives medians, since this VM drifts by 10-15% between runs)
set -euo pipefail
cd "$(dirname "$0")/.."

threads=${1:-$(lscpu -p=CORE,SOCKET | grep -v '^#' | sort -u | wc -l)}
levels=${BENCH_LEVELS:-1 4 8}
max_tokens=${BENCH_MAX_TOKENS:-128}
requests=${BENCH_REQUESTS:-2}
rounds=${BENCH_ROUNDS:-3}
ctx=4096
model=${TOFY_BENCH_GGUF:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
peers=target/peers
tools=${TOFY_PEERS_SCRIPT:-../shared/peers/build-llama-tools.sh}
simd=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
if [ ! -x "$peers/bin/llama-server" ]; then
    cargo fetch --locked
    "$tools" "$peers" 0.1.161 0.3.36 -- "${simd[@]}"
fi
scripts/fetch-gguf.sh models/SmolLM2-135M-Instruct.Q4_1.gguf
cargo build --release --locked --features train
port=18480
out=target/bench-server.jsonl
rm -f "$out"
pid=

stop() { if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=; fi; }
trap stop EXIT
ready() {
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null && return 0
        sleep 0.1
    done
    echo "server on $port did not become ready" >&2
    return 1
}
# What tofy's conditioning message looks like (docs/server.md), fixed numbers.
system="You are Tofy, a helpful assistant. A world model read the user's message and predicted a latent condition for your reply. Use the latent condition to guide the tone, depth and focus of your reply; never mention it or its numbers. Latent condition: chunks=[0.188,0.054,0.099,-0.045,0.000,-0.096,0.031,0.049]"
chat() { # label concurrency
    python3 scripts/bench-server.py --base-url "http://127.0.0.1:$port" --concurrency "$2" \
        --requests-per-stream "$requests" --max-tokens "$max_tokens" --label "$1" --out "$out"
}
bench() { # label concurrency
    chat "$1 chat" "$2"
    python3 scripts/bench-server.py --base-url "http://127.0.0.1:$port" --concurrency "$2" \
        --requests-per-stream "$requests" --max-tokens "$max_tokens" --label "$1 same tokens" \
        --raw-system "$system" --out "$out" | tail -n 1
}

echo "# bench-server $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) CPUs ($(lscpu | sed -n 's/^Model name: *//p')), threads=$threads, $model, max_tokens $max_tokens, $requests requests per stream, $rounds rounds, tofy cache ${TOFY_CACHE_TYPE:-q8_0}"
start_tofy() { # parallel [flags]; text mode (the seed's) unless the flags say otherwise
    JEPA_DECODER_MODEL=$model JEPA_DECODER_NGL=0 JEPA_DECODER_THREADS=$threads \
        target/release/tofy serve "127.0.0.1:$port" --parallel "$1" --ctx "$ctx" --cond-mode text "${@:2}" 2>/dev/null &
    pid=$!
}
start_tofy-prefix() { start_tofy "$1" --cond-mode prefix; }
start_llama-server() {
    "$peers/bin/llama-server" -m "$model" -c $((ctx * $1)) -np "$1" -t "$threads" -tb "$threads" \
        -ngl 0 --host 127.0.0.1 --port "$port" >/dev/null 2>&1 &
    pid=$!
}
for n in $levels; do
    for round in $(seq "$rounds"); do
        # Alternate who goes first, so that the VM's drift does not favour either.
        order="tofy tofy-prefix llama-server"
        if [ $((round % 2)) -eq 0 ]; then order="llama-server tofy-prefix tofy"; fi
        for server in $order; do
            "start_$server" "$n"
            ready
            if [ "$server" = tofy-prefix ]; then
                chat "tofy np=$n prefix chat" "$n" | tail -n 1
            else
                bench "$server np=$n" "$n"
            fi
            stop
        done
    done
done
echo "written to $out; medians over the rounds:"
python3 scripts/bench-server.py --summarize "$out"
