#!/usr/bin/env bash
# The loopback cluster check of issue 16: 3 `tofy serve` replicas on SmolLM2
# behind nginx running deploy/nginx/tofy.conf, 12 agents of 5 turns each,
# replica 2 killed (SIGKILL) and restarted mid-run, a busy replica drained
# (SIGTERM) later; then 3 replicas vs 1 under the same load. The report is in
# target/cluster-check.json; figures go in BENCHMARKS.md. Not part of
# `make test` (about 10 minutes on 2 cores). Extra arguments go to
# scripts/cluster_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --cluster
make --no-print-directory build models
exec python3 scripts/cluster_check.py --tofy target/release/tofy \
    --model models/SmolLM2-135M-Instruct.Q4_1.gguf "$@"
