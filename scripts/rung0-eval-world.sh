#!/usr/bin/env bash
# Issue 24, rung 0: the embedded world model and its fit-split retrain (target/world-fit, the
# command in docs/conditioning.md rung 0) scored by eval-world on the first 10,000 validation
# pairs, next turns encoded by each model's own encoder. Outputs: docs/results/rung0/eval-world-*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
out=docs/results/rung0
mkdir -p "$out"
target/release/tofy eval-world models/world/model_world_1.51M.safetensors models/world/vocab_world.txt \
    data/chitchat_pairs.valid.tsv --no-teacher --json >"$out/eval-world-embedded.json"
target/release/tofy eval-world target/world-fit/model_world_1.51M.safetensors target/world-fit/vocab_world.txt \
    data/chitchat_pairs.valid.tsv --no-teacher --json >"$out/eval-world-fit.json"
