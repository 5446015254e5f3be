#!/usr/bin/env bash
# The full soak of issue 14: 10,000 requests at 32 concurrency against a real
# `tofy serve` on SmolLM2 (loopback only, at most 60 minutes), the report in
# target/soak.json. Figures go in BENCHMARKS.md. `make test` runs a 30-second
# version (tests/soak.rs). Extra arguments go to scripts/soak.py.
set -euo pipefail
cd "$(dirname "$0")/.."
make --no-print-directory build models
exec python3 scripts/soak.py --tofy target/release/tofy \
    --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
    --requests 10000 --seconds 3600 --concurrency 32 --half-open 64 \
    --json target/soak.json "$@"
