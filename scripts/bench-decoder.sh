#!/usr/bin/env bash
# Decoder benchmarks, every figure from one run on one machine:
#  - decode and prefill tok/s: tofy (benches/decoder.rs) vs tgbench (a bare llama.h loop
#    on the same llama.cpp sources as the crate) vs llama.cpp's llama-bench;
#  - time to first token: tofy in-process (model loaded) vs the subprocess backend
#    running llama.cpp's llama-completion.
# For SmolLM2-135M Q4_1 and Gemma-3-270M Q4_K_M, same threads everywhere.
# Peers come from ../shared/peers/build-llama-tools.sh (~15 min the first time).
# usage: scripts/bench-decoder.sh [THREADS]   (default: physical cores)
set -euo pipefail
cd "$(dirname "$0")/.."

threads=${1:-$(lscpu -p=CORE,SOCKET | grep -v '^#' | sort -u | wc -l)}
np=128
ng=128
peers=target/peers
tools=${TOFY_PEERS_SCRIPT:-../shared/peers/build-llama-tools.sh}
# The peers get exactly the SIMD that .cargo/config.toml's x86-64-v3 gives tofy's llama.cpp
# (llama-cpp-sys-2 maps rustc's avx/avx2/fma/f16c/bmi2 features to these GGML_* options),
# not -march=native: on the dev VM that enables AMX, whose kernels die with SIGILL.
simd=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
if [ ! -x "$peers/bin/tgbench" ] || [ ! -x "$peers/bin/llama-bench" ]; then
    cargo fetch --locked
    "$tools" "$peers" 0.1.161 0.3.36 -- "${simd[@]}"
fi
scripts/fetch-gguf.sh models/SmolLM2-135M-Instruct.Q4_1.gguf
scripts/fetch-gemma.sh data/gemma-3-270m-q4_k_m.gguf
cargo bench --locked --features train --bench decoder --no-run 2>/dev/null

out=target/bench-decoder.txt
{
    echo "# bench-decoder $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) CPUs ($(lscpu | sed -n 's/^Model name: *//p')), threads=$threads, prefill $np, decode $ng"
    for model in models/SmolLM2-135M-Instruct.Q4_1.gguf data/gemma-3-270m-q4_k_m.gguf; do
        echo "## $model"
        "$peers/bin/tgbench" "$model" 0 "$np" "$ng" "$threads" | sed 's/^/tgbench /'
        TOFY_BENCH_GGUF=$model TOFY_BENCH_THREADS=$threads TOFY_BENCH_NP=$np TOFY_BENCH_NG=$ng \
            TOFY_BENCH_SUBPROCESS_BIN=$peers/bin/llama-completion \
            cargo bench --locked --features train --bench decoder 2>/dev/null
        "$peers/bin/llama-bench" -m "$model" -t "$threads" -p "$np" -n "$ng" -ngl 0 -r 3 -o md 2>/dev/null \
            | sed 's/^/llama-bench /'
    done
} | tee "$out"
echo "written to $out"
