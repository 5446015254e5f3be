#!/usr/bin/env bash
# `make fuzz`: each cargo-fuzz target of fuzz/ for FUZZ_SECONDS (default 60),
# in turn. Needs the nightly toolchain and cargo-fuzz, installed here on first
# use. Not run by CI. The corpus (fuzz/corpus/TARGET) is kept and grows; a
# crash leaves its input in fuzz/artifacts/TARGET/ and stops the run: turn it
# stays there and tests/fuzz_corpus.rs replays it in CI: fix what it breaks.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-60}"
targets=(chat_request prompt_embeds world_tokenizer vocab checkpoint)

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

# No sanitizer: the targets are safe Rust, and what they look for is a panic,
# a hang or a runaway allocation (llama.cpp, linked but never called here,
# stays uninstrumented either way).
for target in "${targets[@]}"; do
    echo "== fuzz $target for ${seconds}s"
    cargo +nightly fuzz run --sanitizer none --release "$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=10 -max_len=65536
done
